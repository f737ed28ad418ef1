"""The delta file's container and header: read and written byte for byte here, validated before any use.

Delta files are shared like adapters, so a file may be crafted. Everything a reader allocates is derived from
the header, which is therefore checked as a whole against a schema before anything is decompressed or
written (issue 15, items 11–14):

* **container** (:func:`read_container`): the safetensors layout (8-byte header length, JSON header, one
  contiguous data section) is parsed here, not by ``safetensors.load``, so that a pickle or zip renamed
  ``.safetensors`` is called "not a safetensors file" (not "truncated"), the header is bounded
  (:data:`MAX_HEADER_BYTES`) and tensor bytes are read from the file only when needed.
* **schema** (:func:`validate_header`): every metadata key, its type and range, the layer, entry and stream
  tables, and the arithmetic that ties them together (counts, offsets, index sizes per encoding, totals), so a
  malformed header gets one line naming the key instead of a ``KeyError`` halfway through ``apply``.
* **sizes**: a stream may not claim more decompressed bytes than its codec can produce from the stored bytes
  (:data:`MAX_RATIO`), nor store much more than it claims. :func:`check_against_model` ties every entry to a
  tensor of the model it is applied to, so decompression is bounded by that model's size.
* **writing** (:func:`container_bytes`): metadata keys and tensors in sorted order, so identical deltas are
  identical bytes (safetensors' writer orders metadata by hash map, different in every process).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from typing import Any, BinaryIO, Dict, List, Mapping, Optional, Tuple

from .index_codec import ENCODINGS as INDEX_ENCODINGS
from .index_codec import GAP_WIDTHS

FORMAT = "mace-sparse-delta"
#: 1: ``new.<dtype>``/``old.<dtype>`` value arrays (never released); 2: one compressed XOR stream per dtype.
FORMAT_VERSION = "2"
#: Metadata values stored as JSON (everything else is a plain string).
REQUIRED_JSON_KEYS = ("targets", "threshold_weight_decay", "sparse_config", "atomic_numbers", "entries", "streams",
                      "layers", "changed_entries", "total_entries", "adapted_entries", "changed_adapted_entries")
#: JSON keys that files written before multihead support lack: ``heads`` (readout heads of the fine-tuned model)
#: and ``derivation`` (how MACE derived the trained model from the user's file; ``.derivation``).
OPTIONAL_JSON_KEYS = ("heads", "derivation")
JSON_KEYS = REQUIRED_JSON_KEYS + OPTIONAL_JSON_KEYS
#: Columns of the per-layer records as stored (columnar: the keys are not repeated for every layer).
LAYER_COLUMNS = ("name", "kind", "shape", "size", "changed", "threshold_granularity", "path_labels", "path_size",
                 "path_changed", "path_threshold", "element_size", "element_changed", "head_size", "head_changed")
#: The layer columns of files written before the per-head counts.
LEGACY_LAYER_COLUMNS = LAYER_COLUMNS[:-2]
#: The layer columns of a file with per-element thresholds (``--sparse_threshold_granularity element``): one more,
#: ``element_threshold``, written only when some layer has it, so that layer/path files keep their exact bytes.
ELEMENT_LAYER_COLUMNS = LAYER_COLUMNS + ("element_threshold",)
#: Every layer-column layout a reader accepts, newest first.
KNOWN_LAYER_COLUMNS = (ELEMENT_LAYER_COLUMNS, LAYER_COLUMNS, LEGACY_LAYER_COLUMNS)
#: ``threshold_granularity`` of a layer: one δ per tensor, per irrep path, or per chemical element.
THRESHOLD_GRANULARITIES = ("layer", "path", "element")


def layer_columns(layers: List[Mapping[str, Any]]) -> Tuple[str, ...]:
    """The columns to store ``layers`` with: :data:`ELEMENT_LAYER_COLUMNS` only if a layer has per-element δ."""
    return ELEMENT_LAYER_COLUMNS if any(r.get("element_threshold") is not None for r in layers) else LAYER_COLUMNS
#: Entry table: one row per changed tensor. ``index_offset``/``index_bytes`` address bytes of the decompressed
#: ``index`` stream, ``value_offset`` elements of the ``xor.<dtype>`` stream.
ENTRY_COLUMNS = ("name", "shape", "dtype", "encoding", "count", "parameter", "index_offset", "index_bytes",
                 "value_offset")
#: Stream table: one row per stored tensor (``index``, ``xor.<dtype>``), ``count`` elements of ``width`` bytes.
STREAM_COLUMNS = ("tensor", "codec", "dtype", "count", "width")
#: Bytes per element of the dtypes a state dict may hold (kept here so that validation needs no torch).
DTYPE_WIDTHS = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "complex128": 16, "complex64": 8,
                "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1}
#: Largest header accepted. A MACE-MP-medium-sized delta has a header below 1 MB; safetensors itself allows 100 MB,
#: which parsed into Python objects could take gigabytes.
MAX_HEADER_BYTES = 16 << 20
#: Most decompressed bytes per stored byte each codec can produce. deflate's format limit is 1032:1 (measured
#: 1029 on zeros); xz measured 6851:1 on 256 MiB of zeros (LZMA2 chunk overhead caps it); the bound leaves 2.4x.
MAX_RATIO = {"raw": 1, "zlib": 1032, "lzma": 1 << 14}
#: A compressed stream is never much larger than its input (deflate +0.03 %, xz +0.1 %, plus headers).
_STORED_SLACK = (1.01, 4096)
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
_ZIP_MAGIC, _PICKLE_MAGIC = b"PK\x03\x04", b"\x80"


class DeltaFileError(ValueError):
    """The file is not an intact mace-sparse delta (truncated, modified, malformed, or another format)."""


# --------------------------------------------------------------------------------------------- container


def read_container(handle: BinaryIO, file_size: int, where: str) -> Tuple[Dict[str, str], Dict[str, Tuple[int, int]]]:
    """``(metadata, {tensor: (absolute offset, stored bytes)})`` of a safetensors file, reading only its header.

    Every tensor must be ``uint8`` and 1-D, and the data section must be covered exactly, as safetensors requires.
    """
    start = handle.read(8)
    if len(start) < 8:
        raise DeltaFileError(f"{where} is truncated or not a safetensors file ({len(start)} bytes)")
    (size,) = struct.unpack("<Q", start)
    if size > file_size - 8 or size > MAX_HEADER_BYTES:
        first = handle.read(1) if size <= file_size - 8 or file_size > 8 else b""
        if start.startswith(_ZIP_MAGIC) or start.startswith(_PICKLE_MAGIC) or (file_size > 8 and first != b"{"):
            kind = ("a zip archive (a torch.save file such as a .model?)" if start.startswith(_ZIP_MAGIC) else
                    "a Python pickle" if start.startswith(_PICKLE_MAGIC) else "of another format")
            raise DeltaFileError(f"{where} is not a safetensors file (it is {kind}); give the "
                                 "<name>_sparse_delta.safetensors file a sparse_str run wrote")
        if size > MAX_HEADER_BYTES:
            raise DeltaFileError(f"{where} has a {size}-byte header, more than a delta has ({MAX_HEADER_BYTES}); "
                                 "not a delta file")
        raise DeltaFileError(f"{where} is truncated: its header needs {size} bytes, the file has {file_size - 8}")
    text = handle.read(size)
    if not text.lstrip().startswith(b"{"):
        raise DeltaFileError(f"{where} is not a safetensors file (no JSON header); give a delta file")
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: crafted nesting
        raise DeltaFileError(f"{where} has a corrupted header ({exc.__class__.__name__}); not a delta file") from None
    metadata = header.pop("__metadata__", None) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise DeltaFileError(f"{where} is not a mace-sparse delta file (no '{FORMAT}' metadata)")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise DeltaFileError(f"{where}: safetensors metadata values must be strings")
    tensors: Dict[str, Tuple[int, int]] = {}
    spans = []
    for name, info in header.items():
        ok = isinstance(info, dict) and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
        offsets = info["data_offsets"] if ok else []
        if not ok or not all(_is_int(o) and o >= 0 for o in offsets) or offsets[0] > offsets[1]:
            raise DeltaFileError(f"{where}: tensor {name!r} has a malformed safetensors entry")
        if info.get("dtype") != "U8" or info.get("shape") != [offsets[1] - offsets[0]]:
            raise DeltaFileError(f"{where} holds tensor {name!r} of dtype {info.get('dtype')} shape "
                                 f"{info.get('shape')}, which the stream table does not list (only 1-D uint8)")
        tensors[name] = (8 + size + offsets[0], offsets[1] - offsets[0])
        spans.append(tuple(offsets))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise DeltaFileError(f"{where} is corrupted: its tensors overlap or leave gaps")
        position = end
    if 8 + size + position != file_size:
        raise DeltaFileError(f"{where} is truncated or corrupted: the header describes {8 + size + position} bytes, "
                             f"the file has {file_size}")
    return metadata, tensors


def container_bytes(tensors: Mapping[str, bytes], metadata: Mapping[str, str]) -> bytes:
    """A safetensors file of 1-D uint8 tensors, deterministic: sorted metadata keys and tensor names.

    The header is padded with spaces to a multiple of 8 bytes, as safetensors' own writer does.
    """
    header: Dict[str, Any] = {"__metadata__": {k: metadata[k] for k in sorted(metadata)}}
    offset = 0
    for name in sorted(tensors):
        header[name] = {"dtype": "U8", "shape": [len(tensors[name])], "data_offsets": [offset, offset + len(tensors[name])]}
        offset += len(tensors[name])
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(tensors[name] for name in sorted(tensors))


def update_with_stored(digest: "hashlib._Hash", name: str, size: int, chunks: Any) -> None:
    """Feed one stored uint8 tensor into the payload hash, as ``fingerprint.update_with_tensor`` does (same
    bytes), from an iterable of byte chunks so that a file is hashed without holding it in memory."""
    digest.update(f"{name}\0uint8\0({size},)\0{size}\0".encode("utf-8"))
    for chunk in chunks:
        digest.update(chunk)


# ------------------------------------------------------------------------------------------------ schema


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


class _Checker:
    """Raises one :class:`DeltaFileError` line naming the file, the key and what is wrong with it."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, what: str) -> None:
        raise DeltaFileError(f"{self.where} has malformed metadata: {what}; not a usable delta file")

    def int(self, value: Any, what: str, low: int = 0, high: Optional[int] = None) -> int:
        if not _is_int(value) or value < low or (high is not None and value > high):
            self.fail(f"{what} must be an integer in [{low}, {high if high is not None else '∞'}], got {value!r}")
        return value

    def ints(self, value: Any, what: str, length: Optional[int] = None) -> List[int]:
        if not isinstance(value, list) or (length is not None and len(value) != length):
            self.fail(f"{what} must be a list of {length if length is not None else ''} integers")
        return [self.int(v, what) for v in value]

    def table(self, value: Any, columns: Tuple[str, ...], what: str) -> List[Dict[str, Any]]:
        if not isinstance(value, dict) or value.get("columns") != list(columns) or not isinstance(value.get("rows"), list):
            self.fail(f"the {what} table must have columns {list(columns)} and a list of rows")
        rows = value["rows"]
        if not all(isinstance(r, list) and len(r) == len(columns) for r in rows):
            self.fail(f"every row of the {what} table must have {len(columns)} fields")
        return [dict(zip(columns, r)) for r in rows]


