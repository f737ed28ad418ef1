"""``mace_sparse``: the package's own command line (subcommands in the style of MACE's CLIs).

Each subcommand lives in its own module with ``add_parser(subparsers)`` and ``run(args) -> int``; this file
only dispatches, so adding a command never touches another command's code. Building the parser imports every
subcommand module, so those import torch, ASE and MACE inside ``run``: ``mace_sparse <command> --help`` stays
a fraction of a second.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from typing import List, NoReturn, Optional

from ..foundations import resolve

#: subcommand name -> module implementing it
SUBCOMMANDS = {
    "apply": "mace_sparse.cli.apply",
    "revert": "mace_sparse.cli.revert",
    "report": "mace_sparse.cli.report",
    "quickstart": "mace_sparse.cli.quickstart",
    "calibrate": "mace_sparse.cli.calibrate",
    "bench-step": "mace_sparse.cli.bench_step",
    "predict": "mace_sparse.cli.predict",
    "bench": "mace_sparse.cli.bench",
    "bench-magnetic": "mace_sparse.cli.bench_magnetic",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the usage block first), naming ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}; see {self.prog} --help\n")


def foundation_path(spec: str) -> str:
    """argparse ``type`` of every model option: ``mace_sparse:<name>`` is the bundled file, as in ``mace_run_train``."""
    try:
        return resolve(spec)
    except (ValueError, FileNotFoundError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="mace_sparse",
        description="Sparse fine-tuning of MACE models: delta files, reports and benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_parser(sub, name)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for commands that record how they were run
    module = importlib.import_module(SUBCOMMANDS[args.command])
    try:
        return int(module.run(args) or 0)
    except (ValueError, OSError) as exc:
        # bad input (ValueError: bad file, mismatched delta, unwritable output) and the OS's refusals that no
        # pre-check could foresee (disk full, a race): one line on stderr, exit status 2, no traceback
        sys.stderr.write(f"mace_sparse {args.command}: error: {_one_line(exc)}\n")
        return 2
    except Exception as exc:  # noqa: BLE001
        # anything else (a RuntimeError from torch, an allocation no size check foresaw, a bug): still one line;
        # MACE_SPARSE_TRACEBACK=1 shows the traceback for a bug report
        if os.environ.get("MACE_SPARSE_TRACEBACK"):
            raise
        sys.stderr.write(f"mace_sparse {args.command}: error: {type(exc).__name__}: {_one_line(exc)[:300]} "
                         "(unexpected; rerun with MACE_SPARSE_TRACEBACK=1 for the traceback)\n")
        return 2


def _one_line(exc: BaseException) -> str:
    """The message on one line; an ``OSError`` without a readable message gets its type and errno text."""
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.strerror and exc.filename and exc.strerror not in text:
        text = f"{exc.filename}: {exc.strerror}"
    if isinstance(exc, OSError) and exc.errno in _FULL:
        text += " (the disk is full or a quota/size limit was reached; free space and run again: nothing was written)"
    return text or type(exc).__name__


#: errno values of a write that ran out of room
_FULL = {getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG") if hasattr(errno, name)}


if __name__ == "__main__":
    sys.exit(main())
