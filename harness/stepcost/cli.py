"""``mace_sparse bench-step``: cost of a sparse_str training step against full fine-tuning (issue 2, item 6).

Prints a markdown table (median step time, peak memory, both as ratios to full fine-tuning, for full,
sparse_str and MACE's LoRA, measured interleaved in one run) and the two headline ratios with PASS/MISS
against 1.10x (time) and 1.20x (peak memory). ``--json PATH`` writes the same numbers.

The flags are generated from :class:`~harness.stepcost.schema.BenchConfig`'s fields (:mod:`mace_sparse.flags`),
so each setting is declared once; this module only sorts them into help groups. It imports the benchmark
itself only when the command runs (function-level import in :func:`run`), so that listing the ``mace_sparse``
subcommands stays fast; ``mace_sparse/cli/bench_step.py`` is the wheel's entry to it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Any, Dict, Tuple

from mace_sparse import flags
from mace_sparse.cli.progress import setup_progress_logging

from .schema import BenchConfig, write_json

#: ``--help`` groups and the settings each offers, in order (settings in no group have no flag).
GROUPS: Dict[str, Tuple[str, ...]] = {
    "model (built unless --model is given)": ("model_path", "channels", "max_L", "correlation", "num_interactions",
                                               "radial_mlp", "r_max", "dtype"),
    "batch (EMT-labelled Cu/Ni/Al fcc cells)": ("batch_size", "atoms"),
    "measurement": ("rounds", "steps", "warmup", "device", "threads", "methods", "measure_memory", "profile",
                    "seed"),
    "sparse_str": ("targets", "granularity"),
    "lora": ("lora_rank", "lora_alpha"),
}


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help="benchmark one training step: sparse_str vs full fine-tuning (and LoRA), time and peak memory",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for title, names in GROUPS.items():
        flags.add_flags(p.add_argument_group(title), BenchConfig, only=names)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` of parsed flags (settings without a flag keep their default)."""
    return flags.config_from_namespace(BenchConfig, args)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    table = sys.stdout
    # MACE prints notices on stdout while it is imported and builds models; keep stdout for the table alone
    with contextlib.redirect_stdout(sys.stderr):
        # torch and MACE are imported only when the command runs (see the module docstring)
        from .run import run_benchmark

        setup_progress_logging()
        result = run_benchmark(cfg, log=lambda msg: logging.info(f"bench-step: {msg}"))
    table.write(result.markdown() + "\n")
    table.flush()
    if args.json:
        path = write_json(result, args.json)
        print(f"wrote {path}", file=sys.stderr)
    return 0
