"""The step schedule of the benchmark-foundation pretraining: when it fires, where a chunk ends, and what it
writes into a MACE checkpoint (a real torch optimizer and ReduceLROnPlateau, saved the way MACE saves them)."""

from pathlib import Path

import mace  # noqa: F401  (before e3nn/torch users, as everywhere)
import torch

from harness.pretrain import chunked

STEPS = [(60, 0.003), (68, 0.001), (76, 0.0003)]


def _checkpoint(path: Path, lrs=(0.01, 0.01)) -> Path:
    params = [torch.nn.Parameter(torch.ones(2)) for _ in lrs]
    opt = torch.optim.Adam([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)])
    sum(p.sum() for p in params).backward()
    opt.step()
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.6, patience=4)
    sched.step(1.0)
    sched.step(2.0)  # one bad epoch on the counter
    torch.save({"model": {}, "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()}, path)
    return path


def test_scheduled_lr_is_the_last_step_reached():
    assert chunked.scheduled_lr(59, STEPS) is None
    assert chunked.scheduled_lr(60, STEPS) == 0.003
    assert chunked.scheduled_lr(75, STEPS) == 0.001
    assert chunked.scheduled_lr(200, STEPS) == 0.0003


def test_chunks_stop_at_the_next_step():
    assert chunked.chunk_end(59, 25, 300, STEPS) == 60
    assert chunked.chunk_end(60, 25, 300, STEPS) == 68
    assert chunked.chunk_end(76, 25, 300, STEPS) == 101
    assert chunked.chunk_end(76, 25, 90, STEPS) == 90
    assert chunked.chunk_end(10, 5, 300, []) == 15


def test_lower_lr_rewrites_groups_and_scheduler_and_keeps_adam_moments(tmp_path):
    path = _checkpoint(tmp_path / "x_run-1_epoch-55.pt", lrs=(0.01, 0.0005))
    before = torch.load(path, weights_only=False)
    assert chunked.lower_lr(path, 0.003) == 0.01
    after = torch.load(path, weights_only=False)
    assert [g["lr"] for g in after["optimizer"]["param_groups"]] == [0.003, 0.0005]  # never raised
    assert after["lr_scheduler"]["_last_lr"] == [0.003, 0.0005]
    assert after["lr_scheduler"]["num_bad_epochs"] == 0
    assert torch.equal(after["optimizer"]["state"][0]["exp_avg"], before["optimizer"]["state"][0]["exp_avg"])
    assert not list(tmp_path.glob("*.tmp"))
    # the rewritten state loads into a fresh optimizer and scheduler, as --restart_latest does
    opt = torch.optim.Adam([{"params": [torch.nn.Parameter(torch.ones(2))]} for _ in range(2)], lr=0.01)
    opt.load_state_dict(after["optimizer"])
    assert [g["lr"] for g in opt.param_groups] == [0.003, 0.0005]
    assert chunked.lower_lr(path, 0.003) is None  # nothing above: nothing written


def test_apply_schedule_uses_the_latest_checkpoint_and_logs(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    _checkpoint(tmp_path / "checkpoints" / "x_run-1_epoch-9.pt")
    latest = _checkpoint(tmp_path / "checkpoints" / "x_run-1_epoch-57.pt")
    chunked.apply_schedule(tmp_path, 59, STEPS)
    assert not (tmp_path / "lr_schedule.log").exists()  # before the first step nothing changes
    chunked.apply_schedule(tmp_path, 60, STEPS)
    assert torch.load(latest, weights_only=False)["optimizer"]["param_groups"][0]["lr"] == 0.003
    older = torch.load(tmp_path / "checkpoints" / "x_run-1_epoch-9.pt", weights_only=False)
    assert older["optimizer"]["param_groups"][0]["lr"] == 0.01
    assert (tmp_path / "lr_schedule.log").read_text() == \
        "after 60 epochs: lr 0.01 -> 0.003 in x_run-1_epoch-57.pt\n"


def test_a_chunk_stops_on_the_epoch_line_that_converges(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    lines = [f"2026-12-01 INFO: Epoch {e}: head: Default, loss=1, MAE_F= {100 - e:.2f} meV / A" for e in range(40)]
    (logs / "x_run-1.log").write_text("\n".join(lines) + "\n")
    assert not chunked._converged_now("INFO: Epoch 39: ...", tmp_path, settle_s=0)  # still 1 %+ per epoch
    flat = lines + [f"2026-12-01 INFO: Epoch {e}: head: Default, loss=1, MAE_F= 61.00 meV / A" for e in range(40, 60)]
    (logs / "x_run-1.log").write_text("\n".join(flat) + "\n")
    assert not chunked._converged_now("INFO: Valid loss", tmp_path, settle_s=0)  # only epoch lines trigger
    assert chunked._converged_now("INFO: Epoch 59: ...", tmp_path, settle_s=0)


def test_model_is_stale_until_written_after_the_checkpoint(tmp_path):
    import os

    assert not chunked._model_is_stale(tmp_path, "x")  # no checkpoint yet: nothing to write
    (tmp_path / "checkpoints").mkdir()
    checkpoint = _checkpoint(tmp_path / "checkpoints" / "x_run-1_epoch-7.pt")
    assert chunked._model_is_stale(tmp_path, "x")
    model = tmp_path / "x.model"
    model.write_bytes(b"")
    os.utime(model, (checkpoint.stat().st_mtime - 10,) * 2)
    assert chunked._model_is_stale(tmp_path, "x")
    os.utime(model, (checkpoint.stat().st_mtime + 10,) * 2)
    assert not chunked._model_is_stale(tmp_path, "x")
