"""The magnetic-head benchmark (``mace_sparse bench-magnetic``): moments learnt by sparse fine-tuning of a
foundation that never saw them, and what the head costs the energy/force fit.

Side by side in one run, same data, seeds, epochs and flags: sparse_str with the head, sparse_str without it,
and (for context) full fine-tuning with the head. Every number is measured here on the held-out structures.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .bench_train import mace_run_train_executable
from .evaluation import evaluate_file

#: targets of the issue: moment MAE, energy/force ratio to the same fine-tune without head, unchanged backbone
TARGET_MAGMOM_MAE = 0.03
TARGET_UNCHANGED = 0.90

VARIANTS: Dict[str, List[str]] = {
    "sparse_str + head": ["--finetune-method", "sparse_str", "--magmom_weight", "{weight}"],
    "sparse_str, no head": ["--finetune-method", "sparse_str"],
    "full + head": ["--finetune_method", "full", "--magmom_weight", "{weight}"],
}


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


def run_variant(settings: MagneticSettings, variant: str, seed: int, work: Path) -> Dict[str, float]:
    """One fine-tune through the real ``mace_run_train`` and its scores on the held-out file."""
    name = f"{variant.replace(' ', '').replace(',', '_').replace('+', '_')}_s{seed}"
    run_dir = work / name
    run_dir.mkdir(parents=True, exist_ok=True)
    extra = [flag.format(weight=settings.magmom_weight) for flag in VARIANTS[variant]]
    cmd = [
        mace_run_train_executable(), "--name", name, "--foundation_model", settings.foundation,
        "--train_file", settings.train_file, "--valid_fraction", "0.1", "--E0s", "foundation",
        "--energy_key", "REF_energy", "--forces_key", "REF_forces", "--magmoms_key", "REF_magmoms",
        "--max_num_epochs", str(settings.epochs), "--lr", str(settings.lr), "--batch_size", str(settings.batch_size),
        "--seed", str(seed), "--default_dtype", "float64", "--device", "cpu", "--plot", "False",
        "--multiheads_finetuning", "False", "--eval_interval", "5", "--ema", "--ema_decay", "0.99", *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=run_dir, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} (seed {seed}) failed:\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - start
    magnetic = run_dir / f"{name}_magnetic.model"
    model = magnetic if magnetic.is_file() else run_dir / f"{name}.model"
    scores = evaluate_file(model, settings.test_file, magmoms_key="REF_magmoms" if magnetic.is_file() else None)
    scores["wall_s"] = wall
    sparsity = run_dir / f"{name}_sparsity.json"
    if sparsity.is_file():
        report = json.loads(sparsity.read_text())
        scores["unchanged_adapted"] = float(report["sparsity_over_adapted_layers"])
        scores["unchanged_all"] = float(report["sparsity_over_all_parameters"])
    return scores


def run_benchmark(settings: MagneticSettings, work: Path) -> dict:
    """Every (variant, seed) run, ``settings.jobs`` at a time (each run is one single-threaded process)."""
    from concurrent.futures import ThreadPoolExecutor

    plan = [(variant, seed) for seed in settings.seeds for variant in settings.variants]
    results: Dict[str, List[Dict[str, float]]] = {v: [] for v in settings.variants}

    def one(index: int, variant: str, seed: int) -> Dict[str, float]:
        logging.info(f"run {index + 1}/{len(plan)}: {variant}, seed {seed}")
        scores = run_variant(settings, variant, seed, work)
        logging.info(f"run {index + 1}/{len(plan)} done: {json.dumps({k: round(v, 4) for k, v in scores.items()})}")
        return scores

    with ThreadPoolExecutor(max_workers=max(1, settings.jobs)) as pool:
        futures = [pool.submit(one, i, v, s) for i, (v, s) in enumerate(plan)]
        for (variant, _), future in zip(plan, futures):
            results[variant].append(future.result())
    return {"settings": dataclasses.asdict(settings), "runs": results, "summary": summarise(results)}


def _mean_std(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


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
