"""The sparse delta file: only what fine-tuning changed, enough to rebuild or undo it bit for bit.

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
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from .atomic import PathLike, atomic_write_bytes
from .delta_schema import (
    ENTRY_COLUMNS, FORMAT, FORMAT_VERSION, JSON_KEYS, LAYER_COLUMNS, STREAM_COLUMNS, DeltaFileError,
    check_against_model, container_bytes, read_container, update_with_stored, validate_header,
)
from .fingerprint import model_fingerprint, update_with_tensor
from .index_codec import IndexCodecError, decode_indices, encode_indices
from .value_codec import (
    ValueCodecError, apply_xor, check_stream_size, compress, decompress, element_width, shuffle, unshuffle, xor_bits,
)

# The format's constants, DeltaFileError and the header schema live in .delta_schema (imported above, so that
# `from mace_sparse.artifacts.delta_file import FORMAT, DeltaFileError, ...` keeps working).


class DeltaMismatchError(ValueError):
    """The delta is intact but belongs to another model than the one it is applied to."""


@dataclasses.dataclass
class DeltaEntry:
    """The changed entries of one state-dict tensor.

    Attributes:
        name: state-dict name (``interactions.0.linear.weight``).
        shape: full shape of the tensor.
        dtype: its dtype.
        indices: sorted flat indices (int64) of the changed entries.
        xor: ``bits(new) ^ bits(old)`` at ``indices`` as a ``(count, element width)`` uint8 tensor, where
            ``new`` is the merged (fine-tuned) value and ``old`` the foundation's; see :meth:`other_values`.
        parameter: whether the tensor is a parameter (counted in the sparsity figures) or a buffer.
    """

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    indices: torch.Tensor
    xor: torch.Tensor
    parameter: bool = True

    @property
    def count(self) -> int:
        return int(self.indices.numel())

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def other_values(self, values: torch.Tensor) -> torch.Tensor:
        """The values at ``indices`` on the other side of the delta, bit for bit (CPU, 1-D, ``dtype``).

        Given the foundation's values at ``indices`` it returns the merged model's, and given the merged
        model's it returns the foundation's (XOR is its own inverse).
        """
        if values.dtype != self.dtype:
            raise ValueError(f"{self.name}: values of dtype {values.dtype}, the delta holds {self.dtype}")
        return apply_xor(values, self.xor)

    def new_values(self, foundation_tensor: torch.Tensor) -> torch.Tensor:
        """The merged model's values at ``indices``, from the whole foundation tensor."""
        return self.other_values(foundation_tensor.detach().to("cpu").reshape(-1)[self.indices])

    def old_values(self, merged_tensor: torch.Tensor) -> torch.Tensor:
        """The foundation's values at ``indices``, from the whole merged-model tensor."""
        return self.other_values(merged_tensor.detach().to("cpu").reshape(-1)[self.indices])


class _DeltaInfo:
    """The figures every delta (header only, or decoded) answers from its metadata."""

    metadata: Dict[str, Any]

    @property
    def foundation_fingerprint(self) -> str:
        return str(self.metadata["foundation_fingerprint"])

    @property
    def merged_fingerprint(self) -> str:
        return str(self.metadata["merged_fingerprint"])

    @property
    def layers(self) -> List[dict]:
        return list(self.metadata.get("layers", []))

    @property
    def changed_entries(self) -> int:
        return int(self.metadata["changed_entries"])

    @property
    def total_entries(self) -> int:
        return int(self.metadata["total_entries"])


@dataclasses.dataclass
class SparseDelta(_DeltaInfo):
    """A loaded (or freshly built) delta: changed entries per tensor plus decoded metadata."""

    entries: Dict[str, DeltaEntry]
    metadata: Dict[str, Any]


@dataclasses.dataclass
class DeltaHeader(_DeltaInfo):
    """A delta file whose container, payload hash and whole header passed every check; nothing decompressed.

    ``metadata`` is what :class:`SparseDelta` holds; the validated tables are kept apart (``checked``) for
    :func:`decode_delta`, which reads and decompresses the streams, bounded by a model when it is given one.
    """

    where: str
    metadata: Dict[str, Any]
    checked: Dict[str, Any]
    stored: Dict[str, Tuple[int, int]]
    read: Callable[[int, int], bytes]


# ------------------------------------------------------------------------------------------------ diffing


