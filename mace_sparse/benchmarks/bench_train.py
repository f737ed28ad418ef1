"""Run one ``mace_run_train`` fine-tune of the benchmark and collect what it wrote.

Each run gets its own directory; the console output goes to ``command.log`` there (with the command line on
its first line, so any run can be repeated by hand). Nothing is read from MACE's metrics: the evaluation is
ours (:mod:`mace_sparse.benchmarks.bench_eval`). The only thing taken from MACE's log is the wall time between
consecutive validation lines (an epoch of training plus its validation), kept in the JSON as a cross-check of
the in-process step timing.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import List, Optional

_EPOCH_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) INFO: Epoch (\d+):")


@dataclasses.dataclass
class TrainOutput:
    """Paths and timings of one finished run."""

    run_dir: Path
    model: Path
    returncode: int
    wall_s: float
    epoch_s: Optional[float]
    delta: Optional[Path] = None
    sparsity_json: Optional[Path] = None
    reused: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.model.is_file()


def mace_run_train_executable() -> str:
    exe = shutil.which("mace_run_train")
    if exe is None:
        raise FileNotFoundError("mace_run_train is not on PATH; install mace-torch 0.3.16")
    return exe


def subprocess_env() -> dict:
    """The environment of a run: the plugin on, one OpenMP thread unless the caller chose otherwise.

    ``PYTHONPATH`` is inherited, so a source checkout on it is what the subprocess imports.
    """
    env = dict(os.environ)
    env.pop("MACE_SPARSE_DISABLE", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def median_epoch_seconds(log_text: str) -> Optional[float]:
    """Median wall time between consecutive ``Epoch N:`` validation lines of a MACE log (None if < 2)."""
    stamps = []
    for line in log_text.splitlines():
        match = _EPOCH_LINE.match(line)
        if match:
            stamps.append(datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S.%f"))
    gaps = [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:])]
    return statistics.median(gaps) if gaps else None


DONE_FILE = "bench_run.json"


def run_training(args: List[str], run_dir: Path, name: str = "model") -> TrainOutput:
    """Run ``mace_run_train ARGS`` in ``run_dir`` (created) and return what it produced.

    A run that already finished in ``run_dir`` with the very same arguments (recorded in ``bench_run.json``) is
    not repeated: an interrupted benchmark restarted with the same ``--out`` picks up where it stopped.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [mace_run_train_executable(), *args]
    done = run_dir / DONE_FILE
    previous = json.loads(done.read_text()) if done.is_file() else None
    if previous and previous.get("args") == list(args) and (run_dir / f"{name}.model").is_file():
        returncode, wall, reused = 0, float(previous["wall_s"]), True
    else:
        done.unlink(missing_ok=True)
        reused = False
        start = time.perf_counter()
        with open(run_dir / "command.log", "w") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            proc = subprocess.run(cmd, cwd=run_dir, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
        returncode, wall = proc.returncode, time.perf_counter() - start
        if returncode == 0:
            done.write_text(json.dumps({"args": list(args), "wall_s": wall}))
    logs = sorted((run_dir / "logs").glob("*_run-*.log")) if (run_dir / "logs").is_dir() else []
    logs = [p for p in logs if not p.name.endswith("_debug.log")]
    epoch_s = median_epoch_seconds(logs[-1].read_text()) if logs else None
    delta = run_dir / f"{name}_sparse_delta.safetensors"
    sparsity = run_dir / f"{name}_sparsity.json"
    return TrainOutput(
        run_dir=run_dir, model=run_dir / f"{name}.model", returncode=returncode, wall_s=wall, epoch_s=epoch_s,
        delta=delta if delta.is_file() else None, sparsity_json=sparsity if sparsity.is_file() else None,
        reused=reused,
    )


def failure_tail(output: TrainOutput, lines: int = 12) -> str:
    """The last lines of a failed run's console output, for the error message."""
    text = (output.run_dir / "command.log").read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def write_subset(source: Path, n: Optional[int], out: Path) -> Path:
    """The first ``n`` frames of ``source`` as a new extxyz file (``source`` itself when ``n`` is None)."""
    if n is None:
        return source
    import ase.io

    frames = ase.io.read(source, f":{n}")
    if len(frames) < n:
        raise ValueError(f"{source} has only {len(frames)} frames; {n} asked for")
    out.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(out, frames, format="extxyz")
    return out
