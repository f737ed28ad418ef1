"""The sparsity budget (at most F of the weights change, at every step) and thresholds relative to scale."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mace_sparse import SparseConfig, get_sparse_model, merge_and_unload
from mace_sparse import reparametrization as rp
from mace_sparse.budget import BUDGET_ATTR, CUT_ATTR, SCALE_ATTR
from mace_sparse.sparse_model import sparsity_stats

from conftest import assert_same_energy, double_batch


def _train(model, batch, steps, lr=0.05):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(batch, training=True, compute_force=False)
        ((out["energy"] - 1.0) ** 2).sum().backward()
        optimizer.step()


def _changed_bitwise(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sum(int((sa[k] != sb[k]).sum()) for k in sa if sa[k].is_floating_point())


@pytest.mark.parametrize("scale", ["absolute", "relative"])
def test_budget_holds_at_every_step_and_in_the_merged_model(foundation_model, slab_atoms, scale,
                                                            fast_deterministic_torch):
    torch.manual_seed(0)
    reference = copy.deepcopy(foundation_model)
    batch = double_batch(slab_atoms[:3], foundation_model)
    config = SparseConfig(budget=0.02, threshold_weight_decay=0.0, threshold_scale=scale, init_threshold=1e-6)
    model = get_sparse_model(foundation_model, config)
    total = sparsity_stats(model).total_entries
    k = model.__dict__[BUDGET_ATTR]
    assert k == math.floor(0.02 * total)
    for _ in range(4):
        _train(model, batch, steps=5)
        stats = sparsity_stats(model)
        assert stats.changed_entries <= k
    # the latent deltas have all grown past δ, so the budget binds: within 0.5 percentage points below it
    assert stats.changed_entries >= k - 0.005 * total
    merged = merge_and_unload(copy.deepcopy(model))
    assert _changed_bitwise(merged, reference) <= k
    assert not any(CUT_ATTR in m.__dict__ or SCALE_ATTR in m.__dict__ for m in merged.modules())
    assert not merged._forward_pre_hooks and BUDGET_ATTR not in merged.__dict__
    # the saved model predicts what the training model predicts
    assert_same_energy(model, merged, batch)


def test_budget_cut_follows_loaded_weights(foundation_model, slab_atoms, fast_deterministic_torch):
    torch.manual_seed(1)
    batch = double_batch(slab_atoms[:2], foundation_model)
    model = get_sparse_model(foundation_model, SparseConfig(budget=0.01, threshold_weight_decay=0.0))
    fresh = copy.deepcopy(model)
    _train(model, batch, steps=8)
    fresh.load_state_dict(model.state_dict())
    assert sparsity_stats(fresh).changed_entries == sparsity_stats(model).changed_entries
    assert sparsity_stats(fresh).changed_entries <= fresh.__dict__[BUDGET_ATTR]


def test_relative_threshold_is_a_fraction_of_the_tensor_rms(foundation_model):
    model = get_sparse_model(foundation_model, SparseConfig(threshold_scale="relative", init_threshold=0.01))
    for _, owner, name in rp.iter_reparametrized(model):
        base = owner._buffers[rp.FOUNDATION.format(name)]
        rms = float(base.pow(2).mean().sqrt())
        expected = 0.01 * (rms if rms > 0 else 1.0)
        assert float(rp.thresholds(owner, name).max()) == pytest.approx(expected, rel=1e-9)


def test_no_budget_no_scale_leaves_thresholds_as_before(foundation_model):
    model = get_sparse_model(foundation_model, SparseConfig(init_threshold=0.02))
    for _, owner, name in rp.iter_reparametrized(model):
        assert torch.equal(rp.thresholds(owner, name), torch.sigmoid(owner._parameters[rp.SCORE.format(name)]))
        assert CUT_ATTR not in owner.__dict__ and SCALE_ATTR not in owner.__dict__


def test_budget_and_lambda_tau_together_refused_in_one_line():
    import argparse

    from mace_sparse.config import SparseConfigError
    from mace_sparse.integration.arguments import add_sparse_arguments, sparse_config_from_args

    parser = add_sparse_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--finetune_method", "sparse_str", "--sparse_budget", "0.05",
                              "--sparse_threshold_weight_decay", "2"])
    with pytest.raises(SparseConfigError, match="give one") as err:
        sparse_config_from_args(args)
    assert "\n" not in str(err.value)
    config = sparse_config_from_args(parser.parse_args(["--finetune_method", "sparse_str", "--sparse_budget",
                                                        "0.05"]))
    assert config.budget == 0.05 and config.threshold_weight_decay == 0.0
    default = sparse_config_from_args(parser.parse_args(["--finetune_method", "sparse_str"]))
    assert default.budget is None and default.threshold_weight_decay == 1.0
    for bad in ("0", "1.5"):
        with pytest.raises(SparseConfigError, match="sparse_budget is the share"):
            sparse_config_from_args(parser.parse_args(["--finetune_method", "sparse_str", "--sparse_budget", bad]))


@pytest.mark.slow
def test_budget_honoured_by_mace_run_train_in_both_stages_and_after_restart(tiny_foundation, slab_atoms, tmp_path):
    """--sparse_budget through the unchanged console script: stage one, stage two (--swa) and --restart_latest.

    Two runs, since mace-torch 0.3.16 itself cannot resume into stage two (``--restart_latest`` with ``--swa``
    fails with ``KeyError: 'swa_lr'`` once the resumed run reaches ``--start_swa``, plugin off or on)."""
    import json

    import ase.io

    from conftest import run_mace_train

    ase.io.write(tmp_path / "slabs.xyz", slab_atoms[:12])
    args = ["--name", "ft", "--foundation_model", tiny_foundation, "--train_file", tmp_path / "slabs.xyz",
            "--valid_fraction", "0.25", "--energy_key", "REF_energy", "--forces_key", "REF_forces",
            "--E0s", "foundation", "--batch_size", "3", "--default_dtype", "float64", "--device", "cpu",
            "--seed", "1", "--lr", "0.02", "--finetune-method", "sparse_str", "--sparse_budget", "0.03",
            "--multiheads_finetuning", "False"]
    (tmp_path / "swa").mkdir()
    run_mace_train([*args, "--max_num_epochs", "4", "--swa", "--start_swa", "2"], cwd=tmp_path / "swa")
    run_mace_train([*args, "--max_num_epochs", "2"], cwd=tmp_path)
    run_mace_train([*args, "--max_num_epochs", "4", "--restart_latest"], cwd=tmp_path)
    assert "Loading checkpoint" in next((tmp_path / "logs").glob("ft_run-1.log")).read_text()
    for stem in ("swa/ft", "swa/ft_stagetwo", "ft"):
        report = json.loads((tmp_path / f"{stem}_sparsity.json").read_text())
        allowed = math.floor(0.03 * report["total_entries"])
        assert 0 < report["changed_entries"] <= allowed, (stem, report["changed_entries"], allowed)
