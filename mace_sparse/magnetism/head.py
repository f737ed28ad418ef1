"""The per-atom magnetic-moment readout and how it rides on a MACE model during training.

The head reads only the **invariant** (``0e``) channels of MACE's node features plus the one-hot element, so
its output is unchanged by any rotation, reflection or translation of the structure and is permuted with the
atoms: the moments it predicts are invariant by construction, not by training.

During a ``mace_run_train`` run the head is a submodule ``magnetic_head`` of the MACE model, and a forward
hook adds ``output["magmoms"]``. MACE's training loop, EMA, DDP and checkpoints then handle it like any other
part of the model without knowing about it. The hook is a module-level function, so the model still pickles
and deep-copies.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from .config import MagneticConfig
from .statistics import node_features, per_element_linear_fit

HEAD_NAME = "magnetic_head"


def invariant_feature_index(model: torch.nn.Module) -> List[int]:
    """Positions of the scalar-even channels in MACE's concatenated ``node_feats`` output.

    ``node_feats`` is the concatenation of every product block's output, whose irreps are those of the block's
    final o3.Linear; only ``0e`` entries are invariant.
    """
    index: List[int] = []
    offset = 0
    for product in model.products:
        for mul_ir in product.linear.irreps_out:
            width = mul_ir.mul * mul_ir.ir.dim
            if mul_ir.ir.l == 0 and mul_ir.ir.p == 1:
                index.extend(range(offset, offset + width))
            offset += width
    if not index:
        raise ValueError("the model's node features have no invariant (0e) channels to read moments from")
    return index


class MagneticHead(torch.nn.Module):
    """MLP from (invariant node features, one-hot element) to one moment per atom, in μB.

    The moment of an atom of element Z with standardised features x is ``b_Z + w_Z·x + MLP(x, Z)``: a
    per-element linear map (started from a least-squares fit to the training moments, as MACE starts energies
    from least-squares E0s) plus an MLP (its last layer starts at zero) that learns what the linear map misses.
    ``signed=False`` returns the absolute value: magnitudes.
    """

    def __init__(self, feature_index: Sequence[int], num_elements: int, hidden: int = 64, signed: bool = False):
        super().__init__()
        self.register_buffer("feature_index", torch.as_tensor(list(feature_index), dtype=torch.long))
        self.register_buffer("feature_shift", torch.zeros(len(feature_index)))
        self.register_buffer("feature_scale", torch.ones(len(feature_index)))
        self.signed = bool(signed)
        width = len(feature_index) + num_elements
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(width, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, 1),
        )
        with torch.no_grad():
            self.mlp[-1].weight.zero_()
            self.mlp[-1].bias.zero_()
        self.element_offset = torch.nn.Parameter(torch.zeros(num_elements))
        self.element_weight = torch.nn.Parameter(torch.zeros(num_elements, len(feature_index)))

    def forward(self, node_feats: torch.Tensor, node_attrs: torch.Tensor) -> torch.Tensor:
        features = (node_feats.index_select(-1, self.feature_index) - self.feature_shift) / self.feature_scale
        attrs = node_attrs.to(node_feats.dtype)
        linear = attrs @ self.element_offset + ((attrs @ self.element_weight) * features).sum(-1)
        out = linear + self.mlp(torch.cat([features, attrs], dim=-1)).squeeze(-1)
        return out if self.signed else out.abs()


def magnetic_forward_hook(module: torch.nn.Module, inputs: tuple, output: Any) -> Any:
    """Adds ``output["magmoms"]`` (one value per atom) to a MACE forward pass."""
    if not isinstance(output, dict) or output.get("node_feats") is None:
        return output
    data: Dict[str, torch.Tensor] = inputs[0]
    output["magmoms"] = module.magnetic_head(output["node_feats"], data["node_attrs"])
    return output


def has_magnetic_head(model: Any) -> bool:
    return isinstance(model, torch.nn.Module) and isinstance(getattr(model, HEAD_NAME, None), MagneticHead)


def attach_magnetic_head(
    model: torch.nn.Module,
    config: MagneticConfig,
    element_means: Optional[Dict[int, float]] = None,
    frames: Optional[Sequence] = None,
) -> MagneticHead:
    """Give a MACE model a trainable moment head (in place) and return the head.

    ``element_means`` (atomic number → mean reference moment in μB) initialises the per-element offsets;
    ``frames`` (a sample of training structures) sets the standardisation of the head's input features.
    """
    if has_magnetic_head(model):
        raise ValueError("the model already carries a magnetic head")
    reference = next(model.parameters())
    head = MagneticHead(
        invariant_feature_index(model),
        num_elements=len(model.atomic_numbers),
        hidden=config.hidden,
        signed=config.signed,
    ).to(device=reference.device, dtype=reference.dtype)
    if frames:
        _initialise_from_data(model, head, frames, config)
    elif element_means:
        with torch.no_grad():
            for i, z in enumerate(int(z) for z in model.atomic_numbers):
                if z in element_means:
                    head.element_offset[i] = element_means[z]
    model.add_module(HEAD_NAME, head)
    model.register_forward_hook(magnetic_forward_hook)
    return head


@torch.no_grad()
def _initialise_from_data(model: torch.nn.Module, head: MagneticHead, frames: Sequence, config: MagneticConfig) -> None:
    """Input standardisation from the foundation's features on ``frames``, then the least-squares linear map."""
    features, attrs, used = node_features(model, frames, head.feature_index.tolist())
    if features.shape[0] < 2:
        return
    head.feature_shift.copy_(features.mean(0))
    head.feature_scale.copy_(features.std(0).clamp_min(1e-6))
    moments, labelled = [], []
    for atoms in used:
        values = atoms.arrays.get(config.key)
        present = values is not None
        values = np.zeros(len(atoms)) if values is None else np.asarray(values, dtype=float).reshape(-1)
        moments.append(values if config.signed else np.abs(values))
        labelled.append(np.full(len(atoms), present))
    target = torch.as_tensor(np.concatenate(moments), dtype=features.dtype)
    mask = torch.as_tensor(np.concatenate(labelled))
    standardised = (features - head.feature_shift) / head.feature_scale
    weights, offsets = per_element_linear_fit(standardised, attrs, target, mask)
    head.element_weight.copy_(weights)
    head.element_offset.copy_(offsets)


def detach_magnetic_head(model: torch.nn.Module) -> MagneticHead:
    """Remove head and hook (in place), leaving a plain MACE model; returns the head."""
    head = getattr(model, HEAD_NAME)
    for key, hook in list(model._forward_hooks.items()):
        if hook is magnetic_forward_hook:
            del model._forward_hooks[key]
    delattr(model, HEAD_NAME)
    return head
