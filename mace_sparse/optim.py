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
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from .sparse_model import delta_parameters, threshold_parameters

GROUP_NAME = "sparse_thresholds"
DECAY_KEY = "sparse_threshold_weight_decay"
NORMALIZE_KEY = "sparse_delta_normalized"
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
) -> List[Dict[str, Any]]:
    """Move the threshold scores out of whatever groups hold them into their own group.

    Groups are also stripped of frozen parameters (they would only cost the optimizer time). With
    ``delta_eps`` > 0, groups made only of latent deltas get the gradient-scaled update (module docstring).
    """
    group = threshold_param_group(model, lr, weight_decay)
    scores = {id(p) for p in group["params"]}
    deltas = {id(p) for p in delta_parameters(getattr(model, "module", model))}
    cleaned = []
    for g in param_groups:
        g = dict(g)
        g["params"] = [p for p in g["params"] if id(p) not in scores and p.requires_grad]
        if delta_eps > 0 and g["params"] and all(id(p) in deltas for p in g["params"]):
            g["eps"] = delta_eps
            g[NORMALIZE_KEY] = True
        cleaned.append(g)
    cleaned.append(group)
    return cleaned


@torch.no_grad()
def apply_decoupled_threshold_decay(optimizer: torch.optim.Optimizer, *_args, **_kwargs) -> None:
    """s ← s·(1 − lr·λ_τ) for every group that carries a λ_τ (optimizer step pre-hook)."""
    for group in optimizer.param_groups:
        decay = group.get(DECAY_KEY, 0.0)
        if decay:
            factor = 1.0 - group["lr"] * decay
            for p in group["params"]:
                if p.grad is not None or p.requires_grad:
                    p.mul_(factor)


@torch.no_grad()
def normalize_delta_gradients(optimizer: torch.optim.Optimizer, *_args, **_kwargs) -> None:
    """Divide the ΔW gradients of flagged groups by their joint root-mean-square (one scale for all)."""
    grads = [p.grad for g in optimizer.param_groups if g.get(NORMALIZE_KEY) for p in g["params"]
             if p.grad is not None]
    if not grads:
        return
    count = sum(g.numel() for g in grads)
    rms = torch.sqrt(sum(g.pow(2).sum() for g in grads) / count)
    if float(rms) > 0.0:
        torch._foreach_div_(grads, rms)


def sparse_pre_step(optimizer: torch.optim.Optimizer, *args, **kwargs) -> None:
    """Optimizer step pre-hook: gradient-scaled ΔW update, then the decoupled λ_τ decay."""
    normalize_delta_gradients(optimizer)
    apply_decoupled_threshold_decay(optimizer)


def register_threshold_decay(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Attach :func:`sparse_pre_step` (λ_τ decay and the ΔW gradient scaling) to ``optimizer`` once."""
    if not getattr(optimizer, _HOOK_FLAG, False):
        optimizer.register_step_pre_hook(sparse_pre_step)
        setattr(optimizer, _HOOK_FLAG, True)
    return optimizer


def keep_threshold_lr_ratio_in_swa(optimizer: torch.optim.Optimizer, base_lr: float) -> None:
    """Give SWALR a per-group target so the threshold group keeps its learning-rate ratio in stage two."""
    for group in optimizer.param_groups:
        if group.get("name") == GROUP_NAME and "swa_lr" in group and "initial_lr" in group:
            group["swa_lr"] = group["swa_lr"] * group["initial_lr"] / base_lr
