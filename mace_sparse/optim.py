"""Optimizer groups for the thresholds, and their decoupled weight decay (the sparsity knob λ_τ).

The threshold scores get a param group of their own with their own learning rate. MACE's schedulers
(ExponentialLR, ReduceLROnPlateau) scale every group's own ``lr``, so the ratio between the δ learning rate
and the model learning rate survives them; stage two (SWALR) is given a per-group target for the same reason
(:func:`keep_threshold_lr_ratio_in_swa`).

Weight decay on the scores is **decoupled** (AdamW-style, applied before the optimizer step as
s ← s − lr_τ·λ_τ·s), not Adam's coupled L2: coupled L2 is divided by Adam's second-moment estimate and so
saturates, whereas the decoupled pull towards s = 0 (δ = 0.5) grows with λ_τ and with how far s is from 0.
The decay lives in the group as ``sparse_threshold_weight_decay``, so it is saved with the optimizer state
and restored by ``--restart_latest``.

How ΔW is updated (``delta_eps`` = κ > 0). With plain Adam every ΔW entry whose gradient keeps its sign moves
by about the learning rate per step, however small its gradient: a threshold then selects entries by sign
consistency, not by importance. With κ > 0 the ΔW gradients are divided by their root-mean-square over all
adapted tensors before the step and the ΔW groups get Adam's ε = κ, so an entry's step is ≈ lr where its
gradient is large compared with κ·RMS and ≈ lr·|g|/(κ·RMS) where it is small: entries that matter cross δ,
the rest stay exactly zero. κ = 0 is plain Adam. Both the flag and ε live in the param groups (saved with
the optimizer state).

Why ΔW learns faster than the run's lr (``delta_lr_factor``, default 3). An entry changes the model only once
|ΔW| > δ, and λ_τ holds δ at a few tenths (δ = sigmoid(s) with s pulled towards 0), so at the run's lr an entry
needs tens of steps before it has any effect, and a short fine-tune ends before the useful entries have moved
far past δ. The thresholds keep their own lr, so the factor moves the entries, not δ. The measurements behind
the default are in the README ("Choosing the defaults"). The groups' lr is their own, so MACE's schedulers keep
the ratio, and stage two keeps it too (:func:`keep_threshold_lr_ratio_in_swa`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch

from .budget import accumulate_importance, track_importance
from .sparse_model import delta_parameters, threshold_parameters

if TYPE_CHECKING:
    from .config import SparseConfig

GROUP_NAME = "sparse_thresholds"
DECAY_KEY = "sparse_threshold_weight_decay"
NORMALIZE_KEY = "sparse_delta_normalized"
#: Marks the groups made only of latent deltas (their lr is ``delta_lr_factor`` × the run's lr).
DELTA_GROUP_KEY = "sparse_delta_group"
_HOOK_FLAG = "_sparse_threshold_decay_hook"


def threshold_param_group(model: torch.nn.Module, lr: float, weight_decay: float) -> Dict[str, Any]:
    """The param group of all threshold scores (Adam's own weight decay off: ours is decoupled)."""
    return {
        "name": GROUP_NAME,
        "params": threshold_parameters(getattr(model, "module", model)),
        "lr": lr,
        "weight_decay": 0.0,
        DECAY_KEY: weight_decay,
    }


def add_threshold_group(
    param_groups: List[Dict[str, Any]],
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    delta_eps: float = 0.0,
    delta_lr: Optional[float] = None,
) -> List[Dict[str, Any]]:
    """Move the threshold scores out of whatever groups hold them into their own group.

    Groups are also stripped of frozen parameters (they would only cost the optimizer time). With
    ``delta_eps`` > 0, groups made only of latent deltas get the gradient-scaled update (module docstring);
    with ``delta_lr`` they get that learning rate as their own (``None``: the optimizer's default).
    """
    group = threshold_param_group(model, lr, weight_decay)
    scores = {id(p) for p in group["params"]}
    deltas = {id(p) for p in delta_parameters(getattr(model, "module", model))}
    cleaned = []
    for g in param_groups:
        g = dict(g)
        g["params"] = [p for p in g["params"] if id(p) not in scores and p.requires_grad]
        if g["params"] and all(id(p) in deltas for p in g["params"]):
            g[DELTA_GROUP_KEY] = True
            if delta_lr is not None:
                g["lr"] = delta_lr
            if delta_eps > 0:
                g["eps"] = delta_eps
                g[NORMALIZE_KEY] = True
        cleaned.append(g)
    cleaned.append(group)
    return cleaned


def sparse_param_groups(
    param_groups: List[Dict[str, Any]], model: torch.nn.Module, config: "SparseConfig", base_lr: float
) -> List[Dict[str, Any]]:
    """The param groups of a sparse_str run, as every entry point builds them from a :class:`SparseConfig`.

    Thresholds get their own group at ``config.threshold_lr`` (default: ``base_lr``); the latent deltas train at
    ``config.delta_lr_factor × base_lr`` with the gradient-scaled update of ``config.delta_eps``.
    """
    threshold_lr = config.threshold_lr if config.threshold_lr is not None else base_lr
    track_importance(model)  # a budget ranked by importance reads the gradients of exactly these deltas
    return add_threshold_group(param_groups, model, threshold_lr, config.threshold_weight_decay,
                               config.delta_eps, delta_lr=config.delta_lr_factor * base_lr)


@torch.no_grad()
def apply_decoupled_threshold_decay(optimizer: torch.optim.Optimizer, *_args, **_kwargs) -> None:
    """s ← s·(1 − lr·λ_τ) for every group that carries a λ_τ (optimizer step pre-hook)."""
    for group in optimizer.param_groups:
        decay = group.get(DECAY_KEY, 0.0)
        params = [p for p in group["params"] if p.requires_grad] if decay else []
        if params:
            # one fused kernel for all scores: a loop of tiny in-place ops was a visible share of a small
            # model's step
            torch._foreach_mul_(params, 1.0 - group["lr"] * decay)


@torch.no_grad()
def normalize_delta_gradients(optimizer: torch.optim.Optimizer, *_args, **_kwargs) -> None:
    """Divide the ΔW gradients of flagged groups by their joint root-mean-square (one scale for all)."""
    grads = [p.grad for g in optimizer.param_groups if g.get(NORMALIZE_KEY) for p in g["params"]
             if p.grad is not None]
    if not grads:
        return
    count = sum(g.numel() for g in grads)
    rms = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) / count**0.5
    if float(rms) > 0.0:
        torch._foreach_div_(grads, rms)


