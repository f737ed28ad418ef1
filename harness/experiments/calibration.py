"""Accuracy / sparsity / forgetting of sparse_str settings against full fine-tuning, measured side by side.

The sweep behind the package defaults (``mace_sparse calibrate``), an experiment of the one runner
(:mod:`harness.pipeline.runner`). A small foundation is pretrained on the bundled EMT bulk cells with the real
``mace_run_train`` (the quick start's recipe; or given with ``--foundation_model``); each setting then fine-tunes
it on the bundled EMT surface slabs through the real ``mace_run_train`` (MACE's loss, optimizer and schedule)
with the same data, seeds, epochs and learning rate as full fine-tuning, and is scored on held-out slabs
(target) and held-out bulk cells (source: forgetting). All numbers in the printed table come from this one run.

Until 2026-12 the sweep trained in-process with MACE's defaults typed in; nothing it measured needs that (the
errors come from the saved models, the share left unchanged from sparse_str's own ``_sparsity.json``), so it
now runs the same ``mace_run_train`` as the benchmark.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from harness.pipeline.table import mean_std
from mace_sparse.cli.quickstart import COMMON_FLAGS, FOUNDATION_FLAGS

from .methods import ZERO_SHOT, Method, TrainSettings
from .tasks import BenchCase, pretrain_standin_foundation, standin_task

#: (name, label, mace_run_train flags) evaluated by default: full fine-tuning and sparse_str settings.
SPARSE = ("--finetune_method", "sparse_str")
DEFAULT_VARIANTS: Tuple[Tuple[str, str, Tuple[str, ...]], ...] = (
    ("full", "full fine-tuning", ("--finetune_method", "full")),
    ("defaults", "sparse_str defaults (κ=1, λ_τ=1, all, layer)", SPARSE),
    ("tau2", "defaults but λ_τ=2", (*SPARSE, "--sparse_threshold_weight_decay", "2.0")),
    ("tau3", "defaults but λ_τ=3", (*SPARSE, "--sparse_threshold_weight_decay", "3.0")),
    ("kappa0", "defaults but plain Adam (κ=0)", (*SPARSE, "--sparse_delta_eps", "0.0")),
    ("path", "defaults but granularity=path", (*SPARSE, "--sparse_threshold_granularity", "path")),
    ("linear", "defaults but targets=linear", (*SPARSE, "--sparse_targets", "linear")),
)
#: Pretraining epochs of the stand-in foundation, and the fine-tuning set-up shared by every setting.
FOUNDATION_EPOCHS = 30
LR = 0.01
BATCH_SIZE = 4


@dataclasses.dataclass
class RunResult:
    label: str
    seed: int
    target_force_mae: float
    source_force_mae: float
    unchanged_fraction: Optional[float]


def methods(variants: Sequence[Tuple[str, str, Tuple[str, ...]]] = DEFAULT_VARIANTS) -> List[Method]:
    """The runner's methods of the sweep (zero-shot first: the forgetting baseline)."""
    out = [Method(ZERO_SHOT, ZERO_SHOT, (), None)]
    for name, _, flags in variants:
        out.append(Method(name, "sparse_str" if "sparse_str" in flags else "full", tuple(flags), None))
    return out


def pretrain_foundation(work_dir: Path, epochs: int = FOUNDATION_EPOCHS) -> Path:
    """The stand-in foundation with the quick start's recipe (plain ``mace_run_train``, reused if present)."""
    return pretrain_standin_foundation(work_dir, epochs, flags=(*FOUNDATION_FLAGS, *COMMON_FLAGS))


def case(foundation: Path) -> BenchCase:
    """EMT bulk foundation → EMT surface slabs, forgetting on bulk cells (the ``standin`` case)."""
    return standin_task(foundation).cases[0]


def settings(epochs: int) -> TrainSettings:
    return TrainSettings(epochs=epochs, lr=LR, batch_size=BATCH_SIZE)


