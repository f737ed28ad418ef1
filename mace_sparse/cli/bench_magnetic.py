"""``mace_sparse bench-magnetic``: implemented by the repository's harness (``harness.cli.bench_magnetic``);
this shim hands the command over from a checkout and, in an installed wheel, exits 2 naming the fix
(:mod:`.harness_shim`)."""

from __future__ import annotations

import argparse
from typing import Any

from . import harness_shim

HELP = "moments learnt by sparse fine-tuning vs the same fine-tune without head"
MODULE = "harness.cli.bench_magnetic"


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    return harness_shim.add_parser(MODULE, subparsers, name, HELP)


def run(args: argparse.Namespace) -> int:
    return harness_shim.run(MODULE, "bench-magnetic", args)
