"""The delta file format: a :class:`~.delta_types.SparseDelta` to bytes and back, never trusting the bytes.

This layer knows files and codecs, not models (apart from bounding decoding by a model's tensors): the diff
(:mod:`.delta_diff`) hands it a delta to write and the transfer (:mod:`.delta_transfer`) asks it for one.

Why this format:

* **safetensors**, so that reading a delta (which may come from anyone) never unpickles or executes code;
  only ``apply``/``revert`` load the user's own ``.model`` pickle. Loading runs nothing beyond ``zlib``/``lzma``
  decompression. Delta files are shared like adapters, so the container is parsed by hand and the whole
  header is validated (:mod:`.delta_schema`) before anything is decompressed, every claimed size is checked
  against the stored bytes and (``apply``/``revert``) the model's tensors, and files are written with sorted
  keys so that identical deltas are identical bytes.
* **Only changed entries.** An entry is "changed" when its bits differ between the merged model and the
  foundation (bitwise, not ``!=``: ``W + 0`` turns ``-0.0`` into ``0.0``, and a tiny ΔW can round away).
  Per tensor the file holds the compactly encoded flat indices (:mod:`.index_codec`) and, for the values,
  the bitwise XOR of the new (merged) and old (foundation) bit patterns (:mod:`.value_codec`).
* **Why one XOR array, not ΔW or the values.** ``x = bits(new) ^ bits(old)`` gives both directions exactly
  with no floating-point arithmetic: ``apply`` recovers the new values from the foundation it is given
  (``new = old ^ x``) and ``revert`` the old ones from the merged model (``old = new ^ x``). Storing ``new``
  and ``old`` took two full-precision numbers per changed entry (16 B in float64, twice what the entry costs
  in the ``.model`` file), which broke the size budget (≤ 5 % of the model at ≥ 95 % unchanged) for large
  models. Because fine-tuned values stay close to the foundation's, ``x`` begins with zero bits (sign,
  exponent, leading mantissa); byte-shuffled and compressed (:mod:`.value_codec`) it took 6.2 B per float64
  entry for relative changes around 1e-2, and the compressed indices 0.75 B at 5 % changed, against the
  8 B per parameter of the model file.
* **Fingerprints** (:mod:`.fingerprint`) of the whole foundation state and of the whole merged state:
  ``apply`` refuses a model that is not the foundation, ``revert`` one that is not the merged model, and both
  re-check the result, so they either reproduce the exact model or write nothing. (They also make sure the
  XOR is applied to the very values it was computed against.)
* **payload_sha256** over all metadata and (stored, compressed) tensors: a modified or damaged file is refused
  before anything is decompressed.
* **Layout metadata** (per-layer/path/element counts, final δ, λ_τ, targets): the report works from the
  file alone.

Tensors in the file, all ``uint8``: ``index`` (the encoded indices of all tensors, concatenated, then
compressed) and ``xor.<dtype>`` (the XOR bytes of all entries of that dtype, concatenated, byte-shuffled and
compressed). The metadata ``streams`` table gives each stored tensor's codec, dtype, element count and
element width (so its exact decompressed size); the ``entries`` table gives each model tensor's shape,
dtype, index encoding, count and offsets into the decompressed streams.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch

from .atomic import PathLike, atomic_write_bytes
from .delta_schema import (
    ENTRY_COLUMNS, FORMAT_VERSION, JSON_KEYS, STREAM_COLUMNS, DeltaFileError, check_against_model,
    container_bytes, layer_columns, read_container, update_with_stored, validate_header,
)
from .delta_types import DeltaEntry, DeltaInfo, SparseDelta
from .fingerprint import update_with_tensor
from .index_codec import IndexCodecError, decode_indices, encode_indices
from .value_codec import (
    ValueCodecError, check_stream_size, compress, decompress, element_width, shuffle, unshuffle,
)

#: Bytes hashed or copied per read of a delta file: the payload hash never holds the file in memory.
_CHUNK = 1 << 20
_PAYLOAD_PREFIX = b"mace-sparse delta payload v1\0"


@dataclasses.dataclass
class DeltaHeader(DeltaInfo):
    """A delta file whose container, payload hash and whole header passed every check; nothing decompressed.

    ``metadata`` is what :class:`~.delta_types.SparseDelta` holds; the validated tables are kept apart
    (``checked``) for :func:`decode_delta`, which reads and decompresses the streams, bounded by a model when
    it is given one.
    """

    where: str
    metadata: Dict[str, Any]
    checked: Dict[str, Any]
    stored: Dict[str, Tuple[int, int]]
    read: Callable[[int, int], bytes]


# ------------------------------------------------------------------------------------------ payload hash


def _metadata_digest(metadata: Mapping[str, str]) -> "hashlib._Hash":
    """The payload hash fed with every metadata item but the hash itself, in sorted order (tensors follow)."""
    digest = hashlib.sha256(_PAYLOAD_PREFIX)
    for key in sorted(metadata):
        if key != "payload_sha256":
            digest.update(f"{key}\0{metadata[key]}\0".encode("utf-8"))
    return digest


def payload_sha256(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every metadata item (except the hash itself) and every tensor, in sorted order."""
    digest = _metadata_digest(metadata)
    for name in sorted(tensors):
        update_with_tensor(digest, name, tensors[name])
    return digest.hexdigest()


