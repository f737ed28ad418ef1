"""Long ``mace_sparse`` commands log progress the way ``mace_run_train`` does: timestamped INFO lines per step."""

from __future__ import annotations

import logging
import re
import types

import mace  # noqa: F401  (before e3nn)
import torch

MACE_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO: ")


def test_progress_lines_use_mace_format_and_setup_is_idempotent(capsys):
    from mace_sparse.cli.progress import _ProgressHandler, setup_progress_logging

    root = logging.getLogger()
    before = list(root.handlers)
    try:
        setup_progress_logging()
        setup_progress_logging()
        assert sum(isinstance(h, _ProgressHandler) for h in root.handlers) == 1
        handler = next(h for h in root.handlers if isinstance(h, _ProgressHandler))
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "calibrate: epoch 1/2", None, None)
        assert MACE_LINE.match(handler.format(record)), handler.format(record)
    finally:
        root.handlers[:] = before


def test_bench_step_logs_one_line_per_round(caplog):
    from harness.stepcost.timing import time_interleaved

    states = [types.SimpleNamespace(name="full"), types.SimpleNamespace(name="sparse_str")]
    lines = []
    times = time_interleaved(states, lambda state: None, rounds=3, steps=2, device=torch.device("cpu"),
                             log=lines.append)
    assert [len(times[s.name][0]) for s in states] == [3, 3]
    assert [line.split(":")[0] for line in lines] == ["round 1/3", "round 2/3", "round 3/3"]
    assert "full=" in lines[-1] and "sparse_str=" in lines[-1] and lines[-1].endswith(" ms")


def test_calibration_logs_each_epoch(tmp_path, monkeypatch, caplog):
    """calibrate trains through the runner's mace_run_train wrapper and logs every validation line of every run,
    one MACE-format line per epoch, with the run it belongs to."""
    from harness.experiments import calibration
    from harness.pipeline import runner
    from harness.pipeline.execute import execute
    from mace_sparse import training
    from mace_sparse.cli.progress import MACE_DATEFMT, MACE_FORMAT

    script = tmp_path / "fake_train"
    script.write_text("#!/bin/sh\n"
                      "echo '2026-12-01 10:00:01.000 INFO: Epoch 0: head: Default, loss=5.0, MAE_F= 200.0 meV / A'\n"
                      "echo '2026-12-01 10:00:02.000 INFO: Epoch 1: head: Default, loss=4.0, MAE_F= 150.0 meV / A'\n"
                      "touch model.model\n")
    script.chmod(0o755)
    monkeypatch.setattr(training, "mace_run_train_executable", lambda: str(script))
    method = next(m for m in calibration.methods() if m.name == "linear")
    job = runner._Job(case=calibration.case(tmp_path / "f.model"), method=method, seed=0, run_dir=tmp_path / "run", args=["--seed", "0"])
    # a bench command run earlier in this process gives the logger its own handler and stops propagation
    monkeypatch.setattr(logging.getLogger("mace_sparse.bench"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="mace_sparse.bench"):
        execute([job], parallel=1, echo_epochs=True)
    epochs = [r for r in caplog.records if "Epoch" in r.getMessage()]
    assert [r.getMessage().split(", loss")[0] for r in epochs] == [
        "linear seed 0: Epoch 0: head: Default", "linear seed 0: Epoch 1: head: Default"]
    assert MACE_LINE.match(logging.Formatter(MACE_FORMAT, MACE_DATEFMT).format(epochs[-1]))  # calibrate's handler
    assert job.output.ok and (job.run_dir / "command.log").read_text().startswith("$ ")


def test_calibration_settings_are_mace_run_train_flags():
    """Every setting of the sweep is a command line mace_run_train (with the plugin) accepts, as meant."""
    from mace.tools import build_default_arg_parser

    from harness.experiments import calibration
    from harness.experiments.methods import train_command
    from mace_sparse.integration.arguments import add_sparse_arguments

    parser = add_sparse_arguments(build_default_arg_parser())
    case = calibration.case(calibration.Path("foundation.model"))
    parsed = {m.name: parser.parse_args(train_command(case, m, 0, calibration.settings(5), "train.xyz"))
              for m in calibration.methods() if m.trains}
    assert parsed["full"].finetune_method == "full" and parsed["defaults"].finetune_method == "sparse_str"
    assert parsed["tau2"].sparse_threshold_weight_decay == 2.0 and parsed["tau3"].sparse_threshold_weight_decay == 3.0
    assert parsed["kappa0"].sparse_delta_eps == 0.0 and parsed["path"].sparse_threshold_granularity == "path"
    assert "".join(parsed["linear"].sparse_targets) == "linear"
    assert all(p.max_num_epochs == 5 and p.lr == calibration.LR and p.E0s == "foundation" for p in parsed.values())
