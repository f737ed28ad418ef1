"""Running a benchmark's planned ``mace_run_train`` jobs, a few at a time, and draining them.

Separate from :mod:`harness.pipeline.runner` (which plans, selects learning rates and evaluates): this module
only starts processes. A job is the runner's ``_Job`` (its case, method, seed, run directory and arguments);
its ``output`` is filled in here.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from pathlib import Path
from typing import Any, List, Optional, Sequence

from .train import failure_tail, finished, run_training

LOG = logging.getLogger("mace_sparse.bench")


#: a file of this name in ``--out`` drains the benchmark: no run starts after it appears, the running ones finish
DRAIN_FILE = "STOP"


class Drained(Exception):
    """The benchmark was drained (:data:`DRAIN_FILE`): the runs in progress finished, the rest did not start."""


def job_finished(job: Any) -> bool:
    """Whether ``job`` finished earlier with the same arguments (:func:`harness.pipeline.train.finished`)."""
    return finished(job.args, job.run_dir, stage_two=job.method.stage_two)


def execute(jobs: Sequence[Any], parallel: int, echo_epochs: bool = False,
            drain: Optional[Path] = None) -> None:
    """Run the jobs (``parallel`` at a time); a failed run stops the benchmark with its console tail.

    ``drain``: once this file exists no further job starts (a session ending soon: the runs in progress finish
    cleanly instead of being resumed later), and :class:`Drained` is raised after them. Jobs that finished
    earlier are still reused: that starts nothing.
    """
    lock = threading.Lock()
    skipped: List[Any] = []

    def one(job: Any) -> Any:
        if drain is not None and drain.exists() and not job_finished(job):
            skipped.append(job)
            return job
        with lock:
            LOG.info("run %d/%d: %s seed %d (%s) …", job.index, job.total, job.method.name, job.seed, job.case.label)
        def echo(line: str) -> None:
            if " INFO: Epoch " in line:
                LOG.info("%s seed %d: %s", job.method.name, job.seed, line.split(" INFO: ", 1)[1])

        job.output = run_training(job.args, job.run_dir, patience=_patience(job.args),
                                  stage_two=job.method.stage_two, on_line=echo if echo_epochs else None)
        with lock:
            out = job.output
            extra = f", median epoch {out.epoch_s:.2f} s" if out.epoch_s is not None else ""
            extra += " (finished earlier in this --out: reused)" if out.reused else ""
            LOG.info("run %d/%d: %s seed %d done in %.1f s%s", job.index, job.total, job.method.name, job.seed,
                     out.wall_s, extra)
        if not job.output.ok:
            raise RuntimeError(f"{job.method.name} seed {job.seed} on {job.case.label} failed "
                               f"(exit {job.output.returncode}); last lines of {job.run_dir / 'command.log'}:\n"
                               + failure_tail(job.output))
        return job

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel))
    try:
        futures = [pool.submit(one, job) for job in jobs]
        for future in concurrent.futures.as_completed(futures):
            future.result()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # runs already started finish; none is started after
        raise
    pool.shutdown(wait=True)
    if skipped:
        raise Drained(f"{drain} exists: {len(skipped)} run(s) not started; the finished ones are kept (delete "
                      "the file and run the same command again to go on, or add --finished-only for their table)")


def _patience(args: Sequence[str]) -> Optional[int]:
    return int(args[list(args).index("--patience") + 1]) if "--patience" in args else None
