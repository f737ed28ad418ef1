"""Make a MACE model sparse-trainable, report on it, and merge it back into a plain MACE model.

The shape follows Hugging Face peft: :func:`get_sparse_model` (≈ ``get_peft_model``),
:func:`print_trainable_parameters`, :func:`merge_and_unload`. The model is changed in place and keeps its
classes and module names, so MACE code that walks it (parameter groups, ``extract_config_mace_model``,
checkpoints) keeps working; only the adapted weights gain ``_foundation`` / ``_delta`` / ``_threshold_score``
entries in the state dict.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import budget, support
from . import reparametrization as rp
from .config import SparseConfig
from .layouts import element_index
from .model_walker import TargetWeight, find_targets

#: Marker in the model's instance dict: the config the model was made sparse-trainable with.
CONFIG_ATTR = "_sparse_str_config"
#: In the model's instance dict of a ``mace_run_train`` run: how MACE derived the model from the user's
#: foundation file (:mod:`mace_sparse.artifacts.derivation`), written into the delta header.
DERIVATION_ATTR = "_sparse_str_derivation"


def is_sparse_model(model: torch.nn.Module) -> bool:
    """True if ``model`` (or the model inside a DDP wrapper) carries the reparameterisation."""
    model = getattr(model, "module", model)
    return CONFIG_ATTR in model.__dict__


def sparse_config_of(model: torch.nn.Module) -> SparseConfig:
    model = getattr(model, "module", model)
    return SparseConfig(**model.__dict__[CONFIG_ATTR])


def get_sparse_model(
    model: torch.nn.Module,
    config: SparseConfig | None = None,
    exclude_prefixes: Sequence[str] = (),
) -> torch.nn.Module:
    """Freeze ``model`` and reparameterise its target weights for STR fine-tuning (in place).

    Every other parameter is frozen (``requires_grad=False``); the only trainable tensors afterwards are the
    latent deltas and the threshold scores (plus any module under ``exclude_prefixes``, which is left fully
    trainable, like peft's ``modules_to_save``). Before the first update the model predicts exactly what it
    predicted before, since ΔW = 0 and W + 0 is W bit for bit.
    """
    config = config or SparseConfig()
    if is_sparse_model(model):
        raise ValueError("the model is already sparse-trainable; call merge_and_unload() first")
    targets = find_targets(model, config.targets, exclude_prefixes)
    if not targets:
        raise ValueError(
            f"no weights of kind {', '.join(config.targets)} found in {type(model).__name__}; "
            "is this a MACE model (e3nn backend, not cuEquivariance)?"
        )

    def keep_trainable(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in exclude_prefixes)

    for name, param in model.named_parameters():
        if not keep_trainable(name):
            param.requires_grad_(False)
    num_elements = _num_elements(model)
    # every layout first: element_index reads the Parameter, which reparametrize moves into a buffer
    segments = [threshold_segments(t, config.granularity, num_elements) for t in targets]
    for target, (index, num_segments) in zip(targets, segments):
        rp.reparametrize(
            target.owner,
            target.name,
            init_threshold=config.init_threshold,
            segments=index,
            num_segments=num_segments,
            consumer=target.consumer,
            delta_init_std=config.delta_init_std,
            straight_through=config.straight_through,
        )
    if config.threshold_scale == "relative":
        for target in targets:
            budget.set_relative_scale(target.owner, target.name)
    model.__dict__[CONFIG_ATTR] = config.to_dict()
    if config.budget is not None:
        budget.attach_budget(model, config.budget, total_model_entries(model), config.selection)
    if config.retrain_support:
        support.prepare_support(model)
    return model


def _num_elements(model: torch.nn.Module) -> int:
    atomic_numbers = getattr(model, "atomic_numbers", None)
    return int(atomic_numbers.numel()) if isinstance(atomic_numbers, torch.Tensor) else 0


def threshold_segments(
    target: TargetWeight, granularity: str, num_elements: int
) -> Tuple[Optional[torch.Tensor], int]:
    """``(segments, number of δ entries)`` of one weight: which δ each entry uses (``None``: one δ for all).

    * ``path``: the irrep path of each entry (:mod:`mace_sparse.layouts`), where the weight has more than one;
    * ``element``: the element (position in ``model.atomic_numbers``) of each entry of an element-indexed
      weight (:func:`mace_sparse.layouts.element_index`), where the model has more than one element, so that a
      fine-tune can move the elements of its data without one shared δ pruning or freeing all elements at once;
    * otherwise (``layer``, and the fallback of both): one δ per tensor.
    """
    if granularity == "path" and len(target.path_labels) > 1:
        return target.path_index, len(target.path_labels)
    if granularity == "element" and num_elements > 1:
        elements = element_index(target, num_elements)
        if elements is not None:
            return elements, num_elements
    return None, 1


def delta_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The latent ΔW tensors, in module order."""
    return [owner._parameters[rp.DELTA.format(name)] for _, owner, name in rp.iter_reparametrized(model)]


def threshold_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The threshold scores s (δ = sigmoid(s)), in module order."""
    return [owner._parameters[rp.SCORE.format(name)] for _, owner, name in rp.iter_reparametrized(model)]


@dataclasses.dataclass
class SparsityStats:
    """Counts over the adapted weights and over the whole model.

    ``layer_sparsity`` is the fraction of adapted entries whose effective change S(ΔW, δ) is exactly zero
    (the paper's "layer" figure); ``total_sparsity`` the fraction of all model parameters left unchanged
    (the paper's "total" figure).
    """

    changed_entries: int
    adapted_entries: int
    total_entries: int
    mean_threshold: float

    @property
    def layer_sparsity(self) -> float:
        return 1.0 - self.changed_entries / max(self.adapted_entries, 1)

    @property
    def total_sparsity(self) -> float:
        return 1.0 - self.changed_entries / max(self.total_entries, 1)


def total_model_entries(model: torch.nn.Module) -> int:
    """Number of weights of the equivalent plain MACE model (each adapted weight counted once)."""
    model = getattr(model, "module", model)
    adapted = list(rp.iter_reparametrized(model))
    extra = {id(owner._parameters[key.format(name)]) for _, owner, name in adapted for key in (rp.DELTA, rp.SCORE)}
    foundation = sum(owner._buffers[rp.FOUNDATION.format(name)].numel() for _, owner, name in adapted)
    return foundation + sum(p.numel() for p in model.parameters() if id(p) not in extra)


@torch.no_grad()
def sparsity_stats(model: torch.nn.Module) -> SparsityStats:
    """Current sparsity of the effective deltas and the mean δ (one value per threshold entry)."""
    model = getattr(model, "module", model)
    budget.update_cut(model)
    changed = adapted = 0
    threshold_sum = 0.0
    threshold_count = 0
    for _, owner, name in rp.iter_reparametrized(model):
        change = rp.effective_delta(owner, name)
        changed += int(torch.count_nonzero(change))
        adapted += change.numel()
        delta_threshold = torch.sigmoid(owner._parameters[rp.SCORE.format(name)])
        threshold_sum += float(delta_threshold.sum())
        threshold_count += delta_threshold.numel()
    return SparsityStats(
        changed_entries=changed,
        adapted_entries=adapted,
        total_entries=total_model_entries(model),
        mean_threshold=threshold_sum / max(threshold_count, 1),
    )


def trainable_parameter_counts(model: torch.nn.Module) -> Dict[str, int]:
    """``trainable`` and ``all`` as peft counts them, so that ``trainable <= all`` always holds.

    peft's "all params" is every parameter of the wrapped model: the base weights *plus* the adapter. Here the
    base weights of an adapted tensor live in a frozen buffer and its adapter is the latent ΔW and threshold
    score, so "all" is the plain model's weights (:func:`total_model_entries`) plus ΔW and the scores; a plain
    model counts its parameters. Counting only the plain model (as before) let trainable exceed all.
    """
    model = getattr(model, "module", model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not is_sparse_model(model):
        return {"trainable": trainable, "all": sum(p.numel() for p in model.parameters())}
    adapter = sum(
        owner._parameters[key.format(name)].numel()
        for _, owner, name in rp.iter_reparametrized(model)
        for key in (rp.DELTA, rp.SCORE)
    )
    return {"trainable": trainable, "all": total_model_entries(model) + adapter}


def trainable_parameters_line(model: torch.nn.Module) -> str:
    """``trainable params: N || all params: M || trainable%: p`` with peft's meaning.

    "all params" is the base model's weights plus the adapter (latent deltas and threshold scores); the
    trainable ones are the adapter (and any fully trainable extra module), so ``trainable% <= 100``.
    """
    counts = trainable_parameter_counts(model)
    return (
        f"trainable params: {counts['trainable']:,} || all params: {counts['all']:,} || "
        f"trainable%: {100.0 * counts['trainable'] / max(counts['all'], 1):.4f}"
    )


def print_trainable_parameters(model: torch.nn.Module) -> None:
    """Print :func:`trainable_parameters_line` (peft's ``print_trainable_parameters``)."""
    print(trainable_parameters_line(model))


def merge_and_unload(model: torch.nn.Module) -> torch.nn.Module:
    """Fold W + S(ΔW, δ) into plain Parameters and remove every trace of this package (in place).

    The result has exactly the module classes, parameter names, shapes and hooks MACE itself builds, and
    all parameters trainable again, so it saves, loads and compiles without this package installed.
    Use ``merge_and_unload(copy.deepcopy(model))`` to keep training the original.
    """
    if not is_sparse_model(model):
        raise ValueError("the model is not sparse-trainable (no sparse_str reparameterisation found)")
    budget.update_cut(model)
    for _, owner, name in list(rp.iter_reparametrized(model)):
        rp.merge_into_parameter(owner, name)
    budget.detach_budget(model)
    support.remove_support(model)
    for module in model.modules():
        rp.remove_hooks(module)
    model.__dict__.pop(CONFIG_ATTR, None)
    model.__dict__.pop(DERIVATION_ATTR, None)
    for param in model.parameters():
        if not isinstance(param, _empty_param_type()):
            param.requires_grad_(True)
    return model


def _empty_param_type() -> type:
    # here, not at module level: the delta-file modules import this one and must load without MACE (~3 s)
    from mace.modules.symmetric_contraction import EmptyParam

    return EmptyParam
