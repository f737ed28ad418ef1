"""Soft-threshold reparameterisation of one weight tensor: W' = W + sign(ΔW)·ReLU(|ΔW| − δ).

How a weight is reparameterised in place, without changing the module's class (so MACE's own code,
``extract_config_mace_model`` and ``deepcopy`` keep working, and the merged model is plain MACE):

* the pretrained weight W moves from ``module._parameters[name]`` to the buffer ``<name>_foundation``
  (frozen, saved in checkpoints, never optimised, not seen by EMA);
* the learnable latent delta ΔW is the Parameter ``<name>_delta`` (zeros at the start);
* the learnable threshold score s is the Parameter ``<name>_threshold_score``, δ = sigmoid(s), one entry
  per weight tensor (``layer``) or per irrep path (``path``; the buffer ``<name>_threshold_segments``
  maps every weight entry to its path);
* a forward pre-hook writes the effective weight W' as a plain tensor attribute ``module.<name>`` just
  before the module runs, so the unchanged ``forward`` reads ``self.<name>`` as always; a forward hook
  then detaches it, so no autograd graph is kept alive between steps and ``deepcopy`` works.

The dead zone. S(ΔW, δ) has zero gradient in ΔW wherever |ΔW| ≤ δ, so with ΔW = 0 at the start
(needed for step 0 to equal the foundation exactly) nothing would ever train. We use a straight-through
estimator for ΔW: the forward pass is the exact soft threshold, the backward pass treats
∂S/∂ΔW as 1 everywhere, so the latent ΔW keeps integrating the loss gradient inside the dead zone and an
entry starts to change the model once its accumulated pull exceeds δ. The gradient to δ is the exact one
(−sign(ΔW) where |ΔW| > δ). Written as ``ΔW − clamp(ΔW.detach(), −δ, δ)`` this costs three elementwise ops.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import torch

FOUNDATION = "{}_foundation"
DELTA = "{}_delta"
SCORE = "{}_threshold_score"
SEGMENTS = "{}_threshold_segments"
#: Names of the reparameterised weights of a module, kept in the instance dict so deepcopy carries it.
REGISTRY_ATTR = "_sparse_str_weights"
#: Set on a module that owns the hooks for itself (and its ParameterList children).
HOOKED_ATTR = "_sparse_str_hooked"
#: Set on an owner whose deltas take the exact soft-threshold gradient instead of the straight-through one.
EXACT_GRAD_ATTR = "_sparse_str_exact_gradient"
#: Per owner: {weight name: rms of its foundation weight}; δ is then relative to it (``mace_sparse.budget``).
SCALE_ATTR = "_sparse_str_scale"
#: Per owner: the global cut τ of a sparsity budget, in the same units as δ (``mace_sparse.budget``).
CUT_ATTR = "_sparse_str_cut"
#: Buffer of a budget ranked by importance (``selection="fisher"``): the accumulated squared gradient of W'.
IMPORTANCE = "{}_importance"
#: Buffer of a weight whose support was fixed (``mace_sparse.support``): W' = W + m ⊙ (ΔW − offset), m = offset ≠ 0.
SUPPORT_OFFSET = "{}_support_offset"


#: Python flag on an owner once its support is fixed (the tensor flag lives on the model, for checkpoints).
SUPPORT_FIXED_ATTR = "_sparse_str_support_fixed"


def has_support(module: torch.nn.Module, name: str) -> bool:
    """True once the support of ``module.<name>`` was fixed (``mace_sparse.support.fix_support``)."""
    return module.__dict__.get(SUPPORT_FIXED_ATTR, False) and SUPPORT_OFFSET.format(name) in module._buffers


def _support_change(module: torch.nn.Module, name: str, delta: torch.Tensor) -> torch.Tensor:
    offset = module._buffers[SUPPORT_OFFSET.format(name)]
    return torch.where(offset != 0, delta - offset, torch.zeros_like(delta))


def score_for_threshold(threshold: float) -> float:
    """Inverse of sigmoid: the score s with sigmoid(s) = δ."""
    return math.log(threshold) - math.log1p(-threshold)


def soft_threshold_ste(delta: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """sign(ΔW)·ReLU(|ΔW| − δ) in the forward pass, identity gradient for ΔW (straight-through).

    ``ΔW − clamp(ΔW, −δ, δ)`` equals the soft threshold exactly; detaching ΔW inside the clamp removes the
    clamp's gradient to ΔW (that is the straight-through part) while δ keeps its exact gradient.
    """
    return delta - torch.clamp(delta.detach(), -threshold, threshold)


def soft_threshold(delta: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The soft threshold itself, without any gradient trick (for merging and statistics)."""
    return delta - torch.clamp(delta, -threshold, threshold)


