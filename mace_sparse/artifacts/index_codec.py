"""Compact encodings of the sorted flat indices of the changed entries of one tensor.

The index costs as much as the values in a naive (int64) encoding, which alone would break the size budget
of the delta file (≤ 5 % of the model at ≥ 95 % sparsity). Each tensor therefore gets the smallest of:

* ``all``      every entry changed: nothing stored;
* ``bitmask``  one bit per entry (``numel / 8`` bytes), best for dense changes;
* ``gap_u8`` / ``gap_u16`` / ``gap_u32``  the gaps between consecutive changed indices (minus one; the first
  gap is the first index) as 1/2/4-byte little-endian integers, best for sparse changes.

All encodings are raw ``uint8`` bytes, so the file format does not depend on which integer dtypes a
safetensors or torch version supports. The delta file concatenates them for all tensors and compresses the
result losslessly (:mod:`.value_codec`): random 5 % changes then take ~0.75 B per changed entry (close to the
entropy of the gaps, 0.72 B) instead of 1–2 B.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

ENCODINGS = ("all", "bitmask", "gap_u8", "gap_u16", "gap_u32")
_GAP_DTYPES = {"gap_u8": "<u1", "gap_u16": "<u2", "gap_u32": "<u4"}
#: Bytes per stored gap of each ``gap_*`` encoding (what :mod:`.delta_schema` checks index sizes with).
GAP_WIDTHS = {name: np.dtype(dtype).itemsize for name, dtype in _GAP_DTYPES.items()}


class IndexCodecError(ValueError):
    """Stored index data that cannot describe the claimed changes."""


def encode_indices(indices: np.ndarray, numel: int) -> Tuple[str, bytes]:
    """Pick the smallest encoding of ``indices`` (sorted, unique, in ``[0, numel)``); returns (name, bytes)."""
    indices = np.asarray(indices, dtype=np.int64)
    count = int(indices.size)
    if count == 0:
        raise ValueError("nothing to encode: a tensor without changes is not stored in the delta")
    if count == numel:
        return "all", b""
    candidates = []
    mask = np.zeros(numel, dtype=bool)
    mask[indices] = True
    candidates.append(("bitmask", np.packbits(mask, bitorder="little").tobytes()))
    gaps = np.diff(indices, prepend=-1) - 1
    largest = int(gaps.max())
    for name, dtype in _GAP_DTYPES.items():
        if largest < 2 ** (8 * np.dtype(dtype).itemsize):
            candidates.append((name, gaps.astype(dtype).tobytes()))
            break  # the narrowest gap width that fits is always the smallest gap encoding
    return min(candidates, key=lambda c: len(c[1]))


def decode_indices(encoding: str, data: bytes, numel: int, count: int) -> np.ndarray:
    """Inverse of :func:`encode_indices`; checks that the result has ``count`` valid sorted indices."""
    if encoding == "all":
        indices = np.arange(numel, dtype=np.int64)
    elif encoding == "bitmask":
        if len(data) != (numel + 7) // 8:
            raise IndexCodecError(f"bitmask of {len(data)} bytes cannot describe {numel} entries")
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=numel, bitorder="little")
        indices = np.flatnonzero(bits).astype(np.int64)
    elif encoding in _GAP_DTYPES:
        dtype = np.dtype(_GAP_DTYPES[encoding])
        if len(data) % dtype.itemsize:
            raise IndexCodecError(f"{encoding} index data of {len(data)} bytes is not a whole number of gaps")
        gaps = np.frombuffer(data, dtype=dtype).astype(np.int64)
        indices = np.cumsum(gaps + 1) - 1
    else:
        raise IndexCodecError(f"unknown index encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
    if indices.size != count:
        raise IndexCodecError(f"index data gives {indices.size} entries, metadata says {count}")
    if indices.size and (indices[0] < 0 or indices[-1] >= numel):
        raise IndexCodecError(f"index out of range for a tensor of {numel} entries")
    return indices
