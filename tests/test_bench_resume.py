"""An interrupted benchmark run is resumed from MACE's checkpoint, not started again (harness.pipeline.train).

The runs of the real-scale benchmark take tens of minutes each and a session can be cut at any time, so a run
stopped half-way must continue from its last best checkpoint with ``--restart_latest``. These tests replace
the ``mace_run_train`` process by a fake that writes what MACE writes (log lines, a checkpoint, the model), so
they check the bookkeeping in seconds; the real resume of MACE is what the pretraining and
``tests/test_budget_fisher.py`` exercise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import pytest

from harness.pipeline import train as bench_train
from mace_sparse.training import STOPPED, TrainProcess

ARGS = ["--name", "model", "--max_num_epochs", "50", "--patience", "2"]


def _epoch_line(epoch: int, loss: float) -> str:
    return (f"2026-12-01 10:00:{epoch:02d}.000 INFO: Epoch {epoch}: head: Default, loss={loss}, "
            f"MAE_E_per_atom= 1.0 meV, MAE_F= {100 * loss:.1f} meV / A")


class FakeMace:
    """Stands in for ``run_mace_train``: each call plays the next scripted segment and records its args."""

    def __init__(self, segments: List[dict]):
        self.segments = list(segments)
        self.calls: List[List[str]] = []

    def __call__(self, args, run_dir: Path, append: bool = False, on_line=None, **_):
        self.calls.append(list(args))
        seg = self.segments.pop(0)
        (run_dir / "logs").mkdir(exist_ok=True)
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        with open(run_dir / "command.log", "a" if append else "w") as console, \
                open(run_dir / "logs" / "model_run-0.log", "a") as log:
            for epoch, loss in seg.get("epochs", []):
                line = _epoch_line(epoch, loss)
                console.write(line + "\n")
                log.write(line + "\n")
                (run_dir / "checkpoints" / f"model_run-0_epoch-{epoch}.pt").write_text("ckpt")
                if on_line is not None and on_line(line):
                    return TrainProcess(STOPPED, 1.0, run_dir / "command.log")
            for line in seg.get("lines", []):
                console.write(line + "\n")
                log.write(line + "\n")
                if on_line is not None and on_line(line):
                    return TrainProcess(STOPPED, 1.0, run_dir / "command.log")
        if seg.get("killed"):
            raise KeyboardInterrupt  # the benchmark was stopped while this process ran
        (run_dir / "model.model").write_text("model")
        return TrainProcess(0, 1.0, run_dir / "command.log")


STOP = "2026-12-01 10:01:00.000 INFO: Stopping optimization after 2 epochs without improvement"


def test_interrupted_run_resumes_from_its_checkpoint_and_keeps_its_curve(tmp_path, monkeypatch):
    fake = FakeMace([
        {"epochs": [(0, 5.0), (1, 4.0)], "killed": True},  # cut off after epoch 1
        {"epochs": [(1, 4.0), (2, 3.0), (3, 3.5), (4, 3.6)], "lines": [STOP]},  # resumed; patience runs out
        {},  # the finish from the best checkpoint
    ])
    monkeypatch.setattr(bench_train, "run_mace_train", fake)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        bench_train.run_training(ARGS, run, patience=2)
    assert not (run / bench_train.DONE_FILE).exists()
    assert json.loads((run / bench_train.STARTED_FILE).read_text())["args"] == ARGS

    out = bench_train.run_training(ARGS, run, patience=2)
    assert fake.calls[0] == ARGS
    assert fake.calls[1] == [*ARGS, "--restart_latest"]  # resumed, not started again
    assert fake.calls[2] == [*ARGS, "--restart_latest", "--max_num_epochs", "4"]  # latest checkpoint: epoch 4
    assert out.ok and out.stopped_early and out.resumed == 1 and not out.reused
    assert [p["epoch"] for p in out.curve] == [0, 1, 2, 3, 4]  # the epochs of both segments
    done = json.loads((run / bench_train.DONE_FILE).read_text())
    assert done["resumed"] == 1 and done["stopped_early"] is True


def test_run_with_other_arguments_starts_again_without_the_old_checkpoint(tmp_path, monkeypatch):
    fake = FakeMace([{"epochs": [(0, 5.0), (1, 4.0)], "killed": True}, {"epochs": [(0, 6.0)]}])
    monkeypatch.setattr(bench_train, "run_mace_train", fake)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        bench_train.run_training(ARGS, run, patience=2)
    other = [*ARGS, "--lr", "0.03"]
    out = bench_train.run_training(other, run, patience=2)
    assert fake.calls[1] == other  # no --restart_latest: the checkpoint belonged to other arguments
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["model_run-0_epoch-0.pt"]
    assert out.ok and out.resumed == 0
    # the interrupted run of the other arguments is set aside, not deleted
    aside = tmp_path / "run.superseded-1"
    assert json.loads((aside / bench_train.STARTED_FILE).read_text())["args"] == ARGS
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["model_run-0_epoch-0.pt",
                                                                         "model_run-0_epoch-1.pt"]


def test_finished_run_with_other_arguments_is_set_aside_not_wiped(tmp_path, monkeypatch):
    """A harness change that alters a method's arguments must not destroy a finished run of hours."""
    fake = FakeMace([{"epochs": [(0, 5.0)]}, {"epochs": [(0, 6.0)]}, {"epochs": [(0, 7.0)]}])
    monkeypatch.setattr(bench_train, "run_mace_train", fake)
    run = tmp_path / "run"
    assert bench_train.run_training(ARGS, run).ok
    (run / "scores.json").write_text("{}")  # anything else kept next to a finished run goes with it
    other = [*ARGS, "--lr", "0.03"]
    assert bench_train.run_training(other, run).ok and fake.calls[1] == other
    aside = tmp_path / "run.superseded-1"
    assert json.loads((aside / bench_train.DONE_FILE).read_text())["args"] == ARGS
    assert (aside / "model.model").is_file() and (aside / "scores.json").is_file()
    assert not (run / "scores.json").exists() and bench_train.finished(other, run)
    # the same arguments again: reused; yet other ones: set aside under the next free name
    assert bench_train.run_training(other, run).reused and len(fake.calls) == 2
    assert bench_train.run_training(ARGS, run).ok and (tmp_path / "run.superseded-2").is_dir()
    assert bench_train.finished(ARGS, tmp_path / "run") and bench_train.finished(ARGS, aside)