def _decode_json(raw: Mapping[str, str], check: _Checker) -> Dict[str, Any]:
    decoded: Dict[str, Any] = dict(raw)
    for key in JSON_KEYS:
        if key not in raw:
            if key in OPTIONAL_JSON_KEYS:
                continue
            check.fail(f"key {key!r} is missing")
        try:
            decoded[key] = json.loads(raw[key])
        except (json.JSONDecodeError, RecursionError):
            check.fail(f"{key!r} is not valid JSON ({raw[key][:40]!r})")
    return decoded


def _check_layers(meta: Dict[str, Any], check: _Checker) -> List[Dict[str, Any]]:
    elements = len(meta["atomic_numbers"])
    heads = meta.get("heads")
    if heads is not None and (not isinstance(heads, list) or not all(isinstance(h, str) for h in heads)):
        check.fail("heads must be a list of head names")
    derivation = meta.get("derivation")
    if derivation is not None and not isinstance(derivation, dict):
        check.fail("derivation must be a JSON object")
    table = meta["layers"]
    stored = table.get("columns") if isinstance(table, dict) else None
    columns = next((c for c in KNOWN_LAYER_COLUMNS if stored == list(c)), LAYER_COLUMNS)
    layers = []
    for i, row in enumerate(check.table(table, columns, "layers")):
        at = f"layers row {i}"
        if not isinstance(row["name"], str) or not isinstance(row["kind"], str):
            check.fail(f"{at}: name and kind must be strings")
        size = check.int(row["size"], f"{at} size", 0, meta["total_entries"])
        if math.prod(check.ints(row["shape"], f"{at} shape")) != size:
            check.fail(f"{at}: size {size} is not the product of its shape")
        changed = check.int(row["changed"], f"{at} changed", 0, size)
        if row["threshold_granularity"] not in THRESHOLD_GRANULARITIES:
            check.fail(f"{at}: threshold_granularity must be one of {', '.join(map(repr, THRESHOLD_GRANULARITIES))}")
        labels = row["path_labels"]
        if not isinstance(labels, list) or not labels or not all(isinstance(s, str) for s in labels):
            check.fail(f"{at}: path_labels must be a non-empty list of strings")
        path_size = check.ints(row["path_size"], f"{at} path_size", len(labels))
        path_changed = check.ints(row["path_changed"], f"{at} path_changed", len(labels))
        thresholds = row["path_threshold"]
        if not isinstance(thresholds, list) or len(thresholds) != len(labels) or not all(map(_is_number, thresholds)):
            check.fail(f"{at}: path_threshold must be {len(labels)} finite numbers")
        if sum(path_size) != size or sum(path_changed) != changed or any(c > s for c, s in zip(path_changed, path_size)):
            check.fail(f"{at}: per-path counts do not add up to size {size} and changed {changed}")
        if (row["element_size"] is None) != (row["element_changed"] is None):
            check.fail(f"{at}: element_size and element_changed come together")
        if row["element_size"] is not None:
            e_size = check.ints(row["element_size"], f"{at} element_size", elements)
            e_changed = check.ints(row["element_changed"], f"{at} element_changed", elements)
            if any(c > s for c, s in zip(e_changed, e_size)) or sum(e_size) > size:
                check.fail(f"{at}: per-element counts exceed the layer's")
        _check_element_thresholds(row, elements, at, check)
        if (row.get("head_size") is None) != (row.get("head_changed") is None):
            check.fail(f"{at}: head_size and head_changed come together")
        if row.get("head_size") is not None:
            n_heads = len(heads or [])
            h_size = check.ints(row["head_size"], f"{at} head_size", n_heads)
            h_changed = check.ints(row["head_changed"], f"{at} head_changed", n_heads)
            if any(c > s for c, s in zip(h_changed, h_size)) or sum(h_size) > size:
                check.fail(f"{at}: per-head counts exceed the layer's")
        layers.append({c: v for c, v in row.items() if v is not None})
    if sum(r["size"] for r in layers) != meta["adapted_entries"]:
        check.fail("adapted_entries is not the sum of the layer sizes")
    if sum(r["changed"] for r in layers) != meta["changed_adapted_entries"]:
        check.fail("changed_adapted_entries is not the sum of the changed entries of the layers")
    return layers


