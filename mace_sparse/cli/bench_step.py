"""``mace_sparse bench-step``: cost of a sparse_str training step against full fine-tuning (and MACE's LoRA).

The benchmark is part of the research harness (``harness/stepcost/`` at the repository root), which is not
shipped in the wheel; this module is the subcommand's entry from ``mace_sparse``. From a checkout (``pip
install -e .`` puts the repository root on the path) it is the harness's command line; from an installed
wheel the subcommand exits with status 2 and one line saying it needs a checkout.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

try:
    from harness.stepcost import cli as _impl
except ModuleNotFoundError as exc:  # only a missing harness means "no checkout"; any other error is a bug
    if exc.name not in ("harness", "harness.stepcost", "harness.stepcost.cli"):
        raise
    _impl = None

NEEDS_CHECKOUT = ("needs a checkout of the repository (the benchmark lives in harness/stepcost/, which the wheel "
                  "does not ship): git clone the mace-sparse repository and pip install -e . in it")


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    if _impl is not None:
        return _impl.add_parser(subparsers, name)
    p = subparsers.add_parser(name, help="benchmark one training step (needs a checkout of the repository)",
                              description=f"{name} {NEEDS_CHECKOUT}")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def run(args: argparse.Namespace) -> int:
    if _impl is None:
        sys.stderr.write(f"mace_sparse bench-step: error: {NEEDS_CHECKOUT}\n")
        return 2
    return _impl.run(args)
