"""Where each changed entry of an adapted weight sits: its layer, irrep path and chemical element.

The report must work from the delta file alone, long after the model is gone, so the layout is resolved
once at save time (from :func:`mace_sparse.model_walker.find_targets`, the same description that drove the
per-path thresholds) and stored as plain per-layer records with per-path and per-element counts.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .. import reparametrization as rp
from ..config import TARGET_KINDS
from ..layouts import blocks_along, element_index
from ..sparse_model import CONFIG_ATTR
from ..model_walker import TargetWeight, find_targets


def head_index(target: TargetWeight, num_heads: int) -> Optional[torch.Tensor]:
    """Readout head of every entry of a multihead readout weight, else None.

    MACE's readouts of an ``n``-head model output ``n×0e`` (one column per head), and their hidden layers
    ``(n·MLP)×0e`` are masked per head in blocks of ``MLP`` channels (``mask_head``): the head of an entry is
    its output channel's block.
    """
    if num_heads < 2 or target.kind != "linear" or not target.qualified_name.startswith("readouts."):
        return None
    irreps_out = target.owner.irreps_out
    if len(irreps_out) != 1 or not irreps_out[0].ir.is_scalar() or irreps_out[0].mul % num_heads:
        return None
    block = irreps_out[0].mul // num_heads
    weight = target.owner._parameters[target.name]
    if target.name == "bias":
        return (torch.arange(weight.numel()) // block).view(weight.shape)
    shapes = [tuple(ins.path_shape) for ins in target.owner.instructions if ins.i_in != -1]
    return (blocks_along(shapes, 1) // block).view(weight.shape)


def _rounded(values: torch.Tensor) -> List[float]:
    # 7 significant digits: δ is for reading, and full float64 reprs would dominate a small delta file
    return [float(f"{v:.7g}") for v in values.detach().double().reshape(-1).tolist()]


def _thresholds_per_path(sparse_model: torch.nn.Module, num_paths: Dict[str, int]) -> Dict[str, List[float]]:
    """Final δ = sigmoid(score) of each adapted weight, one value per path (a layer δ is repeated)."""
    out = {}
    for qualified, owner, name in rp.iter_reparametrized(sparse_model):
        values = _rounded(torch.sigmoid(owner._parameters[rp.SCORE.format(name)]))
        paths = num_paths.get(qualified, len(values))
        out[qualified] = values if len(values) == paths else [values[0]] * paths
    return out


def _element_thresholds(owner: torch.nn.Module, name: str, path_index: torch.Tensor,
                        num_paths: int) -> Tuple[List[float], List[float]]:
    """``(δ per path, δ per element)`` of a weight with one δ per element (``--sparse_threshold_granularity
    element``).

    A path of an element-indexed weight spans every element, so it has no single δ: its ``path_threshold`` is
    the **mean δ over the path's entries** (for MACE's layouts every element holds the same number of entries of
    a path, so this is the plain mean of the element δ). The per-element δ themselves are the new
    ``element_threshold`` field.
    """
    per_element = torch.sigmoid(owner._parameters[rp.SCORE.format(name)].detach()).double()
    per_entry = per_element[owner._buffers[rp.SEGMENTS.format(name)]].reshape(-1)
    paths = path_index.reshape(-1)
    sums = torch.bincount(paths, weights=per_entry, minlength=num_paths)
    counts = torch.bincount(paths, minlength=num_paths).clamp(min=1)
    return _rounded(sums / counts), _rounded(per_element)


def layer_records(
    sparse_model: torch.nn.Module,
    foundation: torch.nn.Module,
    changed: Dict[str, torch.Tensor],
) -> List[dict]:
    """One JSON-ready record per adapted weight, with per-path and per-element counts.

    ``threshold_granularity`` is ``layer`` (one δ, repeated in ``path_threshold``), ``path`` (one δ per path) or
    ``element`` (one δ per element, in ``element_threshold``; ``path_threshold`` is then each path's mean δ).

    Args:
        sparse_model: the sparse-trainable model (source of the adapted names and of δ).
        foundation: its plain foundation (:func:`foundation_of`), used to resolve the layouts.
        changed: boolean change mask per state-dict name (entries where merged differs from foundation).
    """
    model = getattr(sparse_model, "module", sparse_model)
    adapted = [q for q, _, _ in rp.iter_reparametrized(model)]
    targets = {t.qualified_name: t for t in find_targets(foundation, TARGET_KINDS)}
    atomic_numbers = getattr(foundation, "atomic_numbers", None)
    num_elements = int(atomic_numbers.numel()) if isinstance(atomic_numbers, torch.Tensor) else 0
    params = dict(foundation.named_parameters())
    num_heads = len(getattr(foundation, "heads", None) or ["Default"])
    num_paths = {q: len(targets[q].path_labels) for q in adapted if q in targets}
    thresholds = _thresholds_per_path(model, num_paths)
    # a segments buffer means one δ per path, or per element in a run made with granularity "element"
    segmented = "element" if model.__dict__.get(CONFIG_ATTR, {}).get("granularity") == "element" else "path"
    owners = {q: (owner, name) for q, owner, name in rp.iter_reparametrized(model)}
    granularity = {
        q: (segmented if owner._buffers.get(rp.SEGMENTS.format(name)) is not None else "layer")
        for q, (owner, name) in owners.items()
    }
    records = []
    for qualified in adapted:
        weight = params[qualified]
        mask = changed.get(qualified, torch.zeros(weight.shape, dtype=torch.bool)).reshape(weight.shape)
        target = targets.get(qualified)
        if target is not None:
            labels, path_index = list(target.path_labels), target.path_index.reshape(weight.shape)
            kind = target.kind
        else:  # adapted but no longer recognised (should not happen): one path for the whole tensor
            labels, path_index, kind = ["all"], torch.zeros(weight.shape, dtype=torch.long), "unknown"
        record = {
            "name": qualified,
            "kind": kind,
            "shape": list(weight.shape),
            "size": int(weight.numel()),
            "changed": int(mask.sum()),
            "threshold_granularity": granularity[qualified],
            "path_labels": labels,
            "path_size": torch.bincount(path_index.reshape(-1), minlength=len(labels)).tolist(),
            "path_changed": torch.bincount(path_index[mask], minlength=len(labels)).tolist(),
            "path_threshold": thresholds[qualified],
        }
        if granularity[qualified] == "element":
            record["path_threshold"], record["element_threshold"] = _element_thresholds(
                *owners[qualified], path_index, len(labels))
        heads = head_index(target, num_heads) if target is not None else None
        if heads is not None:
            record["head_size"] = torch.bincount(heads.reshape(-1), minlength=num_heads).tolist()
            record["head_changed"] = torch.bincount(heads[mask], minlength=num_heads).tolist()
        elements = element_index(target, num_elements) if target is not None and num_elements else None
        if elements is not None:
            record["element_size"] = torch.bincount(elements.reshape(-1), minlength=num_elements).tolist()
            record["element_changed"] = torch.bincount(elements[mask], minlength=num_elements).tolist()
        records.append(record)
    return records
