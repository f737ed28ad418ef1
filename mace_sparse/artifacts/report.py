"""The interpretability report: which layers, irrep paths and chemical elements fine-tuning changed.

With ``--sparse_threshold_granularity element`` the per-element table also shows each element's final δ (the
delta file's ``element_threshold``); the per-path δ of such a layer is the mean over the path's entries.

Everything is computed from the delta's metadata (counted at save time from the bitwise difference between
merged model and foundation), so ``mace_sparse report D.safetensors`` needs neither MACE nor the models.
The same numbers go to ``<name>_sparsity.json`` after a run and to ``report --json``.

The two sparsity figures of the paper, named plainly:

* ``sparsity_over_all_parameters``: unchanged fraction of *all* parameters of the model;
* ``sparsity_over_adapted_layers``: unchanged fraction of the entries of the adapted weights only.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional, Sequence

import torch

from .atomic import PathLike, atomic_write_bytes

try:
    from ase.data import chemical_symbols
except ImportError:  # pragma: no cover - ASE comes with MACE
    chemical_symbols = []


def _percent(changed: int, size: int) -> float:
    return 100.0 * changed / size if size else 0.0


def element_symbols(atomic_numbers: Sequence[int]) -> List[str]:
    """Chemical symbols for atomic numbers (``Z<n>`` if ASE is missing or the number is unknown)."""
    return [chemical_symbols[z] if 0 < z < len(chemical_symbols) else f"Z{z}" for z in atomic_numbers]


def report_data(delta: Any) -> Dict[str, Any]:
    """All report numbers as one JSON-ready dict (``delta``: a :class:`SparseDelta` or its metadata dict)."""
    meta = delta.metadata if hasattr(delta, "metadata") else delta
    changed, total = int(meta["changed_entries"]), int(meta["total_entries"])
    adapted, adapted_changed = int(meta["adapted_entries"]), int(meta["changed_adapted_entries"])
    numbers = [int(z) for z in meta.get("atomic_numbers", [])]
    symbols = element_symbols(numbers)
    head_names = [str(h) for h in meta.get("heads", [])]
    layers, paths, per_element, per_head = [], [], [], []
    head_size = [0] * len(head_names)
    head_changed = [0] * len(head_names)
    element_size = [0] * len(numbers)
    element_changed = [0] * len(numbers)
    for record in meta.get("layers", []):
        layers.append(
            {
                "name": record["name"],
                "kind": record["kind"],
                "size": record["size"],
                "changed": record["changed"],
                "percent_changed": _percent(record["changed"], record["size"]),
                "threshold_granularity": record.get("threshold_granularity", "layer"),
            }
        )
        for i, label in enumerate(record["path_labels"]):
            size, count = record["path_size"][i], record["path_changed"][i]
            paths.append(
                {
                    "layer": record["name"],
                    "kind": record["kind"],
                    "path": i,
                    "label": label,
                    "size": size,
                    "changed": count,
                    "percent_changed": _percent(count, size),
                    "threshold": record["path_threshold"][i],
                }
            )
        if "head_size" in record and len(record["head_size"]) == len(head_names):
            for i, name in enumerate(head_names):
                size, count = record["head_size"][i], record["head_changed"][i]
                head_size[i] += size
                head_changed[i] += count
                per_head.append({"layer": record["name"], "head": name, "size": size, "changed": count,
                                 "percent_changed": _percent(count, size)})
        if "element_size" in record:
            element_threshold = record.get("element_threshold")  # granularity "element" only
            for i, symbol in enumerate(symbols):
                size, count = record["element_size"][i], record["element_changed"][i]
                element_size[i] += size
                element_changed[i] += count
                per_element.append(
                    {
                        "layer": record["name"],
                        "kind": record["kind"],
                        "element": symbol,
                        "atomic_number": numbers[i],
                        "size": size,
                        "changed": count,
                        "percent_changed": _percent(count, size),
                    }
                )
                if element_threshold is not None:
                    per_element[-1]["threshold"] = element_threshold[i]
    return {
        "changed_entries": changed,
        "total_entries": total,
        "adapted_entries": adapted,
        "changed_adapted_entries": adapted_changed,
        "sparsity_over_all_parameters": 1.0 - changed / total if total else 1.0,
        "sparsity_over_adapted_layers": 1.0 - adapted_changed / adapted if adapted else 1.0,
        "targets": meta.get("targets"),
        "granularity": meta.get("granularity"),
        "threshold_weight_decay": meta.get("threshold_weight_decay"),
        "mace_sparse_version": meta.get("mace_sparse_version"),
        "mace_torch_version": meta.get("mace_torch_version"),
        "foundation_fingerprint": meta.get("foundation_fingerprint"),
        "atomic_numbers": numbers,
        "element_symbols": symbols,
        "layers": layers,
        "paths": paths,
        "elements_per_layer": per_element,
        "heads_per_layer": per_head,
        "heads": [
            {"head": name, "size": head_size[i], "changed": head_changed[i],
             "percent_changed": _percent(head_changed[i], head_size[i])}
            for i, name in enumerate(head_names)
        ] if per_head else [],
        "elements": [
            {
                "element": symbol,
                "atomic_number": numbers[i],
                "size": element_size[i],
                "changed": element_changed[i],
                "percent_changed": _percent(element_changed[i], element_size[i]),
            }
            for i, symbol in enumerate(symbols)
        ],
    }


@torch.no_grad()
def add_relative_change(data: Dict[str, Any], delta: Any, foundation: torch.nn.Module) -> Dict[str, Any]:
    """Add ``relative_change`` = ‖W' − W‖ / ‖W‖ per layer (needs the full foundation weight W).

    The delta stores ``bits(W') ^ bits(W)`` at the changed entries, so the new values W' are recovered from
    the foundation's (the caller has checked that ``foundation`` is the delta's foundation).
    """
    params = dict(foundation.named_parameters())
    for layer in data["layers"]:
        entry = delta.entries.get(layer["name"])
        weight = params.get(layer["name"])
        if weight is None:
            continue
        change = 0.0
        if entry is not None:
            old = weight.detach().to("cpu").reshape(-1)[entry.indices]
            change = float((entry.new_values(weight).double() - old.double()).norm())
        norm = float(weight.detach().double().norm())
        layer["relative_change"] = change / norm if norm else (0.0 if change == 0.0 else math.inf)
    return data


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str) -> str:
    """A plain-text table (MACE prints its error tables with prettytable; this avoids the dependency)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: List[str]) -> str:
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)]
        return "| " + " | ".join(parts) + " |"

    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    return "\n".join([rule, line(cells[0]), rule, *[line(r) for r in cells[1:]], rule])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_report(data: Dict[str, Any]) -> str:
    """The human-readable report: summary, then per-layer, per-path and per-element tables."""
    out = [
        f"mace-sparse delta (mace-sparse {data['mace_sparse_version']}, mace-torch {data['mace_torch_version']}); "
        f"targets {','.join(data['targets'] or [])}, granularity {data['granularity']}, "
        f"lambda_tau {data['threshold_weight_decay']}",
        f"changed parameters: {data['changed_entries']:,} of {data['total_entries']:,} "
        f"(sparsity over all parameters {100 * data['sparsity_over_all_parameters']:.2f} %)",
        f"changed adapted entries: {data['changed_adapted_entries']:,} of {data['adapted_entries']:,} "
        f"(sparsity over adapted layers {100 * data['sparsity_over_adapted_layers']:.2f} %)",
        "",
        "Changed parameters per layer",
    ]
    with_rel = any("relative_change" in layer for layer in data["layers"])
    headers = ["layer", "kind", "size", "changed", "%"] + (["|dW|/|W|"] if with_rel else [])
    rows = []
    for layer in data["layers"]:
        row = [layer["name"], layer["kind"], layer["size"], layer["changed"], layer["percent_changed"]]
        if with_rel:
            row.append(f"{layer.get('relative_change', float('nan')):.3e}")
        rows.append(row)
    rows.append(["all parameters", "", data["total_entries"], data["changed_entries"],
                 _percent(data["changed_entries"], data["total_entries"])] + ([""] if with_rel else []))
    out += [_table(headers, rows, "llrrrr"), "", "Changed entries per irrep path"]
    rows = [
        [p["layer"], p["label"], p["size"], p["changed"], p["percent_changed"], f"{p['threshold']:.3e}"]
        for p in data["paths"]
    ]
    out.append(_table(["layer", "path", "size", "changed", "%", "delta"], rows, "llrrrr"))
    if any(layer["threshold_granularity"] == "element" for layer in data["layers"]):
        out.append("(layers with one delta per element: the path's delta is the mean over its entries)")
    if data["elements_per_layer"]:
        out += ["", "Changed entries per chemical element (element-dependent weights)"]
        # a δ column only when some layer has one δ per element (--sparse_threshold_granularity element)
        with_delta = any("threshold" in e for e in data["elements_per_layer"])
        rows = [
            [e["layer"], e["element"], e["size"], e["changed"], e["percent_changed"]]
            + ([f"{e['threshold']:.3e}" if "threshold" in e else ""] if with_delta else [])
            for e in data["elements_per_layer"]
        ]
        rows += [["all element-dependent", e["element"], e["size"], e["changed"], e["percent_changed"]]
                 + ([""] if with_delta else []) for e in data["elements"]]
        headers = ["layer", "element", "size", "changed", "%"] + (["delta"] if with_delta else [])
        out.append(_table(headers, rows, "llrrrr"))
    if data.get("heads_per_layer"):
        out += ["", "Changed entries per readout head (multihead readouts)"]
        rows = [[h["layer"], h["head"], h["size"], h["changed"], h["percent_changed"]] for h in data["heads_per_layer"]]
        rows += [["all readouts", h["head"], h["size"], h["changed"], h["percent_changed"]] for h in data["heads"]]
        out.append(_table(["layer", "head", "size", "changed", "%"], rows, "llrrr"))
    return "\n".join(out)


def sparsity_json(delta: Any) -> str:
    """The text of ``<name>_sparsity.json``: :func:`report_data` as indented JSON."""
    return json.dumps(report_data(delta), indent=2) + "\n"


def write_sparsity_json(delta: Any, path: PathLike, data: Optional[Dict[str, Any]] = None) -> None:
    """Write ``<name>_sparsity.json`` atomically."""
    text = json.dumps(data, indent=2) + "\n" if data is not None else sparsity_json(delta)
    atomic_write_bytes(path, text.encode("utf-8"))