def sparse_pre_step(optimizer: torch.optim.Optimizer, *args, **kwargs) -> None:
    """Optimizer step pre-hook: importance from the raw gradients (budget ``fisher`` only), gradient-scaled ΔW
    update, then the decoupled λ_τ decay."""
    accumulate_importance(optimizer)
    normalize_delta_gradients(optimizer)
    apply_decoupled_threshold_decay(optimizer)


def register_threshold_decay(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Attach :func:`sparse_pre_step` (λ_τ decay and the ΔW gradient scaling) to ``optimizer`` once."""
    if not getattr(optimizer, _HOOK_FLAG, False):
        optimizer.register_step_pre_hook(sparse_pre_step)
        setattr(optimizer, _HOOK_FLAG, True)
    return optimizer


def keep_threshold_lr_ratio_in_swa(optimizer: torch.optim.Optimizer, base_lr: float) -> None:
    """Give SWALR a per-group target so the threshold group and the delta groups keep their learning-rate
    ratio to the run's lr in stage two (SWALR would otherwise move every group to the same ``swa_lr``).
    At ``--lr 0`` there is no ratio to keep (every group is at 0)."""
    if not base_lr:
        return
    for group in optimizer.param_groups:
        ours = group.get("name") == GROUP_NAME or group.get(DELTA_GROUP_KEY, False)
        if ours and "swa_lr" in group and "initial_lr" in group:
            group["swa_lr"] = group["swa_lr"] * group["initial_lr"] / base_lr