def changed_mask(foundation: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """Boolean mask (of the tensor's shape) of entries whose bits differ; works for every dtype."""
    a = foundation.detach().to("cpu").contiguous().reshape(-1)
    b = merged.detach().to("cpu").contiguous().reshape(-1)
    if a.numel() == 0:
        return torch.zeros(foundation.shape, dtype=torch.bool)
    size = a.element_size()
    bits_a = a.view(torch.uint8).view(-1, size)
    bits_b = b.view(torch.uint8).view(-1, size)
    return (bits_a != bits_b).any(dim=1).view(foundation.shape)


def diff_models(
    foundation: torch.nn.Module, merged: torch.nn.Module
) -> Tuple[Dict[str, DeltaEntry], Dict[str, torch.Tensor]]:
    """Changed entries of every state-dict tensor (parameters and buffers) and their masks."""
    state_f = foundation.state_dict()
    state_m = merged.state_dict()
    if set(state_f) != set(state_m):
        missing = sorted(set(state_f) ^ set(state_m))
        raise ValueError(f"the models have different state-dict entries (e.g. {missing[0]!r}); not one fine-tune")
    parameter_names = {name for name, _ in merged.named_parameters()}
    entries: Dict[str, DeltaEntry] = {}
    masks: Dict[str, torch.Tensor] = {}
    for name in sorted(state_f):
        old_t, new_t = state_f[name], state_m[name]
        if old_t.shape != new_t.shape or old_t.dtype != new_t.dtype:
            raise ValueError(
                f"{name}: {tuple(old_t.shape)} {old_t.dtype} in the foundation but "
                f"{tuple(new_t.shape)} {new_t.dtype} in the merged model"
            )
        mask = changed_mask(old_t, new_t)
        if not bool(mask.any()):
            continue
        indices = torch.nonzero(mask.reshape(-1), as_tuple=False).reshape(-1)
        entries[name] = DeltaEntry(
            name=name,
            shape=tuple(old_t.shape),
            dtype=old_t.dtype,
            indices=indices,
            xor=xor_bits(new_t.detach().to("cpu").reshape(-1)[indices],
                         old_t.detach().to("cpu").reshape(-1)[indices]),
            parameter=name in parameter_names,
        )
        masks[name] = mask
    return entries, masks


# ---------------------------------------------------------------------------------------------- building


def _package_version(dist: str, module: str) -> str:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        imported = __import__(module)
        return str(getattr(imported, "__version__", "unknown"))


def build_delta(
    sparse_model: torch.nn.Module,
    merged: Optional[torch.nn.Module] = None,
    foundation: Optional[torch.nn.Module] = None,
) -> SparseDelta:
    """The delta of a sparse-trainable model against its own foundation (nothing written).

    Args:
        sparse_model: the model made by :func:`~mace_sparse.get_sparse_model` (before merging).
        merged: its merged plain model if already made (``merge_and_unload(copy.deepcopy(m))`` otherwise).
        foundation: its plain foundation if already made (:func:`~mace_sparse.artifacts.foundation.foundation_of`
            otherwise).
    """
    from .. import __version__
    from ..sparse_model import is_sparse_model, merge_and_unload, sparse_config_of
    from .foundation import foundation_of
    from .layout import layer_records

    model = getattr(sparse_model, "module", sparse_model)
    if not is_sparse_model(model):
        raise ValueError(
            "save_delta() needs the sparse-trainable model: call it before merge_and_unload() "
            "(or on the model get_sparse_model() returned)"
        )
    if foundation is None:
        foundation = foundation_of(model)
    if merged is None:
        merged = merge_and_unload(copy.deepcopy(model))
    entries, masks = diff_models(foundation, merged)
    layers = layer_records(model, foundation, masks)
    config = sparse_config_of(model)
    atomic_numbers = getattr(foundation, "atomic_numbers", None)
    metadata: Dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mace_sparse_version": __version__,
        "mace_torch_version": _package_version("mace-torch", "mace"),
        "torch_version": torch.__version__,
        "foundation_fingerprint": model_fingerprint(foundation),
        "merged_fingerprint": model_fingerprint(merged),
        "targets": list(config.targets),
        "granularity": config.granularity,
        "threshold_weight_decay": float(config.threshold_weight_decay),
        "sparse_config": config.to_dict(),
        "atomic_numbers": [int(z) for z in atomic_numbers.tolist()] if atomic_numbers is not None else [],
        "heads": list(getattr(foundation, "heads", None) or ["Default"]),
        "changed_entries": sum(e.count for e in entries.values() if e.parameter),
        "total_entries": sum(p.numel() for p in merged.parameters()),
        "adapted_entries": sum(r["size"] for r in layers),
        "changed_adapted_entries": sum(r["changed"] for r in layers),
        "layers": layers,
    }
    from ..sparse_model import DERIVATION_ATTR

    if model.__dict__.get(DERIVATION_ATTR) is not None:
        metadata["derivation"] = model.__dict__[DERIVATION_ATTR]
    return SparseDelta(entries=entries, metadata=metadata)


