"""``mace_sparse``: the package's own command line (subcommands in the style of MACE's CLIs).

Each subcommand lives in its own module with ``add_parser(subparsers)`` and ``run(args) -> int``; this file
only dispatches, so adding a command never touches another command's code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

#: subcommand name -> module implementing it
SUBCOMMANDS = {
    "apply": "mace_sparse.cli.apply",
    "revert": "mace_sparse.cli.revert",
    "report": "mace_sparse.cli.report",
    "quickstart": "mace_sparse.cli.quickstart",
    "calibrate": "mace_sparse.cli.calibrate",
    "bench-step": "mace_sparse.cli.bench_step",
    "predict": "mace_sparse.cli.predict",
    "bench-magnetic": "mace_sparse.cli.bench_magnetic",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mace_sparse",
        description="Sparse fine-tuning of MACE models: delta files, reports and benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_parser(sub, name)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command])
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        sys.stderr.write(f"mace_sparse {args.command}: error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