def _chunks(read: Callable[[int, int], bytes], offset: int, size: int) -> Iterator[bytes]:
    for position in range(offset, offset + size, _CHUNK):
        yield read(position, min(_CHUNK, offset + size - position))


# ---------------------------------------------------------------------------------------------- writing


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise DeltaFileError(f"unknown dtype {name!r} in the delta metadata")
    return dtype


def _encode_metadata(metadata: Mapping[str, Any]) -> Dict[str, str]:
    """Metadata as safetensors strings: JSON for :data:`~.delta_schema.JSON_KEYS`, layers stored columnar."""
    raw = {}
    for key, value in metadata.items():
        if key == "layers":
            columns = layer_columns(value)
            value = {"columns": list(columns), "rows": [[r.get(c) for c in columns] for r in value]}
        raw[key] = json.dumps(value, separators=(",", ":")) if key in JSON_KEYS else str(value)
    return raw


def delta_to_bytes(delta: SparseDelta) -> bytes:
    """Serialise a delta to safetensors bytes (metadata gets the entry and stream tables and the payload hash).

    All index bytes go into one ``index`` stream and all XOR bytes of one dtype into one ``xor.<dtype>`` stream,
    addressed by offsets in the entry table: a safetensors header line per model tensor would otherwise cost
    more than the changes themselves in a small, very sparse delta, and one long stream compresses better.
    """
    index_parts: List[bytes] = []
    index_offset = 0
    xor_parts: Dict[str, List[torch.Tensor]] = {}
    value_offset: Dict[str, int] = {}
    rows = []
    for name, entry in sorted(delta.entries.items()):
        encoding, data = encode_indices(entry.indices.numpy(), entry.numel)
        dtype = _dtype_name(entry.dtype)
        width = element_width(entry.dtype)
        if tuple(entry.xor.shape) != (entry.count, width) or entry.xor.dtype != torch.uint8:
            raise ValueError(f"{name}: XOR data of shape {tuple(entry.xor.shape)} for {entry.count} {dtype} entries")
        start = value_offset.get(dtype, 0)
        rows.append([name, list(entry.shape), dtype, encoding, entry.count, bool(entry.parameter),
                     index_offset, len(data), start])
        index_parts.append(data)
        index_offset += len(data)
        xor_parts.setdefault(dtype, []).append(entry.xor)
        value_offset[dtype] = start + entry.count
    tensors: Dict[str, torch.Tensor] = {}
    stored_bytes: Dict[str, bytes] = {}
    streams = []

    def add_stream(tensor_name: str, raw: bytes, dtype: str, count: int, width: int) -> None:
        codec, stored = compress(raw)
        stored_bytes[tensor_name] = stored
        tensors[tensor_name] = torch.frombuffer(bytearray(stored), dtype=torch.uint8) if stored else \
            torch.zeros(0, dtype=torch.uint8)
        streams.append([tensor_name, codec, dtype, count, width])

    blob = b"".join(index_parts)
    if blob:
        add_stream("index", blob, "uint8", len(blob), 1)
    for dtype, parts in xor_parts.items():
        planes = torch.cat(parts)
        add_stream(f"xor.{dtype}", shuffle(planes), dtype, int(planes.shape[0]), int(planes.shape[1]))
    metadata = {k: v for k, v in delta.metadata.items() if k not in ("entries", "streams", "payload_sha256")}
    metadata["entries"] = {"columns": list(ENTRY_COLUMNS), "rows": rows}
    metadata["streams"] = {"columns": list(STREAM_COLUMNS), "rows": streams}
    raw = _encode_metadata(metadata)
    raw["payload_sha256"] = payload_sha256(raw, tensors)
    return container_bytes(stored_bytes, raw)  # sorted keys: identical deltas are identical bytes


def write_delta(delta: SparseDelta, path: PathLike) -> Path:
    """Write a delta file atomically (temp file + rename)."""
    return atomic_write_bytes(path, delta_to_bytes(delta))


# ---------------------------------------------------------------------------------------------- reading