# ------------------------------------------------------------------------------------------ serialising


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise DeltaFileError(f"unknown dtype {name!r} in the delta metadata")
    return dtype


def payload_sha256(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every metadata item (except the hash itself) and every tensor, in sorted order."""
    digest = hashlib.sha256(b"mace-sparse delta payload v1\0")
    for key in sorted(metadata):
        if key == "payload_sha256":
            continue
        digest.update(f"{key}\0{metadata[key]}\0".encode("utf-8"))
    for name in sorted(tensors):
        update_with_tensor(digest, name, tensors[name])
    return digest.hexdigest()


def _layers_to_columns(layers: List[dict]) -> dict:
    return {"columns": list(LAYER_COLUMNS), "rows": [[r.get(c) for c in LAYER_COLUMNS] for r in layers]}


def _encode_metadata(metadata: Mapping[str, Any]) -> Dict[str, str]:
    raw = {}
    for key, value in metadata.items():
        if key == "layers":
            value = _layers_to_columns(value)
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


def save_delta(
    sparse_model: torch.nn.Module,
    path: PathLike,
    merged: Optional[torch.nn.Module] = None,
    foundation: Optional[torch.nn.Module] = None,
) -> SparseDelta:
    """Write ``path`` (``*.safetensors``) with the delta of ``sparse_model``; returns the delta.

    Like peft's ``save_pretrained`` for an adapter: call it on the sparse-trainable model (before or instead of
    ``merge_and_unload``). ``merged``/``foundation`` skip recomputing them when the caller already has them.
    """
    delta = build_delta(sparse_model, merged=merged, foundation=foundation)
    write_delta(delta, path)
    return delta


# --------------------------------------------------------------------------------------------- loading


#: Bytes hashed or copied per read of a delta file: the payload hash never holds the file in memory.
_CHUNK = 1 << 20


def _chunks(read: Callable[[int, int], bytes], offset: int, size: int) -> Iterator[bytes]:
    for position in range(offset, offset + size, _CHUNK):
        yield read(position, min(_CHUNK, offset + size - position))


def _checked_header(raw: Dict[str, str], stored: Dict[str, Tuple[int, int]], read: Callable[[int, int], bytes],
                    where: str) -> DeltaHeader:
    """Version, payload hash (streamed), then the whole header schema: a :class:`DeltaHeader` or one error."""
    if raw.get("format_version") != FORMAT_VERSION:
        raise DeltaFileError(
            f"{where} has delta format version {raw.get('format_version')!r}; this mace-sparse reads "
            f"version {FORMAT_VERSION}"
        )
    digest = hashlib.sha256(b"mace-sparse delta payload v1\0")
    for key in sorted(raw):
        if key != "payload_sha256":
            digest.update(f"{key}\0{raw[key]}\0".encode("utf-8"))
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
    """Decompress and decode the streams of a checked header into a :class:`SparseDelta`.

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
    """Parse and verify delta bytes; raises :class:`DeltaFileError` for anything not intact."""
    return decode_delta(header_from_bytes(data, where))


def load_delta(path: PathLike, model: Optional[torch.nn.Module] = None) -> SparseDelta:
    """Read and verify a delta file (no code is executed; the whole header is checked before anything is used).

    Pass the ``model`` the delta is for (foundation or fine-tuned) to bound decoding by its tensors: without
    it a file from someone else is decoded as large as its (self-consistent) header claims.
    """
    return decode_delta(read_delta_header(path), model)


# ------------------------------------------------------------------------------------- applying, reverting


DeltaLike = Union[SparseDelta, DeltaHeader, PathLike]


def _as_header(delta: DeltaLike) -> Union[SparseDelta, DeltaHeader]:
    """A decoded delta as given, else its checked header (decoded later, against the model)."""
    return delta if isinstance(delta, (SparseDelta, DeltaHeader)) else read_delta_header(delta)


