"""``mace_sparse bench-magnetic``: the magnetic-head benchmark (:mod:`harness.experiments.magnetic`).

Reached through the runtime's shim ``mace_sparse.cli.bench_magnetic`` (a checkout of the repository is needed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shlex
import sys
import tempfile
from pathlib import Path

from harness.experiments.magnetic import VARIANTS, MagneticSettings, markdown_table, run_benchmark
from mace_sparse import data
from mace_sparse.foundations import resolve


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help="moments learnt by sparse fine-tuning vs the same fine-tune without head")
    p.add_argument("--foundation_model", default="mace_sparse:inorganic", help="foundation (default: bundled inorganic)")
    p.add_argument("--train_file", default=None, help="extxyz with REF_magmoms (default: bundled TM oxides)")
    p.add_argument("--test_file", default=None, help="held-out extxyz (default: bundled TM oxides test split)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--magmom_weight", type=float, default=10.0)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--variants", nargs="+", default=None, help="subset of: " + ", ".join(repr(v) for v in VARIANTS))
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each one thread; default 2)")
    p.add_argument("--quick", action="store_true", help="1 seed, 8 epochs, head variants only: a smoke run")
    p.add_argument("--out", default=None, help="folder for bench_magnetic.md/.json and the runs (default: temp)")
    return p


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s.%(msecs)03d %(levelname)s: %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")
    train, test = data.path("magnetic_oxides", "train.xyz"), data.path("magnetic_oxides", "test.xyz")
    settings = MagneticSettings(
        foundation=resolve(args.foundation_model), train_file=str(args.train_file or train),
        test_file=str(args.test_file or test), epochs=args.epochs, seeds=tuple(args.seeds),
        magmom_weight=args.magmom_weight, lr=args.lr, jobs=args.jobs,
    )
    if args.variants:
        unknown = [v for v in args.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
        settings.variants = tuple(args.variants)
    if args.quick:
        settings.epochs, settings.seeds = 8, (0,)
        settings.variants = tuple(args.variants or ("sparse_str + head", "sparse_str, no head"))
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mace_sparse_bench_magnetic_"))
    out.mkdir(parents=True, exist_ok=True)
    report = run_benchmark(settings, out)  # the runs in out/runs/
    table = markdown_table(report)
    print(table)
    command = "mace_sparse " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "mace_sparse bench-magnetic"
    (out / "bench_magnetic.md").write_text(
        f"Measured {datetime.date.today().isoformat()} with `{command}`.\n\n{table}\n")
    (out / "bench_magnetic.json").write_text(json.dumps(report, indent=2))
    logging.info(f"Wrote {out / 'bench_magnetic.md'} and {out / 'bench_magnetic.json'}")
    return 0
