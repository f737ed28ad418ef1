"""The diff: what fine-tuning changed in a model, as a :class:`~.delta_types.SparseDelta` (model → delta).

The only layer that knows sparse models: it compares the merged model with its foundation bit by bit, takes
the XOR of the changed entries (:mod:`.value_codec`) and gathers what the report needs later (layout per layer,
path and element from :mod:`.layout`, the sparse config, fingerprints, how MACE derived the trained model).
Writing the result is :mod:`.delta_format`'s job; :func:`save_delta` only chains the two.
"""

from __future__ import annotations

import copy
from importlib import metadata as importlib_metadata
from typing import Any, Dict, Optional, Tuple

import torch

from .. import __version__
from ..sparse_model import DERIVATION_ATTR, is_sparse_model, merge_and_unload, sparse_config_of
from .atomic import PathLike
from .delta_format import write_delta
from .delta_schema import FORMAT, FORMAT_VERSION
from .delta_types import DeltaEntry, SparseDelta
from .fingerprint import model_fingerprint
from .foundation import foundation_of
from .layout import layer_records
from .value_codec import xor_bits


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
    if model.__dict__.get(DERIVATION_ATTR) is not None:
        metadata["derivation"] = model.__dict__[DERIVATION_ATTR]
    return SparseDelta(entries=entries, metadata=metadata)


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
