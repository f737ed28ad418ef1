"""Find the weights of a MACE model that sparse fine-tuning can adapt, with their irrep-path layout.

Each adaptable weight is described as data (like e3nn's instructions): its kind, where it lives, which module
reads it, and how its entries split into irrep paths (:mod:`mace_sparse.layouts`). The same description
drives per-path thresholds, the delta file and the interpretability report, so all three agree on what a
"path" is. Only parameters MACE itself would optimise are candidates (:mod:`mace_sparse.mace_groups`): a
``bessel_weights`` Parameter that MACE never puts in an optimizer group is not "trainable" here either.

Kinds (every learnable weight MACE 0.3.16 builds has one; see README "Foundation coverage"):
    ``linear``       every e3nn ``o3.Linear`` weight and bias (node embedding, interactions incl. the
                     non-linear block's ``source_embedding``/``target_embedding``, products, readouts).
    ``skip_tp``      element-dependent self-connection tensor products (``o3.TensorProduct`` with internal weights).
    ``contraction``  symmetric-contraction weights (per element × coupling × channel).
    ``radial``       the MLPs that turn edge features into per-edge weights: e3nn ``FullyConnectedNet`` layers
                     and the ``torch.nn.Linear`` weights and biases of MACE's ``RadialMLP`` (``conv_tp_weights``
                     and ``density_fn`` of every block).
    ``norm``         ``torch.nn.LayerNorm`` weight and bias (inside ``RadialMLP``).
    ``scalar``       zero-dimensional Parameters such as the non-linear block's ``alpha`` and ``beta``.
    ``embedding``    the ``--embedding_specs`` joint embedding (``torch.nn.Embedding`` / ``torch.nn.Linear``).
Equivariance does not restrict any of them: each mixes invariants, or channels within one irrep.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Set

import torch

from . import layouts
from .mace_groups import mace_optimised_parameters


@dataclasses.dataclass
class TargetWeight:
    """One adaptable weight tensor.

    Attributes:
        qualified_name: dotted name of the Parameter in the model (``interactions.0.linear.weight``).
        kind: one of :data:`mace_sparse.config.TARGET_KINDS`.
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


def _is_element_input(tp, node_attr_dim: Optional[int]) -> bool:
    """The skip TP's second input is the one-hot element encoding (scalars, one per element)."""
    irreps2 = tp.irreps_in2
    return node_attr_dim is not None and irreps2.dim == node_attr_dim and irreps2.lmax == 0


def _parent(prefix: str) -> str:
    return prefix.rsplit(".", 1)[0] if "." in prefix else ""