def test_run_cut_off_after_its_stop_line_only_runs_the_finish(tmp_path, monkeypatch):
    fake = FakeMace([
        {"epochs": [(0, 5.0), (1, 4.0), (2, 4.5)], "lines": ["not yet"], "killed": True},
        {},
    ])
    monkeypatch.setattr(bench_train, "run_mace_train", fake)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        bench_train.run_training(ARGS, run, patience=None)  # as if the watcher missed the stop: cut later
    with open(run / "logs" / "model_run-0.log", "a") as log:
        log.write(STOP + "\n")
    out = bench_train.run_training(ARGS, run, patience=2)
    assert len(fake.calls) == 2
    assert fake.calls[1] == [*ARGS, "--restart_latest", "--max_num_epochs", "2"]  # straight to the finish
    assert out.ok and out.stopped_early and out.resumed == 1


def test_interrupted_segment_counts_in_the_wall_time(tmp_path, monkeypatch):
    fake = FakeMace([{"epochs": [(0, 5.0)], "killed": True}, {}])
    monkeypatch.setattr(bench_train, "run_mace_train", fake)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        bench_train.run_training(ARGS, run)
    started = json.loads((run / bench_train.STARTED_FILE).read_text())
    started["segment_start"] -= 100.0  # the cut-off segment ran 100 s before its last line
    (run / bench_train.STARTED_FILE).write_text(json.dumps(started))
    out = bench_train.run_training(ARGS, run)
    assert 100.0 <= out.wall_s < 110.0  # 100 s of the first segment + 1 s of the resumed one


def test_drain_file_lets_running_runs_finish_and_starts_no_more(tmp_path, monkeypatch):
    """A session about to end: ``touch <out>/STOP``; the run in progress finishes, the next ones never start."""
    from harness.pipeline import execute as bench_execute

    drain = tmp_path / bench_execute.DRAIN_FILE

    class Job:
        def __init__(self, name: str):
            self.method = type("M", (), {"name": name, "stage_two": False})()
            self.case = type("C", (), {"label": "case"})()
            self.seed, self.index, self.total, self.output = 0, 1, 3, None
            self.run_dir, self.args = tmp_path / name, ARGS

    started: List[str] = []

    def fake_run(args, run_dir, **_):
        started.append(run_dir.name)
        drain.touch()  # the file appears while the first run trains
        run_dir.mkdir(exist_ok=True)
        (run_dir / "model.model").write_text("m")
        return bench_train.TrainOutput(run_dir=run_dir, model=run_dir / "model.model", returncode=0, wall_s=1.0,
                                       epoch_s=None)

    monkeypatch.setattr(bench_execute, "run_training", fake_run)
    jobs = [Job("a"), Job("b"), Job("c"), Job("d")]
    jobs[3].run_dir.mkdir()  # "d" finished in an earlier sitting: reusing it starts nothing, so it is not skipped
    (jobs[3].run_dir / "model.model").write_text("m")
    (jobs[3].run_dir / bench_train.DONE_FILE).write_text(json.dumps({"args": ARGS, "wall_s": 1.0}))
    with pytest.raises(bench_execute.Drained, match="2 run\\(s\\) not started"):
        bench_execute.execute(jobs, parallel=1, drain=drain)
    assert started == ["a", "d"] and jobs[0].output.ok and jobs[1].output is None and jobs[2].output is None
