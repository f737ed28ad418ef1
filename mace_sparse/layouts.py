"""How the entries of one adaptable weight split into paths: e3nn instruction blocks, couplings, output rows.

A "path" is the unit that gets its own threshold (``--sparse_threshold_granularity path``) and its own line in
the report. Where the weight has an equivariant structure (e3nn instructions, contraction couplings, the
per-edge weights a radial MLP feeds to each tensor-product path) the paths follow it; a weight without such
structure (a hidden MLP layer, a LayerNorm, a scalar) is honestly a single path.

:func:`element_index` gives the other axis an entry can be split by, the chemical element. It lives here, below
:mod:`mace_sparse.sparse_model` (per-element thresholds, ``--sparse_threshold_granularity element``) and
:mod:`mace_sparse.artifacts.layout` (per-element counts in the delta file), so that both use one definition
without an import cycle.
"""

from __future__ import annotations

from typing import List, Optional, Protocol, Sequence, Tuple

import torch

#: (labels, index tensor of the weight's shape giving each entry's path)
Layout = Tuple[List[str], torch.Tensor]


def flat_segments(shapes: Sequence[Tuple[int, ...]]) -> torch.Tensor:
    """Path index of a flat weight made of consecutive instruction blocks (e3nn layout)."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))


def irrep_label(irreps, index: int) -> str:
    return f"{irreps[index].ir}[{index}]"


def linear_layout(linear) -> Layout:
    """An e3nn ``o3.Linear`` weight: one path per instruction ``irrep_in -> irrep_out``.

    With ``biases=True`` e3nn lists the biases as extra instructions with ``i_in == -1``; they live in the
    separate ``bias`` Parameter, not in ``weight``, so they are not paths of the weight.
    """
    instructions = [ins for ins in linear.instructions if ins.i_in != -1]
    labels = [
        f"{irrep_label(linear.irreps_in, ins.i_in)} -> {irrep_label(linear.irreps_out, ins.i_out)}"
        for ins in instructions
    ]
    return labels, flat_segments([ins.path_shape for ins in instructions])


def tensor_product_paths(tp) -> Layout:
    """The weighted instructions of an e3nn tensor product, as labels and a flat path index."""
    weighted = [ins for ins in tp.instructions if ins.has_weight]
    labels = [
        f"{irrep_label(tp.irreps_in1, ins.i_in1)} x {irrep_label(tp.irreps_in2, ins.i_in2)}"
        f" -> {irrep_label(tp.irreps_out, ins.i_out)}"
        for ins in weighted
    ]
    return labels, flat_segments([ins.path_shape for ins in weighted])


def single_path(shape: torch.Size, label: str) -> Layout:
    """One path for the whole tensor (no equivariant structure to split it by)."""
    return [label], torch.zeros(shape, dtype=torch.long)


def contraction_layout(shape: torch.Size, irrep: str, nu: int) -> Layout:
    """Symmetric-contraction weights ``[element, coupling, channel]``: one path per coupling."""
    num_params = shape[1]
    labels = [f"{irrep} nu={nu} coupling {k}" for k in range(num_params)]
    index = torch.arange(num_params).view(1, -1, 1).expand(shape).contiguous()
    return labels, index


def conv_weight_layout(shape: torch.Size, conv_tp, output_axis: int, label: str) -> Layout:
    """A layer of the MLP that makes the convolution's per-edge weights.

    Its output entries along ``output_axis`` are the conv tensor product's weights, in instruction order, so
    the last layer splits by tensor-product path (axis 1 of e3nn's ``(in, out)`` layer, axis 0 of
    ``torch.nn.Linear``'s ``(out, in)`` weight and of its bias). Any other layer is a single path.
    """
    weight_numel = getattr(conv_tp, "weight_numel", -1) if conv_tp is not None else -1
    if len(shape) > output_axis and shape[output_axis] == weight_numel:
        labels, columns = tensor_product_paths(conv_tp)
        view = [1] * len(shape)
        view[output_axis] = -1
        return labels, columns.view(view).expand(shape).contiguous()
    return single_path(shape, label)


def element_rows(linear, num_elements: Optional[int]) -> bool:
    """True if an ``o3.Linear``'s input is the one-hot element (node embedding, source/target embeddings)."""
    irreps_in = linear.irreps_in
    return num_elements is not None and irreps_in.dim == num_elements and irreps_in.lmax == 0 and len(irreps_in) == 1


class ElementTarget(Protocol):
    """What :func:`element_index` reads of a target (:class:`mace_sparse.model_walker.TargetWeight` has it).

    A protocol rather than an import: the walker imports this module, so this module cannot import the walker.
    """

    kind: str
    owner: torch.nn.Module
    name: str
    element_axis: Optional[int]


def blocks_along(shapes: Sequence[Tuple[int, ...]], axis: int) -> torch.Tensor:
    """Index along ``axis`` of every entry of consecutive flat instruction blocks of the given shapes."""
    parts = []
    for shape in shapes:
        view = [1] * len(shape)
        view[axis] = shape[axis]
        parts.append(torch.arange(shape[axis]).view(view).expand(shape).reshape(-1))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def element_index(target: ElementTarget, num_elements: int) -> Optional[torch.Tensor]:
    """Element (position in the model's ``atomic_numbers``) of every entry of an element-dependent weight, else None.

    * symmetric contraction: axis 0 of the weight is the element;
    * skip tensor product whose second input is the one-hot element: axis 1 of each path block
      ``(mul_in1, num_elements, mul_out)``;
    * an ``o3.Linear`` whose input is the one-hot element (node embedding, the non-linear block's
      ``source_embedding``/``target_embedding``): the rows (``mul_in``) are elements.

    Reads only the weight's shape and the module's instructions, so it must be called while ``target.name`` is
    still the module's Parameter (before :func:`mace_sparse.reparametrization.reparametrize` moves it).
    """
    weight = target.owner._parameters[target.name]
    if target.kind == "contraction" and target.element_axis == 0 and weight.shape[0] == num_elements:
        return torch.arange(num_elements).view(-1, *([1] * (weight.dim() - 1))).expand(weight.shape).contiguous()
    if target.kind == "skip_tp" and target.element_axis == -1:
        shapes = [tuple(ins.path_shape) for ins in target.owner.instructions if ins.has_weight]
        if all(len(s) == 3 and s[1] == num_elements for s in shapes):
            return blocks_along(shapes, 1).view(weight.shape)
    if target.kind == "linear" and target.element_axis == 0 and target.name == "weight":
        shapes = [tuple(ins.path_shape) for ins in target.owner.instructions]
        if all(len(s) == 2 and s[0] == num_elements for s in shapes):
            return blocks_along(shapes, 0).view(weight.shape)
    return None
