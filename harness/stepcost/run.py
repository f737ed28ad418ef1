"""The step-cost benchmark: sparse_str's training step against full fine-tuning (and MACE's LoRA), one model,
one batch, one run.

Issue 2, item 6 asks for a *benchmark*, not a timed test: a sparse_str training step should cost at most
1.10x a full fine-tuning step, with at most 1.2x the peak memory, both ratios measured in one run.
:func:`run_benchmark` is that benchmark; ``mace_sparse bench-step`` prints its table. It sets the methods up
(:mod:`.fixture`), steps them with MACE's own ``take_step`` (:mod:`.take_step`), times them interleaved
(:mod:`.timing`), measures each one's peak memory (:mod:`.memory`) and, with ``profile``, breaks sparse_str's
extra time down (:mod:`.breakdown`).

The headline is the ratio of the median wall-clock steps; reported next to it are the paired ratio (per round,
a method's step over full's step of the same round: median and interquartile range, which shows how noisy the
machine was) and the ratio of median process-CPU times (robust to other processes taking turns on the core).
Torch threads are fixed for the run.
"""

from __future__ import annotations

import dataclasses
import gc
import platform
import statistics
from typing import Any, Callable, Dict, List, Optional

import mace
import torch
from mace.modules.loss import WeightedEnergyForcesLoss

from mace_sparse.mace_io import default_dtype

from .breakdown import op_time_diff, overhead_breakdown
from .fixture import MethodState, mace_default_args, prepare, setup_method
from .memory import batch_bytes, measure_peak_memory
from .schema import METHODS, REFERENCE, BenchConfig, BenchResult, MethodResult
from .take_step import train_step
from .timing import default_threads, time_interleaved


def _ratio(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    if value is None or reference is None or reference <= 0:
        return None
    return float(value) / float(reference)


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = lambda _msg: None) -> BenchResult:
    """Set the methods up on one model and batch, time them interleaved, measure their peak memory."""
    cfg.validate()
    methods = [m for m in METHODS if m in cfg.methods or m == REFERENCE]
    device = torch.device(cfg.device)
    threads = int(cfg.threads) if cfg.threads and cfg.threads > 0 else default_threads()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
    try:
        with default_dtype(dtype):
            return _run(cfg, methods, device, threads, log)
    finally:
        torch.set_num_threads(previous_threads)


def _method_results(states: List[MethodState], times: Dict[str, Any]) -> Dict[str, MethodResult]:
    """Each method's step times, medians and per-round ratios to the reference (ratios of medians come later)."""
    results: Dict[str, MethodResult] = {}
    ref_rounds = [statistics.median(block) for block in times[REFERENCE][0]]
    for state in states:
        wall, cpu = times[state.name]
        flat = [t for block in wall for t in block]
        flat_cpu = [t for block in cpu for t in block]
        rounds = [statistics.median(block) for block in wall]
        results[state.name] = MethodResult(
            name=state.name,
            trainable_params=state.trainable_params,
            step_ms=flat,
            cpu_ms=flat_cpu,
            median_ms=statistics.median(flat),
            median_cpu_ms=statistics.median(flat_cpu),
            round_ratios=[r / ref for r, ref in zip(rounds, ref_rounds)],
        )
    return results


def _environment(device: torch.device, threads: int) -> Dict[str, Any]:
    return {
        "torch": torch.__version__,
        "mace": getattr(mace, "__version__", "?"),
        "python": platform.python_version(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
    }


def _run(cfg: BenchConfig, methods: List[str], device: torch.device, threads: int, log: Callable[[str], None]) -> BenchResult:
    args = mace_default_args()
    base_model, batch, batch_info = prepare(cfg)
    base_model = base_model.to(device)
    batch = batch.to(device)
    loss_fn = WeightedEnergyForcesLoss(energy_weight=args.energy_weight, forces_weight=args.forces_weight).to(device)
    max_grad_norm = args.clip_grad

    def step(state: MethodState) -> Any:
        return train_step(state, loss_fn, batch, max_grad_norm, device)

    log(
        f"model: {type(base_model).__name__}, {batch_info['model_params']:,} parameters; batch: "
        f"{batch_info['configs']} configs, {batch_info['atoms']} atoms, {batch_info['edges']} edges; "
        f"{cfg.dtype}, device {device}, {threads} threads"
    )
    states = [setup_method(name, base_model, cfg, args) for name in methods]
    for state in states:
        for _ in range(cfg.warmup):
            step(state)
    log(f"timing {len(states)} methods: {cfg.rounds} interleaved rounds x {cfg.steps} steps (after {cfg.warmup} warm-up)")
    times = time_interleaved(states, step, cfg.rounds, cfg.steps, device, log=log)
    results = _method_results(states, times)

    breakdown = op_diff = None
    by_name = {s.name: s for s in states}
    if cfg.profile and "sparse_str" in by_name:
        log("profiling full vs sparse_str")
        op_diff = op_time_diff(by_name[REFERENCE], by_name["sparse_str"], step, steps=cfg.profile_steps)
        breakdown = overhead_breakdown(by_name[REFERENCE], by_name["sparse_str"], device)
    del states, by_name
    gc.collect()

    if cfg.measure_memory:
        for name in methods:
            log(f"measuring peak memory: {name}")
            results[name].peak_memory_bytes = measure_peak_memory(name, base_model, cfg, args, step, device) + batch_bytes(batch)
    reference = results[REFERENCE]
    for r in results.values():
        r.time_ratio = _ratio(r.median_ms, reference.median_ms)
        r.cpu_time_ratio = _ratio(r.median_cpu_ms, reference.median_cpu_ms)
        r.memory_ratio = _ratio(r.peak_memory_bytes, reference.peak_memory_bytes)
    sparse = results.get("sparse_str")
    config = dataclasses.asdict(cfg)
    config["radial_mlp"] = list(cfg.radial_mlp)
    config["methods"] = list(methods)
    return BenchResult(
        config=config,
        environment=_environment(device, threads),
        batch=batch_info,
        methods=results,
        step_time_ratio=sparse.time_ratio if sparse else None,
        peak_memory_ratio=sparse.memory_ratio if sparse else None,
        breakdown=breakdown,
        op_diff=op_diff,
    )
