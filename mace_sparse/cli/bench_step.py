"""``mace_sparse bench-step``: implemented by the repository's harness (``harness.stepcost.cli``); this shim hands
the command over from a checkout and, in an installed wheel, exits 2 naming the fix (:mod:`.harness_shim`)."""

from __future__ import annotations

import argparse
from typing import Any

from . import harness_shim

HELP = "benchmark one training step: sparse_str vs full fine-tuning (and LoRA), time and peak memory"
MODULE = "harness.stepcost.cli"


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    return harness_shim.add_parser(MODULE, subparsers, name, HELP)


def run(args: argparse.Namespace) -> int:
    return harness_shim.run(MODULE, "bench-step", args)
