"""``mace_sparse bench``: the side-by-side fine-tuning benchmark (zero-shot, full, LoRA, freeze, sparse_str).

Every method fine-tunes the task's foundation through the real ``mace_run_train`` with the same data, epochs,
learning rate, batch size and seeds; the saved models are evaluated here on the held-out target test set and
on the foundation's own (source) test set. Writes ``bench.md`` and ``bench.json`` into ``--out`` and prints
the table with the issue's targets marked ✓/✗.

This module only parses arguments and applies the mode's defaults (:mod:`harness.experiments.bench`); the work
is in :mod:`harness.pipeline.runner` and the table in :mod:`harness.pipeline.table`. ``mace_sparse bench`` reaches
it through the runtime's shim ``mace_sparse.cli.bench`` (a checkout of the repository is needed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from harness.experiments import methods as bench_methods
from harness.experiments import tasks as bench_tasks
from harness.experiments.bench import MODES, describe, epochs_text
from harness.experiments.methods import METHOD_NAMES  # light: no torch
from harness.experiments.tasks import TASK_NAMES, bundled_foundation

def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name, help="side-by-side fine-tuning benchmark: zero-shot, full, LoRA, freeze and sparse_str",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--quick", action="store_true", help="quick mode: tiny organic foundation, rmd17 aspirin N=50 "
                   "only, 7 methods, 5 epochs, 1 seed (≤ 10 min on 2 cores), a smoke test; default: full mode, "
                   "rmd17-s (aspirin, malonaldehyde × N=50, 200 on organic-s) and inorganic-s, every method, 3 "
                   "seeds, early stopping, EMA, an lr grid")
    p.add_argument("--mode", choices=sorted(MODES), default=None,
                   help="full (default): benchmark-scale foundations, early stopping, EMA, lr grid; toy: the "
                        "earlier fixed-epoch regime on the tiny foundations; quick = --quick")
    p.add_argument("--plan", action="store_true",
                   help="print the runs the command would make (per case: the lr grid's tuning runs, then every "
                        "method's seeds) and exit without training")
    p.add_argument("--finished-only", dest="finished_only", action="store_true",
                   help="write bench.md/bench.json from the runs already finished in --out and start no "
                        "training (but a one-epoch lr-0 reference run per seed): the partial table of a benchmark "
                        "that takes several sittings; each lr is chosen among the grid runs that finished")
    p.add_argument("--patience", type=int, default=None,
                   help="stop a run once its validation loss has not improved for this many epochs (MACE's "
                        "--patience, enforced; the saved model is the best checkpoint); 0 = fixed epochs")
    p.add_argument("--ema", dest="ema", action="store_true", default=None, help="MACE's --ema (decay 0.99)")
    p.add_argument("--no-ema", dest="ema", action="store_false")
    p.add_argument("--lr-grid", dest="lr_grid", nargs="+", type=float, default=None,
                   help="learning rates tried for every method on the first seed; each method then uses the one "
                        "of lowest validation force MAE for all seeds (default: the mode's; one value = no tuning)")
    p.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=None, help="tasks to run (default: the mode's)")
    p.add_argument("--cases", nargs="+", default=None,
                   help="only the cases whose label contains one of these (e.g. aspirin N=50)")
    p.add_argument("--methods", nargs="+", choices=METHOD_NAMES, default=None,
                   help="methods to run (default: the mode's); full is the reference of the ratios")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default: 0 1 2; quick: 0)")
    p.add_argument("--epochs", type=int, default=None,
                   help="fine-tuning epochs of every method (with --patience: the cap)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of every method, no tuning (default 0.01 where the mode has no lr grid)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=4)
    p.add_argument("--out", default="bench_results", help="output directory (bench.md, bench.json, runs/)")
    p.add_argument("--jobs", type=int, default=2,
                   help="mace_run_train runs at a time, one OpenMP thread each (default 2, for 2 cores). Results do "
                        "not depend on it: every run is seeded, and step cost is measured afterwards, alone")
    p.add_argument("--cost-rounds", dest="cost_rounds", type=int, default=None,
                   help="interleaved timing rounds of the step cost (0: not measured; default: the mode's)")
    p.add_argument("--no-memory", dest="measure_memory", action="store_false", help="skip the peak-memory part")
    p.add_argument("--freeze", type=int, default=5, help="N of MACE's --freeze for the freeze method")
    p.add_argument("--lora-rank", dest="lora_rank", type=int, default=4)
    p.add_argument("--lora-alpha", dest="lora_alpha", type=float, default=1.0)
    p.add_argument("--sparse-flags", dest="sparse_flags", default="",
                   help="extra mace_run_train --sparse_* flags for every sparse_str method, overriding the presets "
                        "(e.g. --sparse-flags='--sparse_delta_lr_factor 1'): how the README's tuning "
                        "comparisons were run")
    custom = p.add_argument_group("another foundation or other data")
    custom.add_argument("--foundation", default=None,
                        help="foundation .model (or mace_sparse:<name>) replacing the task's (one task)")
    custom.add_argument("--data-dir", dest="data_dir", default=None,
                        help="directory with the task's files under their usual names, replacing the bundled one "
                             "(one task; e.g. <molecule>_train.xyz / <molecule>_test.xyz for rmd17)")
    custom.add_argument("--train-file", dest="train_file", default=None,
                        help="run the custom task on this training file (needs --test-file, --source-test-file "
                             "and --foundation)")
    custom.add_argument("--test-file", dest="test_file", default=None)
    custom.add_argument("--source-test-file", dest="source_test_file", default=None)
    custom.add_argument("--train-size", dest="train_size", type=int, default=None,
                        help="custom task: use the first N training frames")
    custom.add_argument("--e0s", default="foundation", help="custom task: MACE's --E0s")
    custom.add_argument("--molecules", action="store_true", help="custom task: also report meV per molecule")
    return p


def _foundation(value: Optional[str]) -> Optional[Path]:
    """A path, or ``mace_sparse:<name>`` for a bundled foundation (as in ``mace_run_train --foundation_model``)."""
    if not value:
        return None
    return bundled_foundation(value.split(":", 1)[1]) if value.startswith("mace_sparse:") else Path(value)


def _cases(args: argparse.Namespace, mode: Dict[str, Any], out: Path) -> List[Any]:
    if args.train_file:
        missing = [f for f in ("test_file", "source_test_file", "foundation") if not getattr(args, f)]
        if missing:
            raise ValueError(f"--train-file needs --{missing[0].replace('_', '-')}")
        tasks = [bench_tasks.custom_task(_foundation(args.foundation), Path(args.train_file), Path(args.test_file),
                                         Path(args.source_test_file), args.train_size, args.molecules, args.e0s)]
    else:
        names = args.tasks or mode["tasks"]
        overrides = [f for f in ("foundation", "data_dir", "source_test_file") if getattr(args, f)]
        if overrides and len(names) > 1:
            raise ValueError(f"--{overrides[0].replace('_', '-')} applies to one task; give one --tasks name")

        def opt(value: Optional[str]) -> Optional[Path]:
            return Path(value) if value else None

        tasks = [bench_tasks.build_task(n, _foundation(args.foundation), out, opt(args.data_dir),
                                        opt(args.source_test_file)) for n in names]
    # the mode's case filter belongs to the mode's tasks
    only = args.cases or ([] if (args.tasks or args.train_file) else mode["cases"])
    cases = [c for t in tasks for c in bench_tasks.select_cases(t, only)]
    if not cases:
        raise ValueError("no case matches --cases")
    return cases


def _setup_logging() -> None:
    logger = logging.getLogger("mace_sparse.bench")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def run(args: argparse.Namespace) -> int:
    import contextlib
    import warnings

    table = sys.stdout
    # MACE and e3nn print notices on stdout while they load models: keep stdout for the table alone
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.*")
        text = _bench(args)
    table.write(text)
    table.flush()
    return 0


def _bench(args: argparse.Namespace) -> str:
    from harness.pipeline import runner as bench_runner  # torch and MACE: only when the benchmark runs
    from harness.pipeline import table as bench_table
    from harness.pipeline.plots import write_plots

    _setup_logging()
    log = logging.getLogger("mace_sparse.bench")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    mode_name = "quick" if args.quick else (getattr(args, "mode", None) or "full")
    mode = MODES[mode_name]
    out = Path(args.out).resolve()
    method_names = args.methods or mode["methods"] or list(bench_methods.METHOD_NAMES)
    if "full" not in method_names:
        log.warning("full fine-tuning is not among the methods: the accuracy and forgetting ratios to it stay "
                    "empty (step time and memory are still measured against a full step)")
    methods = bench_methods.select_methods(method_names, freeze=args.freeze, lora_rank=args.lora_rank,
                                           lora_alpha=args.lora_alpha,
                                           sparse_flags=bench_methods.parse_sparse_flags(args.sparse_flags))
    seeds = args.seeds or mode["seeds"]
    cases = _cases(args, mode, out)
    # per task: --epochs for all, else the mode's (an int, or a dict per task name)
    default = mode["epochs"]
    epochs = {c.task: args.epochs or (default.get(c.task, default["*"]) if isinstance(default, dict) else default)
              for c in cases}
    if min(epochs.values()) < 1:
        raise ValueError(f"--epochs must be >= 1; got {args.epochs}")
    customised = any(getattr(args, k, None) for k in ("tasks", "cases", "methods", "seeds", "epochs", "train_file",
                                                       "sparse_flags", "lr", "lr_grid", "patience"))
    lr_grid = [args.lr] if getattr(args, "lr", None) else list(getattr(args, "lr_grid", None) or mode["lr_grid"])
    lr = lr_grid[0] if len(lr_grid) == 1 else 0.01
    patience = getattr(args, "patience", None)
    patience = mode["patience"] if patience is None else (patience or None)
    ema = mode["ema"] if getattr(args, "ema", None) is None else args.ema
    covers = describe(mode, cases, methods, epochs, list(seeds), customised)
    log.info("mace_sparse bench, %s mode: %s", mode_name, covers)
    settings = bench_methods.TrainSettings(epochs=max(epochs.values()), lr=lr, batch_size=args.batch_size,
                                           patience=patience, ema=ema)
    # the mode's primary/secondary design holds for any --methods subset (a secondary method named there
    # still borrows the lr of the method it varies, so adding one to a finished case costs one run); an
    # explicit --lr-grid tunes every method named alike
    split = bool(mode.get("tuned")) and len(lr_grid) > 1 and not getattr(args, "lr_grid", None)
    options = bench_runner.BenchOptions(
        methods=methods, seeds=list(seeds), settings=settings, out=out, jobs=args.jobs,
        cost_rounds=mode["cost_rounds"] if args.cost_rounds is None else args.cost_rounds,
        measure_memory=args.measure_memory,
        freeze=args.freeze, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, epochs_by_task=epochs,
        lr_grid=tuple(lr_grid) if len(lr_grid) > 1 else (),
        tuned=tuple(mode["tuned"]) if split else None,
        secondary_seeds=mode.get("secondary_seeds") if split else None,
        finished_only=bool(getattr(args, "finished_only", False)),
    )
    if getattr(args, "plan", False):
        return plan_text(cases, options)
    argv = getattr(args, "argv", None) or list(sys.argv[1:])
    meta_base = {
        "command": "mace_sparse " + shlex.join(argv), "date": datetime.date.today().isoformat(), "mode": mode_name,
        "covers": covers, "epochs": epochs_text(epochs), "epochs_by_task": epochs,
        "lr": lr if len(lr_grid) <= 1 else None,
        "lr_grid": lr_grid, "patience": patience, "ema": ema,
        "batch_size": args.batch_size, "seeds": list(seeds), "jobs": options.jobs,
        "dtype": settings.dtype, "methods": [m.name for m in methods],
        "method_flags": {m.name: list(m.flags) for m in methods},
        "sparse_presets": bench_methods.SPARSE_PRESETS, "freeze": args.freeze, "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha, "environment": _environment(), "commit": source_commit(),
        "tuned": list(options.tuned) if options.tuned else None,
        "secondary_seeds": options.secondary_seeds,
    }

    def write(results: List[Dict[str, Any]], partial: bool) -> str:
        """bench.md / bench.json (and the figures) from the cases measured so far."""
        meta = {**meta_base, "wall_s": time.perf_counter() - start}
        if partial:
            meta["partial"] = f"{len(results)} of {len(cases)} cases so far; run the same command again to go on"
        if options.finished_only:
            meta["partial"] = ("--finished-only: only the runs that had finished in --out; lrs chosen among the "
                               "grid runs that had finished" + (f"; {meta['partial']}" if partial else ""))
        report = bench_table.build_report(results, meta)
        text = bench_table.markdown(report)
        (out / "bench.md").write_text(text)
        (out / "bench.json").write_text(json.dumps(bench_table.json_ready(report), indent=2, allow_nan=False))
        plots = write_plots(results, out)
        log.info("wrote %d figures (learning curves, accuracy vs share changed) next to bench.md", len(plots))
        log.info("wrote %s and %s%s (%.1f min)", out / "bench.md", out / "bench.json",
                 " (partial)" if partial else "", meta["wall_s"] / 60)
        return text

    try:
        results = bench_runner.run_bench(cases, options, after_case=lambda done: write(done, partial=True))
    except bench_runner.Drained as exc:
        log.info("drained: %s", exc)
        return f"Benchmark drained, no table written: {exc}\n"
    return write(results, partial=False)


def plan_text(cases: List[Any], options: Any) -> str:
    """``--plan``: what would run, per case, without running it (finished runs are reused when it does run)."""
    from harness.pipeline import runner as bench_runner

    tuned = [m.name for m in options.methods if m.trains and options.is_tuned(m)] if options.lr_grid else []
    lines = []
    for case in cases:
        lines.append(f"{case.label}:")
        if tuned:
            lines.append(f"  tuning, seed {options.seeds[0]}, lr {list(options.lr_grid)}: {', '.join(tuned)}")
        for method in options.methods:
            if method.trains:
                how = "" if not options.lr_grid or options.is_tuned(method) else " (lr borrowed)"
                lines.append(f"  {method.name}: seeds {options.seeds_of(method)}{how}")
    total = bench_runner.count_runs(cases, options)
    lines.append(f"{total} mace_run_train runs in all (a tuned method's seed-{options.seeds[0]} run is its tuning "
                 "run, counted in both phases; finished runs are reused)")
    return "\n".join(lines) + "\n"


def source_commit() -> str:
    """The checkout's commit (``+local changes`` when the runtime or harness differ from it), for bench.md."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mace_sparse", "harness/pipeline",
                                "harness/experiments", "harness/cli"], cwd=root, capture_output=True, text=True,
                               timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return head + (" +local changes" if dirty else "")


def _environment() -> Dict[str, Any]:
    import platform

    import torch

    import mace

    return {"torch": torch.__version__, "mace": getattr(mace, "__version__", "?"),
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
