"""PNG figures next to ``bench.md``: learning curves, and force error against the share of weights changed.

Both are drawn from the per-case results of :func:`harness.pipeline.runner.run_case` (the same
numbers as ``bench.json``): the learning curve is the validation force MAE that MACE logged after every epoch
(EMA weights when the run used ``--ema``) of each method's first seed; the trade-off plot puts each method's
mean target force MAE over seeds against its mean share of the foundation's weights changed, so that
sparse_str at several λ_τ, LoRA at several ranks, freeze and full fine-tuning can be compared at a glance.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any, Dict, List, Sequence

_MARKERS = {"full": "s", "lora": "^", "freeze": "D", "sparse_str": "o", "paper": "x"}


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label.replace("/", "__"))


def _kind(method: str) -> str:
    if method.startswith("paper"):
        return "paper"
    return method.split("-")[0]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(case: Dict[str, Any], path: Path) -> Path:
    """Validation force MAE per epoch of every trained method (first seed), log scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    seen = set()
    for run in case["runs"]:
        curve = [p for p in run.get("curve") or [] if "mae_f" in p]
        if not curve or run["method"] in seen:
            continue
        seen.add(run["method"])
        ax.plot([p["epoch"] for p in curve], [p["mae_f"] for p in curve], lw=1.1, label=run["method"])
        if run.get("best_epoch") is not None:
            best = [p for p in curve if p["epoch"] == run["best_epoch"]]
            if best:
                ax.plot([best[0]["epoch"]], [best[0]["mae_f"]], "k.", ms=4)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation force MAE (meV/Å)")
    ax.set_title(f"{case['case']['label']}: learning curves (first seed; dot = best epoch)", fontsize=9)
    if seen:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _means(runs: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    by: Dict[str, List[Dict[str, Any]]] = {}
    for run in runs:
        by.setdefault(run["method"], []).append(run)
    return {m: {"changed": statistics.fmean(r["changed_percent"] for r in rs),
                "force": statistics.fmean(r["target_force_mae"] for r in rs)} for m, rs in by.items()}


def tradeoff(case: Dict[str, Any], path: Path) -> Path:
    """Mean target force MAE against mean % of weights changed, one point per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    means = _means([r for r in case["runs"] if r["method"] != "zero-shot"])
    sparse = sorted((v["changed"], v["force"]) for m, v in means.items() if _kind(m) == "sparse_str")
    if len(sparse) > 1:
        ax.plot(*zip(*sparse), color="0.7", lw=0.8, zorder=0)
    for method, v in means.items():
        ax.scatter([v["changed"]], [v["force"]], marker=_MARKERS.get(_kind(method), "o"), s=28)
        ax.annotate(method, (v["changed"], v["force"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("weights changed (% of the foundation as configured)")
    ax.set_ylabel("target force MAE (meV/Å)")
    ax.set_title(f"{case['case']['label']}: accuracy vs share changed (mean over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(results: Sequence[Dict[str, Any]], out: Path) -> List[Path]:
    """Both figures for every case, as ``bench_<case>_curves.png`` and ``bench_<case>_tradeoff.png``."""
    paths = []
    for case in results:
        slug = _slug(case["case"]["label"])
        paths.append(learning_curves(case, out / f"bench_{slug}_curves.png"))
        paths.append(tradeoff(case, out / f"bench_{slug}_tradeoff.png"))
    return paths