def _check_element_thresholds(row: Dict[str, Any], elements: int, at: str, check: _Checker) -> None:
    """A layer has ``element_threshold`` (one finite δ per element) exactly when its granularity is ``element``,
    and then it is an element-indexed weight (it has per-element counts)."""
    thresholds = row.get("element_threshold")
    if (row["threshold_granularity"] == "element") != (thresholds is not None):
        check.fail(f"{at}: element_threshold is given exactly when threshold_granularity is 'element'")
    if thresholds is None:
        return
    if not isinstance(thresholds, list) or len(thresholds) != elements or not all(map(_is_number, thresholds)):
        check.fail(f"{at}: element_threshold must be {elements} finite numbers (one per element)")
    if row["element_size"] is None:
        check.fail(f"{at}: element_threshold on a weight without per-element counts")


def _check_streams(meta: Dict[str, Any], stored: Mapping[str, Tuple[int, int]], check: _Checker) -> Dict[str, Dict]:
    streams: Dict[str, Dict[str, Any]] = {}
    for i, row in enumerate(check.table(meta["streams"], STREAM_COLUMNS, "streams")):
        name, dtype = row["tensor"], row["dtype"]
        if not isinstance(name, str) or name in streams or name not in stored:
            check.fail(f"streams row {i}: tensor {name!r} is missing from the file or listed twice")
        if dtype not in DTYPE_WIDTHS or not (name == f"xor.{dtype}" or (name == "index" and dtype == "uint8")):
            check.fail(f"streams row {i}: stream {name!r} of dtype {dtype!r} is not an index or xor stream")
        if row["codec"] not in MAX_RATIO:
            check.fail(f"streams row {i}: unknown codec {row['codec']!r} (known: {', '.join(MAX_RATIO)})")
        if row["width"] != DTYPE_WIDTHS[dtype]:
            check.fail(f"streams row {i}: width {row['width']!r} for dtype {dtype}")
        count = check.int(row["count"], f"streams row {i} count")
        claimed, held = count * row["width"], stored[name][1]
        if claimed > held * MAX_RATIO[row["codec"]] or held > claimed * _STORED_SLACK[0] + _STORED_SLACK[1] or \
                (row["codec"] == "raw" and held != claimed):
            raise DeltaFileError(f"{check.where}: stream {name!r} claims {claimed} bytes from {held} stored "
                                 f"{row['codec']} bytes, more than it can hold; refused before decompressing")
        streams[name] = dict(row)
    unlisted = sorted(set(stored) - set(streams))
    if unlisted:
        raise DeltaFileError(f"{check.where} holds tensors the stream table does not list: {unlisted}")
    return streams


