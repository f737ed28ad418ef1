"""``mace_sparse bench``: implemented by the repository's harness (``harness.cli.bench``); this shim hands the
command over from a checkout and, in an installed wheel, exits 2 naming the fix (:mod:`.harness_shim`)."""

from __future__ import annotations

import argparse
from typing import Any

from . import harness_shim

HELP = "side-by-side fine-tuning benchmark: zero-shot, full, LoRA, freeze and sparse_str"
MODULE = "harness.cli.bench"


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    return harness_shim.add_parser(MODULE, subparsers, name, HELP)


def run(args: argparse.Namespace) -> int:
    return harness_shim.run(MODULE, "bench", args)
