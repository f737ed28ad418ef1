"""``mace_sparse calibrate``: implemented by the repository's harness (``harness.cli.calibrate``); this shim hands the
command over from a checkout and, in an installed wheel, exits 2 naming the fix (:mod:`.harness_shim`)."""

from __future__ import annotations

import argparse
from typing import Any

from . import harness_shim

HELP = "sweep sparse_str settings against full fine-tuning on bundled EMT data"
MODULE = "harness.cli.calibrate"


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    return harness_shim.add_parser(MODULE, subparsers, name, HELP)


def run(args: argparse.Namespace) -> int:
    return harness_shim.run(MODULE, "calibrate", args)
