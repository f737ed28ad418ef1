"""Choosing each method's learning rate on validation, and lending it to the methods not tuned.

Pure functions of finished runs (no training here): :mod:`harness.pipeline.runner` plans and runs the grid.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

from harness.experiments.methods import REFERENCE, Method

from .curve import best_point


def select_lrs(jobs: Sequence[Any]) -> Tuple[Dict[str, float], Dict[str, Dict[str, Optional[float]]]]:
    """Per method (``jobs``: the runner's finished tuning jobs): the grid lr of the lowest validation force MAE at the best checkpoint, and the whole table."""
    table: Dict[str, Dict[str, Optional[float]]] = {}
    for job in jobs:
        best = best_point(job.output.curve) if job.output else None
        table.setdefault(job.method.name, {})[f"{job.lr:g}"] = best.get("mae_f") if best else None
    chosen = {}
    for method, by_lr in table.items():
        scored = [(v, float(lr)) for lr, v in by_lr.items() if v is not None]
        if not scored:
            raise RuntimeError(f"{method}: no validation force MAE was logged for any learning rate")
        chosen[method] = min(scored)[1]
    return chosen, table


def borrowed_lrs(methods: Sequence[Method], chosen: Dict[str, float], fallback: float) -> Dict[str, str]:
    """For every trained method without its own choice: which tuned method's lr it takes (the one it is a variant
    of, ``Method.lr_from``, when that was tuned; else the first of its kind; else full fine-tuning); ``chosen``
    gains those entries. Returns {method: lender} (``fallback`` lends "grid")."""
    lenders: Dict[str, str] = {}
    tuned = dict(chosen)  # lenders are tuned methods only, never another borrower
    for method in methods:
        if not method.trains or method.name in chosen:
            continue
        same_kind = [m.name for m in methods if m.kind == method.kind and m.name in tuned]
        if method.lr_from in tuned:
            lender: Optional[str] = method.lr_from
        else:
            lender = same_kind[0] if same_kind else (REFERENCE if REFERENCE in tuned else None)
        chosen[method.name] = chosen[lender] if lender else fallback
        lenders[method.name] = lender or "grid"
    return lenders
