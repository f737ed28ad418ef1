"""The one runner of the harness: every method × seed of every case of an experiment, then evaluated.

``mace_sparse bench``, ``calibrate`` and ``bench-magnetic`` are all experiments of this runner (their cases,
methods and settings are data in :mod:`harness.experiments`); they differ only in the report they draw from the
records it returns.


For each case: the training file is cut to its size, the foundation is evaluated as it is (zero-shot), every
trained method runs as a real ``mace_run_train`` subprocess for every seed, each saved model is evaluated on
the target test set and the source test set, its changed parameters are counted against the step-0 model,
and the training-step cost of every method is measured (:mod:`harness.stepcost.cost`; skipped with
``cost_rounds=0``). The result is one JSON-ready dict; :mod:`harness.pipeline.table` turns it into the table.

The step-0 model (the foundation as MACE configured it for this data: element-filtered, atomic energies per
``--E0s``) is what "changed" is measured against. A sparse_str run records it exactly: reverting its delta file
from its saved model gives it back bit for bit (fingerprint-checked). When a seed has no sparse_str run, one
extra ``mace_run_train`` with the same flags, one epoch and ``--lr 0`` writes it: Adam with a zero learning
rate adds exactly zero to every weight, so the saved model is the configured one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from harness.experiments.methods import REFERENCE, ZERO_SHOT, Method, TrainSettings, train_command
from harness.experiments.tasks import BenchCase
from harness.stepcost.cost import measure_step_costs
from mace_sparse.mace_io import load_trusted_model, output_paths

from . import evaluate as bench_eval
from .curve import best_point, epochs_trained
from .splits import scored_test_sets, split_files
from .execute import DRAIN_FILE, Drained, execute, job_finished
from .train import TrainOutput
from .tuning import borrowed_lrs, select_lrs

LOG = logging.getLogger("mace_sparse.bench")


@dataclasses.dataclass
class BenchOptions:
    """Everything a benchmark run shares across cases (recorded in the JSON)."""

    methods: List[Method]
    seeds: List[int]
    settings: TrainSettings
    out: Path
    jobs: int = 1
    #: interleaved step-timing rounds (:mod:`harness.stepcost.cost`); 0: no step-cost measurement
    cost_rounds: int = 10
    measure_memory: bool = True
    freeze: int = 5
    lora_rank: int = 4
    lora_alpha: float = 1.0
    #: epochs per task name, overriding ``settings.epochs`` (full mode gives larger data sets fewer epochs)
    epochs_by_task: Dict[str, int] = dataclasses.field(default_factory=dict)
    #: learning rates tried for every method on the first seed; the one with the lowest validation force MAE
    #: (at MACE's best checkpoint) is used for every seed. Empty: ``settings.lr`` for all, no tuning.
    lr_grid: Tuple[float, ...] = ()
    #: the methods tuned on ``lr_grid`` (None: every method). An untuned ("secondary") method takes the lr chosen
    #: for the first tuned method of its kind, else the one chosen for full fine-tuning (:func:`borrowed_lrs`).
    tuned: Optional[Tuple[str, ...]] = None
    #: how many of the seeds the untuned methods run (the first ones; None: every seed): where CPU time is short
    #: the secondary methods run fewer
    secondary_seeds: Optional[int] = None
    #: log every validation line of every run (``calibrate`` does: its runs are short and run one at a time)
    echo_epochs: bool = False
    #: report only the runs already finished in ``out`` and start none (but the one-epoch ``--lr 0`` reference
    #: where a seed has no finished sparse_str run): the partial table of a benchmark longer than a sitting
    finished_only: bool = False

    def settings_for(self, case: BenchCase) -> TrainSettings:
        """What every method of ``case`` shares (same epochs for all of them)."""
        return dataclasses.replace(self.settings, epochs=self.epochs_by_task.get(case.task, self.settings.epochs))

    def is_tuned(self, method: Method) -> bool:
        return self.tuned is None or method.name in self.tuned

    def seeds_of(self, method: Method) -> List[int]:
        """The seeds ``method`` runs: all of them, or the secondary seeds for an untuned method."""
        if self.is_tuned(method) or self.secondary_seeds is None:
            return list(self.seeds)
        return list(self.seeds[: max(1, self.secondary_seeds)])


@dataclasses.dataclass
class _Job:
    case: BenchCase
    method: Method
    seed: int
    run_dir: Path
    args: List[str]
    index: int = 0
    total: int = 0
    output: Optional[TrainOutput] = None
    lr: float = 0.0


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text.replace("/", "__"))


def _reference_method() -> Method:
    return Method("reference-lr0", "reference", ("--finetune_method", "full"), None)


def _run_name(method: Method, seed: int, lr: Optional[float]) -> str:
    return f"{method.name}_seed{seed}" if lr is None else f"{method.name}_lr{lr:g}_seed{seed}"


def _plan(case: BenchCase, options: BenchOptions, train_file: Path, case_dir: Path,
          valid_file: Optional[Path] = None, lrs: Optional[Dict[str, float]] = None,
          seeds: Optional[Sequence[int]] = None, reference: bool = False) -> List[_Job]:
    """The runs of one case: every trained method × seed, plus an ``--lr 0`` reference where needed.

    ``lrs``: the learning rate of each method (from the tuning phase); without it the shared ``settings.lr``.
    ``reference``: an ``--lr 0`` reference for every seed, even one with sparse_str runs (``--finished-only``,
    where those may not have finished).
    """
    jobs = []
    trained = [m for m in options.methods if m.trains]
    has_sparse = any(m.kind == "sparse_str" for m in trained)
    base = options.settings_for(case)
    for seed in options.seeds if seeds is None else seeds:
        for method in trained:
            if seeds is None and seed not in options.seeds_of(method):
                continue
            lr = None if lrs is None else lrs[method.name]
            settings = base if lr is None else dataclasses.replace(base, lr=lr)
            jobs.append(_Job(case, method, seed, case_dir / _run_name(method, seed, lr),
                             train_command(case, method, seed, settings, str(train_file), valid_file=valid_file),
                             lr=settings.lr))
        if trained and (reference or not has_sparse):
            ref = _reference_method()
            settings = dataclasses.replace(base, epochs=1, lr=0.0, patience=None)
            jobs.append(_Job(case, ref, seed, case_dir / f"reference-lr0_seed{seed}",
                             train_command(case, ref, seed, settings, str(train_file), valid_file=valid_file),
                             lr=0.0))
    return jobs


def center_out(grid: Sequence[float]) -> List[float]:
    """The grid from its middle value outwards (0.01, 0.003, 0.03 for 0.003, 0.01, 0.03).

    Tuning runs go in this order, so a benchmark stopped half-way has every method at the middle lr first.
    """
    if not grid:
        return []
    middle = len(grid) // 2
    order = [middle] + [i for k in range(1, len(grid)) for i in (middle - k, middle + k) if 0 <= i < len(grid)]
    return [grid[i] for i in order]


def _finished_only(jobs: Sequence[_Job]) -> List[_Job]:
    """The jobs that finished earlier (``--finished-only``); the cheap ``--lr 0`` references are always kept."""
    return [j for j in jobs if j.method.kind == "reference" or job_finished(j)]


def _tuning_plan(case: BenchCase, options: BenchOptions, train_file: Path, case_dir: Path,
                 valid_file: Optional[Path]) -> List[_Job]:
    """The learning-rate grid on the first seed, for every trained method (the same budget for each)."""
    jobs = []
    tuned = dataclasses.replace(options, methods=[m for m in options.methods if options.is_tuned(m)])
    for lr in center_out(options.lr_grid):
        lrs = {m.name: lr for m in tuned.methods if m.trains}
        jobs += [j for j in _plan(case, tuned, train_file, case_dir, valid_file, lrs, options.seeds[:1])
                 if j.method.kind != "reference"]
    return jobs


def _drain_file(options: BenchOptions) -> Optional[Path]:
    """The drain file of :func:`harness.pipeline.execute.execute` (none for ``--finished-only``: its references
    must run)."""
    return None if options.finished_only else options.out / DRAIN_FILE


def _references(jobs: Sequence[_Job]) -> Dict[int, Tuple[Any, str]]:
    """Per seed: the step-0 model and where it came from (a sparse_str delta, or the ``--lr 0`` run)."""
    refs: Dict[int, Tuple[Any, str]] = {}
    for job in jobs:
        if job.seed in refs or job.output is None:
            continue
        if job.method.kind == "sparse_str" and job.output.delta is not None:
            model = bench_eval.reference_from_sparse_run(job.output.model, job.output.delta)
            refs[job.seed] = (model, f"reverted delta of {job.run_dir.name}")
        elif job.method.kind == "reference":
            refs[job.seed] = (bench_eval.load_model(job.output.model), f"--lr 0 run {job.run_dir.name}")
    return refs


def _errors_dict(prefix: str, errors: Dict[str, float]) -> Dict[str, Any]:
    return {f"{prefix}_{key}": value for key, value in errors.items()}


def _evaluate_run(job: _Job, reference, target: Path, source: Optional[Path]) -> Dict[str, Any]:
    out = job.output
    assert out is not None
    saved = load_trusted_model(out.model)
    change = bench_eval.count_changed(reference, saved)
    del saved
    record: Dict[str, Any] = {
        "case": job.case.label, "method": job.method.name, "seed": job.seed,
        "changed_entries": change.changed, "total_entries": change.total,
        "changed_percent": change.changed_percent,
        "model_bytes": out.model.stat().st_size, "wall_s": out.wall_s, "epoch_s_from_log": out.epoch_s,
        "run_dir": str(out.run_dir), "lr": job.lr, "curve": out.curve, "stopped_early": out.stopped_early,
        "epochs_run": epochs_trained(out.curve), "resumed": out.resumed,
    }
    best = best_point(out.curve)
    if best is not None:
        record["best_epoch"] = int(best["epoch"])
        record["valid_force_mae_at_best"] = best.get("mae_f")
    if out.sparsity_json is not None:
        # sparse_str's own count (same definition); the bitwise count above must agree with it
        sparsity = json.loads(out.sparsity_json.read_text())
        record["changed_entries_sparsity_json"] = int(sparsity["changed_entries"])
        record["changed_percent"] = 100.0 * sparsity["changed_entries"] / sparsity["total_entries"]
        record["delta_bytes"] = out.delta.stat().st_size if out.delta else None
        record["delta_percent_of_model"] = (100.0 * record["delta_bytes"] / record["model_bytes"]
                                            if record["delta_bytes"] else None)
        record["unchanged_adapted"] = float(sparsity["sparsity_over_adapted_layers"])
        record["unchanged_all"] = float(sparsity["sparsity_over_all_parameters"])
    # a run with the magnetic head also writes <name>_magnetic.model (MACE + head): it scores the moments too
    magnetic = output_paths(out.model.parent, out.model.stem).magnetic
    scored = magnetic if magnetic.is_file() else out.model
    magmoms_key = _magmoms_key(job.case) if magnetic.is_file() else None
    case = job.case
    record.update(_errors_dict("target", bench_eval.evaluate(scored, target, case.energy_key, case.forces_key,
                                                             magmoms_key)))
    if source is not None:
        record.update(_errors_dict("source", bench_eval.evaluate(out.model, source, case.energy_key,
                                                                 case.forces_key)))
    return record


def _magmoms_key(case: BenchCase) -> str:
    flags = list(case.extra_flags)
    for name in ("--magmoms_key", "--magmoms-key"):
        if name in flags:
            return flags[flags.index(name) + 1]
    return "REF_magmoms"


def _number(jobs: Sequence[_Job], counter: List[int], total: int) -> None:
    for job in jobs:
        counter[0] += 1
        job.index, job.total = counter[0], total


def _zero_shot(case: BenchCase, target: Path, source: Optional[Path]) -> Dict[str, Any]:
    zero = {"case": case.label, "method": ZERO_SHOT, "seed": None, "changed_entries": 0, "changed_percent": 0.0}
    zero.update(_errors_dict("target", bench_eval.evaluate(case.foundation, target, case.energy_key,
                                                           case.forces_key)))
    if source is not None:
        zero.update(_errors_dict("source", bench_eval.evaluate(case.foundation, source, case.energy_key,
                                                               case.forces_key)))
    LOG.info("%s: zero-shot force MAE target %.1f, source %s meV/Å", case.label, zero["target_force_mae"],
             f"{zero['source_force_mae']:.1f}" if source is not None else "–")
    return zero


def _step_costs(options: BenchOptions, case: BenchCase, base, train_file: Path) -> Dict[str, Any]:
    """Step time and memory per cost key (none with ``cost_rounds=0`` or without a trained method)."""
    trained = [m for m in options.methods if m.trains]
    if not trained or options.cost_rounds <= 0:
        return {}
    frames = bench_eval.read_frames(train_file)[: options.settings.batch_size]
    measured = measure_step_costs(
        base, frames, trained, options.settings.lr, rounds=options.cost_rounds, lora_rank=options.lora_rank,
        lora_alpha=options.lora_alpha, freeze=options.freeze, memory=options.measure_memory,
        log=lambda msg: LOG.info("%s: %s", case.label, msg),
    )
    return {key: dataclasses.asdict(value) for key, value in measured.items()}


def run_case(case: BenchCase, options: BenchOptions, counter: List[int], total: int) -> Dict[str, Any]:
    """Everything measured on one case (runs, zero-shot, step costs)."""
    case.check_files()
    case_dir = options.out / "runs" / _slug(case.label)
    train_file, valid_file = split_files(case, case_dir)
    elements = bench_eval.file_elements(train_file)
    target, source, counts = scored_test_sets(case, case_dir, elements)
    runs = [_zero_shot(case, target, source)] if any(m.kind == ZERO_SHOT for m in options.methods) else []

    lrs, lr_table, lenders = None, {}, {}
    if len(options.lr_grid) > 1:
        tuning = _tuning_plan(case, options, train_file, case_dir, valid_file)
        if options.finished_only:
            tuning = _finished_only(tuning)
        _number(tuning, counter, total)
        execute(tuning, options.jobs, options.echo_epochs, _drain_file(options))
        lrs, lr_table = select_lrs(tuning)
        LOG.info("%s: learning rates chosen on validation: %s", case.label,
                 ", ".join(f"{m} {lr:g}" for m, lr in lrs.items()))
        untried = [m for m in options.methods if options.is_tuned(m) and m.trains and m.name not in lrs]
        if untried:  # --finished-only: a tuned method with no finished grid run is left out, not given an lr
            LOG.info("%s: no finished tuning run of %s", case.label, ", ".join(m.name for m in untried))
        lenders = borrowed_lrs([m for m in options.methods if m not in untried], lrs,
                               options.lr_grid[len(options.lr_grid) // 2])
        if lenders:
            LOG.info("%s: untuned methods take the lr of: %s", case.label,
                     ", ".join(f"{m} ← {lender} ({lrs[m]:g})" for m, lender in lenders.items()))
    elif options.lr_grid:
        lrs = {m.name: options.lr_grid[0] for m in options.methods if m.trains}
    planned = options if lrs is None else dataclasses.replace(
        options, methods=[m for m in options.methods if not m.trains or m.name in lrs])
    jobs = _plan(case, planned, train_file, case_dir, valid_file, lrs, reference=options.finished_only)
    if options.finished_only:
        jobs = _finished_only(jobs)
    _number(jobs, counter, total)
    execute(jobs, options.jobs, options.echo_epochs, _drain_file(options))
    refs = _references(jobs)
    fingerprints = {seed: bench_eval.fingerprint(model) for seed, (model, _) in refs.items()}

    for job in jobs:
        if job.method.kind == "reference":
            continue
        reference, _ = refs[job.seed]
        record = _evaluate_run(job, reference, target, source)
        LOG.info("%s seed %d: force MAE target %.1f, source %s meV/Å, %.2f%% of parameters changed",
                 job.method.name, job.seed, record["target_force_mae"],
                 f"{record['source_force_mae']:.1f}" if source is not None else "–", record["changed_percent"])
        runs.append(record)

    first = refs.get(options.seeds[0])
    costs = _step_costs(options, case, first[0], train_file) if first else {}
    return {
        "case": dataclasses.asdict(case) | {"foundation": str(case.foundation), "train_file": str(case.train_file),
                                             "test_file": str(case.test_file),
                                             "source_test_file": _str_or_none(case.source_test_file)},
        "train_file_used": str(train_file),
        "valid_file_used": str(valid_file) if valid_file else None,
        "lr_selection": lr_table,
        "lr_borrowed": lenders,
        "epochs": options.settings_for(case).epochs,
        "elements": sorted(elements),
        **counts,
        "reference": {str(seed): {"from": how, "fingerprint": fingerprints[seed]} for seed, (_, how) in refs.items()},
        "reference_seed_independent": len(set(fingerprints.values())) <= 1,
        "runs": runs,
        "step_cost": costs,
        "cost_key": {m.name: m.cost_key for m in options.methods if m.cost_key},
    }


def _str_or_none(path: Optional[Path]) -> Optional[str]:
    return None if path is None else str(path)


def count_runs(cases: Sequence[BenchCase], options: BenchOptions) -> int:
    """Runs of the whole benchmark (tuning grid included; a tuning run reused by the seeds counts once)."""
    total = 0
    for case in cases:
        main = len(_plan(case, options, case.train_file, options.out))
        if len(options.lr_grid) > 1:
            trained = sum(1 for m in options.methods if m.trains and options.is_tuned(m))
            main += trained * len(options.lr_grid)  # counted in both phases; the seed-0 rerun is a reuse
        total += main
    return total


def run_bench(cases: Sequence[BenchCase], options: BenchOptions,
              after_case: Optional[Callable[[List[Dict[str, Any]]], None]] = None) -> List[Dict[str, Any]]:
    """Measure every case; the list of per-case results (see :func:`run_case`).

    ``after_case`` gets the results so far after every case, so a benchmark longer than a sitting leaves a
    partial table on disk (the finished runs themselves are reused when the command is run again).
    """
    options.out.mkdir(parents=True, exist_ok=True)
    total = count_runs(cases, options)
    LOG.info("%d cases × %d methods × %d seeds: %d mace_run_train runs", len(cases), len(options.methods),
             len(options.seeds), total)
    counter = [0]
    results: List[Dict[str, Any]] = []
    for case in cases:
        results.append(run_case(case, options, counter, total))
        if after_case is not None and len(results) < len(cases):
            after_case(results)
    return results


__all__ = ["BenchOptions", "Drained", "DRAIN_FILE", "run_bench", "run_case", "count_runs", "REFERENCE"]