def thresholds(module: torch.nn.Module, name: str) -> torch.Tensor:
    """δ of one reparameterised weight, broadcastable to (or of) the weight's shape, in the weight's units.

    With a sparsity budget the budget's cut τ raises it where it binds; with relative thresholds both are
    fractions of the tensor's rms (see :mod:`mace_sparse.budget`). Without either this is sigmoid(s).
    """
    delta_threshold = torch.sigmoid(getattr(module, SCORE.format(name)))
    segments = module._buffers.get(SEGMENTS.format(name))
    if segments is not None:
        delta_threshold = delta_threshold[segments]
    elif module._parameters[DELTA.format(name)].dim() == 0:
        # a scalar weight (e.g. alpha of the non-linear block): a (1,) δ would broadcast W' to shape (1,)
        delta_threshold = delta_threshold.reshape(())
    cut = module.__dict__.get(CUT_ATTR)
    if isinstance(cut, dict):  # a budget ranked by importance: 0 where selected, +inf elsewhere, per entry
        cut = cut.get(name)
    if cut is not None:
        delta_threshold = torch.maximum(delta_threshold, cut)
    scale = module.__dict__.get(SCALE_ATTR, {}).get(name)
    if scale is not None:
        delta_threshold = delta_threshold * scale
    return delta_threshold


def effective_delta(module: torch.nn.Module, name: str) -> torch.Tensor:
    """S(ΔW, δ): the change the weight currently applies to the foundation weight (no grad tricks)."""
    if has_support(module, name):
        return _support_change(module, name, getattr(module, DELTA.format(name)))
    return soft_threshold(getattr(module, DELTA.format(name)), thresholds(module, name))


def reparametrized_names(module: torch.nn.Module) -> Tuple[str, ...]:
    return module.__dict__.get(REGISTRY_ATTR, ())


def _refresh_own(module: torch.nn.Module) -> None:
    for name in reparametrized_names(module):
        base = module._buffers[FOUNDATION.format(name)]
        delta = module._parameters[DELTA.format(name)]
        if has_support(module, name):
            module.__dict__[name] = base + _support_change(module, name, delta)
            continue
        shrink = soft_threshold if module.__dict__.get(EXACT_GRAD_ATTR, False) else soft_threshold_ste
        module.__dict__[name] = base + shrink(delta, thresholds(module, name))


def refresh(module: torch.nn.Module, *_args) -> None:
    """Write W' for the module's own reparameterised weights and those of its ParameterList children."""
    _refresh_own(module)
    for child in module.children():
        if isinstance(child, torch.nn.ParameterList) and reparametrized_names(child):
            _refresh_own(child)


def _detach_own(module: torch.nn.Module) -> None:
    for name in reparametrized_names(module):
        value = module.__dict__.get(name)
        if value is not None:
            module.__dict__[name] = value.detach()


def detach_after_forward(module: torch.nn.Module, *_args) -> None:
    """Drop the autograd history of W' once the module has run (the graph already holds what it needs)."""
    _detach_own(module)
    for child in module.children():
        if isinstance(child, torch.nn.ParameterList) and reparametrized_names(child):
            _detach_own(child)


def _refresh_after_load(module: torch.nn.Module, *_args) -> None:
    with torch.no_grad():
        refresh(module)


