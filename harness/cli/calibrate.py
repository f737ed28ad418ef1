"""``mace_sparse calibrate``: the settings sweep behind the defaults (:mod:`harness.experiments.calibration`).

Reached through the runtime's shim ``mace_sparse.cli.calibrate`` (a checkout of the repository is needed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from mace_sparse.cli.progress import setup_progress_logging


def add_parser(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="sweep sparse_str settings against full fine-tuning on bundled EMT data")
    p.add_argument("--foundation_model", default=None, help="MACE .model to fine-tune (default: pretrain one)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="1 seed, 5 epochs: a smoke run, not evidence")
    p.add_argument("--jobs", type=int, default=2, help="mace_run_train runs at a time, one thread each (default 2)")
    p.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the report as JSON here")
    p.add_argument("--markdown", dest="markdown_path", default=None,
                   help="also write the table (with the command and date) as markdown here")


def run(args: argparse.Namespace) -> int:
    from harness.experiments.calibration import markdown_table, run_calibration

    setup_progress_logging()  # the runner's per-run and per-epoch lines on stderr; stdout keeps the table
    seeds, epochs = (args.seeds, args.epochs) if not args.quick else ([0], 5)
    report = run_calibration(args.foundation_model, seeds=seeds, epochs=epochs,
                             out=Path(args.out) if args.out else None, jobs=args.jobs)
    table = markdown_table(report)
    print(table)
    if args.markdown_path:
        command = "mace_sparse " + " ".join(sys.argv[1:]) if sys.argv[1:] else "mace_sparse calibrate"
        stamp = datetime.date.today().isoformat()
        Path(args.markdown_path).write_text(f"Measured {stamp} with `{command}`.\n\n{table}\n")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2))
    return 0
