"""Which Parameters MACE itself would optimise: asked of MACE's own ``get_params_options``.

"Trainable" has to mean what ``mace_run_train`` trains, not ``requires_grad``: MACE builds its optimizer
groups by module (``node_embedding``, ``interactions``, ``products``, ``readouts``, ``joint_embedding``,
``embedding_readout``, ``les_readouts``), so a Parameter elsewhere — ``radial_embedding.bessel_fn.
bessel_weights`` after ``load_foundations_elements``, a trainable ZBL or Agnesi constant — never moves in a
MACE fine-tune. Calling the real function (not a copy of its module list) keeps this right if MACE adds groups.
"""

from __future__ import annotations

import argparse
from typing import Dict, Optional

import torch


def mace_optimised_parameters(model: torch.nn.Module) -> Optional[Dict[str, torch.nn.Parameter]]:
    """``{name: Parameter}`` of the model's Parameters in MACE's optimizer groups, or ``None`` if the model is
    not one MACE's ``get_params_options`` understands (then every learnable Parameter counts)."""
    try:  # here, not at module level: model_walker (so the delta-file modules) imports this module, and
        # scripts_utils loads all of mace.modules (~3 s), which ``mace_sparse report`` must not pay
        from mace.tools.scripts_utils import get_params_options
    except ImportError:  # pragma: no cover - MACE is a dependency
        return None
    # freeze=0: nothing frozen, no module touched; the numbers only fill the groups' hyperparameters
    args = argparse.Namespace(lr_params_factors="{}", freeze=0, weight_decay=0.0, lr=1.0, amsgrad=True, beta=0.9)
    try:
        options = get_params_options(args, model)
    except AttributeError:  # no ``interactions`` / ``node_embedding``: not a MACE model
        return None
    ids = {id(p) for group in options["params"] for p in group["params"]}
    return {name: p for name, p in model.named_parameters() if id(p) in ids}
