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

* **Ranking by importance** (``selection="fisher"``). The magnitude cut above ranks entries by the latent
  |ΔW|, which integrates signed gradients: an entry whose gradient keeps its sign grows, one whose gradient is
  large but flips does not. The ``fisher`` ranking instead accumulates, for every adapted entry, the squared
  gradient of the loss with respect to its effective weight W' (the diagonal of the empirical Fisher, Σ_t g_t²,
  times scale² so that it measures a relative change like |ΔW| / scale does), and lets the k entries with the
  largest sum change. The sum only grows, so the selection settles as training goes on instead of oscillating
  when a moved entry's gradient falls to zero. The sums are buffers ``<name>_importance`` (saved in checkpoints,
  so ``--restart_latest`` keeps the selection) and are accumulated by the optimizer's step pre-hook
  (:func:`accumulate_importance`), i.e. from the gradients after DDP has averaged them: every rank ranks alike.
  Before the first step nothing has any importance, so step 0 is the foundation.

The cut is recomputed by a forward pre-hook on the model, after ``load_state_dict``, and by :func:`update_cut`
wherever the effective deltas are read without a forward pass (statistics, merge).
"""

from __future__ import annotations

import math
import weakref
from typing import List, Optional, Tuple

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from . import reparametrization as rp

SCALE_ATTR = rp.SCALE_ATTR
CUT_ATTR = rp.CUT_ATTR
#: On the model: the number k of entries the budget allows to change.
BUDGET_ATTR = "_sparse_str_budget_entries"
#: On the model: how the budget ranks entries (``magnitude`` or ``fisher``, :data:`mace_sparse.config.SELECTIONS`).
SELECTION_ATTR = "_sparse_str_budget_selection"
IMPORTANCE = rp.IMPORTANCE
#: latent ΔW Parameter → (weak reference to its owner, weight name), for the optimizer hook (which sees only
#: Parameters); filled by :func:`track_importance` when the optimizer's groups are built.
_IMPORTANCE_OF = WeakTensorKeyDictionary()


def set_relative_scale(owner: torch.nn.Module, name: str) -> None:
    """Record rms(W) of ``owner.<name>``'s foundation weight, so its δ is read as a fraction of it."""
    base = owner._buffers[rp.FOUNDATION.format(name)]
    rms = float(base.detach().double().pow(2).mean().sqrt()) if base.numel() else 0.0
    owner.__dict__.setdefault(SCALE_ATTR, {})[name] = rms if rms > 0.0 else 1.0


def scale_of(owner: torch.nn.Module, name: str) -> Optional[float]:
    return owner.__dict__.get(SCALE_ATTR, {}).get(name)


def _entries(model: torch.nn.Module) -> List[Tuple[torch.nn.Module, str]]:
    return [(owner, name) for _, owner, name in rp.iter_reparametrized(model)]


def _kth_cut(flat: torch.Tensor, k: int, unbound: float) -> torch.Tensor:
    """The (k+1)-th largest value of ``flat``, so that at most k entries lie strictly above it; ``unbound`` when
    the budget allows every entry (k ≥ the number of entries)."""
    if k >= flat.numel():
        return torch.full((), unbound, dtype=flat.dtype, device=flat.device)
    return torch.kthvalue(flat, flat.numel() - k).values


def _update_importance_cut(entries: List[Tuple[torch.nn.Module, str]], k: int) -> None:
    """Per entry: 0 for the k most important (strictly above the (k+1)-th score), +inf for every other one."""
    scores = [owner._buffers[IMPORTANCE.format(name)] * (scale_of(owner, name) or 1.0) ** 2 for owner, name in entries]
    # unbound: -1, below every sum of squares, so that every entry is selected
    cut = _kth_cut(torch.cat([s.reshape(-1) for s in scores]) if scores else torch.zeros(0), k, unbound=-1.0)
    for (owner, name), score in zip(entries, scores):
        blocked = torch.full_like(score, float("inf"))
        owner.__dict__.setdefault(CUT_ATTR, {})[name] = torch.where(score > cut, torch.zeros_like(score), blocked)


