"""The new kinds train and merge like the old ones, and a run says what it adapts and what it leaves frozen.

On the mh-* twin (MACE's non-linear block: ``RadialMLP`` of ``torch.nn.Linear`` + ``LayerNorm``, scalar
``alpha``/``beta``) and the ``--embedding_specs`` twin; the table of twins is in foundation_twins.py.
"""

from __future__ import annotations

import argparse
import copy
import logging

import mace  # noqa: F401  (before e3nn)
import pytest
import torch

from foundation_twins import CHANNELS, TWINS, build_twin, twin_batch, twin_structures
from mace_sparse import SparseConfig, get_sparse_model, merge_and_unload
from mace_sparse import reparametrization as rp
from mace_sparse.artifacts.foundation import foundation_of
from mace_sparse.artifacts.layout import layer_records
from mace_sparse.config import TARGET_KINDS
from mace_sparse.coverage import NOT_OPTIMISED, coverage_of
from mace_sparse.integration.run_hooks import FineTuneHooks
from mace_sparse.model_walker import find_targets

pytestmark = pytest.mark.usefixtures("fast_deterministic_torch")

MH = next(t for t in TWINS if t.name == "mh-1")
EMB = next(t for t in TWINS if t.name == "embedding-specs")


def loss_of(model, batch):
    out = model(dict(batch), training=True, compute_force=True)
    return (out["energy"] ** 2).sum() + (out["forces"] ** 2).sum()


@pytest.mark.parametrize("twin", [MH, EMB], ids=lambda t: t.name)
def test_new_kinds_get_gradients_train_and_merge_to_their_exact_shapes(twin):
    model = build_twin(twin)
    with torch.no_grad():
        for interaction in model.interactions:
            if hasattr(interaction, "beta"):
                interaction.beta.fill_(0.5)  # MACE starts beta at 0, where density_fn has no gradient at all
    sparse = get_sparse_model(copy.deepcopy(model), SparseConfig(granularity="path"))
    batch = twin_batch(model, twin, twin_structures(twin))
    loss_of(sparse, batch).backward()
    kinds = {t.qualified_name: t.kind for t in find_targets(model, TARGET_KINDS)}
    expected = {"mh-1": {"linear", "contraction", "radial", "norm", "scalar"}, "embedding-specs": {"embedding"}}
    assert expected[twin.name] <= set(kinds.values())
    for qualified, owner, name in rp.iter_reparametrized(sparse):
        grad = owner._parameters[rp.DELTA.format(name)].grad
        assert grad is not None and grad.shape == owner._buffers[rp.FOUNDATION.format(name)].shape, qualified
        assert torch.count_nonzero(grad) > 0, qualified  # the straight-through gradient reaches every ΔW
    opt = torch.optim.Adam([p for p in sparse.parameters() if p.requires_grad], lr=0.05)
    opt.step()  # every ΔW with a gradient moves by ≈ lr, past δ = 1e-3
    merged = merge_and_unload(copy.deepcopy(sparse))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in merged.state_dict().items()} == shapes
    if twin is MH:
        assert merged.interactions[0].alpha.shape == () and merged.interactions[0].alpha != model.interactions[0].alpha
        assert merged.interactions[0].conv_tp_weights.net[1].weight.shape == (8,)  # a LayerNorm weight


def test_radial_mlp_last_layer_splits_by_conv_tp_path_and_embeddings_by_element():
    model = build_twin(MH)
    targets = {t.qualified_name: t for t in find_targets(model, TARGET_KINDS)}
    interaction = model.interactions[1]
    weighted = [ins for ins in interaction.conv_tp.instructions if ins.has_weight]
    last = max(i for i, m in enumerate(interaction.conv_tp_weights.net) if isinstance(m, torch.nn.Linear))
    for name in ("weight", "bias"):
        t = targets[f"interactions.1.conv_tp_weights.net.{last}.{name}"]
        assert t.kind == "radial" and len(t.path_labels) == len(weighted) > 1
        rows = t.path_index if name == "bias" else t.path_index[:, 0]
        sizes = torch.bincount(rows, minlength=len(weighted)).tolist()
        assert sizes == [int(torch.Size(ins.path_shape).numel()) for ins in weighted]  # output rows, in TP order
    assert len(targets["interactions.1.conv_tp_weights.net.0.weight"].path_labels) == 1  # a hidden layer
    assert targets["interactions.1.conv_tp_weights.net.1.weight"].kind == "norm"
    assert targets["interactions.1.alpha"].kind == targets["interactions.1.beta"].kind == "scalar"
    # the source/target embeddings read the one-hot element: the report counts their changes per element
    sparse = get_sparse_model(copy.deepcopy(model), SparseConfig())
    owner = sparse.interactions[0].source_embedding
    with torch.no_grad():
        owner.weight_delta.view(len(MH.elements), -1)[1, :2] = 0.5
    foundation = foundation_of(sparse)
    merged = merge_and_unload(copy.deepcopy(sparse))
    masks = {k: merged.state_dict()[k] != v for k, v in foundation.state_dict().items()}
    records = {r["name"]: r for r in layer_records(sparse, foundation, masks)}
    record = records["interactions.0.source_embedding.weight"]
    assert record["element_changed"] == [0, 2] and record["element_size"] == [CHANNELS] * 2


