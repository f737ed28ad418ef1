"""Retraining the chosen support: after fix_support only the selected entries move, freely and exactly."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from mace_sparse import SparseConfig, get_sparse_model, merge_and_unload
from mace_sparse import reparametrization as rp
from mace_sparse.sparse_model import sparsity_stats
from mace_sparse.support import fix_support, has_fixed_support

from conftest import double_batch


def _train(model, batch, steps, lr=0.05):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        ((model(batch, training=True, compute_force=False)["energy"] - 1.0) ** 2).sum().backward()
        optimizer.step()


def _energy(model, batch):
    return model(batch, training=False, compute_force=False)["energy"]


def test_fixed_support_keeps_the_model_then_trains_only_the_support(foundation_model, slab_atoms,
                                                                     fast_deterministic_torch):
    torch.manual_seed(0)
    batch = double_batch(slab_atoms[:3], foundation_model)
    model = get_sparse_model(foundation_model, SparseConfig(threshold_weight_decay=2.0, init_threshold=0.02,
                                                            retrain_support=True))
    _train(model, batch, steps=6)
    before = _energy(model, batch)
    changed_before = sparsity_stats(model).changed_entries
    sizes = fix_support(model)
    assert has_fixed_support(model) and sum(sizes.values()) == changed_before > 0
    torch.testing.assert_close(_energy(model, batch), before, rtol=1e-12, atol=1e-12)  # no jump
    masks = {q: owner._buffers[rp.SUPPORT_OFFSET.format(n)] != 0 for q, owner, n in rp.iter_reparametrized(model)}
    _train(model, batch, steps=6)
    for qualified, owner, name in rp.iter_reparametrized(model):
        change = rp.effective_delta(owner, name)
        assert torch.count_nonzero(change[~masks[qualified]]) == 0  # outside: exactly the foundation
    assert sparsity_stats(model).changed_entries <= changed_before
    assert not torch.allclose(_energy(model, batch), before)  # the support did train
    # gradients are the plain ones, masked: no threshold, no straight-through
    model.zero_grad()
    out = _energy(model, batch).sum()
    out.backward()
    for qualified, owner, name in rp.iter_reparametrized(model):
        grad = owner._parameters[rp.DELTA.format(name)].grad
        if grad is not None:
            assert torch.count_nonzero(grad[~masks[qualified]]) == 0


def test_fixed_support_survives_state_dict_and_merge(foundation_model, slab_atoms, fast_deterministic_torch):
    torch.manual_seed(2)
    batch = double_batch(slab_atoms[:2], foundation_model)
    config = SparseConfig(threshold_weight_decay=2.0, retrain_support=True)
    fresh = get_sparse_model(copy.deepcopy(foundation_model), config)
    model = get_sparse_model(foundation_model, config)
    assert not has_fixed_support(fresh) and len(list(fresh.buffers())) == len(list(model.buffers()))
    _train(model, batch, steps=5)
    fix_support(model)
    _train(model, batch, steps=3)
    fresh.load_state_dict(model.state_dict())  # what --restart_latest and MACE's save-time reload do
    assert has_fixed_support(fresh)
    torch.testing.assert_close(_energy(fresh, batch), _energy(model, batch), rtol=0, atol=0)
    merged = merge_and_unload(copy.deepcopy(model))
    assert not any(k.endswith("_support_offset") for k in merged.state_dict())
    assert "sparse_support_fixed" not in merged.state_dict() and not merged._load_state_dict_post_hooks
    torch.testing.assert_close(_energy(merged, batch), _energy(model, batch), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_retrain_support_in_mace_stage_two(tiny_foundation, slab_atoms, tmp_path):
    import ase.io

    from conftest import run_mace_train

    ase.io.write(tmp_path / "slabs.xyz", slab_atoms[:12])
    run_mace_train(["--name", "ft", "--foundation_model", tiny_foundation, "--train_file", tmp_path / "slabs.xyz",
                    "--valid_fraction", "0.25", "--energy_key", "REF_energy", "--forces_key", "REF_forces",
                    "--E0s", "foundation", "--batch_size", "3", "--default_dtype", "float64", "--device", "cpu",
                    "--seed", "1", "--lr", "0.02", "--finetune-method", "sparse_str", "--sparse_budget", "0.05",
                    "--sparse_retrain_support", "True", "--multiheads_finetuning", "False", "--swa",
                    "--start_swa", "2", "--max_num_epochs", "4"], cwd=tmp_path)
    log = next((tmp_path / "logs").glob("ft_run-1.log")).read_text()
    fixed = re.findall(r"Stage two: support fixed \((\d+) entries", log)
    assert len(fixed) == 1, "the support is fixed once, when stage two starts"
    stagetwo = json.loads((tmp_path / "ft_stagetwo_sparsity.json").read_text())
    assert 0 < stagetwo["changed_entries"] <= int(fixed[0])
