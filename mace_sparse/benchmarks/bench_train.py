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
from typing import Dict, List, Optional

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
    #: validation points per epoch (:func:`mace_sparse.benchmarks.bench_curve.parse_curve`)
    curve: List[Dict[str, float]] = dataclasses.field(default_factory=list)
    stopped_early: bool = False

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


def _run_once(cmd: List[str], run_dir: Path, watch_stop: bool, mode: str = "w") -> int:
    """One ``mace_run_train`` process, console output to ``command.log``; with ``watch_stop`` it is stopped
    once MACE logs that patience is exhausted (see :mod:`mace_sparse.benchmarks.bench_curve`)."""
    from .bench_curve import STOP_LINE

    with open(run_dir / "command.log", mode) as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=run_dir, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
        if not watch_stop:
            return proc.wait()
        marker, seen = STOP_LINE.encode(), 0
        while proc.poll() is None:
            time.sleep(0.5)
            with open(run_dir / "command.log", "rb") as fh:
                fh.seek(seen)
                chunk = fh.read()
            if _final_stop(chunk, marker):
                proc.terminate()
                proc.wait()
                return STOPPED
            seen = max(seen, seen + len(chunk) - 200)  # a line cut in two is read again next time
        return proc.returncode


#: Return code of :func:`_run_once` for a process stopped at patience (not an error).
STOPPED = -1000


def _final_stop(chunk: bytes, marker: bytes) -> bool:
    """A complete 'Stopping optimization' line that ends the run; with ``--swa`` MACE's first such line says
    '... and starting Stage Two' and the run goes on."""
    for line in chunk.split(b"\n")[:-1]:  # the last piece may be a line still being written
        if marker in line and b"Stage Two" not in line:
            return True
    return False


def latest_checkpoint_epoch(run_dir: Path) -> Optional[int]:
    """The epoch of the checkpoint ``--restart_latest`` will load (MACE tries the stage-two ones first)."""
    files = list((run_dir / "checkpoints").glob("*_epoch-*.pt")) if (run_dir / "checkpoints").is_dir() else []
    pattern = re.compile(r"_epoch-(\d+)(_swa)?\.pt$")
    found = [(bool(m.group(2)), int(m.group(1))) for m in map(pattern.search, (f.name for f in files)) if m]
    if not found:
        return None
    swa = [e for is_swa, e in found if is_swa]
    return max(swa) if swa else max(e for _, e in found)


def run_training(args: List[str], run_dir: Path, name: str = "model", patience: Optional[int] = None,
                 stage_two: bool = False) -> TrainOutput:
    """Run ``mace_run_train ARGS`` in ``run_dir`` (created) and return what it produced.

    With ``patience`` (the run's ``--patience``), the run is stopped when MACE reports that patience is exhausted
    and finished from its best checkpoint (``--restart_latest --max_num_epochs <best epoch>``), so that the
    saved model is the best-validation one and no epoch is trained past the stop. ``stage_two``: the run has
    MACE's stage two (``--swa``); its outputs (``<name>_stagetwo.*``) are the ones returned.

    A run that already finished in ``run_dir`` with the very same arguments (recorded in ``bench_run.json``) is
    not repeated: an interrupted benchmark restarted with the same ``--out`` picks up where it stopped.
    """
    from .bench_curve import best_epoch_from_log, parse_curve, run_log

    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [mace_run_train_executable(), *args]
    done = run_dir / DONE_FILE
    previous = json.loads(done.read_text()) if done.is_file() else None
    stopped = bool(previous and previous.get("stopped_early"))
    stem = f"{name}_stagetwo" if stage_two else name
    if previous and previous.get("args") == list(args) and (run_dir / f"{stem}.model").is_file():
        returncode, wall, reused = 0, float(previous["wall_s"]), True
    else:
        done.unlink(missing_ok=True)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a stale checkpoint must not be resumed
        shutil.rmtree(run_dir / "logs", ignore_errors=True)
        reused = False
        start = time.perf_counter()
        returncode = _run_once(cmd, run_dir, watch_stop=patience is not None)
        stopped = returncode == STOPPED
        if stopped:
            best = latest_checkpoint_epoch(run_dir)
            best = best if best is not None else best_epoch_from_log(run_log(run_dir))
            finish = [*cmd, "--restart_latest", "--max_num_epochs", str(best if best is not None else 0)]
            returncode = _run_once(finish, run_dir, watch_stop=False, mode="a")
        wall = time.perf_counter() - start
        if returncode == 0:
            done.write_text(json.dumps({"args": list(args), "wall_s": wall, "stopped_early": stopped}))
    log_text = run_log(run_dir)
    epoch_s = median_epoch_seconds(log_text) if log_text else None
    delta = run_dir / f"{stem}_sparse_delta.safetensors"
    sparsity = run_dir / f"{stem}_sparsity.json"
    return TrainOutput(
        run_dir=run_dir, model=run_dir / f"{stem}.model", returncode=returncode, wall_s=wall, epoch_s=epoch_s,
        delta=delta if delta.is_file() else None, sparsity_json=sparsity if sparsity.is_file() else None,
        reused=reused, curve=parse_curve(log_text), stopped_early=stopped,
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
