"""``mace_sparse revert``: recover the foundation from a fine-tuned model and its sparse delta file.

    mace_sparse revert --model ft.model --delta ft_sparse_delta.safetensors -o foundation.model

The result is bit-identical to the foundation the run started from (MACE's configured, element-filtered
foundation). A model the delta was not made from, or a damaged delta file, is refused (exit code 2) and
nothing is written.
"""

from __future__ import annotations

import argparse
import sys

from ..artifacts.atomic import check_writable_file
from . import foundation_path


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help="recover the foundation: fine-tuned .model + delta file -> foundation .model",
        description="Undo a sparse delta: restore the foundation values in the fine-tuned model and save it.",
    )
    parser.add_argument("--model", required=True, type=foundation_path,
                        help="fine-tuned .model written by the run")
    parser.add_argument("--delta", required=True, help="delta file (<name>_sparse_delta.safetensors)")
    parser.add_argument("-o", "--output", required=True, help="path of the foundation .model to write")
    return parser


def run(args: argparse.Namespace) -> int:
    # torch-backed modules here, not at module level: ``mace_sparse --help`` imports every subcommand module
    from ..artifacts.delta_file import read_delta_header, revert_delta
    from ..mace_io import load_model, save_model

    check_writable_file(args.output)  # before any slow step: an impossible -o fails at once
    delta = read_delta_header(args.delta)
    model = revert_delta(load_model(args.model), delta, inplace=True)
    save_model(model, args.output)
    sys.stderr.write(f"mace_sparse revert: wrote {args.output} ({delta.changed_entries:,} parameters restored)\n")
    return 0
