"""Pretrain a small bundled foundation (``organic``, ``inorganic``) with the real ``mace_run_train`` and write its card.

``python -m harness.pretrain organic|inorganic [--epochs N] [--work-dir DIR]`` (:mod:`harness.pretrain`
dispatches these names here; the benchmark-scale ones go to :mod:`harness.pretrain.chunked`)

The command is plain MACE (the mace_sparse start-up hook is switched off with ``MACE_SPARSE_DISABLE=1``), so the
bundled file is exactly what a user would get by typing the printed command. The model is kept small (≤ 2 MB) so
that it can ship inside the wheel; its card records the data, the command, the wall time and the errors measured
on the held-out source test split, which the forgetting benchmarks reuse.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, List

from mace_sparse import data as bundled_data
from mace_sparse import foundations
from mace_sparse.training import log_tail, run_mace_train

#: where the bundled foundations and their cards live (the package's foundations folder)
HERE = Path(foundations.__file__).resolve().parent
DATA = bundled_data.DATA_DIR
SEED = 1

#: Architecture shared by both foundations: 2 interactions, ℓ ≤ 1 messages, correlation 3, 4.5 Å cutoff.
#: Sized for the budget of ~20 min on one shared CPU thread: 32 channels with a 5 Å cutoff took ~2 min per
#: inorganic epoch here; 16 channels, ℓ_sh ≤ 2 and 4.5 Å take ~20 s (inorganic) or ~7 s (organic, fewer
#: neighbours) per epoch and give a ~1 MB file. Epoch counts below fill that budget.
ARCH = [
    "--model", "MACE", "--num_channels", "16", "--max_L", "1", "--max_ell", "2", "--r_max", "4.5",
    "--num_interactions", "2", "--correlation", "3", "--num_radial_basis", "8", "--radial_MLP", "[32,32]",
]
TRAINING = [
    "--energy_key", "REF_energy", "--forces_key", "REF_forces", "--E0s", "average", "--default_dtype", "float64",
    "--device", "cpu", "--batch_size", "8", "--valid_batch_size", "16", "--valid_fraction", "0.1", "--lr", "0.01",
    "--ema", "--ema_decay", "0.99", "--error_table", "PerAtomMAE", "--plot", "False", "--seed", str(SEED),
]

SPECS: Dict[str, Dict] = {
    "organic": {
        "data": DATA / "organic",
        "labeler": "GFN2-xTB (tblite 0.8, neutral closed shell), via `harness.data.organic_data`",
        "elements": "H, C, N, O",
        "epochs": 200,
        "note": "Trained on energies and forces. Molecules only (no periodic cells, no stress).",
        "extra": ["--loss", "weighted", "--energy_weight", "1", "--forces_weight", "10"],
    },
    "inorganic": {
        "data": DATA / "inorganic",
        "labeler": "CHGNet 0.3.0 (chgnet 0.4.2 wheel), a surrogate of Materials Project PBE/PBE+U, "
                   "via `harness.data.inorganic_data`",
        "elements": "Al, Cu, Ni, Fe, Co, Mn, O",
        "epochs": 45,
        "note": "Trained on energies, forces and stress (`--loss stress`). The data also carry CHGNet's per-atom "
                "magnetic moments (`REF_magmoms`); the foundation is **not** trained on them.",
        "extra": ["--loss", "stress", "--stress_key", "REF_stress", "--energy_weight", "1", "--forces_weight", "10",
                  "--stress_weight", "100"],
    },
}


def command(name: str, epochs: int) -> List[str]:
    """The exact ``mace_run_train`` command line for foundation ``name`` (run inside its work directory)."""
    spec = SPECS[name]
    return [
        "mace_run_train", "--name", name, "--train_file", str(spec["data"] / "train.xyz"),
        "--test_file", str(spec["data"] / "test.xyz"), "--max_num_epochs", str(epochs), *ARCH, *TRAINING,
        *spec["extra"],
    ]


def _log_tables(work: Path) -> str:
    """The final error tables that mace_run_train printed (train/valid, then test per config_type)."""
    text = (work / "command.log").read_text()
    start = text.find("Error-table on TRAIN")
    if start < 0:
        return "(no error table found in the log)"
    lines = text[start:].splitlines()
    keep = [re.sub(r"^\S+ \S+ INFO: ", "", ln) for ln in lines if ln.startswith(("|", "+")) or "Error-table" in ln]
    return "\n".join(keep)


def _curve(log: str, points: int = 6) -> str:
    """A few evenly spaced 'Epoch N' validation lines, so the card shows whether training had converged."""
    wanted = re.compile(r"INFO: (Epoch \d+|Initial)")
    lines = [re.sub(r"^\S+ \S+ INFO: ", "", ln) for ln in log.splitlines() if wanted.search(ln)]
    if len(lines) <= points:
        return "\n".join(lines)
    picks = sorted({round(i * (len(lines) - 1) / (points - 1)) for i in range(points)})
    return "\n".join(lines[i] for i in picks)


def _card(name: str, cmd: List[str], wall_s: float, model: Path, tables: str, test: Dict, valid: Dict,
          cmd_log: str, meta: Dict) -> str:
    spec = SPECS[name]
    pretty = " ".join(f"'{c}'" if "[" in c else c for c in cmd).replace(str(HERE.parent.parent) + "/", "")
    return f"""# Bundled foundation `{name}`

Small MACE pretrained here, with the real `mace_run_train` (mace-torch 0.3.16), because no MACE foundation can
be downloaded in this environment. It is a stand-in for MACE-OFF / MACE-MP in tests, benchmarks and tutorials,
**not** a production potential. Its file is `mace_sparse.foundations.path("{name}")`; mace_sparse's training entry
points accept `--foundation_model mace_sparse:{name}` (turned into that path by `mace_sparse.foundations.resolve`).

