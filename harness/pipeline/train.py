"""The harness's layer over :func:`mace_sparse.training.run_mace_train`: one fine-tune of an experiment.

Each run gets its own directory (console output and command line in ``command.log``, as the runtime wrapper
writes them). On top of the plain process this layer adds what experiments need: early stopping at patience
(MACE 0.3.16 logs the stop but goes on; see :mod:`harness.pipeline.curve`) finished from the best checkpoint,
reuse of a run that already finished with the same arguments and the resume of one that was interrupted
(an experiment restarted with the same ``--out`` picks up where it stopped, inside a run too), the learning
curve, and the wall time between consecutive validation lines (kept in the JSON as a cross-check of the
in-process step timing). Nothing else is read from MACE's metrics: the evaluation is
:mod:`harness.pipeline.evaluate`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import re
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from mace_sparse.mace_io import output_paths
from mace_sparse.training import STOPPED, log_tail, run_mace_train

from .curve import STOP_LINE, best_epoch_from_log, latest_checkpoint_epoch, parse_curve, run_log, stopped_early

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
    #: validation points per epoch (:func:`harness.pipeline.curve.parse_curve`)
    curve: List[Dict[str, float]] = dataclasses.field(default_factory=list)
    stopped_early: bool = False
    #: how many times the run was interrupted and resumed from its checkpoint (0: ran in one go)
    resumed: int = 0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.model.is_file()


DONE_FILE = "bench_run.json"
#: written when a run starts (its arguments, the wall time of earlier segments): what makes it resumable
STARTED_FILE = "bench_started.json"


def _final_stop(chunk: bytes, marker: bytes) -> bool:
    """A complete 'Stopping optimization' line that ends the run; with ``--swa`` MACE's first such line says
    '... and starting Stage Two' and the run goes on."""
    for line in chunk.split(b"\n")[:-1]:  # the last piece may be a line still being written
        if marker in line and b"Stage Two" not in line:
            return True
    return False


def _stop_watcher(line: str) -> bool:
    """``on_line`` of :func:`mace_sparse.training.run_mace_train`: stop once MACE reports patience exhausted."""
    return _final_stop(line.encode() + b"\n", STOP_LINE.encode())


def median_epoch_seconds(log_text: str) -> Optional[float]:
    """Median wall time between consecutive ``Epoch N:`` validation lines of a MACE log (None if < 2)."""
    stamps = []
    for line in log_text.splitlines():
        match = _EPOCH_LINE.match(line)
        if match:
            stamps.append(datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S.%f"))
    gaps = [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:])]
    return statistics.median(gaps) if gaps else None


def _read_json(path: Path) -> Optional[Dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def finished(args: Sequence[str], run_dir: Path, name: str = "model", stage_two: bool = False) -> bool:
    """Whether ``run_dir`` holds a run that finished with exactly these arguments (it is reused, not repeated)."""
    previous = _read_json(run_dir / DONE_FILE)
    stem = f"{name}_stagetwo" if stage_two else name
    return bool(previous and previous.get("args") == [str(a) for a in args] and (run_dir / f"{stem}.model").is_file())


def _last_write(run_dir: Path) -> float:
    """When the run last wrote a line (MACE's own log is flushed per line, the console log may lag)."""
    files = [run_dir / "command.log", *((run_dir / "logs").glob("*.log") if (run_dir / "logs").is_dir() else [])]
    return max((f.stat().st_mtime for f in files if f.is_file()), default=0.0)


def _resume_state(run_dir: Path, args: List[str]) -> Optional[Tuple[float, int]]:
    """(seconds already trained, times resumed so far) of an interrupted run with these ``args``; None when it
    cannot be resumed.

    Resumable: it was started with the very same arguments (``bench_started.json``) and MACE wrote a
    checkpoint. The interrupted segment ran from its recorded start to the last line it wrote.
    """
    started = _read_json(run_dir / STARTED_FILE)
    if not started or started.get("args") != args or latest_checkpoint_epoch(run_dir) is None:
        return None
    wall = float(started.get("wall_s", 0.0)) + max(0.0, _last_write(run_dir) - float(started["segment_start"]))
    return wall, int(started.get("resumed", 0))


def _set_aside(run_dir: Path, args: List[str]) -> Optional[Path]:
    """Move a run made with other arguments out of the way (``<run>.superseded-N``) and return where it went.

    A harness change that alters a method's arguments would otherwise wipe a finished run of hours the next
    time the benchmark runs; set aside, it can still be compared, restored or deleted by hand.
    """
    records = [_read_json(run_dir / f) for f in (DONE_FILE, STARTED_FILE)]
    if not any(r and r.get("args") not in (None, args) for r in records):
        return None
    n = 1
    while run_dir.with_name(f"{run_dir.name}.superseded-{n}").exists():
        n += 1
    target = run_dir.with_name(f"{run_dir.name}.superseded-{n}")
    run_dir.rename(target)
    run_dir.mkdir()
    logging.getLogger(__name__).warning("%s: made with other arguments; set aside as %s and started again",
                                        run_dir, target.name)
    return target


def _mark_started(run_dir: Path, args: List[str], wall_s: float, resumed: int) -> None:
    record = {"args": args, "wall_s": wall_s, "segment_start": time.time(), "resumed": resumed}
    (run_dir / STARTED_FILE).write_text(json.dumps(record))


def run_training(args: Sequence[str], run_dir: Path, name: str = "model", patience: Optional[int] = None,
                 stage_two: bool = False, on_line: Optional[Callable[[str], None]] = None) -> TrainOutput:
    """Run ``mace_run_train ARGS`` in ``run_dir`` (created) and return what it produced.

    With ``patience`` (the run's ``--patience``), the run is stopped when MACE reports that patience is exhausted
    and finished from its best checkpoint (``--restart_latest --max_num_epochs <best epoch>``), so that the
    saved model is the best-validation one and no epoch is trained past the stop. ``stage_two``: the run has
    MACE's stage two (``--swa``); its outputs (``<name>_stagetwo.*``) are the ones returned. ``on_line`` sees
    every console line (progress reports).

    A run that already finished in ``run_dir`` with the very same arguments (recorded in ``bench_run.json``) is
    not repeated; one made with other arguments is set aside as ``<run>.superseded-N``, never deleted. One that
    was interrupted (the benchmark stopped, the session cut) is resumed from MACE's checkpoint with
    ``--restart_latest``, so a long benchmark loses at most the epochs since the last best one; a run whose log
    already says patience is exhausted goes straight to the finish. MACE's resume is not a seamless
    continuation: it starts again at the best checkpoint's epoch from the EMA weights, with a fresh EMA (its
    decay warm-up starts over) and its best loss and patience counter reset, so a resumed run's validation curve
    is noisier and patience may end it on a noise dip; ``resumed`` in ``bench_run.json`` says which runs were
    resumed (draining, :mod:`harness.pipeline.execute`, avoids it).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    args = [str(a) for a in args]
    done = run_dir / DONE_FILE
    previous = _read_json(done)
    stopped = bool(previous and previous.get("stopped_early"))
    resumed = int(previous.get("resumed", 0)) if previous else 0
    stem = f"{name}_stagetwo" if stage_two else name
    if finished(args, run_dir, name, stage_two):
        returncode, wall, reused = 0, float(previous["wall_s"]), True
    else:
        state = _resume_state(run_dir, args)
        if state is None:
            _set_aside(run_dir, args)  # reads the run's records, so before they are removed
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a stale checkpoint must not be resumed
            shutil.rmtree(run_dir / "logs", ignore_errors=True)
            earlier, resumed = 0.0, 0
        else:
            earlier, resumed = state[0], state[1] + 1
        done.unlink(missing_ok=True)
        _mark_started(run_dir, args, earlier, resumed)
        reused = False

        def report(line: str) -> bool:
            if on_line is not None:
                on_line(line)
            return False

        def watch(line: str) -> bool:
            return report(line) or (patience is not None and _stop_watcher(line))

        if resumed and patience is not None and stopped_early(run_log(run_dir)):
            returncode, wall, stopped = STOPPED, 0.0, True  # it had stopped; only the finish was cut off
        else:
            first = run_mace_train([*args, "--restart_latest"] if resumed else args, run_dir,
                                   append=bool(resumed), on_line=watch)
            returncode, wall, stopped = first.returncode, first.wall_s, first.stopped
        wall += earlier
        if stopped:
            best = latest_checkpoint_epoch(run_dir)
            best = best if best is not None else best_epoch_from_log(run_log(run_dir))
            finish = [*args, "--restart_latest", "--max_num_epochs", str(best if best is not None else 0)]
            second = run_mace_train(finish, run_dir, append=True, on_line=report)
            returncode, wall = second.returncode, wall + second.wall_s
        if returncode == 0:
            done.write_text(json.dumps({"args": args, "wall_s": wall, "stopped_early": stopped,
                                        "resumed": resumed}))
    log_text = run_log(run_dir)
    epoch_s = median_epoch_seconds(log_text) if log_text else None
    outputs = output_paths(run_dir, stem)
    delta, sparsity = outputs.delta, outputs.sparsity
    return TrainOutput(
        run_dir=run_dir, model=run_dir / f"{stem}.model", returncode=returncode, wall_s=wall, epoch_s=epoch_s,
        delta=delta if delta.is_file() else None, sparsity_json=sparsity if sparsity.is_file() else None,
        reused=reused, curve=parse_curve(log_text), stopped_early=stopped, resumed=resumed,
    )


def failure_tail(output: TrainOutput, lines: int = 12) -> str:
    """The last lines of a failed run's console output, for the error message."""
    return log_tail(output.run_dir / "command.log", lines)


def write_subset(source: Path, n: Optional[int], out: Path) -> Path:
    """The first ``n`` frames of ``source`` as a new extxyz file (``source`` itself when ``n`` is None)."""
    if n is None:
        return source
    import ase.io  # ase loads in ~0.5 s: only when a subset is written

    frames = ase.io.read(source, f":{n}")
    if len(frames) < n:
        raise ValueError(f"{source} has only {len(frames)} frames; {n} asked for")
    out.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(out, frames, format="extxyz")
    return out
