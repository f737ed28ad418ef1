"""Step times of several methods, measured interleaved, so that a drifting machine is charged to all of them.

Each method has its own model copy and optimiser; the timing runs many rounds, each round a short block of
steps (one by default) of every method, the order rotating from round to round, every step timed on its own.
Interleaving spreads slow drifts of the machine (thermal state, other processes, allocator growth) over all
methods instead of charging them to whichever ran last.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .fixture import MethodState
from .take_step import sync

#: Per method: (wall-clock ms, process-CPU ms), each a list of rounds holding one time per step.
Times = Dict[str, Tuple[List[List[float]], List[List[float]]]]


def default_threads() -> int:
    """The CPUs this process may run on (its affinity mask), not the machine's core count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def time_interleaved(
    states: Sequence[MethodState],
    step: Callable[[MethodState], Any],
    rounds: int,
    steps: int,
    device: torch.device,
    log: Optional[Callable[[str], None]] = None,
) -> Times:
    """Per method, per round, the wall and process-CPU time (ms) of each step; the order rotates every round.

    ``log`` gets one line per round (the median step of each method so far), like MACE's per-epoch lines, so
    a long benchmark on a large model shows that it advances.

    CPU time is recorded next to wall time because on a shared machine the wall clock also counts the time
    other processes held the core; the process's own CPU time does not (it still feels cache and memory
    bandwidth contention). On CUDA only the wall time (with synchronisation) means anything.
    """
    times: Times = {s.name: ([], []) for s in states}
    for r in range(rounds):
        order = list(states[r % len(states):]) + list(states[: r % len(states)])
        for state in order:
            wall, cpu = [], []
            for _ in range(steps):
                sync(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                step(state)
                sync(device)
                wall.append(1e3 * (time.perf_counter() - start))
                cpu.append(1e3 * (time.process_time() - start_cpu))
            times[state.name][0].append(wall)
            times[state.name][1].append(cpu)
        if log is not None:
            medians = ", ".join(
                f"{s.name}={statistics.median(t for block in times[s.name][0] for t in block):.1f} ms" for s in states
            )
            log(f"round {r + 1}/{rounds}: median step {medians}")
    return times