def test_frozen_parameters_are_named_with_their_reason():
    model = build_twin(MH)
    # what MACE's load_foundations_elements does: bessel_weights becomes a Parameter MACE never optimises
    bessel = model.radial_embedding.bessel_fn
    bessel.bessel_weights = torch.nn.Parameter(bessel.bessel_weights.clone())
    coverage = coverage_of(model, ("linear", "contraction"))
    total = sum(p.numel() for n, p in model.named_parameters() if "bessel" not in n)
    assert coverage.trainable == total
    assert set(coverage.adapted) == {"linear", "contraction"}
    line = coverage.frozen_line()
    assert line.count("\n") == 0 and line.startswith("sparse_str leaves frozen: ")
    n_bessel = bessel.bessel_weights.numel()
    assert f"radial_embedding.bessel_fn.bessel_weights ({n_bessel} entries: {NOT_OPTIMISED})" in line
    for kind in ("radial", "norm", "scalar"):
        assert f"kind {kind} not in --sparse_targets" in line
    assert "interactions.0.alpha" in line and "interactions.1.conv_tp_weights.net.1.bias" in line
    share = coverage.share_line()
    linear = coverage.adapted["linear"]
    assert f"linear {100.0 * linear / total:.1f}% ({linear:,})" in share
    # the reparameterised model adapts exactly what the coverage counted, and never bessel_weights
    sparse = get_sparse_model(copy.deepcopy(model), SparseConfig(targets=("linear", "contraction")))
    adapted = {q: owner._buffers[rp.FOUNDATION.format(n)].numel() for q, owner, n in rp.iter_reparametrized(sparse)}
    assert sum(adapted.values()) == coverage.adapted_total
    assert not any("bessel" in q for q in adapted)


def test_run_start_logs_share_per_kind_and_one_warning_line(caplog):
    model = build_twin(MH)
    hooks = FineTuneHooks(argparse.Namespace(lr=0.01), SparseConfig(targets=("linear", "radial")), None)
    with caplog.at_level(logging.INFO):
        hooks.configure_model(model)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("sparse_str adapts ") and "linear " in m and "radial " in m for m in infos)
    assert len(warnings) == 1 and "kind norm not in --sparse_targets" in warnings[0]
    assert "kind scalar not in --sparse_targets" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        FineTuneHooks(argparse.Namespace(lr=0.01), SparseConfig(), None).configure_model(build_twin(MH))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # all: nothing left frozen
    assert any("sparse_str adapts 100.0% of the" in r.getMessage() for r in caplog.records)


def _variant(**overrides):
    """A small plain ``MACE`` with one MACE constructor option changed (another model class: ``cls=<name>``)."""
    import numpy as np
    from e3nn import o3
    from mace import modules

    residual = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    config = dict(
        r_max=4.0, num_bessel=4, num_polynomial_cutoff=5, max_ell=2, interaction_cls=residual,
        interaction_cls_first=residual, num_interactions=2, num_elements=2, hidden_irreps=o3.Irreps("4x0e+4x1o"),
        MLP_irreps=o3.Irreps("4x0e"), atomic_energies=np.zeros(2), avg_num_neighbors=3.0, atomic_numbers=[1, 8],
        correlation=2, gate=torch.nn.functional.silu, radial_MLP=[8, 8],
    )
    cls = getattr(modules, overrides.pop("cls", "MACE"))
    config.update(overrides)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return cls(**config)
    finally:
        torch.set_default_dtype(previous)


VARIANTS = {
    "three-interactions": {"num_interactions": 3},
    "gaussian-radial": {"radial_type": "gaussian"},
    "chebyshev-radial": {"radial_type": "chebyshev"},
    "last-readout-only": {"use_last_readout_only": True},
    "keep-last-layer-irreps": {"keep_last_layer_irreps": True},
    "so3": {"use_so3": True},
    "soft-transform": {"distance_transform": "Soft"},
    "no-cutoff": {"apply_cutoff": False},
    "energy-dipoles-model": {"cls": "EnergyDipolesMACE"},
}


@pytest.mark.parametrize("overrides", list(VARIANTS.values()), ids=list(VARIANTS))
def test_other_mace_options_are_fully_covered_too(overrides):
    model = _variant(**dict(overrides))
    coverage = coverage_of(model, TARGET_KINDS)
    assert coverage.frozen == [], coverage.frozen_line()
    learnable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # not MACE's zeroed EmptyParam
    assert coverage.adapted_total == coverage.trainable == learnable > 0