def run_calibration(
    foundation_path: Optional[str] = None,
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 20,
    variants: Sequence[Tuple[str, str, Tuple[str, ...]]] = DEFAULT_VARIANTS,
    out: Optional[Path] = None,
    jobs: int = 1,
) -> Dict:
    """Run every variant for every seed through the runner; the report (see :func:`report`)."""
    from harness.pipeline.runner import BenchOptions, run_bench  # torch and MACE: only when the sweep runs

    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="mace_sparse_calib_"))
    if foundation_path is None:
        foundation_path = str(pretrain_foundation(out / "foundation"))
    options = BenchOptions(methods=methods(variants), seeds=list(seeds), settings=settings(epochs), out=out,
                           jobs=jobs, cost_rounds=0, echo_epochs=True)
    result = run_bench([case(Path(foundation_path))], options)[0]
    return report(result, variants, foundation_path, epochs, seeds)


def report(result: Dict[str, Any], variants: Sequence[Tuple[str, str, Tuple[str, ...]]], foundation: str,
           epochs: int, seeds: Sequence[int]) -> Dict:
    """The sweep's report from the runner's records of its one case."""
    labels = {name: label for name, label, _ in variants}
    zero = next(r for r in result["runs"] if r["method"] == ZERO_SHOT)
    zero_shot = {"target": zero["target_force_mae"], "source": zero["source_force_mae"]}
    results = [
        RunResult(labels[r["method"]], r["seed"], r["target_force_mae"], r["source_force_mae"],
                  r.get("unchanged_all"))
        for r in result["runs"] if r["method"] != ZERO_SHOT
    ]
    order = {label: i for i, label in enumerate(labels.values())}
    results.sort(key=lambda r: (order[r.label], r.seed))
    return {"foundation": foundation, "epochs": epochs, "seeds": list(seeds), "zero_shot": zero_shot,
            "runs": [dataclasses.asdict(r) for r in results], "table": summarize(results, zero_shot)}


def summarize(results: Sequence[RunResult], zero_shot: Dict[str, float]) -> List[Dict]:
    """Mean ± std per setting, with ratios to full fine-tuning of the same run."""
    labels = list(dict.fromkeys(r.label for r in results))

    rows = []
    full = [r for r in results if r.unchanged_fraction is None]
    full_target = mean_std([r.target_force_mae for r in full])[0] if full else float("nan")
    full_rise = (mean_std([r.source_force_mae for r in full])[0] - zero_shot["source"]) if full else float("nan")
    for label in labels:
        runs = [r for r in results if r.label == label]
        t_mean, t_std = mean_std([r.target_force_mae for r in runs])
        s_mean, s_std = mean_std([r.source_force_mae for r in runs])
        unchanged = [r.unchanged_fraction for r in runs if r.unchanged_fraction is not None]
        rows.append({
            "setting": label,
            "target_force_mae": t_mean, "target_force_mae_std": t_std,
            "target_ratio_to_full": t_mean / full_target,
            "source_force_mae": s_mean, "source_force_mae_std": s_std,
            "source_rise_ratio_to_full": (s_mean - zero_shot["source"]) / full_rise if full_rise else float("nan"),
            "unchanged_percent": 100.0 * statistics.fmean(unchanged) if unchanged else 0.0,
        })
    return rows


def markdown_table(report: Dict) -> str:
    lines = [
        f"Zero-shot: target {report['zero_shot']['target']:.1f} meV/Å, source {report['zero_shot']['source']:.1f} "
        f"meV/Å; {report['epochs']} epochs, seeds {report['seeds']}.",
        "",
        "| setting | target F MAE (meV/Å) | ratio to full | source F MAE (meV/Å) | source rise / full's | unchanged % |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["table"]:
        lines.append(
            f"| {row['setting']} | {row['target_force_mae']:.1f} ± {row['target_force_mae_std']:.1f} | "
            f"{row['target_ratio_to_full']:.2f} | {row['source_force_mae']:.1f} ± {row['source_force_mae_std']:.1f} | "
            f"{row['source_rise_ratio_to_full']:.2f} | {row['unchanged_percent']:.1f} |"
        )
    return "\n".join(lines)
