"""Restarting sparse fine-tuning: MACE's ``--restart_latest`` and an in-process save / restore.

What MACE 0.3.16 guarantees on ``--restart_latest`` (checked with plain full fine-tuning, no plugin involved):
the latest checkpoint's model, optimizer and scheduler state are loaded and training resumes. It does **not**
continue the uninterrupted trajectory: (1) the loop restarts *at* the checkpoint's epoch index, so that
epoch is trained a second time (``start_epoch = <epoch in the file name>``, ``while epoch < max_num_epochs``),
and (2) the training DataLoader's generator is re-seeded with ``--seed`` at start-up, so the restarted run
replays the shuffle order of epoch 0. With full fine-tuning, 2 epochs + restart to 4 gave validation losses
13.61 (restored) → 12.18, 10.80, 9.75 against 12.54, 11.35 for epochs 2, 3 of the uninterrupted run.
So the test asserts what MACE guarantees, for sparse_str: the interrupted run is identical to the start of
the uninterrupted one, and the restarted run starts from exactly the state saved (same validation loss,
sparsity and mean δ as the checkpointed epoch). Exact continuation (ΔW, scores, Adam moments, λ_τ) is
checked in-process below.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import shutil
from pathlib import Path

import mace  # noqa: F401  (before e3nn)
import pytest
import torch

from conftest import COMMON_ARGS, batch_of, run_mace_train
from mace_sparse import SparseConfig, get_sparse_model
from mace_sparse import optim as sparse_optim
from mace_sparse.reparametrization import score_for_threshold
from mace_sparse.sparse_model import delta_parameters, threshold_parameters

VALID_LINE = re.compile(r"INFO: (Initial|Epoch \d+): (head: Default, loss=.*sparsity=.*mean_delta=.*)$")


pytestmark = pytest.mark.usefixtures("fast_deterministic_torch")


# ------------------------------------------------------------------------------ (a) mace_run_train restart


@pytest.fixture(scope="module")
def restart_runs(tiny_foundation, emt_data, tmp_path_factory):
    import ase.io

    data = tmp_path_factory.mktemp("restart-data") / "slab_small.xyz"
    ase.io.write(data, ase.io.read(emt_data["slab_train"], ":12"), format="extxyz")
    base = [
        "--name", "ft", "--foundation_model", tiny_foundation, "--train_file", data, "--valid_fraction", "0.2",
        "--E0s", "foundation", "--seed", "1", "--lr", "0.01", "--multiheads_finetuning", "False",
        "--plot", "False", "--skip_evaluate_heads", "Default", "--finetune-method", "sparse_str",
        "--save_all_checkpoints", *COMMON_ARGS,
    ]
    env = {"OMP_NUM_THREADS": "1"}
    interrupted = tmp_path_factory.mktemp("interrupted")
    uninterrupted = tmp_path_factory.mktemp("uninterrupted")

    def interrupted_then_restarted():
        first = run_mace_train(base + ["--max_num_epochs", "2"], cwd=interrupted, env_extra=env, check=False)
        snapshot = interrupted / "checkpoints_after_first_run"
        if first.returncode == 0:
            shutil.copytree(interrupted / "checkpoints", snapshot)
            (interrupted / "first_run.log").write_text(validation_log_text(interrupted))
        second = run_mace_train(base + ["--max_num_epochs", "4", "--restart_latest"], cwd=interrupted,
                                env_extra=env, check=False)
        return first, second

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        pair = pool.submit(interrupted_then_restarted)
        whole = pool.submit(run_mace_train, base + ["--max_num_epochs", "4"], uninterrupted, env, False)
        first, second = pair.result()
        full = whole.result()
    for name, proc in (("first", first), ("restart", second), ("uninterrupted", full)):
        assert proc.returncode == 0, f"{name} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return interrupted, uninterrupted


def validation_log_text(work: Path) -> str:
    log = [p for p in sorted((work / "logs").glob("*.log")) if not p.name.endswith("_debug.log")][0]
    return log.read_text()


def parse(text: str):
    return [m.groups() for m in map(VALID_LINE.search, text.splitlines()) if m]


def test_restart_latest_resumes_from_the_saved_state(restart_runs, tiny_foundation):
    interrupted, uninterrupted = restart_runs
    first_text = (interrupted / "first_run.log").read_text()
    first = parse(first_text)
    whole = parse(validation_log_text(uninterrupted))
    # MACE appends the restarted run to the same log file
    both = validation_log_text(interrupted)
    assert both.startswith(first_text)
    restarted_text = both[len(first_text):]
    restarted = parse(restarted_text)

    # the interrupted run is exactly the start of the uninterrupted one (seeded, deterministic)
    assert [t for t, _ in first] == ["Initial", "Epoch 0", "Epoch 1"]
    assert first == whole[:3]
    assert [t for t, _ in whole] == ["Initial", "Epoch 0", "Epoch 1", "Epoch 2", "Epoch 3"]

    # the restart loads the latest checkpoint (epoch 1) before training, and starts from exactly that state:
    # same loss, errors, sparsity and mean δ as the checkpointed epoch
    loading = restarted_text.index("Loading checkpoint: ./checkpoints/ft_run-1_epoch-1.pt")
    assert loading < restarted_text.index("===========TRAINING===========")
    assert restarted[0][0] == "Initial"
    assert restarted[0][1] == first[2][1]
    # MACE resumes *at* the saved epoch index (module docstring), up to --max_num_epochs
    assert [t for t, _ in restarted] == ["Initial", "Epoch 1", "Epoch 2", "Epoch 3"]

    # the final model is a plain MACE model again
    model = torch.load(interrupted / "ft.model", map_location="cpu", weights_only=False)
    foundation = torch.load(tiny_foundation, map_location="cpu", weights_only=False)
    assert list(model.state_dict()) == list(foundation.state_dict())
    assert not any(k.endswith(("_delta", "_threshold_score", "_foundation")) for k in model.state_dict())


def test_checkpoint_holds_the_sparse_state(restart_runs):
    """What --restart_latest restores: ΔW, scores, foundation buffers, the threshold group with its λ_τ."""
    interrupted, _ = restart_runs
    checkpoint = torch.load(
        interrupted / "checkpoints_after_first_run" / "ft_run-1_epoch-1.pt", map_location="cpu", weights_only=False
    )
    state = checkpoint["model"]
    deltas = [k for k in state if k.endswith("_delta")]
    scores = [k for k in state if k.endswith("_threshold_score")]
    assert deltas and len(deltas) == len(scores) == len([k for k in state if k.endswith("_foundation")])
    assert any(torch.count_nonzero(state[k]) > 0 for k in deltas)
    groups = checkpoint["optimizer"]["param_groups"]
    thr = [g for g in groups if g.get("name") == sparse_optim.GROUP_NAME]
    defaults = SparseConfig()
    assert len(thr) == 1 and thr[0]["lr"] == 0.01  # --lr, no --sparse_threshold_lr
    assert thr[0][sparse_optim.DECAY_KEY] == defaults.threshold_weight_decay
    assert len(thr[0]["params"]) == len(scores)
    opt_state = checkpoint["optimizer"]["state"]
    assert all("exp_avg" in opt_state[i] for i in thr[0]["params"])


# --------------------------------------------------------------------- (b) in-process save and restore


def mace_namespace() -> argparse.Namespace:
    """The fields MACE's get_params_options / get_optimizer read, with mace_run_train's defaults."""
    return argparse.Namespace(
        lr=0.01, weight_decay=5e-7, amsgrad=True, beta=0.9, optimizer="adam", freeze=None,
        lr_params_factors=json.dumps({"embedding_lr_factor": 1.0, "interactions_lr_factor": 1.0,
                                      "products_lr_factor": 1.0, "readouts_lr_factor": 1.0}),
    )


def build(foundation_path, threshold_lr=0.004, decay=0.3):
    """Sparse model + optimizer as the mace_run_train integration builds them (default config otherwise)."""
    from mace.tools.scripts_utils import get_optimizer, get_params_options

    foundation = torch.load(foundation_path, map_location="cpu", weights_only=False).double()
    config = SparseConfig(granularity="path", threshold_lr=threshold_lr, threshold_weight_decay=decay)
    model = get_sparse_model(foundation, config)
    args = mace_namespace()
    options = get_params_options(args, model)
    options["params"] = sparse_optim.add_threshold_group(
        options["params"], model, config.threshold_lr, config.threshold_weight_decay, config.delta_eps
    )
    optimizer = sparse_optim.register_threshold_decay(get_optimizer(args, options))
    return model, optimizer


def train(model, optimizer, batch, steps):
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        out = model(dict(batch), training=True, compute_force=True)
        loss = ((out["energy"] - batch["energy"]) ** 2).mean() + 10 * ((out["forces"] - batch["forces"]) ** 2).mean()
        loss.backward()
        optimizer.step()


def assert_same_optimizer_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert len(sa["param_groups"]) == len(sb["param_groups"])
    for ga, gb in zip(sa["param_groups"], sb["param_groups"]):
        assert ga == gb  # lr, names, λ_τ key, betas, ..., param indices
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for key in sa["state"][i]:
            assert torch.equal(torch.as_tensor(sa["state"][i][key]), torch.as_tensor(sb["state"][i][key])), (i, key)


def test_save_and_restore_continues_identically(tiny_foundation, slab_atoms, tmp_path):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model, optimizer = build(tiny_foundation)
        batch = batch_of(slab_atoms[:2], model)
        train(model, optimizer, batch, steps=3)
        path = tmp_path / "state.pt"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)

        restored, restored_opt = build(tiny_foundation)
        saved = torch.load(path, map_location="cpu", weights_only=False)
        restored.load_state_dict(saved["model"])
        restored_opt.load_state_dict(saved["optimizer"])

        # exactly equal right after the restore
        for a, b in zip(delta_parameters(model), delta_parameters(restored)):
            assert torch.equal(a, b)
        for a, b in zip(threshold_parameters(model), threshold_parameters(restored)):
            assert torch.equal(a, b)
        assert any(torch.count_nonzero(d) > 0 for d in delta_parameters(restored))
        init = score_for_threshold(SparseConfig().init_threshold)
        assert all(not torch.equal(s, torch.full_like(s, init)) for s in threshold_parameters(restored))  # λ_τ acted
        assert_same_optimizer_state(optimizer, restored_opt)
        thr = [g for g in restored_opt.param_groups if g.get("name") == sparse_optim.GROUP_NAME][0]
        assert thr["lr"] == 0.004 and thr[sparse_optim.DECAY_KEY] == 0.3
        moments = restored_opt.state[threshold_parameters(restored)[0]]
        assert {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"} <= set(moments)
        # the restored model predicts what the saved one predicts (its effective weights were refreshed)
        e_a = model(dict(batch), training=False, compute_force=True)["energy"].detach()
        e_b = restored(dict(batch), training=False, compute_force=True)["energy"].detach()
        assert torch.equal(e_a, e_b)

        # continuing N steps on both gives identical parameters and optimizer state
        train(model, optimizer, batch, steps=2)
        train(restored, restored_opt, batch, steps=2)
        for (name, a), (_, b) in zip(model.named_parameters(), restored.named_parameters()):
            assert torch.equal(a, b), name
        assert_same_optimizer_state(optimizer, restored_opt)
    finally:
        torch.set_default_dtype(previous)

