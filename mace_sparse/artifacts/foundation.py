"""The plain foundation model inside a sparse-trainable model.

A delta is defined against the model the run actually started from: MACE's *configured* foundation
(element-filtered, with the run's atomic energies), which the sparse model keeps in its
``<name>_foundation`` buffers. Rebuilding it from those buffers (rather than re-reading the original
foundation file) is what makes ``revert`` and ``apply`` exact even when MACE changed the foundation on load.
"""

from __future__ import annotations

import copy

import torch

from .. import reparametrization as rp
from ..sparse_model import is_sparse_model, merge_and_unload


def foundation_of(sparse_model: torch.nn.Module) -> torch.nn.Module:
    """A plain MACE model (new object) equal to ``sparse_model`` with every adapted weight set to W.

    The copy goes through :func:`merge_and_unload`, so its structure (classes, hooks, parameter names,
    ``requires_grad``) is exactly that of the merged model; the adapted weights are then overwritten with
    the foundation buffers bit for bit (``copy_``, so even ``-0.0`` survives, which ``W + 0`` would not).
    """
    model = getattr(sparse_model, "module", sparse_model)
    if not is_sparse_model(model):
        raise ValueError("foundation_of() needs a sparse-trainable model (made by get_sparse_model)")
    plain = copy.deepcopy(model)
    saved = {
        qualified: owner._buffers[rp.FOUNDATION.format(name)].detach().clone()
        for qualified, owner, name in rp.iter_reparametrized(plain)
    }
    merge_and_unload(plain)
    params = dict(plain.named_parameters())
    with torch.no_grad():
        for qualified, base in saved.items():
            params[qualified].copy_(base)
    return plain
