"""A budget ranked by importance (``--sparse_selection fisher``): the k entries with the largest accumulated
squared gradient may change, step 0 is the foundation, the sums are exact, survive a reload and leave no trace in
the merged model."""

from __future__ import annotations

import argparse
import copy
import math

import pytest
import torch

from mace_sparse import SparseConfig, get_sparse_model, merge_and_unload, register_threshold_decay
from mace_sparse import reparametrization as rp
from mace_sparse.budget import BUDGET_ATTR, CUT_ATTR, IMPORTANCE, SELECTION_ATTR, scale_of
from mace_sparse.config import SparseConfigError
from mace_sparse.optim import sparse_param_groups
from mace_sparse.sparse_model import sparsity_stats

from conftest import assert_same_energy, double_batch

CONFIG = dict(budget=0.02, threshold_weight_decay=0.0, selection="fisher", init_threshold=1e-6)


def _loss(model, batch):
    out = model(batch, training=True, compute_force=False)
    return ((out["energy"] - 1.0) ** 2).sum()


def _optimizer(model, config):
    groups = sparse_param_groups([{"params": [p for p in model.parameters() if p.requires_grad]}], model,
                                 config, base_lr=0.05)
    return register_threshold_decay(torch.optim.Adam(groups, lr=0.05))


def _train(model, optimizer, batch, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        _loss(model, batch).backward()
        optimizer.step()


def _selected(model):
    """Entries the importance ranking lets change: score strictly above the (k+1)-th largest score."""
    entries = [(q, o, n) for q, o, n in rp.iter_reparametrized(model)]
    scores = {q: o._buffers[IMPORTANCE.format(n)] * (scale_of(o, n) or 1.0) ** 2 for q, o, n in entries}
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    k = model.__dict__[BUDGET_ATTR]
    cut = torch.kthvalue(flat, flat.numel() - k).values
    return {q: s > cut for q, s in scores.items()}


@pytest.mark.parametrize("scale", ["absolute", "relative"])
def test_fisher_budget_selects_the_most_important_entries(foundation_model, slab_atoms, scale,
                                                          fast_deterministic_torch):
    torch.manual_seed(0)
    reference = copy.deepcopy(foundation_model)
    batch = double_batch(slab_atoms[:3], foundation_model)
    config = SparseConfig(threshold_scale=scale, **CONFIG)
    model = get_sparse_model(foundation_model, config)
    assert model.__dict__[SELECTION_ATTR] == "fisher"
    total = sparsity_stats(model).total_entries
    k = model.__dict__[BUDGET_ATTR]
    assert k == math.floor(0.02 * total)
    # step 0: no importance yet, so nothing may change and the model is the foundation
    assert sparsity_stats(model).changed_entries == 0
    e0 = model(batch, training=False, compute_force=False)["energy"]
    torch.testing.assert_close(e0, reference(batch, training=False, compute_force=False)["energy"],
                               rtol=0, atol=0)
    optimizer = _optimizer(model, config)
    for _ in range(3):
        _train(model, optimizer, batch, steps=5)
        stats = sparsity_stats(model)
        assert stats.changed_entries <= k
    # every selected entry's latent delta is far past δ = 1e-6, so the budget binds
    assert stats.changed_entries >= k - 0.005 * total
    selected = _selected(model)
    for qualified, owner, name in rp.iter_reparametrized(model):
        changed = rp.effective_delta(owner, name) != 0
        assert not bool((changed & ~selected[qualified]).any()), qualified  # only ranked entries change
    merged = merge_and_unload(copy.deepcopy(model))
    assert not any(IMPORTANCE.format("weight") in m._buffers or CUT_ATTR in m.__dict__ for m in merged.modules())
    assert not any(k_.endswith("_importance") for k_ in merged.state_dict())
    assert_same_energy(model, merged, batch)


def test_importance_is_the_sum_of_raw_squared_gradients(foundation_model, slab_atoms, fast_deterministic_torch):
    torch.manual_seed(2)
    batch = double_batch(slab_atoms[:2], foundation_model)
    config = SparseConfig(**CONFIG)  # κ = 1: the gradients are rescaled in the same hook, after the sum
    model = get_sparse_model(foundation_model, config)
    optimizer = _optimizer(model, config)
    expected = {q: torch.zeros_like(o._buffers[IMPORTANCE.format(n)]) for q, o, n in rp.iter_reparametrized(model)}
    for _ in range(2):
        optimizer.zero_grad()
        _loss(model, batch).backward()
        for qualified, owner, name in rp.iter_reparametrized(model):
            grad = owner._parameters[rp.DELTA.format(name)].grad
            expected[qualified] += grad * grad
        optimizer.step()
    for qualified, owner, name in rp.iter_reparametrized(model):
        torch.testing.assert_close(owner._buffers[IMPORTANCE.format(name)], expected[qualified],
                                   rtol=1e-12, atol=0)
    assert any(bool(v.any()) for v in expected.values())


def test_selection_survives_a_reload(foundation_model, slab_atoms, fast_deterministic_torch):
    torch.manual_seed(1)
    batch = double_batch(slab_atoms[:2], foundation_model)
    config = SparseConfig(**{**CONFIG, "budget": 0.01})
    model = get_sparse_model(foundation_model, config)
    fresh = copy.deepcopy(model)
    _train(model, _optimizer(model, config), batch, steps=6)
    assert any(k.endswith("_importance") for k in model.state_dict())
    fresh.load_state_dict(model.state_dict())  # what --restart_latest does: the sums come back with it
    assert sparsity_stats(fresh).changed_entries == sparsity_stats(model).changed_entries > 0
    for (_, a, n), (_, b, _) in zip(rp.iter_reparametrized(model), rp.iter_reparametrized(fresh)):
        assert torch.equal(rp.effective_delta(a, n), rp.effective_delta(b, n))


def test_magnitude_budget_has_no_importance_buffers(foundation_model):
    model = get_sparse_model(foundation_model, SparseConfig(budget=0.02, threshold_weight_decay=0.0))
    assert not any(k.endswith("_importance") for k in model.state_dict())
    assert model.__dict__[SELECTION_ATTR] == "magnitude"


@pytest.mark.parametrize("settings, message", [
    ({"selection": "fisher"}, "--sparse_selection fisher ranks entries for a budget: give --sparse_budget F"),
    ({"selection": "fisher", "budget": 0.05, "straight_through": False},
     "--sparse_selection fisher needs --sparse_straight_through True"),
    ({"selection": "grad"}, "--sparse_selection must be one of magnitude, fisher; got 'grad'"),
])
def test_impossible_selections_refused_in_one_line(settings, message):
    with pytest.raises(SparseConfigError) as err:
        SparseConfig(**settings)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_selection_flag_reaches_the_config():
    from mace_sparse.integration.arguments import add_sparse_arguments, sparse_config_from_args

    parser = add_sparse_arguments(argparse.ArgumentParser())
    config = sparse_config_from_args(parser.parse_args(
        ["--finetune_method", "sparse_str", "--sparse_budget", "0.05", "--sparse-selection", "fisher"]))
    assert (config.selection, config.budget, config.threshold_weight_decay) == ("fisher", 0.05, 0.0)
    assert sparse_config_from_args(parser.parse_args(["--finetune_method", "sparse_str"])).selection == "magnitude"
    with pytest.raises(SparseConfigError, match="give --sparse_budget F"):
        sparse_config_from_args(parser.parse_args(["--finetune_method", "sparse_str", "--sparse_selection",
                                                   "fisher"]))


@pytest.mark.slow
def test_fisher_budget_through_mace_run_train_and_restart(tiny_foundation, slab_atoms, tmp_path):
    """--sparse_selection fisher in the unchanged console script: the sums reach MACE's optimizer hook (something
    changes), the budget holds, and --restart_latest resumes the sums from the checkpoint."""
    import json

    import ase.io

    from conftest import run_mace_train

    ase.io.write(tmp_path / "slabs.xyz", slab_atoms[:12])
    args = ["--name", "ft", "--foundation_model", tiny_foundation, "--train_file", tmp_path / "slabs.xyz",
            "--valid_fraction", "0.25", "--energy_key", "REF_energy", "--forces_key", "REF_forces",
            "--E0s", "foundation", "--batch_size", "3", "--default_dtype", "float64", "--device", "cpu",
            "--seed", "1", "--lr", "0.02", "--finetune-method", "sparse_str", "--sparse_budget", "0.03",
            "--sparse_selection", "fisher", "--multiheads_finetuning", "False"]
    run_mace_train([*args, "--max_num_epochs", "2"], cwd=tmp_path)
    checkpoint = next((tmp_path / "checkpoints").glob("ft_run-1_epoch-*.pt"))
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    sums = [v for k, v in state.items() if k.endswith("_importance")]
    assert sums and sum(float(v.sum()) for v in sums) > 0
    run_mace_train([*args, "--max_num_epochs", "4", "--restart_latest"], cwd=tmp_path)
    assert "Loading checkpoint" in next((tmp_path / "logs").glob("ft_run-1.log")).read_text()
    report = json.loads((tmp_path / "ft_sparsity.json").read_text())
    allowed = math.floor(0.03 * report["total_entries"])
    assert 0 < report["changed_entries"] <= allowed, (report["changed_entries"], allowed)
    from mace_sparse import load_delta

    assert load_delta(str(tmp_path / "ft_sparse_delta.safetensors")).metadata["sparse_config"]["selection"] == "fisher"