def _checked_header(raw: Dict[str, str], stored: Dict[str, Tuple[int, int]], read: Callable[[int, int], bytes],
                    where: str) -> DeltaHeader:
    """Version, payload hash (streamed), then the whole header schema: a :class:`DeltaHeader` or one error."""
    if raw.get("format_version") != FORMAT_VERSION:
        raise DeltaFileError(
            f"{where} has delta format version {raw.get('format_version')!r}; this mace-sparse reads "
            f"version {FORMAT_VERSION}"
        )
    digest = _metadata_digest(raw)
    for name in sorted(stored):
        offset, size = stored[name]
        update_with_stored(digest, name, size, _chunks(read, offset, size))
    if not raw.get("payload_sha256") or digest.hexdigest() != raw["payload_sha256"]:
        raise DeltaFileError(f"{where} failed its integrity check (payload sha256 mismatch): modified or corrupted")
    checked = validate_header(raw, stored, where)
    metadata = {k: v for k, v in checked.items() if not k.startswith("_")}
    return DeltaHeader(where=where, metadata=metadata, checked=checked, stored=stored, read=read)


def read_delta_header(path: PathLike) -> DeltaHeader:
    """Open a delta file and check everything but the compressed streams, in memory bounded by its header.

    ``mace_sparse report`` needs no more; ``apply``/``revert`` decode the streams only once the model they
    act on has been checked against the header (:func:`decode_delta`).
    """
    path = Path(path)
    if path.is_dir():
        raise DeltaFileError(f"{path} is a directory, not a delta file; give the path of a "
                             "<name>_sparse_delta.safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"no such delta file: {path}")

    def read(offset: int, size: int) -> bytes:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(size)

    with open(path, "rb") as handle:
        raw, stored = read_container(handle, path.stat().st_size, str(path))
    return _checked_header(raw, stored, read, str(path))


def header_from_bytes(data: bytes, where: str = "delta file") -> DeltaHeader:
    """:func:`read_delta_header` for delta bytes held in memory."""
    view = memoryview(data)
    raw, stored = read_container(io.BytesIO(data), len(data), where)
    return _checked_header(raw, stored, lambda offset, size: view[offset : offset + size], where)


def verify_streams(header: DeltaHeader) -> None:
    """Check that every stream decodes to the size its header claims, in memory independent of that size."""
    for name, info in header.checked["_streams"].items():
        offset, size = header.stored[name]
        try:
            nonzero = check_stream_size(info["codec"], _chunks(header.read, offset, size), info["count"] * info["width"])
        except ValueCodecError as exc:
            raise DeltaFileError(f"{header.where} has inconsistent contents (stream {name!r}: {exc})") from exc
        if name != "index" and info["count"] and not nonzero:
            raise DeltaFileError(f"{header.where}: stream {name!r} decodes to zeros only, i.e. its {info['count']} "
                                 "'changed' entries change nothing; not a delta file (crafted or damaged)")


def decode_delta(header: DeltaHeader, model: Optional[torch.nn.Module] = None) -> SparseDelta:
    """Decompress and decode the streams of a checked header into a :class:`~.delta_types.SparseDelta`.

    With ``model``, every entry must first name one of its tensors with the same shape and dtype
    (:func:`~.delta_schema.check_against_model`), so nothing larger than that model is ever decoded.
    """
    where, checked = header.where, header.checked
    if model is not None:
        check_against_model(checked, model.state_dict(), where)
    try:
        streams: Dict[str, Any] = {}
        for name, info in checked["_streams"].items():
            offset, size = header.stored[name]
            data = decompress(info["codec"], bytes(header.read(offset, size)), info["count"] * info["width"])
            streams[name] = data if name == "index" else unshuffle(data, info["count"], info["width"])
        blob = streams.get("index", b"")
        entries = {}
        for info in checked["_entries"]:
            start, count = info["index_offset"], info["count"]
            indices = decode_indices(info["encoding"], blob[start : start + info["index_bytes"]], info["numel"], count)
            entries[info["name"]] = DeltaEntry(
                name=info["name"],
                shape=tuple(info["shape"]),
                dtype=_dtype_from_name(info["dtype"]),
                indices=torch.from_numpy(np.ascontiguousarray(indices)),
                xor=streams[f"xor.{info['dtype']}"][info["value_offset"] : info["value_offset"] + count].clone(),
                parameter=info["parameter"],
            )
    except (IndexCodecError, ValueCodecError) as exc:
        raise DeltaFileError(f"{where} has inconsistent contents ({type(exc).__name__}: {exc})") from exc
    return SparseDelta(entries=entries, metadata=copy.deepcopy(header.metadata))


def delta_from_bytes(data: bytes, where: str = "delta file") -> SparseDelta:
    """Parse and verify delta bytes; raises :class:`~.delta_schema.DeltaFileError` for anything not intact."""
    return decode_delta(header_from_bytes(data, where))


def load_delta(path: PathLike, model: Optional[torch.nn.Module] = None) -> SparseDelta:
    """Read and verify a delta file (no code is executed; the whole header is checked before anything is used).

    Pass the ``model`` the delta is for (foundation or fine-tuned) to bound decoding by its tensors: without
    it a file from someone else is decoded as large as its (self-consistent) header claims.
    """
    return decode_delta(read_delta_header(path), model)
