"""The magnetic-head benchmark (``mace_sparse bench-magnetic``): moments learnt by sparse fine-tuning of a
foundation that never saw them, and what the head costs the energy/force fit.

An experiment of the one runner (:mod:`harness.pipeline.runner`). Side by side in one run, same data, seeds,
epochs and flags: sparse_str with the head, sparse_str without it, and (for context) full fine-tuning with the
head. Every number is measured on the held-out structures by the shared evaluator, on the run's
``_magnetic.model`` (MACE + head) where there is one.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from harness.pipeline.table import mean_std

from .methods import Method, TrainSettings
from .tasks import BenchCase

#: targets of the issue: moment MAE, energy/force ratio to the same fine-tune without head, unchanged backbone
TARGET_MAGMOM_MAE = 0.03
TARGET_UNCHANGED = 0.90

#: variant -> its own mace_run_train flags (``{weight}``: the moment loss weight)
VARIANTS: Dict[str, List[str]] = {
    "sparse_str + head": ["--finetune-method", "sparse_str", "--magmom_weight", "{weight}"],
    "sparse_str, no head": ["--finetune-method", "sparse_str"],
    "full + head": ["--finetune_method", "full", "--magmom_weight", "{weight}"],
}
#: flags of every run beyond the runner's shared ones (moments key, validation every 5 epochs)
CASE_FLAGS = ("--magmoms_key", "REF_magmoms", "--eval_interval", "5")
EMA_DECAY = 0.99


@dataclasses.dataclass
class MagneticSettings:
    foundation: str
    train_file: str
    test_file: str
    epochs: int = 30
    seeds: Sequence[int] = (0, 1, 2)
    magmom_weight: float = 10.0
    lr: float = 0.005
    jobs: int = 1
    batch_size: int = 4
    variants: Sequence[str] = tuple(VARIANTS)


def _slug(variant: str) -> str:
    return variant.replace(" ", "").replace(",", "_").replace("+", "_")


def methods(settings: MagneticSettings) -> List[Method]:
    """The runner's methods: one per variant, its flags with the moment weight filled in."""
    out = []
    for variant in settings.variants:
        flags = tuple(flag.format(weight=settings.magmom_weight) for flag in VARIANTS[variant])
        out.append(Method(_slug(variant), "sparse_str" if "sparse_str" in flags else "full", flags, None))
    return out


def case(settings: MagneticSettings) -> BenchCase:
    """The held-out oxides are the target; no source test set (forgetting is the benchmark's ``magnetic`` task)."""
    return BenchCase(task="magnetic-head", label="magnetic-head/tm-oxides", foundation=Path(settings.foundation),
                     train_file=Path(settings.train_file), test_file=Path(settings.test_file),
                     e0s="foundation", valid_fraction=0.1, extra_flags=CASE_FLAGS)


def run_benchmark(settings: MagneticSettings, work: Optional[Path] = None) -> dict:
    """Every (variant, seed) run, ``settings.jobs`` at a time (each run is one single-threaded process)."""
    from harness.pipeline.runner import BenchOptions, run_bench  # torch and MACE: only when the benchmark runs

    work = Path(work) if work else Path(tempfile.mkdtemp(prefix="mace_sparse_bench_magnetic_"))
    train = TrainSettings(epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size, ema=True,
                          ema_decay=EMA_DECAY)
    options = BenchOptions(methods=methods(settings), seeds=list(settings.seeds), settings=train, out=work,
                           jobs=settings.jobs, cost_rounds=0)
    result = run_bench([case(settings)], options)[0]
    results = {v: [scores(r) for r in result["runs"] if r["method"] == _slug(v)] for v in settings.variants}
    return {"settings": dataclasses.asdict(settings), "runs": results, "summary": summarise(results)}


def scores(record: Dict[str, Any]) -> Dict[str, float]:
    """One run's scores under this report's names, from the runner's record."""
    out = {"energy_mae_mev_per_atom": record["target_energy_mae_per_atom"],
           "energy_mae_mev": record["target_energy_mae_per_config"],
           "force_mae_mev_per_a": record["target_force_mae"], "wall_s": record["wall_s"]}
    if "target_magmom_mae" in record:
        out["magmom_mae_mub"] = record["target_magmom_mae"]
        out["magmom_rmse_mub"] = record["target_magmom_rmse"]
    if "unchanged_adapted" in record:
        out["unchanged_adapted"] = record["unchanged_adapted"]
        out["unchanged_all"] = record["unchanged_all"]
    return out


def _mean_std(values: List[float]) -> Dict[str, float]:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std}


def summarise(results: Dict[str, List[Dict[str, float]]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    summary: Dict[str, Dict[str, Dict[str, float]]] = {}
    for variant, runs in results.items():
        keys = sorted({k for r in runs for k in r})
        summary[variant] = {k: _mean_std([r[k] for r in runs if k in r]) for k in keys}
    return summary


def _fmt(stat: Optional[Dict[str, float]], scale: float = 1.0, digits: int = 1) -> str:
    if stat is None:
        return "—"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def markdown_table(report: dict) -> str:
    summary = report["summary"]
    lines = [
        "| variant | magmom MAE / μB | E MAE / meV/atom | F MAE / meV/Å | backbone unchanged (adapted / all) | wall / s |",
        "|---|---|---|---|---|---|",
    ]
    for variant, s in summary.items():
        unchanged = (f"{_fmt(s.get('unchanged_adapted'), 100)} % / {_fmt(s.get('unchanged_all'), 100)} %"
                     if "unchanged_adapted" in s else "—")
        lines.append(
            f"| {variant} | {_fmt(s.get('magmom_mae_mub'), 1, 4)} | {_fmt(s.get('energy_mae_mev_per_atom'), 1, 2)} | "
            f"{_fmt(s.get('force_mae_mev_per_a'))} | {unchanged} | {_fmt(s.get('wall_s'), 1, 0)} |"
        )
    lines += ["", *target_lines(summary)]
    return "\n".join(lines)


def target_lines(summary: dict) -> List[str]:
    """The issue's targets, each marked ✓ or ✗ from the measured means."""
    head, plain = summary.get("sparse_str + head"), summary.get("sparse_str, no head")
    if head is None or "magmom_mae_mub" not in head:
        return []
    mark = lambda ok: "✓" if ok else "✗"  # noqa: E731
    out = [f"- {mark(head['magmom_mae_mub']['mean'] <= TARGET_MAGMOM_MAE)} moment MAE "
           f"{head['magmom_mae_mub']['mean']:.4f} μB ≤ {TARGET_MAGMOM_MAE} μB"]
    if plain is not None:
        for key, label in (("energy_mae_mev_per_atom", "energy"), ("force_mae_mev_per_a", "force")):
            ratio = head[key]["mean"] / plain[key]["mean"]
            out.append(f"- {mark(ratio <= 1.0)} {label} MAE with head / without head = {ratio:.3f} (≤ 1)")
    if "unchanged_adapted" in head:
        value = head["unchanged_adapted"]["mean"]
        out.append(f"- {mark(value >= TARGET_UNCHANGED)} backbone unchanged {100 * value:.1f} % ≥ {100 * TARGET_UNCHANGED:.0f} %")
    return out
