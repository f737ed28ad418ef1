"""Retraining the chosen support: fix which entries of ΔW may move, then train those freely.

The soft threshold both selects entries and shrinks every selected one by δ (the LASSO bias), and while the mask
is still being chosen, entries keep crossing δ in both directions. Once it has settled (MACE's stage two is the
natural point: it starts when stage one stops improving), :func:`fix_support` freezes the selection:

    W' = W + m ⊙ (ΔW − c),   m = [S(ΔW₀, δ₀) ≠ 0],   c = m ⊙ (ΔW₀ − S(ΔW₀, δ₀)) = m ⊙ sign(ΔW₀)·δ₀,

with ΔW₀, δ₀ the values at the moment of fixing. W' is unchanged at that moment (no jump, for EMA too, since
the latent ΔW is not rewritten), W' is linear in ΔW (plain gradients, no threshold, no straight-through), the
entries outside the support stay exactly at the foundation, and the surviving entries can take any value, so
the shrinkage is trained away. c is a buffer ``<name>_support_offset`` (non-zero exactly on the support, since a
selected entry has |ΔW₀| > δ₀ > 0) registered (as zeros) when the model is made sparse-trainable with
``retrain_support``, so checkpoints, ``--restart_latest``, the save-time reload and MACE's stage-two
``AveragedModel`` all see the same buffers before and after fixing.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict

import torch

from . import budget
from . import reparametrization as rp

OFFSET = rp.SUPPORT_OFFSET
#: Buffer on the model (0-dim bool): the support is fixed. Saved in checkpoints; the owners carry a Python flag
#: (``rp.SUPPORT_FIXED_ATTR``) so that the forward pass never reads a tensor to decide.
FIXED_BUFFER = "sparse_support_fixed"


def prepare_support(model: torch.nn.Module) -> None:
    """Register the (zero) offsets and the flag up front, so that the model's buffers never change in number
    (MACE's stage-two ``AveragedModel`` copies buffers positionally, checkpoints load them by name)."""
    for _, owner, name in rp.iter_reparametrized(model):
        base = owner._buffers[rp.FOUNDATION.format(name)]
        owner.register_buffer(OFFSET.format(name), torch.zeros_like(base))
    model.register_buffer(FIXED_BUFFER, torch.zeros((), dtype=torch.bool))
    model.register_load_state_dict_post_hook(_after_load)


def has_fixed_support(model: torch.nn.Module) -> bool:
    model = getattr(model, "module", model)
    return any(rp.has_support(owner, name) for _, owner, name in rp.iter_reparametrized(model))


def _set_flags(model: torch.nn.Module) -> None:
    for _, owner, _name in rp.iter_reparametrized(model):
        owner.__dict__[rp.SUPPORT_FIXED_ATTR] = True


def _after_load(module: torch.nn.Module, *_args) -> None:
    flag = module._buffers.get(FIXED_BUFFER)
    if flag is not None and bool(flag):
        _set_flags(module)


@torch.no_grad()
def fix_support(model: torch.nn.Module) -> Dict[str, int]:
    """Freeze the current support of every adapted weight (in place); returns the support size per weight."""
    model = getattr(model, "module", model)
    if FIXED_BUFFER not in model._buffers:
        prepare_support(model)
    if bool(model._buffers[FIXED_BUFFER]):
        return {q: int(torch.count_nonzero(o._buffers[OFFSET.format(n)])) for q, o, n in rp.iter_reparametrized(model)}
    budget.update_cut(model)
    sizes = {}
    for qualified, owner, name in rp.iter_reparametrized(model):
        delta = owner._parameters[rp.DELTA.format(name)]
        change = rp.effective_delta(owner, name)
        owner._buffers[OFFSET.format(name)].copy_(torch.where(change != 0, delta - change, torch.zeros_like(delta)))
        owner._parameters[rp.SCORE.format(name)].requires_grad_(False)
        sizes[qualified] = int(torch.count_nonzero(owner._buffers[OFFSET.format(name)]))
    model._buffers[FIXED_BUFFER].fill_(True)
    _set_flags(model)
    return sizes


def remove_support(model: torch.nn.Module) -> None:
    """Drop the flag buffer, its hook and the owners' flags (merge: the plain model must be exactly MACE's)."""
    model._buffers.pop(FIXED_BUFFER, None)
    hooks = model._load_state_dict_post_hooks
    for key in [k for k, f in hooks.items() if f is _after_load]:
        del hooks[key]
    for module in model.modules():
        module.__dict__.pop(rp.SUPPORT_FIXED_ATTR, None)


class FixSupportOnFirstCall(torch.nn.Module):
    """Stage two's loss, fixing the support the first time it is used (MACE switches to it when stage two
    starts, for ``--sparse_retrain_support``). The loss itself is returned unchanged."""

    def __init__(self, loss_fn: torch.nn.Module, model: Callable[[], torch.nn.Module]) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self._model = model
        self.fixed = False

    def forward(self, *args, **kwargs):
        if not self.fixed:
            sizes = fix_support(self._model())
            logging.info(f"Stage two: support fixed ({sum(sizes.values())} entries over {len(sizes)} weights); "
                         "the surviving entries now train without a threshold")
            self.fixed = True
        return self.loss_fn(*args, **kwargs)
