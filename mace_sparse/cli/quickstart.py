"""``mace_sparse quickstart``: a real sparse fine-tune on the bundled data, through the real ``mace_run_train``.

What it does, each step a normal MACE command you could type yourself (they are printed):

1. pretrain a small foundation on the bundled EMT bulk Cu/Ni/Al cells (``mace_run_train``, plain MACE);
   it stands in for MACE-MP-0, which cannot be downloaded here (skipped with ``--foundation_model``);
2. fine-tune it on the bundled EMT surface slabs with ``--finetune-method sparse_str`` and default flags;
3. print how much of the foundation changed and where the plain MACE model was written.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import List

from ..data import path as data_path
from ..training import log_tail, mace_run_train_executable, run_mace_train

DATA_DIR = data_path("emt")

FOUNDATION_FLAGS = [
    "--model", "MACE", "--num_channels", "16", "--max_L", "1", "--r_max", "4.0", "--num_radial_basis", "8",
    "--radial_MLP", "[32,32,32]", "--correlation", "3", "--E0s", "average", "--max_num_epochs", "30",
]
COMMON_FLAGS = [
    "--energy_key", "REF_energy", "--forces_key", "REF_forces", "--default_dtype", "float64",
    "--device", "cpu", "--batch_size", "4", "--seed", "1", "--lr", "0.01",
]


def add_parser(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="pretrain a small foundation on bundled data and sparse-fine-tune it")
    p.add_argument("--work-dir", "--work_dir", dest="work_dir", default="mace_sparse_quickstart",
                   help="directory for all outputs (created)")
    p.add_argument("--foundation_model", default=None,
                   help="use this MACE .model as the foundation instead of pretraining one")
    p.add_argument("--max_num_epochs", type=int, default=20, help="fine-tuning epochs")
    p.add_argument("--foundation_epochs", type=int, default=30, help="pretraining epochs of the stand-in foundation")


#: MACE log lines echoed to stderr while a step runs (the full output goes to ``command.log``): the per-epoch
#: validation lines and errors, which is what a ``mace_run_train`` user watches.
_ECHO = (" INFO: Epoch ", " ERROR: ", "Saved sparse delta", "mace_run_train: error:")


def _echo(line: str) -> bool:
    """``on_line`` of :func:`mace_sparse.training.run_mace_train`: show MACE's progress lines; never stop."""
    if any(marker in line for marker in _ECHO):
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    return False


def _run(args: List[str], cwd: Path) -> None:
    """One step: ``mace_run_train ARGS`` in ``cwd``, its command printed, console output in ``command.log``."""
    print("$ " + " ".join([mace_run_train_executable(), *args]), flush=True)
    run = run_mace_train(args, cwd, append=True, on_line=_echo)
    if run.returncode != 0:
        raise RuntimeError(f"command failed (exit {run.returncode}); last lines of {run.log}:\n"
                           + log_tail(run.log, 15))


def run(args: argparse.Namespace) -> int:
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    foundation = args.foundation_model
    if foundation is None:
        pre = work / "foundation"
        pre.mkdir(exist_ok=True)
        flags = list(FOUNDATION_FLAGS)
        flags[flags.index("--max_num_epochs") + 1] = str(args.foundation_epochs)
        print("[1/2] pretraining a small stand-in foundation on EMT bulk cells", flush=True)
        _run(["--name", "foundation", "--train_file", str(DATA_DIR / "bulk_train.xyz"),
              "--valid_fraction", "0.15", "--test_file", str(DATA_DIR / "bulk_test.xyz"),
              *flags, *COMMON_FLAGS], cwd=pre)
        foundation = str(pre / "foundation.model")
    fine = work / "sparse_finetune"
    fine.mkdir(exist_ok=True)
    print("[2/2] sparse fine-tuning on EMT surface slabs (--finetune-method sparse_str)", flush=True)
    _run(["--name", "sparse_slab", "--foundation_model", foundation,
          "--train_file", str(DATA_DIR / "slab_train.xyz"), "--valid_fraction", "0.2",
          "--test_file", str(DATA_DIR / "slab_test.xyz"), "--E0s", "foundation",
          "--multiheads_finetuning", "False", "--max_num_epochs", str(args.max_num_epochs),
          "--finetune-method", "sparse_str", *COMMON_FLAGS], cwd=fine)
    summary = _summary(fine)
    print(json.dumps(summary, indent=2))
    return 0


def _summary(fine: Path) -> dict:
    """Last validation line's sparsity and where the outputs are."""
    logs = sorted((fine / "logs").glob("*.log"))
    last = ""
    for line in logs[-1].read_text().splitlines() if logs else []:
        if "sparsity=" in line:
            last = line
    match = re.search(r"sparsity=\s*([0-9.]+) %, mean_delta=([0-9.eE+-]+)", last)
    return {
        "model": str(fine / "sparse_slab.model"),
        "log": str(logs[-1]) if logs else None,
        "last_validation": last.split("INFO: ")[-1],
        "unchanged_fraction_of_adapted_weights": float(match.group(1)) / 100 if match else None,
        "mean_threshold": float(match.group(2)) if match else None,
    }