@torch.no_grad()
def update_cut(model: torch.nn.Module, *_args) -> None:
    """Set τ on every owner from the current latent deltas or importances (no-op without a budget)."""
    model = getattr(model, "module", model)
    k = model.__dict__.get(BUDGET_ATTR)
    if k is None:
        return
    entries = _entries(model)
    if model.__dict__.get(SELECTION_ATTR) == "fisher":
        _update_importance_cut(entries, k)
        return
    magnitudes = []
    for owner, name in entries:
        delta = owner._parameters[rp.DELTA.format(name)]
        magnitudes.append((delta.detach().abs() / (scale_of(owner, name) or 1.0)).reshape(-1))
    flat = torch.cat(magnitudes) if magnitudes else torch.zeros(0)
    cut = _kth_cut(flat, k, unbound=0.0)  # unbound: no cut beyond each entry's own δ
    for owner, _ in entries:
        owner.__dict__[CUT_ATTR] = cut


def attach_budget(model: torch.nn.Module, budget: float, total_entries: int, selection: str = "magnitude") -> int:
    """Allow at most ``floor(budget · total_entries)`` changed entries, ranked by ``selection``; returns that k.

    With ``fisher`` the (zero) importance buffers are registered here, before any checkpoint or stage-two copy
    of the model exists, so the model's buffers never change in number.
    """
    k = int(math.floor(budget * total_entries))
    model.__dict__[BUDGET_ATTR] = k
    model.__dict__[SELECTION_ATTR] = selection
    if selection == "fisher":
        for owner, name in _entries(model):
            base = owner._buffers[rp.FOUNDATION.format(name)]
            owner.register_buffer(IMPORTANCE.format(name), torch.zeros_like(base))
    model.register_forward_pre_hook(update_cut)
    model.register_load_state_dict_post_hook(_after_load)
    update_cut(model)
    return k


def _after_load(module: torch.nn.Module, *_args) -> None:
    update_cut(module)


def track_importance(model: torch.nn.Module) -> None:
    """Let :func:`accumulate_importance` find the importance buffer of each latent ΔW of ``model`` (no-op unless
    its budget ranks by importance). Called where the optimizer's groups are built from this very model."""
    model = getattr(model, "module", model)
    if model.__dict__.get(SELECTION_ATTR) != "fisher":
        return
    for owner, name in _entries(model):
        _IMPORTANCE_OF[owner._parameters[rp.DELTA.format(name)]] = (weakref.ref(owner), name)


@torch.no_grad()
def accumulate_importance(optimizer: torch.optim.Optimizer) -> None:
    """importance += g² for every tracked ΔW with a gradient (optimizer step pre-hook, before any rescaling).

    With the straight-through estimator the ΔW gradient is the gradient of the effective weight W', so every
    entry, selected or not, keeps collecting evidence of how much the loss depends on it.
    """
    if not len(_IMPORTANCE_OF):
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            found = _IMPORTANCE_OF.get(param) if param.grad is not None else None
            owner = found[0]() if found is not None else None
            if owner is not None:
                owner._buffers[IMPORTANCE.format(found[1])].addcmul_(param.grad, param.grad)


def detach_budget(model: torch.nn.Module) -> None:
    """Remove the budget hooks and attributes (merge: the plain model must be exactly MACE's)."""
    model.__dict__.pop(BUDGET_ATTR, None)
    model.__dict__.pop(SELECTION_ATTR, None)
    for hooks, fn in ((model._forward_pre_hooks, update_cut), (model._load_state_dict_post_hooks, _after_load)):
        for key in [k for k, f in hooks.items() if f is fn]:
            del hooks[key]
    for module in model.modules():
        module.__dict__.pop(CUT_ATTR, None)
        module.__dict__.pop(SCALE_ATTR, None)