| | |
|---|---|
| elements | {spec["elements"]} |
| labels | {spec["labeler"]} |
| source data | `mace_sparse/data/{spec["data"].name}/train.xyz` ({meta["n_train"]} configs, 10% held out for validation), card `mace_sparse/data/{spec["data"].name}/README.md` |
| source test split | `mace_sparse/data/{spec["data"].name}/test.xyz` ({test["n_configs"]} configs, never trained on) |
| model file | `{model.name}`, {model.stat().st_size / 1e6:.2f} MB, float64, {meta["n_params"]} parameters |
| pretraining wall time | {wall_s / 60:.1f} min on 1 CPU thread (shared 2-core machine) |
| seed | {SEED} |

{spec["note"]}

## Errors of the bundled model (`harness.pipeline.evaluate`; the test split was never trained on)

| split | configs | energy MAE (meV/atom) | force MAE (meV/Å) | force RMSE (meV/Å) |
|---|---|---|---|---|
| validation (10% of train) | {valid["n_configs"]} | {valid["energy_mae_mev_per_atom"]:.1f} | {valid["forces_mae_mev_per_A"]:.1f} | {valid["forces_rmse_mev_per_A"]:.1f} |
| test | {test["n_configs"]} | {test["energy_mae_mev_per_atom"]:.1f} | {test["forces_mae_mev_per_A"]:.1f} | {test["forces_rmse_mev_per_A"]:.1f} |

## Learning curve (validation, as logged by `mace_run_train`)

Training stops at a fixed epoch count chosen for a ~20 min CPU budget, not at convergence: if the last lines
still fall, a longer run would give a better (but larger-budget) foundation.

```
{_curve(cmd_log)}
```

## Error tables printed by `mace_run_train` at the end of the run

```
{tables}
```

## Exact command (run in an empty work directory, `MACE_SPARSE_DISABLE=1 OMP_NUM_THREADS=1`)

```
{pretty}
```

Rebuild: `python -m harness.pretrain {name}` from a checkout (rewrites this card and `{name}.model`).
"""


def _valid_frames(work: Path, name: str) -> List:
    """The validation frames mace_run_train split off (it writes them to ``valid_indices_<seed>.txt``)."""
    import ase.io

    train = ase.io.read(SPECS[name]["data"] / "train.xyz", ":")
    files = list(work.glob("*valid_indices*.txt"))
    if not files:
        return []
    idx = [int(x) for x in files[0].read_text().split()]
    return [train[i] for i in idx]


def train(name: str, epochs: int | None, work: Path) -> float:
    """Run mace_run_train for ``name`` in a fresh ``work`` directory; copy the model here; return the wall time."""
    if name not in SPECS:
        raise ValueError(f"unknown foundation {name!r}; valid names: {', '.join(SPECS)}")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cmd = command(name, epochs or SPECS[name]["epochs"])
    print("$ " + " ".join(cmd), flush=True)
    run = run_mace_train(cmd[1:], work, plugin=False)
    wall = run.wall_s
    if run.returncode != 0:
        raise RuntimeError(f"mace_run_train failed ({run.returncode}):\n" + log_tail(run.log, 20))
    shutil.copyfile(work / f"{name}.model", HERE / f"{name}.model")
    (work / "wall_s.txt").write_text(f"{wall:.1f}\n")
    return wall


def write_card(name: str, work: Path, epochs: int | None = None) -> Dict:
    """Evaluate the bundled ``<name>.model`` on validation and test frames and write ``<name>.md``."""
    import ase.io

    from harness.pipeline.evaluate import errors  # torch and MACE: only for the card
    from mace_sparse.mace_io import load_trusted_model  # torch: only for the card

    model = HERE / f"{name}.model"
    wall = float((work / "wall_s.txt").read_text())
    test = errors(str(model), ase.io.read(SPECS[name]["data"] / "test.xyz", ":"))
    valid_frames = _valid_frames(work, name)
    valid = errors(str(model), valid_frames) if valid_frames else {
        "n_configs": 0, "energy_mae_mev_per_atom": float("nan"), "forces_mae_mev_per_A": float("nan"),
        "forces_rmse_mev_per_A": float("nan")}
    net = load_trusted_model(model)
    meta = {"n_params": sum(p.numel() for p in net.parameters()),
            "n_train": len(ase.io.read(SPECS[name]["data"] / "train.xyz", ":"))}
    cmd = command(name, epochs or SPECS[name]["epochs"])
    (HERE / f"{name}.md").write_text(_card(name, cmd, wall, model, _log_tables(work), test, valid,
                                                     (work / "command.log").read_text(), meta))
    summary = {"name": name, "wall_s": wall, "size_bytes": model.stat().st_size, **meta, "test": test, "valid": valid}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2), flush=True)
    return summary


def pretrain(name: str, epochs: int | None = None, work_dir: str | None = None, card_only: bool = False) -> Dict:
    """Train foundation ``name`` (unless ``card_only``), then evaluate it and write its card."""
    work = Path(work_dir or f"pretrain_{name}").resolve()
    if not card_only:
        train(name, epochs, work)
    return write_card(name, work, epochs)


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(SPECS))
    parser.add_argument("--epochs", type=int, default=None, help="override the default number of epochs")
    parser.add_argument("--work-dir", default=None, help="scratch directory for mace_run_train (recreated)")
    parser.add_argument("--card-only", action="store_true",
                        help="do not train: rewrite the card from the bundled model and an existing work dir")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    pretrain(args.name, args.epochs, args.work_dir, args.card_only)


if __name__ == "__main__":
    main()
