"""Whatever MACE's own ``--lora`` adapts, ``--finetune-method sparse_str`` (targets ``all``) adapts too.

MACE's ``inject_LoRAs`` (mace/modules/lora.py) wraps every ``o3.Linear`` that shares an irrep between input
and output, every ``torch.nn.Linear`` and every e3nn ``FullyConnectedNet`` layer. Asked of MACE's real
function on every foundation twin, not of a list written here.
"""

from __future__ import annotations

import copy

import mace  # noqa: F401  (before e3nn)
import pytest

from foundation_twins import TWINS, build_twin
from mace_sparse.config import TARGET_KINDS
from mace_sparse.model_walker import find_targets


def lora_adapted_weights(model):
    """Names (in ``model``) of the base weights MACE's LoRA wraps (``X.base.weight`` there is ``X.weight`` here)."""
    from mace.modules.lora import LoRADenseLinear, LoRAFCLayer, LoRAO3Linear, inject_LoRAs

    lora = inject_LoRAs(copy.deepcopy(model), rank=2, alpha=1)
    wrappers = (LoRADenseLinear, LoRAFCLayer, LoRAO3Linear)
    return {f"{prefix}.weight" for prefix, module in lora.named_modules() if isinstance(module, wrappers)}


@pytest.mark.parametrize("twin", TWINS, ids=[t.name for t in TWINS])
def test_sparse_str_adapts_everything_mace_lora_adapts(twin):
    model = build_twin(twin)
    lora = lora_adapted_weights(model)
    names = {n for n, _ in model.named_parameters()}
    assert lora and lora <= names  # the LoRA names map back onto the plain model
    adapted = {t.qualified_name for t in find_targets(model, TARGET_KINDS)}
    assert lora <= adapted, sorted(lora - adapted)
    assert adapted - lora  # and more: contractions, skip TPs or biases / norms / scalars that LoRA leaves frozen
