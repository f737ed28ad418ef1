"""Accuracy / sparsity / forgetting of sparse_str settings against full fine-tuning, measured side by side.

The sweep behind the package defaults (``mace_sparse calibrate``). A small foundation is pretrained on the bundled
EMT bulk cells with the real ``mace_run_train`` (or given with ``--foundation_model``); each setting then
fine-tunes a fresh copy on the bundled EMT surface slabs with MACE's loss, Adam(amsgrad) and the same batches,
seeds and epochs as full fine-tuning, and is scored on held-out slabs (target) and held-out bulk cells
(source: forgetting). All numbers in the printed table come from this one run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "emt"

#: (label, settings) evaluated by default; ``None`` settings = full fine-tuning.
DEFAULT_VARIANTS: Sequence = (
    ("full fine-tuning", None),
    ("sparse_str defaults (κ=1, λ_τ=1, all, layer)", {}),
    ("defaults but λ_τ=2", {"threshold_weight_decay": 2.0}),
    ("defaults but λ_τ=3", {"threshold_weight_decay": 3.0}),
    ("defaults but plain Adam (κ=0)", {"delta_eps": 0.0}),
    ("defaults but granularity=path", {"granularity": "path"}),
    ("defaults but targets=linear", {"targets": "linear"}),
)


@dataclasses.dataclass
class RunResult:
    label: str
    seed: int
    target_force_mae: float
    source_force_mae: float
    unchanged_fraction: Optional[float]


def pretrain_foundation(work_dir: Path, epochs: int = 30) -> Path:
    """Pretrain the stand-in foundation with the real ``mace_run_train`` (same recipe as the quick start)."""
    import subprocess

    from ..cli.quickstart import COMMON_FLAGS, FOUNDATION_FLAGS, _mace_run_train

    flags = list(FOUNDATION_FLAGS)
    flags[flags.index("--max_num_epochs") + 1] = str(epochs)
    work_dir.mkdir(parents=True, exist_ok=True)
    logging.info(f"calibrate: pretraining the stand-in foundation ({epochs} epochs) in {work_dir}")
    started = time.perf_counter()
    cmd = [_mace_run_train(), "--name", "foundation", "--train_file", str(DATA_DIR / "bulk_train.xyz"),
           "--valid_fraction", "0.15", *flags, *COMMON_FLAGS]
    subprocess.run(cmd, cwd=work_dir, check=True, capture_output=True, env={**__import__("os").environ,
                                                                              "MACE_SPARSE_DISABLE": "1"})
    logging.info(f"calibrate: foundation ready after {time.perf_counter() - started:.0f} s")
    return work_dir / "foundation.model"


def _loader(path: Path, model, batch_size: int, shuffle: bool, seed: int):
    import ase.io
    import torch
    from mace import data
    from mace.tools import torch_geometric
    from mace.tools.utils import AtomicNumberTable

    z_table = AtomicNumberTable([int(z) for z in model.atomic_numbers])
    keys = data.KeySpecification(info_keys={"energy": "REF_energy"}, arrays_keys={"forces": "REF_forces"})
    items = [
        data.AtomicData.from_config(data.config_from_atoms(a, key_specification=keys), z_table=z_table,
                                    cutoff=float(model.r_max))
        for a in ase.io.read(path, ":")
    ]
    return torch_geometric.dataloader.DataLoader(items, batch_size=batch_size, shuffle=shuffle,
                                                 generator=torch.Generator().manual_seed(seed))


def force_mae(model, loader) -> float:
    """Mean absolute force error in meV/Å."""
    import torch

    errors = []
    for batch in loader:
        out = model(batch.to_dict(), training=False, compute_force=True)
        errors.append((out["forces"] - batch.forces).abs().detach())
    return 1000.0 * float(torch.cat(errors).mean())


def fine_tune(foundation, settings: Optional[dict], seed: int, epochs: int, lr: float = 0.01, label: str = ""):
    """One fine-tune as ``mace_run_train`` does it (loss weights 1/100, Adam amsgrad, clip 10, ExponentialLR).

    Logs one line per epoch (mean training loss), as ``mace_run_train`` does: a sweep runs for many minutes.
    """
    import torch
    from mace import modules

    from .. import optim
    from ..config import SparseConfig
    from ..sparse_model import get_sparse_model, sparsity_stats

    torch.manual_seed(seed)
    model = copy.deepcopy(foundation)
    if settings is None:
        groups = [{"params": list(model.parameters()), "lr": lr}]
        config = None
    else:
        config = SparseConfig(**settings)
        get_sparse_model(model, config)
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
        groups = optim.sparse_param_groups(groups, model, config, lr)
    optimizer = torch.optim.Adam(groups, lr=lr, amsgrad=True)
    optim.register_threshold_decay(optimizer)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9993)
    loss_fn = modules.WeightedEnergyForcesLoss(energy_weight=1.0, forces_weight=100.0)
    train = _loader(DATA_DIR / "slab_train.xyz", model, 4, True, seed)
    for epoch in range(epochs):
        started, total, batches = time.perf_counter(), 0.0, 0
        for batch in train:
            optimizer.zero_grad(set_to_none=True)
            out = model(batch.to_dict(), training=True, compute_force=True)
            loss = loss_fn(pred=out, ref=batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
            optimizer.step()
            total, batches = total + float(loss.detach()), batches + 1
        scheduler.step()
        logging.info(
            f"calibrate [{label or 'run'}, seed {seed}] epoch {epoch + 1}/{epochs}: "
            f"train loss={total / max(batches, 1):.4f}, {time.perf_counter() - started:.1f} s"
        )
    unchanged = sparsity_stats(model).total_sparsity if config is not None else None
    return model, unchanged


def run_calibration(
    foundation_path: Optional[str] = None,
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 20,
    variants: Sequence = DEFAULT_VARIANTS,
    progress=None,
) -> Dict:
    """Run every variant for every seed; ``progress`` gets one JSON line per finished run (default: the log)."""
    import mace  # noqa: F401
    import torch

    torch.set_default_dtype(torch.float64)
    if foundation_path is None:
        foundation_path = str(pretrain_foundation(Path(tempfile.mkdtemp(prefix="mace_sparse_calib_"))))
    foundation = torch.load(foundation_path, map_location="cpu", weights_only=False).double()
    target_test = _loader(DATA_DIR / "slab_test.xyz", foundation, 8, False, 0)
    source_test = _loader(DATA_DIR / "bulk_test.xyz", foundation, 8, False, 0)
    zero_shot = {"target": force_mae(foundation, target_test), "source": force_mae(foundation, source_test)}
    results: List[RunResult] = []
    progress = progress or (lambda line: logging.info(f"calibrate: finished {line}"))
    total = len(variants) * len(seeds)
    for label, settings in variants:
        for seed in seeds:
            logging.info(f"calibrate: run {len(results) + 1}/{total}: {label}, seed {seed}, {epochs} epochs")
            model, unchanged = fine_tune(foundation, settings, seed, epochs, label=label)
            result = RunResult(label, seed, force_mae(model, target_test), force_mae(model, source_test), unchanged)
            results.append(result)
            progress(json.dumps(dataclasses.asdict(result)))
    return {"foundation": foundation_path, "epochs": epochs, "seeds": list(seeds), "zero_shot": zero_shot,
            "runs": [dataclasses.asdict(r) for r in results], "table": summarize(results, zero_shot)}


def summarize(results: Sequence[RunResult], zero_shot: Dict[str, float]) -> List[Dict]:
    """Mean ± std per setting, with ratios to full fine-tuning of the same run."""
    labels = list(dict.fromkeys(r.label for r in results))

    def stats(values):
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    rows = []
    full = [r for r in results if r.unchanged_fraction is None]
    full_target = stats([r.target_force_mae for r in full])[0] if full else float("nan")
    full_rise = (stats([r.source_force_mae for r in full])[0] - zero_shot["source"]) if full else float("nan")
    for label in labels:
        runs = [r for r in results if r.label == label]
        t_mean, t_std = stats([r.target_force_mae for r in runs])
        s_mean, s_std = stats([r.source_force_mae for r in runs])
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
