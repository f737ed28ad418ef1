"""The sparse delta file: only what fine-tuning changed, enough to rebuild or undo it bit for bit.

This module is the public face of the delta; it holds no code, only the names users and the CLI import.
The work is done in layers, each importing only the ones below it:

* :mod:`.delta_transfer`: ``apply_delta``/``revert_delta``, one XOR operation run in two directions;
* :mod:`.delta_diff`: ``build_delta``/``save_delta``, a sparse model against its foundation (model → delta);
* :mod:`.delta_format`: ``delta_to_bytes``/``write_delta``, ``read_delta_header``/``decode_delta``/
  ``load_delta``: the file (why it is built as it is: that module's docstring), on
  :mod:`.delta_schema` (safetensors container, header validation), :mod:`.index_codec` and :mod:`.value_codec`;
* :mod:`.delta_types`: ``SparseDelta``/``DeltaEntry``, the delta in memory, shared by the layers above.
"""

from __future__ import annotations

from .delta_diff import build_delta, changed_mask, diff_models, save_delta
from .delta_format import (
    DeltaHeader, decode_delta, delta_from_bytes, delta_to_bytes, header_from_bytes, load_delta, payload_sha256,
    read_delta_header, verify_streams, write_delta,
)
from .delta_schema import FORMAT, FORMAT_VERSION, DeltaFileError
from .delta_transfer import APPLY, REVERT, DeltaLike, DeltaMismatchError, apply_delta, revert_delta, transfer
from .delta_types import DeltaEntry, SparseDelta

__all__ = [
    "APPLY", "FORMAT", "FORMAT_VERSION", "REVERT", "DeltaEntry", "DeltaFileError", "DeltaHeader", "DeltaLike",
    "DeltaMismatchError", "SparseDelta", "apply_delta", "build_delta", "changed_mask", "decode_delta",
    "delta_from_bytes", "delta_to_bytes", "diff_models", "header_from_bytes", "load_delta", "payload_sha256",
    "read_delta_header", "revert_delta", "save_delta", "transfer", "verify_streams", "write_delta",
]
