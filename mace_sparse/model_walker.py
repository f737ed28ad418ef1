"""Find the weights of a MACE model that sparse fine-tuning can adapt, with their irrep-path layout.

Each adaptable weight is described as data (like e3nn's instructions): its kind, where it lives, which module
reads it, and how its entries split into irrep paths. The same description drives per-path thresholds,
the delta file and the interpretability report, so all three agree on what a "path" is.

Kinds:
    ``linear``       every e3nn ``o3.Linear`` with internal weights (embedding, interactions, products, readouts).
    ``skip_tp``      element-dependent self-connection tensor products (``o3.TensorProduct`` with internal weights).
    ``contraction``  symmetric-contraction weights (per element × coupling × channel).
    ``radial``       the radial MLP layers that produce the convolution's per-edge weights.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch


@dataclasses.dataclass
class TargetWeight:
    """One adaptable weight tensor.

    Attributes:
        qualified_name: dotted name of the Parameter in the model (``interactions.0.linear.weight``).
        kind: one of ``linear``, ``skip_tp``, ``contraction``, ``radial``.
        owner: module holding the Parameter.
        name: attribute name on ``owner``.
        consumer: module whose ``forward`` reads the weight (``owner``, or the parent of a ParameterList).
        path_labels: human-readable label of each irrep path.
        path_index: long tensor of the weight's shape giving each entry's path.
        element_axis: axis of the weight indexed by chemical element (``None`` if not element-dependent).
    """

    qualified_name: str
    kind: str
    owner: torch.nn.Module
    name: str
    consumer: torch.nn.Module
    path_labels: List[str]
    path_index: torch.Tensor
    element_axis: Optional[int] = None


def _flat_segments(shapes: Sequence[Tuple[int, ...]]) -> torch.Tensor:
    """Path index of a flat weight made of consecutive instruction blocks (e3nn layout)."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))


def _irrep_label(irreps, index: int) -> str:
    mul_ir = irreps[index]
    return f"{mul_ir.ir}[{index}]"


def _linear_layout(linear) -> Tuple[List[str], torch.Tensor]:
    instructions = list(linear.instructions)
    labels = [
        f"{_irrep_label(linear.irreps_in, ins.i_in)} -> {_irrep_label(linear.irreps_out, ins.i_out)}"
        for ins in instructions
    ]
    return labels, _flat_segments([ins.path_shape for ins in instructions])


def _tensor_product_layout(tp) -> Tuple[List[str], torch.Tensor]:
    weighted = [ins for ins in tp.instructions if ins.has_weight]
    labels = [
        f"{_irrep_label(tp.irreps_in1, ins.i_in1)} x {_irrep_label(tp.irreps_in2, ins.i_in2)}"
        f" -> {_irrep_label(tp.irreps_out, ins.i_out)}"
        for ins in weighted
    ]
    return labels, _flat_segments([ins.path_shape for ins in weighted])


def _is_element_input(tp, node_attr_dim: Optional[int]) -> bool:
    """The skip TP's second input is the one-hot element encoding (scalars, one per element)."""
    irreps2 = tp.irreps_in2
    return node_attr_dim is not None and irreps2.dim == node_attr_dim and irreps2.lmax == 0


def find_targets(
    model: torch.nn.Module,
    kinds: Sequence[str],
    exclude_prefixes: Sequence[str] = (),
) -> List[TargetWeight]:
    """All adaptable weights of ``model`` whose kind is in ``kinds``, in module order.

    Frozen or zeroed weights (``requires_grad=False``, MACE's ``EmptyParam``) are skipped: they are not
    learnable in MACE either.
    """
    from e3nn import o3
    from e3nn.nn._fc import FullyConnectedNet, _Layer
    from mace.modules.symmetric_contraction import Contraction, SymmetricContraction

    kinds = set(kinds)
    modules = dict(model.named_modules())
    node_attr_dim = None
    atomic_numbers = getattr(model, "atomic_numbers", None)
    if isinstance(atomic_numbers, torch.Tensor):
        node_attr_dim = int(atomic_numbers.numel())

    def excluded(prefix: str) -> bool:
        return any(prefix == p or prefix.startswith(p + ".") for p in exclude_prefixes)

    def learnable(p: Optional[torch.Tensor]) -> bool:
        return isinstance(p, torch.nn.Parameter) and p.requires_grad and p.numel() > 0

    found: List[TargetWeight] = []
    for prefix, module in model.named_modules():
        if excluded(prefix):
            continue
        if "linear" in kinds and isinstance(module, o3.Linear) and learnable(module._parameters.get("weight")):
            labels, index = _linear_layout(module)
            found.append(TargetWeight(f"{prefix}.weight", "linear", module, "weight", module, labels, index))
        elif (
            "skip_tp" in kinds
            and isinstance(module, o3.TensorProduct)
            and module.internal_weights
            and learnable(module._parameters.get("weight"))
        ):
            labels, index = _tensor_product_layout(module)
            element_axis = None
            if _is_element_input(module, node_attr_dim):
                element_axis = -1  # resolved per path by the report (path_shape[1] is the element axis)
            found.append(
                TargetWeight(f"{prefix}.weight", "skip_tp", module, "weight", module, labels, index, element_axis)
            )
        elif "contraction" in kinds and isinstance(module, Contraction):
            parent_name = prefix.rsplit(".", 2)[0] if prefix.count(".") >= 2 else ""
            parent = modules.get(parent_name)
            irrep = "?"
            if isinstance(parent, SymmetricContraction):
                position = int(prefix.rsplit(".", 1)[1])
                irrep = str(parent.irreps_out[position].ir)
            weights = [("weights_max", module, module.correlation)]
            plist = module.weights
            weights += [(str(i), plist, i + 1) for i in range(len(plist))]
            for name, owner, nu in weights:
                param = owner._parameters.get(name)
                if not learnable(param):
                    continue
                num_params = param.shape[1]
                labels = [f"{irrep} nu={nu} coupling {k}" for k in range(num_params)]
                index = torch.arange(num_params).view(1, -1, 1).expand(param.shape).contiguous()
                qualified = f"{prefix}.{name}" if owner is module else f"{prefix}.weights.{name}"
                found.append(TargetWeight(qualified, "contraction", owner, name, module, labels, index, 0))
        elif "radial" in kinds and isinstance(module, FullyConnectedNet):
            layers = [(n, m) for n, m in module.named_children() if isinstance(m, _Layer)]
            interaction = modules.get(prefix.rsplit(".", 1)[0]) if "." in prefix else None
            conv_tp = getattr(interaction, "conv_tp", None)
            for position, (layer_name, layer) in enumerate(layers):
                param = layer._parameters.get("weight")
                if not learnable(param):
                    continue
                last = position == len(layers) - 1
                if last and conv_tp is not None and getattr(conv_tp, "weight_numel", -1) == param.shape[1]:
                    labels, columns = _tensor_product_layout(conv_tp)
                    index = columns.view(1, -1).expand(param.shape).contiguous()
                else:
                    labels = [f"hidden layer {position}"]
                    index = torch.zeros(param.shape, dtype=torch.long)
                found.append(
                    TargetWeight(f"{prefix}.{layer_name}.weight", "radial", layer, "weight", layer, labels, index)
                )
    return found
