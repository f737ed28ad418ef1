"""``mace_sparse report``: what fine-tuning changed, per layer, irrep path and chemical element.

    mace_sparse report ft_sparse_delta.safetensors [--foundation F.model] [--plot DIR] [--json]

Works from the delta file alone (without ``--foundation`` MACE is not even imported). ``--foundation`` checks
that the delta belongs to that model and adds the relative size of the change per layer; ``--json`` prints
only JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..artifacts.atomic import OutputPathError, unwritable_reason
from . import foundation_path


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help="tables (and plots) of the changed parameters per layer, irrep path and element",
        description="Report which parameters a sparse fine-tune changed, from its delta file.",
    )
    parser.add_argument("delta", help="delta file (<name>_sparse_delta.safetensors)")
    parser.add_argument("--foundation", default=None, type=foundation_path,
                        help="foundation .model: verify the delta belongs to it and add |dW|/|W| per layer")
    parser.add_argument("--plot", metavar="DIR", default=None, help="write PNG figures into DIR")
    parser.add_argument("--json", action="store_true", help="print the report as JSON only")
    return parser


def run(args: argparse.Namespace) -> int:
    # torch-backed modules here, not at module level: ``mace_sparse --help`` imports every subcommand module
    from ..artifacts.delta_file import DeltaMismatchError, decode_delta, read_delta_header, verify_streams
    from ..artifacts.fingerprint import model_fingerprint
    from ..artifacts.report import add_relative_change, format_report, report_data

    if args.plot:
        reason = unwritable_reason(args.plot)
        if reason is not None:
            raise OutputPathError(f"cannot write plots into {args.plot}: {reason}; choose a writable --plot DIR")
    delta = read_delta_header(args.delta)  # the report needs the (checked) header only; the streams are
    verify_streams(delta)  # decoded chunk by chunk and discarded, so memory does not grow with their claims
    data = report_data(delta)
    if args.foundation:
        from ..mace_io import load_model  # only with --foundation

        foundation = load_model(args.foundation)
        if model_fingerprint(foundation) != delta.foundation_fingerprint:
            raise DeltaMismatchError(
                f"{args.delta} was not made from {args.foundation} (foundation fingerprint differs)"
            )
        add_relative_change(data, decode_delta(delta, foundation), foundation)  # bounded by the model's tensors
    if args.plot:
        from ..artifacts.plots import write_plots  # only with --plot (numpy, matplotlib)

        written = write_plots(data, args.plot)
        sys.stderr.write(f"mace_sparse report: wrote {', '.join(str(p) for p in written)}\n")
    if args.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        sys.stdout.write(format_report(data) + "\n")
    return 0
