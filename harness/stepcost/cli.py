"""``mace_sparse bench-step``: cost of a sparse_str training step against full fine-tuning (issue 2, item 6).

Prints a markdown table (median step time, peak memory, both as ratios to full fine-tuning, for full,
sparse_str and MACE's LoRA, measured interleaved in one run) and the two headline ratios with PASS/MISS
against 1.10x (time) and 1.20x (peak memory). ``--json PATH`` writes the same numbers.

The flags are generated from :class:`~harness.stepcost.schema.BenchConfig`'s fields (name, default, help,
group, choices), so each setting is declared once. This module imports the benchmark itself only when the
command runs (function-level import in :func:`run`), so that listing the ``mace_sparse`` subcommands stays
fast; ``mace_sparse/cli/bench_step.py`` is the wheel's entry to it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
from typing import Any, Dict, List

from mace_sparse.cli.progress import setup_progress_logging

from .schema import BenchConfig, write_json

#: argparse group titles of the settings' ``metadata["group"]``, in the order ``--help`` lists them.
GROUPS = {
    "model": "model (built unless --model is given)",
    "batch": "batch (EMT-labelled Cu/Ni/Al fcc cells)",
    "measurement": "measurement",
    "sparse_str": "sparse_str",
    "lora": "lora",
}


def _int_list(text: str) -> List[int]:
    """``[64,64,64]`` or ``64,64,64`` (MACE writes ``--radial_MLP`` the first way)."""
    items = [t.strip() for t in text.strip().strip("[]").split(",") if t.strip()]
    try:
        return [int(t) for t in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a list of integers like [64,64,64], got {text!r}") from None


def _flag_options(field: dataclasses.Field) -> Dict[str, Any]:
    """argparse options of one setting, from its default: a switch for a bool, a list for a tuple
    (integers as ``[64,64,64]``, names as a comma list), the default's type otherwise (``str`` for ``None``)."""
    default, meta = field.default, field.metadata
    options: Dict[str, Any] = {"dest": field.name, "help": meta["help"]}
    if isinstance(default, bool):
        options["action"] = "store_false" if default else "store_true"
    elif isinstance(default, tuple) and all(isinstance(v, int) for v in default):
        options.update(type=_int_list, default=list(default))
    elif isinstance(default, tuple):
        options["default"] = ",".join(default)
    else:
        options.update(type=type(default) if default is not None else str, default=default)
    if "choices" in meta:
        options["choices"] = list(meta["choices"])
    return options


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help="benchmark one training step: sparse_str vs full fine-tuning (and LoRA), time and peak memory",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for key, title in GROUPS.items():
        group = p.add_argument_group(title)
        for field in dataclasses.fields(BenchConfig):
            flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
            if field.metadata["group"] == key and flag is not None:
                group.add_argument(flag, **_flag_options(field))
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` of parsed flags (settings without a flag keep their default)."""
    values: Dict[str, Any] = {}
    for field in dataclasses.fields(BenchConfig):
        if not hasattr(args, field.name):
            continue
        value = getattr(args, field.name)
        if isinstance(field.default, tuple):
            value = tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else tuple(value)
        values[field.name] = value
    return BenchConfig(**values)


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
