"""Per-epoch learning curves of a ``mace_run_train`` run, read from its log, and the early-stop watcher.

Why a watcher: mace-torch 0.3.16 logs "Stopping optimization after N epochs without improvement" once
``--patience`` is exhausted but only *leaves* the epoch loop in distributed runs (``tools/train.py``: the exit
flag is a tensor that exists only when ``distributed``), so a plain run goes on to ``--max_num_epochs``. The
benchmark needs patience-based stopping for every method alike, without patching MACE for plain runs, so it
stops the process when that line appears and lets MACE itself finish from its best checkpoint:
``--restart_latest --max_num_epochs <best epoch>`` loads the checkpoint MACE wrote at the best validation loss
(with the EMA weights), trains no further epoch and saves ``<name>.model`` (and, for sparse_str, the delta)
exactly as a run that ended there would.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional

STOP_LINE = "Stopping optimization after"
_EPOCH = re.compile(r"INFO: Epoch (\d+): (.*)$")
_FIELDS = {
    "loss": re.compile(r"loss=\s*([-+0-9.eE]+)"),
    "mae_f": re.compile(r"MAE_F=\s*([-+0-9.eE]+) meV"),
    "rmse_f": re.compile(r"RMSE_F=\s*([-+0-9.eE]+) meV"),
    "mae_e_per_atom": re.compile(r"MAE_E_per_atom=\s*([-+0-9.eE]+) meV"),
    "sparsity_percent": re.compile(r"sparsity=\s*([-+0-9.eE]+) %"),
    "mean_delta": re.compile(r"mean_delta=\s*([-+0-9.eE]+)"),
    "lr": re.compile(r"lr=\s*([-+0-9.eE]+)"),
}


def parse_curve(log_text: str) -> List[Dict[str, float]]:
    """One dict per validation line (``epoch`` plus whichever of :data:`_FIELDS` the line carries).

    A restarted run logs an epoch again; the later line wins, so the curve is the run's final history.
    """
    by_epoch: Dict[int, Dict[str, float]] = {}
    for line in log_text.splitlines():
        match = _EPOCH.search(line)
        if not match:
            continue
        point: Dict[str, float] = {"epoch": int(match.group(1))}
        for key, pattern in _FIELDS.items():
            found = pattern.search(match.group(2))
            if found:
                point[key] = float(found.group(1))
        by_epoch[point["epoch"]] = point
    return [by_epoch[e] for e in sorted(by_epoch)]


def best_point(curve: List[Dict[str, float]], key: str = "loss") -> Optional[Dict[str, float]]:
    """The point MACE's checkpointing keeps: the first epoch of lowest validation ``key`` (MACE uses the loss)."""
    points = [p for p in curve if key in p]
    if not points:
        return None
    return min(points, key=lambda p: (p[key], p["epoch"]))


def epochs_trained(curve: List[Dict[str, float]]) -> Optional[int]:
    """How many epochs the run trained: one validation point per epoch, counted, not read off the last one.

    Why not ``last epoch + 1``: MACE numbers stage-two epochs from ``--max_num_epochs`` (a run stopped at 134
    and continued in stage two logs epochs 401, 402, ...), so the last number overstates the run by the gap.
    """
    return len(curve) if curve else None


def stopped_early(log_text: str) -> bool:
    return STOP_LINE in log_text


def best_epoch_from_log(log_text: str) -> Optional[int]:
    """The epoch of MACE's best checkpoint: the lowest validation loss (ties: the earliest, as MACE saves)."""
    point = best_point(parse_curve(log_text))
    return None if point is None else int(point["epoch"])


def run_log(run_dir: Path) -> str:
    """The run's MACE log (``logs/*_run-*.log``, not the debug log); '' when there is none."""
    logs = sorted((run_dir / "logs").glob("*_run-*.log")) if (run_dir / "logs").is_dir() else []
    logs = [p for p in logs if not p.name.endswith("_debug.log")]
    return logs[-1].read_text(errors="replace") if logs else ""


def latest_checkpoint_epoch(run_dir: Path) -> Optional[int]:
    """The epoch of the checkpoint ``--restart_latest`` will load (MACE tries the stage-two ones first)."""
    files = list((run_dir / "checkpoints").glob("*_epoch-*.pt")) if (run_dir / "checkpoints").is_dir() else []
    pattern = re.compile(r"_epoch-(\d+)(_swa)?\.pt$")
    found = [(bool(m.group(2)), int(m.group(1))) for m in map(pattern.search, (f.name for f in files)) if m]
    if not found:
        return None
    swa = [e for is_swa, e in found if is_swa]
    return max(swa) if swa else max(e for _, e in found)