def reparametrize(
    owner: torch.nn.Module,
    name: str,
    init_threshold: float,
    segments: Optional[torch.Tensor],
    num_segments: int,
    consumer: torch.nn.Module,
    delta_init_std: float = 0.0,
    straight_through: bool = True,
) -> None:
    """Turn ``owner.<name>`` (a Parameter) into foundation buffer + latent delta + threshold score.

    Args:
        owner: module holding the Parameter.
        name: its attribute name.
        init_threshold: initial δ (absolute).
        segments: long tensor of the weight's shape mapping each entry to a path, or ``None`` for one δ.
        num_segments: number of δ entries.
        consumer: the module whose forward reads the weight (``owner`` or, for a ParameterList, its parent).
        delta_init_std: ΔW starts at randn · this (0: exactly zero, so step 0 is the foundation bit for bit).
        straight_through: straight-through ΔW gradient (default) or the exact soft-threshold gradient.
    """
    weight = owner._parameters.pop(name)
    base = weight.detach().clone()
    owner.register_buffer(FOUNDATION.format(name), base)
    start = torch.randn_like(base) * delta_init_std if delta_init_std > 0 else torch.zeros_like(base)
    owner.register_parameter(DELTA.format(name), torch.nn.Parameter(start))
    if not straight_through:
        owner.__dict__[EXACT_GRAD_ATTR] = True
    score = torch.full((num_segments,), score_for_threshold(init_threshold), dtype=base.dtype, device=base.device)
    owner.register_parameter(SCORE.format(name), torch.nn.Parameter(score))
    if segments is not None:
        owner.register_buffer(SEGMENTS.format(name), segments.to(device=base.device, dtype=torch.long))
    owner.__dict__[REGISTRY_ATTR] = reparametrized_names(owner) + (name,)
    with torch.no_grad():  # base.clone() at ΔW = 0 keeps even the sign of a -0.0 entry
        moved = delta_init_std > 0
        owner.__dict__[name] = base + soft_threshold(start, thresholds(owner, name)) if moved else base.clone()
    if not consumer.__dict__.get(HOOKED_ATTR, False):
        consumer.register_forward_pre_hook(refresh)
        consumer.register_forward_hook(detach_after_forward)
        consumer.register_load_state_dict_post_hook(_refresh_after_load)
        consumer.__dict__[HOOKED_ATTR] = True


def merge_into_parameter(owner: torch.nn.Module, name: str) -> None:
    """Replace the reparameterisation of ``owner.<name>`` by a plain Parameter holding W + S(ΔW, δ)."""
    with torch.no_grad():
        merged = owner._buffers[FOUNDATION.format(name)] + effective_delta(owner, name)
    owner.__dict__.pop(name, None)
    for key in (FOUNDATION, SEGMENTS, SUPPORT_OFFSET, IMPORTANCE):
        owner._buffers.pop(key.format(name), None)
    for key in (DELTA, SCORE):
        owner._parameters.pop(key.format(name), None)
    owner._parameters[name] = torch.nn.Parameter(merged)
    remaining = tuple(n for n in reparametrized_names(owner) if n != name)
    if remaining:
        owner.__dict__[REGISTRY_ATTR] = remaining
    else:
        owner.__dict__.pop(REGISTRY_ATTR, None)


def remove_hooks(consumer: torch.nn.Module) -> None:
    """Remove this package's hooks so that the module is exactly what MACE built."""
    if not consumer.__dict__.pop(HOOKED_ATTR, False):
        return
    ours = (refresh, detach_after_forward, _refresh_after_load)
    for hooks in (consumer._forward_pre_hooks, consumer._forward_hooks, consumer._load_state_dict_post_hooks):
        for key in [k for k, fn in hooks.items() if fn in ours]:
            del hooks[key]


def iter_reparametrized(model: torch.nn.Module) -> Iterator[Tuple[str, torch.nn.Module, str]]:
    """(qualified name, owner module, weight name) of every reparameterised weight, in module order."""
    for prefix, module in model.named_modules():
        for name in reparametrized_names(module):
            yield (f"{prefix}.{name}" if prefix else name), module, name