def _check_entries(meta: Dict[str, Any], streams: Mapping[str, Dict], check: _Checker) -> List[Dict[str, Any]]:
    entries, names = [], set()
    index_end, value_end = 0, {}
    for i, row in enumerate(check.table(meta["entries"], ENTRY_COLUMNS, "entries")):
        at = f"entries row {i}"
        if not isinstance(row["name"], str) or row["name"] in names:
            check.fail(f"{at}: name must be a string, once")
        names.add(row["name"])
        numel = math.prod(check.ints(row["shape"], f"{at} shape"))
        if row["dtype"] not in DTYPE_WIDTHS or f"xor.{row['dtype']}" not in streams:
            check.fail(f"{at}: dtype {row['dtype']!r} has no xor stream")
        if row["encoding"] not in INDEX_ENCODINGS or not isinstance(row["parameter"], bool):
            check.fail(f"{at}: unknown index encoding {row['encoding']!r} or non-boolean parameter flag")
        count = check.int(row["count"], f"{at} count", 1, numel)
        expected = {"all": 0, "bitmask": (numel + 7) // 8}.get(row["encoding"], count * GAP_WIDTHS.get(row["encoding"], 0))
        if row["encoding"] == "all" and count != numel:
            check.fail(f"{at}: encoding 'all' with {count} of {numel} entries")
        if check.int(row["index_bytes"], f"{at} index_bytes") != expected:
            check.fail(f"{at}: {row['index_bytes']} index bytes, {row['encoding']} of {count}/{numel} needs {expected}")
        if check.int(row["index_offset"], f"{at} index_offset") != index_end:
            check.fail(f"{at}: index_offset {row['index_offset']} does not follow the previous entry ({index_end})")
        if check.int(row["value_offset"], f"{at} value_offset") != value_end.get(row["dtype"], 0):
            check.fail(f"{at}: value_offset does not follow the previous {row['dtype']} entry")
        index_end += expected
        value_end[row["dtype"]] = row["value_offset"] + count
        entries.append({**row, "numel": numel})
    if index_end != (streams["index"]["count"] if "index" in streams else 0):
        check.fail("the index stream's size is not the sum of the entries' index bytes")
    for name, stream in streams.items():
        if name != "index" and value_end.get(stream["dtype"], 0) != stream["count"]:
            check.fail(f"stream {name!r} holds {stream['count']} values, the entries use {value_end.get(stream['dtype'], 0)}")
    layers = {r["name"]: r for r in meta["layers"]}
    for entry in entries:  # a run's delta changes adapted weights only: each must agree with its layer record
        record = layers.get(entry["name"])
        if entry["parameter"] and layers and (record is None or record["shape"] != entry["shape"]
                                              or record["changed"] != entry["count"]):
            check.fail(f"entry {entry['name']} ({entry['count']} of {entry['shape']}) does not match the layers table")
    parameters = [e for e in entries if e["parameter"]]
    if sum(e["count"] for e in parameters) != meta["changed_entries"]:
        check.fail("changed_entries is not the number of changed parameter entries in the entry table")
    if sum(e["numel"] for e in parameters) > meta["total_entries"]:
        check.fail("the changed tensors hold more entries than total_entries")
    return entries


def validate_header(raw: Mapping[str, str], stored: Mapping[str, Tuple[int, int]], where: str) -> Dict[str, Any]:
    """The decoded metadata, after every schema check passed (raises :class:`DeltaFileError` otherwise).

    Adds ``_entries`` and ``_streams`` (the validated tables as dicts) and replaces ``layers`` by its records.
    """
    check = _Checker(where)
    meta = _decode_json(raw, check)
    for key in ("mace_sparse_version", "mace_torch_version", "torch_version", "granularity"):
        if key not in meta:
            check.fail(f"key {key!r} is missing")
    for key in ("foundation_fingerprint", "merged_fingerprint"):
        if not _FINGERPRINT.match(str(meta.get(key, ""))):
            check.fail(f"{key!r} must be a sha256 hex digest")
    if not isinstance(meta["targets"], list) or not all(isinstance(t, str) for t in meta["targets"]):
        check.fail("'targets' must be a list of weight kinds")
    if not _is_number(meta["threshold_weight_decay"]) or not isinstance(meta["sparse_config"], dict):
        check.fail("'threshold_weight_decay' must be a number and 'sparse_config' an object")
    for z in check.ints(meta["atomic_numbers"], "'atomic_numbers'"):
        check.int(z, "'atomic_numbers'", 1, 118)
    total = check.int(meta["total_entries"], "'total_entries'")
    check.int(meta["changed_entries"], "'changed_entries'", 0, total)
    adapted = check.int(meta["adapted_entries"], "'adapted_entries'", 0, total)
    check.int(meta["changed_adapted_entries"], "'changed_adapted_entries'", 0, adapted)
    meta["layers"] = _check_layers(meta, check)
    meta["_streams"] = _check_streams(meta, stored, check)
    meta["_entries"] = _check_entries(meta, meta["_streams"], check)
    return meta


def check_against_model(meta: Mapping[str, Any], state: Mapping[str, Any], where: str) -> None:
    """Every entry must name a tensor of ``state`` with its shape and dtype, so decoding is bounded by the model.

    Raises ``ValueError`` subclasses of the caller's choosing via :class:`DeltaFileError` (the file describes
    tensors the model does not have: it was made for another model, or it lies about its sizes).
    """
    for entry in meta["_entries"]:
        tensor = state.get(entry["name"])
        dtype = str(getattr(tensor, "dtype", "")).replace("torch.", "")
        if tensor is None or list(tensor.shape) != entry["shape"] or dtype != entry["dtype"]:
            raise DeltaFileError(f"{where} describes {entry['name']} as {entry['dtype']} {entry['shape']}, which the "
                                 "given model does not have; give the model this delta was made for")
