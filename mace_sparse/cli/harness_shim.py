"""The runtime's end of the commands implemented by the repository's harness (``bench``, ``calibrate``,
``bench-magnetic``, ``bench-step``): the harness is not shipped in the wheel, so these commands need a checkout.

From a checkout installed with ``pip install -e .`` the repository root is on ``sys.path`` and
:func:`harness_command` returns the harness's module, to which the shim hands ``add_parser`` and ``run``.
Without the harness (an installed wheel), the command still appears in ``mace_sparse --help``, accepts any
arguments, and exits with status 2 and one line naming the fix.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType
from typing import Any, Optional

FIX = ("needs a checkout of the mace-sparse repository (the research harness is not part of the installed "
       "package): clone it and run 'pip install -e .' there")


def harness_command(module: str) -> Optional[ModuleType]:
    """The harness module ``module`` (e.g. ``harness.cli.bench``), or None when there is no harness."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        parents = {module.rsplit(".", depth)[0] for depth in range(module.count(".") + 1)}  # harness, harness.cli, ...
        if exc.name not in parents:
            raise  # the harness is there but something it needs is not: that is the error to show
        return None


def add_parser(module: str, subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """The harness's parser of ``name``, or a stand-in that takes any arguments (help says what it needs)."""
    command = harness_command(module)
    if command is not None:
        return command.add_parser(subparsers, name)
    # '+' as prefix: '--quick' and the like are plain words here, so that run() can give the one-line fix
    parser = subparsers.add_parser(name, help=f"{help_text} ({FIX.split(' (')[0]})", prefix_chars="+",
                                   add_help=False)
    parser.add_argument("harness_args", nargs="*")
    return parser


def run(module: str, name: str, args: argparse.Namespace) -> int:
    command = harness_command(module)
    if command is None:
        sys.stderr.write(f"mace_sparse {name}: error: {FIX}\n")
        return 2
    return int(command.run(args) or 0)
