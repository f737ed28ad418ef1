"""Start one ``mace_run_train`` process: the single wrapper every command and the repository's harness use.

A run is MACE's own console script in its own directory, its console output in ``command.log`` there, with
the command line on the first line (``$ ...``) so that any run can be repeated by hand. The environment turns
the mace_sparse plugin on (or, for plain-MACE pretraining, off with ``MACE_SPARSE_DISABLE=1``) and uses one
OpenMP thread unless the caller's environment already chose. While the process runs, every complete line it
writes is handed to ``on_line``; a callback that returns True stops the process (the harness stops a run when
MACE logs that its patience is exhausted, see ``harness.pipeline.curve``). ``quickstart`` uses the same
callback to echo MACE's epoch lines to the terminal.

Only the standard library is imported, so that the command line stays light.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

#: Return code of :func:`run_mace_train` for a process that ``on_line`` stopped (not an error).
STOPPED = -1000
LOG_NAME = "command.log"


@dataclasses.dataclass
class TrainProcess:
    """How one ``mace_run_train`` process ended."""

    returncode: int
    wall_s: float
    log: Path

    @property
    def stopped(self) -> bool:
        return self.returncode == STOPPED


def mace_run_train_executable() -> str:
    """The ``mace_run_train`` console script on ``PATH``."""
    exe = shutil.which("mace_run_train")
    if exe is None:
        raise FileNotFoundError("mace_run_train is not on PATH; install mace-torch 0.3.16")
    return exe


def train_env(plugin: bool = True, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a run: the plugin on (or off), one OpenMP thread unless the caller chose otherwise.

    ``PYTHONPATH`` is inherited, so a source checkout on it is what the subprocess imports.
    """
    env = dict(os.environ)
    if plugin:
        env.pop("MACE_SPARSE_DISABLE", None)
    else:
        env["MACE_SPARSE_DISABLE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def run_mace_train(
    args: Sequence[str],
    run_dir: Path,
    *,
    plugin: bool = True,
    env_extra: Optional[Dict[str, str]] = None,
    append: bool = False,
    on_line: Optional[Callable[[str], bool]] = None,
    on_poll: Optional[Callable[[float], None]] = None,
    poll_s: float = 0.5,
) -> TrainProcess:
    """Run ``mace_run_train ARGS`` in ``run_dir`` (created), console output to ``run_dir/command.log``.

    ``append``: add to an existing ``command.log`` (a run finished in a second process). ``on_line`` gets
    every complete output line; when it returns True the process is terminated and the return code is
    :data:`STOPPED`. ``on_poll`` gets the seconds elapsed, every ``poll_s`` while the process runs.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [mace_run_train_executable(), *map(str, args)]
    log_path = run_dir / LOG_NAME
    start = time.perf_counter()
    with open(log_path, "a" if append else "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        offset = log.tell()
        proc = subprocess.Popen(cmd, cwd=run_dir, env=train_env(plugin, env_extra), stdout=log,
                                stderr=subprocess.STDOUT)
        pending = b""
        while True:
            finished = proc.poll() is not None  # read once more after the end: the last lines
            with open(log_path, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
            offset += len(chunk)
            *lines, pending = (pending + chunk).split(b"\n")  # the last piece may be a line still being written
            if on_line is not None and any(on_line(line.decode(errors="replace")) for line in lines):
                proc.terminate()
                proc.wait()
                return TrainProcess(STOPPED, time.perf_counter() - start, log_path)
            if finished:
                return TrainProcess(proc.returncode, time.perf_counter() - start, log_path)
            if on_poll is not None:
                on_poll(time.perf_counter() - start)
            time.sleep(poll_s)


def log_tail(log: Path, lines: int = 12) -> str:
    """The last lines of a run's console output, for an error message."""
    return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])
