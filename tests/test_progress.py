"""Long ``mace_sparse`` commands log progress the way ``mace_run_train`` does: timestamped INFO lines per step."""

from __future__ import annotations

import logging
import re
import types

import mace  # noqa: F401  (before e3nn)
import pytest
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


@pytest.mark.usefixtures("fast_deterministic_torch")
def test_calibration_logs_each_epoch(foundation_model, caplog):
    from mace_sparse.benchmarks.calibration import fine_tune

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # as run_calibration does
    try:
        with caplog.at_level(logging.INFO):
            fine_tune(foundation_model, {"targets": "linear"}, seed=0, epochs=2, label="linear only")
    finally:
        torch.set_default_dtype(previous)
    epochs = [r.getMessage() for r in caplog.records if "epoch" in r.getMessage()]
    assert len(epochs) == 2, epochs
    assert re.match(r"calibrate \[linear only, seed 0\] epoch 2/2: train loss=[0-9.]+, [0-9.]+ s$", epochs[-1])