def _decoded(delta: Union[SparseDelta, DeltaHeader], model: torch.nn.Module) -> SparseDelta:
    return delta if isinstance(delta, SparseDelta) else decode_delta(delta, model)


def _check_fingerprint(model: torch.nn.Module, expected: str, role: str, hint: str) -> None:
    got = model_fingerprint(model)
    if got != expected:
        raise DeltaMismatchError(
            f"this delta was made for a different {role} (fingerprint {expected[:12]}…, "
            f"given model {got[:12]}…); {hint}"
        )


@torch.no_grad()
def _flip_values(model: torch.nn.Module, delta: SparseDelta) -> None:
    """XOR the changed entries of ``model`` in place: foundation → merged model, or merged model → foundation.

    Every tensor is checked before any is changed, so a mismatch leaves the model as it was.
    """
    state = model.state_dict(keep_vars=True)
    for name, entry in delta.entries.items():
        tensor = state.get(name)
        if tensor is None or tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise DeltaMismatchError(f"the model has no tensor {name} of shape {entry.shape} and dtype {entry.dtype}")
    for name, entry in delta.entries.items():
        target = state[name].detach()
        flat = target.reshape(-1).clone()
        index = entry.indices.to(flat.device)
        flat[index] = entry.other_values(flat[index]).to(flat.device)
        target.copy_(flat.view(target.shape))


def apply_delta(
    foundation_model: torch.nn.Module, delta: DeltaLike, inplace: bool = False
) -> torch.nn.Module:
    """The fine-tuned (merged) model, rebuilt from its foundation and the delta, bit for bit.

    Refuses (:class:`DeltaMismatchError`) a model that is not the delta's foundation, before changing anything
    (and, for a file or header, before decompressing anything). Returns a new model unless ``inplace``.
    """
    delta = _as_header(delta)
    derived = _replayed_derivation(foundation_model, delta)
    if derived is not None:
        foundation_model, inplace = derived, True
    _check_fingerprint(
        foundation_model,
        delta.foundation_fingerprint,
        "foundation",
        "give the foundation the run started from (`mace_sparse revert` rebuilds it from the fine-tuned model)",
    )
    delta = _decoded(delta, foundation_model)
    model = foundation_model if inplace else copy.deepcopy(foundation_model)
    _flip_values(model, delta)  # new = old ^ x
    _check_fingerprint(model, delta.merged_fingerprint, "result", "the delta file is inconsistent")
    return model


def _replayed_derivation(model: torch.nn.Module, delta: SparseDelta) -> Optional[torch.nn.Module]:
    """The model the run trained, rebuilt from the user's foundation file when ``model`` is that file.

    ``None`` when ``model`` already is the derived model, or is not the recorded source (then the usual refusal
    follows). A replay that does not reproduce the recorded model bit for bit is refused here.
    """
    derivation = delta.metadata.get("derivation")
    if not derivation:
        return None
    fingerprint = model_fingerprint(model)
    if fingerprint == delta.foundation_fingerprint or fingerprint != derivation.get("source_fingerprint"):
        return None
    from .derivation import describe, replay_derivation

    derived = replay_derivation(model, derivation)
    if model_fingerprint(derived) != delta.foundation_fingerprint:
        raise DeltaMismatchError(
            f"replaying how MACE derived the trained model ({describe(derivation)}) did not reproduce it; "
            "give the derived model instead (`mace_sparse revert` rebuilds it from the fine-tuned model)"
        )
    return derived


def revert_delta(
    model: torch.nn.Module, delta: DeltaLike, inplace: bool = False
) -> torch.nn.Module:
    """The foundation, recovered from the fine-tuned (merged) model and the delta, bit for bit.

    Refuses (:class:`DeltaMismatchError`) a model that is not the delta's merged model. Returns a new model
    unless ``inplace``.
    """
    delta = _as_header(delta)
    _check_fingerprint(
        model,
        delta.merged_fingerprint,
        "fine-tuned model",
        "give the .model file written by the same run as this delta",
    )
    delta = _decoded(delta, model)
    result = model if inplace else copy.deepcopy(model)
    _flip_values(result, delta)  # old = new ^ x
    _check_fingerprint(result, delta.foundation_fingerprint, "result", "the delta file is inconsistent")
    return result
