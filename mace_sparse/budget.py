"""A sparsity budget and thresholds relative to each tensor's scale.

Two additions to the soft threshold of :mod:`mace_sparse.reparametrization`, both applied through
:func:`mace_sparse.reparametrization.thresholds`, so that the forward pass, the statistics, the merge and the
delta file all see the same effective threshold:

* **Relative thresholds** (``threshold_scale="relative"``). Typical |W| differs several-fold between radial,
  linear, skip-tensor-product and contraction weights, so one absolute δ prunes the small kinds wholesale. In
  relative mode the threshold of a tensor is δ · rms(W), with rms(W) the root mean square of its foundation
  weight (a constant, kept in the owner's instance dict under :data:`SCALE_ATTR`): δ is a fraction of the
  tensor's own scale.
* **Budget** (``budget=F``). At most ``k = floor(F · N)`` of the model's N weights may change. Before every
  forward pass of the model a global cut τ is set to the (k+1)-th largest normalised magnitude |ΔW| / scale over
  all adapted entries, and an entry changes the model only if its magnitude exceeds both its own δ and τ: at
  most k entries are non-zero at any time, so the budget holds at every step, in every stage, whatever the task
  or run length. With the straight-through gradient every latent ΔW keeps integrating its gradient, so an entry
  outside the budget can grow past the cut and displace a weaker one (drop and grow by accumulated gradient,
  in the spirit of SpIEL). τ carries no gradient; every rank computes the same τ from the same weights.

The cut is recomputed by a forward pre-hook on the model, after ``load_state_dict``, and by :func:`update_cut`
wherever the effective deltas are read without a forward pass (statistics, merge).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from . import reparametrization as rp

SCALE_ATTR = rp.SCALE_ATTR
CUT_ATTR = rp.CUT_ATTR
#: On the model: the number k of entries the budget allows to change.
BUDGET_ATTR = "_sparse_str_budget_entries"


def set_relative_scale(owner: torch.nn.Module, name: str) -> None:
    """Record rms(W) of ``owner.<name>``'s foundation weight, so its δ is read as a fraction of it."""
    base = owner._buffers[rp.FOUNDATION.format(name)]
    rms = float(base.detach().double().pow(2).mean().sqrt()) if base.numel() else 0.0
    owner.__dict__.setdefault(SCALE_ATTR, {})[name] = rms if rms > 0.0 else 1.0


def scale_of(owner: torch.nn.Module, name: str) -> Optional[float]:
    return owner.__dict__.get(SCALE_ATTR, {}).get(name)


def _entries(model: torch.nn.Module) -> List[Tuple[torch.nn.Module, str]]:
    return [(owner, name) for _, owner, name in rp.iter_reparametrized(model)]


@torch.no_grad()
def update_cut(model: torch.nn.Module, *_args) -> None:
    """Set τ on every owner from the current latent deltas (no-op without a budget)."""
    model = getattr(model, "module", model)
    k = model.__dict__.get(BUDGET_ATTR)
    if k is None:
        return
    entries = _entries(model)
    magnitudes = []
    for owner, name in entries:
        delta = owner._parameters[rp.DELTA.format(name)]
        magnitudes.append((delta.detach().abs() / (scale_of(owner, name) or 1.0)).reshape(-1))
    flat = torch.cat(magnitudes) if magnitudes else torch.zeros(0)
    if k >= flat.numel():
        cut = torch.zeros((), dtype=flat.dtype, device=flat.device)
    else:  # the (k+1)-th largest value: at most k entries lie strictly above it
        cut = torch.kthvalue(flat, flat.numel() - k).values
    for owner, _ in entries:
        owner.__dict__[CUT_ATTR] = cut


def attach_budget(model: torch.nn.Module, budget: float, total_entries: int) -> int:
    """Allow at most ``floor(budget · total_entries)`` changed entries; returns that k."""
    k = int(math.floor(budget * total_entries))
    model.__dict__[BUDGET_ATTR] = k
    model.register_forward_pre_hook(update_cut)
    model.register_load_state_dict_post_hook(_after_load)
    update_cut(model)
    return k


def _after_load(module: torch.nn.Module, *_args) -> None:
    update_cut(module)


def detach_budget(model: torch.nn.Module) -> None:
    """Remove the budget hooks and attributes (merge: the plain model must be exactly MACE's)."""
    model.__dict__.pop(BUDGET_ATTR, None)
    for hooks, fn in ((model._forward_pre_hooks, update_cut), (model._load_state_dict_post_hooks, _after_load)):
        for key in [k for k, f in hooks.items() if f is fn]:
            del hooks[key]
    for module in model.modules():
        module.__dict__.pop(CUT_ATTR, None)
        module.__dict__.pop(SCALE_ATTR, None)