class _Walk:
    """One pass over the model's modules; each ``_visit_*`` claims the Parameters of one module type."""

    def __init__(self, model: torch.nn.Module, kinds: Sequence[str], exclude_prefixes: Sequence[str]) -> None:
        self.model = model
        self.kinds = set(kinds)
        self.exclude_prefixes = tuple(exclude_prefixes)
        self.modules: Dict[str, torch.nn.Module] = dict(model.named_modules())
        atomic_numbers = getattr(model, "atomic_numbers", None)
        self.num_elements = int(atomic_numbers.numel()) if isinstance(atomic_numbers, torch.Tensor) else None
        optimised = mace_optimised_parameters(model)
        self.optimised: Optional[Set[int]] = None if optimised is None else {id(p) for p in optimised.values()}
        self.found: List[TargetWeight] = []
        self.claimed: Set[int] = set()
        self.joint_embeddings: List[str] = []

    # ------------------------------------------------------------------------------------------- helpers
    def excluded(self, prefix: str) -> bool:
        return any(prefix == p or prefix.startswith(p + ".") for p in self.exclude_prefixes)

    def learnable(self, module: torch.nn.Module, name: str) -> bool:
        p = module._parameters.get(name)
        if not (isinstance(p, torch.nn.Parameter) and p.requires_grad and p.numel() > 0):
            return False
        return self.optimised is None or id(p) in self.optimised

    def add(self, kind: str, prefix: str, owner, name: str, layout: layouts.Layout, consumer=None,
            element_axis: Optional[int] = None, qualified: Optional[str] = None) -> None:
        param = owner._parameters.get(name)
        if id(param) in self.claimed or not self.learnable(owner, name):
            return
        self.claimed.add(id(param))  # claimed even when its kind is not asked for: one kind per Parameter
        if kind not in self.kinds:
            return
        labels, index = layout
        qualified = qualified or (f"{prefix}.{name}" if prefix else name)
        self.found.append(TargetWeight(qualified, kind, owner, name, consumer or owner, labels, index, element_axis))

    def conv_tp_of(self, mlp_prefix: str):
        """The conv tensor product fed by the MLP at ``mlp_prefix`` (a child of an interaction block)."""
        interaction = self.modules.get(_parent(mlp_prefix)) if "." in mlp_prefix else None
        return getattr(interaction, "conv_tp", None)

    # ------------------------------------------------------------------------------------------ visitors
    def visit(self, prefix: str, module: torch.nn.Module) -> None:
        # here, not at module level: the delta-file modules import this one, and ``mace_sparse report`` must read
        # a delta without loading MACE/e3nn (~3 s); any model being walked has already loaded them
        from mace.modules.embeddings import GenericJointEmbedding  # mace before e3nn
        from e3nn import o3
        from e3nn.nn._fc import FullyConnectedNet
        from mace.modules.radial import RadialMLP
        from mace.modules.symmetric_contraction import Contraction

        if isinstance(module, GenericJointEmbedding):
            self.joint_embeddings.append(prefix)
        if isinstance(module, o3.Linear):
            self.visit_o3_linear(prefix, module)
        elif isinstance(module, o3.TensorProduct) and module.internal_weights:
            layout = layouts.tensor_product_paths(module)
            axis = -1 if _is_element_input(module, self.num_elements) else None  # per path: axis 1 of its block
            self.add("skip_tp", prefix, module, "weight", layout, element_axis=axis)
        elif isinstance(module, Contraction):
            self.visit_contraction(prefix, module)
        elif isinstance(module, FullyConnectedNet):
            self.visit_fc_net(prefix, module)
        elif isinstance(module, RadialMLP):
            self.visit_radial_mlp(prefix, module)
        elif isinstance(module, torch.nn.LayerNorm) and not self.in_joint_embedding(prefix):
            for name in ("weight", "bias"):
                p = module._parameters.get(name)
                if p is not None:
                    self.add("norm", prefix, module, name, layouts.single_path(p.shape, f"layer norm {name}"))
        elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm)) and self.in_joint_embedding(
            prefix
        ):
            for name, p in module._parameters.items():
                if p is not None:
                    label = f"{type(module).__name__} {name}"
                    self.add("embedding", prefix, module, name, layouts.single_path(p.shape, label))
        for name, p in module._parameters.items():
            if p is not None and p.dim() == 0:
                self.add("scalar", prefix, module, name, layouts.single_path(p.shape, name))

    def in_joint_embedding(self, prefix: str) -> bool:
        return any(prefix.startswith(p + ".") for p in self.joint_embeddings)

    def visit_o3_linear(self, prefix: str, module) -> None:
        element_axis = 0 if layouts.element_rows(module, self.num_elements) else None
        self.add("linear", prefix, module, "weight", layouts.linear_layout(module), element_axis=element_axis)
        bias = module._parameters.get("bias")
        if bias is not None:
            self.add("linear", prefix, module, "bias", layouts.single_path(bias.shape, "bias"))

    def visit_contraction(self, prefix: str, module) -> None:
        from mace.modules.symmetric_contraction import SymmetricContraction  # lazily: see ``visit``

        parent = self.modules.get(prefix.rsplit(".", 2)[0] if prefix.count(".") >= 2 else "")
        irrep = "?"
        if isinstance(parent, SymmetricContraction):
            irrep = str(parent.irreps_out[int(prefix.rsplit(".", 1)[1])].ir)
        weights = [("weights_max", module, module.correlation)]
        plist = module.weights
        weights += [(str(i), plist, i + 1) for i in range(len(plist))]
        for name, owner, nu in weights:
            param = owner._parameters.get(name)
            if param is None:
                continue
            qualified = f"{prefix}.{name}" if owner is module else f"{prefix}.weights.{name}"
            layout = layouts.contraction_layout(param.shape, irrep, nu)
            self.add("contraction", prefix, owner, name, layout, consumer=module, element_axis=0, qualified=qualified)

    def visit_fc_net(self, prefix: str, module) -> None:
        from e3nn.nn._fc import _Layer  # lazily: see ``visit``

        layers = [(n, m) for n, m in module.named_children() if isinstance(m, _Layer)]
        conv_tp = self.conv_tp_of(prefix)
        for position, (layer_name, layer) in enumerate(layers):
            param = layer._parameters.get("weight")
            if param is None:
                continue
            last = position == len(layers) - 1
            layout = layouts.conv_weight_layout(param.shape, conv_tp if last else None, 1, f"hidden layer {position}")
            self.add("radial", f"{prefix}.{layer_name}", layer, "weight", layout)

    def visit_radial_mlp(self, prefix: str, module) -> None:
        """MACE's ``RadialMLP``: ``torch.nn.Linear`` layers (weight ``(out, in)`` and bias) → ``radial``.

        Its LayerNorms are visited on their own (kind ``norm``).
        """
        linears = [(n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
        conv_tp = self.conv_tp_of(prefix)
        for position, (sub, layer) in enumerate(linears):
            last = position == len(linears) - 1
            for name in ("weight", "bias"):
                p = layer._parameters.get(name)
                if p is None:
                    continue
                label = f"hidden layer {position}" + (" bias" if name == "bias" else "")
                layout = layouts.conv_weight_layout(p.shape, conv_tp if last else None, 0, label)
                self.add("radial", f"{prefix}.{sub}", layer, name, layout)


def find_targets(
    model: torch.nn.Module,
    kinds: Sequence[str],
    exclude_prefixes: Sequence[str] = (),
) -> List[TargetWeight]:
    """All adaptable weights of ``model`` whose kind is in ``kinds``, in module order (except that a
    ``RadialMLP``'s Linear layers come before its LayerNorms; :func:`~mace_sparse.reparametrization.
    iter_reparametrized`, which orders the report, is strictly in module order).

    Frozen or zeroed weights (``requires_grad=False``, MACE's ``EmptyParam``) and Parameters MACE never
    optimises are skipped: they are not learnable in MACE either.
    """
    walk = _Walk(model, kinds, exclude_prefixes)
    for prefix, module in model.named_modules():
        if not walk.excluded(prefix):
            walk.visit(prefix, module)
    return walk.found
