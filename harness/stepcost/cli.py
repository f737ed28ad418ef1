"""``mace_sparse bench-step``: cost of a sparse_str training step against full fine-tuning (issue 2, item 6).

Prints a markdown table (median step time, peak memory, both as ratios to full fine-tuning, for full,
sparse_str and MACE's LoRA, measured interleaved in one run) and the two headline ratios with PASS/MISS
against 1.10x (time) and 1.20x (peak memory). ``--json PATH`` writes the same numbers.

This module only parses arguments: torch and MACE are imported when the command runs, so that listing the
``mace_sparse`` subcommands stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, List


def _int_list(text: str) -> List[int]:
    """``[64,64,64]`` or ``64,64,64`` (MACE writes ``--radial_MLP`` the first way)."""
    items = [t.strip() for t in text.strip().strip("[]").split(",") if t.strip()]
    try:
        return [int(t) for t in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a list of integers like [64,64,64], got {text!r}") from None


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    from mace_sparse.config import GRANULARITIES  # light: no torch

    p = subparsers.add_parser(
        name,
        help="benchmark one training step: sparse_str vs full fine-tuning (and LoRA), time and peak memory",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = p.add_argument_group("model (built unless --model is given)")
    model.add_argument("--model", dest="model_path", default=None, help="a saved MACE model to benchmark instead")
    model.add_argument("--channels", type=int, default=64, help="channels per irrep")
    model.add_argument("--max-L", dest="max_L", type=int, default=1, help="max ℓ of the hidden features")
    model.add_argument("--correlation", type=int, default=3, help="body order of the product basis")
    model.add_argument("--interactions", dest="num_interactions", type=int, default=2, help="interaction layers")
    model.add_argument(
        "--radial-mlp", dest="radial_mlp", type=_int_list, default=[64, 64, 64], help="hidden widths of the radial MLP"
    )
    model.add_argument("--r-max", dest="r_max", type=float, default=5.0, help="cutoff radius (Å)")
    model.add_argument("--dtype", choices=["float32", "float64"], default="float64", help="default dtype")
    data = p.add_argument_group("batch (EMT-labelled Cu/Ni/Al fcc cells)")
    data.add_argument("--batch-size", type=int, default=2, help="configurations per batch")
    data.add_argument("--atoms", type=int, default=4, help="atoms per configuration")
    run = p.add_argument_group("measurement")
    run.add_argument("--rounds", type=int, default=20, help="interleaved rounds (each runs every method)")
    run.add_argument("--steps", type=int, default=1, help="timed steps per method per round")
    run.add_argument("--warmup", type=int, default=2, help="untimed steps per method before timing")
    run.add_argument("--device", default="cpu", help="cpu or cuda")
    run.add_argument("--threads", type=int, default=1, help="torch threads; 0 = every CPU this process may use")
    run.add_argument(
        "--methods", default="full,sparse_str,lora", help="comma list of full, sparse_str, lora (full is always run)"
    )
    run.add_argument("--no-memory", dest="measure_memory", action="store_false", help="skip the peak-memory part")
    run.add_argument("--profile", action="store_true", help="also break sparse_str's extra step time down")
    run.add_argument("--seed", type=int, default=0, help="seed of the structures and the model")
    sparse = p.add_argument_group("sparse_str")
    sparse.add_argument("--targets", default="all", help="weight kinds to adapt (comma list of "
                        "linear,skip_tp,contraction,radial,norm,scalar,embedding, or all)")
    sparse.add_argument("--granularity", choices=list(GRANULARITIES), default="path")
    lora = p.add_argument_group("lora")
    lora.add_argument("--lora-rank", type=int, default=4, help="LoRA rank (mace_run_train --lora_rank)")
    lora.add_argument("--lora-alpha", type=float, default=1.0, help="LoRA alpha (mace_run_train --lora_alpha)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    from mace_sparse.benchmarks.step_cost import write_json

    table = sys.stdout
    # MACE prints notices on stdout while it is imported and builds models; keep stdout for the table alone
    with contextlib.redirect_stdout(sys.stderr):
        result = _benchmark(args)
    table.write(result.markdown() + "\n")
    table.flush()
    if args.json:
        path = write_json(result, args.json)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _benchmark(args: argparse.Namespace) -> Any:
    from mace_sparse.benchmarks.step_cost import BenchConfig, run_benchmark

    cfg = BenchConfig(
        model_path=args.model_path,
        channels=args.channels,
        max_L=args.max_L,
        correlation=args.correlation,
        num_interactions=args.num_interactions,
        radial_mlp=tuple(args.radial_mlp),
        r_max=args.r_max,
        dtype=args.dtype,
        batch_size=args.batch_size,
        atoms=args.atoms,
        rounds=args.rounds,
        steps=args.steps,
        warmup=args.warmup,
        targets=args.targets,
        granularity=args.granularity,
        device=args.device,
        threads=args.threads,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        measure_memory=args.measure_memory,
        profile=args.profile,
        seed=args.seed,
    )
    import logging

    from .progress import setup_progress_logging

    setup_progress_logging()
    return run_benchmark(cfg, log=lambda msg: logging.info(f"bench-step: {msg}"))
