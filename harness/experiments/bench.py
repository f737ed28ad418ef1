"""The benchmark experiment (``mace_sparse bench``) as data: what each mode runs, and how a run is described.

Every mode is the same runner (:mod:`harness.pipeline.runner`) on other tasks, methods, seeds, epochs and
protocol; ``harness.cli.bench`` applies the mode and the command line's overrides.
"""

from __future__ import annotations

from typing import Any, Dict, List

from .methods import METHOD_NAMES

#: What each mode runs unless a flag says otherwise (``methods`` None: all). bench.md states what was covered,
#: computed from what actually ran.
MODES: Dict[str, Dict[str, Any]] = {
    "quick": {
        "tasks": ["rmd17"], "cases": ["aspirin/N=50"], "seeds": [0], "epochs": 5, "cost_rounds": 10,
        "methods": ["zero-shot", "full", "lora", "freeze", "sparse_str-L-all", "sparse_str-H-all",
                    "sparse_str-H-linear"],
        "patience": None, "ema": False, "lr_grid": [],
        "note": "a smoke run of the whole pipeline (≤ 10 min on 2 cores), not evidence",
    },
    "full": {
        "tasks": ["rmd17-s", "inorganic-s"], "cases": [], "seeds": [0, 1, 2],
        "epochs": {"*": 400}, "cost_rounds": 20,
        "methods": ["zero-shot", "full", "lora", "lora-r16", "freeze", "paper-recipe", "sparse_str-M-all",
                    "sparse_str-B5-all", "sparse_str-B5-fisher", "sparse_str-L-all", "sparse_str-H-all"],
        # primary methods get the lr grid and every seed; the secondary ones borrow the lr chosen for the primary
        # method they vary (Method.lr_from; else their kind's, else full's) and run the first seed only: the
        # issue's "fewer seeds or lr values for the secondary methods rather than cut the convergence or the
        # foundation size" on 2 CPU cores
        "tuned": ["full", "lora", "sparse_str-M-all", "sparse_str-B5-all"], "secondary_seeds": 1,
        "patience": 15, "ema": True, "lr_grid": [0.003, 0.01, 0.03],
        "note": "the converged, validated regime on the benchmark-scale foundations (organic-s, inorganic-s): "
                "every method stops at patience 15 (cap 400 epochs), EMA; full, lora, sparse_str-M-all and "
                "sparse_str-B5-all get the lr grid on validation and 3 seeds, the other methods borrow their "
                "kind's lr and run seed 0; tens of CPU hours, resumable (finished runs are reused, the table is "
                "rewritten after every case)",
    },
    "toy": {
        "tasks": ["rmd17", "inorganic"], "cases": [], "seeds": [0, 1, 2],
        "epochs": {"rmd17": 15, "inorganic": 12, "*": 15}, "cost_rounds": 20, "methods": None,
        "patience": None, "ema": False, "lr_grid": [],
        "note": "the earlier regime (tiny foundations, fixed 12–15 epochs, one lr, no EMA): 85 min on 2 cores",
    },
}


def describe(mode: Dict[str, Any], cases: List[Any], methods: List[Any], epochs: Dict[str, int],
             seeds: List[int], customised: bool) -> str:
    """What a run covers, in words (printed at the start and written to bench.md)."""
    names = [m.name for m in methods]
    text = (f"{len(cases)} case(s) ({', '.join(c.label for c in cases)}); {len(names)} of {len(METHOD_NAMES)} "
            f"methods ({', '.join(names)}); epochs {epochs_text(epochs)}; {len(seeds)} seed(s) {list(seeds)}")
    return text + ("; customised by flags" if customised else f"; {mode['note']}")


def epochs_text(epochs: Dict[str, int]) -> str:
    values = set(epochs.values())
    return str(values.pop()) if len(values) == 1 else ", ".join(f"{t}: {n}" for t, n in epochs.items())
