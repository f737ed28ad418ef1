"""``mace_sparse apply``: rebuild a fine-tuned model from its foundation and a sparse delta file.

    mace_sparse apply --foundation F.model --delta ft_sparse_delta.safetensors -o ft.model [--head NAME]

The result is bit-identical to the merged model of the run. A delta made for another foundation, or a
modified/truncated delta file, is refused with one line on stderr (exit code 2) and nothing is written.
"""

from __future__ import annotations

import argparse
import sys

from . import foundation_path


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help="rebuild the fine-tuned model: foundation + delta file -> .model",
        description="Apply a sparse delta file to its foundation model and save the fine-tuned model.",
    )
    parser.add_argument("--foundation", required=True, type=foundation_path,
                        help="foundation .model the delta was made from (or mace_sparse:organic|inorganic)")
    parser.add_argument("--delta", required=True, help="delta file (<name>_sparse_delta.safetensors)")
    parser.add_argument("-o", "--output", required=True, help="path of the fine-tuned .model to write")
    parser.add_argument(
        "--head", default=None,
        help="write only this head of a multihead fine-tuned model (MACE's remove_pt_head), e.g. Default",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    # torch-backed modules here, not at module level: ``mace_sparse --help`` imports every subcommand module
    from ..artifacts.delta_file import apply_delta, read_delta_header
    from ..artifacts.atomic import check_writable_file
    from ..mace_io import load_model, save_model

    check_writable_file(args.output)  # before any slow step: an impossible -o fails at once
    delta = read_delta_header(args.delta)  # whole header checked before the (slower) model load; streams
    # are decoded only once the model is known to be the delta's (their sizes bounded by its tensors)
    heads = [str(h) for h in delta.metadata.get("heads", [])]
    if args.head is not None and args.head not in heads:
        raise ValueError(
            f"--head {args.head!r} is not a head of the fine-tuned model of this delta (it has "
            f"{', '.join(heads) or 'no recorded heads'}); give one of those"
        )
    model = apply_delta(load_model(args.foundation), delta, inplace=True)
    if args.head is not None and len(heads) > 1:
        model = _single_head(model, args.head)
    save_model(model, args.output)
    sys.stderr.write(
        f"mace_sparse apply: wrote {args.output} ({delta.changed_entries:,} of {delta.total_entries:,} "
        "parameters changed)\n"
    )
    return 0


def _single_head(model, head: str):
    """MACE's ``remove_pt_head`` under the model's own dtype (it builds the new model in the default dtype)."""
    # MACE and torch only here, with --head (``mace_sparse --help`` imports every subcommand module)
    from mace.tools.scripts_utils import remove_pt_head

    from ..mace_io import default_dtype, model_dtype

    with default_dtype(model_dtype(model)):
        return remove_pt_head(model, head)
