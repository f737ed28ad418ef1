"""Cost of one training step: sparse_str against full fine-tuning (and MACE's LoRA), same model, same batch.

Issue 2, item 6 asks for a *benchmark*, not a timed test: a sparse_str training step should cost at most
1.10x a full fine-tuning step, with at most 1.2x the peak memory, both ratios measured in one run. This
module is that benchmark; ``mace_sparse bench-step`` prints its table.

What a "step" is. Exactly what ``mace.tools.train.take_step`` does for one batch: ``zero_grad(set_to_none)``,
forward with ``training=True, compute_force=True``, MACE's ``WeightedEnergyForcesLoss``, ``backward``, MACE's
gradient clipping (``--clip_grad``, 10 by default) and an ``Adam(amsgrad=True)`` step over the param groups of
``mace.tools.scripts_utils.get_params_options``. Every optimiser setting comes from MACE's own argument
parser defaults, so the benchmark follows MACE if those change. The three methods differ only in setup:

* ``full``: the plain model, every weight trainable (the reference);
* ``sparse_str``: :func:`mace_sparse.get_sparse_model` + MACE's param groups passed through
  :func:`mace_sparse.add_threshold_group` (with the config's ``delta_eps``) +
  :func:`mace_sparse.register_threshold_decay` — exactly what the ``mace_run_train`` integration does;
* ``lora``: ``mace.modules.lora.inject_LoRAs(model, rank=4, alpha=1)``, as ``mace_run_train --lora`` does
  (for context: the other parameter-efficient method MACE ships).

Timing. Each method gets its own deep copy of the same base model and its own optimiser; all three are
built first and then timed **interleaved**: many rounds, each round runs a short block of steps (one by
default) of every method, the order rotating from round to round, every step timed on its own. Interleaving
spreads slow drifts of the machine (thermal state, other processes, allocator growth) over all methods
instead of charging them to whichever ran last. The headline is the ratio of the median wall-clock steps;
reported next to it are the paired ratio (per round, a method's step over full's step of the same round:
median and interquartile range, which shows how noisy the machine was) and the ratio of median process-CPU
times (robust to other processes taking turns on the core). Torch threads are fixed for the run.

Peak memory. Counted the same way on every device: the bytes of tensors a method owns (its model copy and
reparameterisation, gradients, optimiser state, activations and temporaries) at their peak during a step,
plus the batch (shared, counted once for everyone). Every method is set up from scratch for the
measurement, one at a time, after the timing (so global caches such as e3nn's are already warm and charged
to nobody).

* CUDA: the allocator's own counters. ``memory_allocated()`` before the method is set up is the zero
  point; after one warm-up step (which creates Adam's state) the peak counter is reset and
  ``max_memory_allocated()`` over the measured steps is read.
* CPU has no allocator peak counter, and process RSS is the wrong instrument: glibc keeps freed blocks,
  serves large ones with ``mmap`` and returns them at its own pace, so ``ru_maxrss`` differences of a few
  MB are allocator policy, not tensors. Instead the method is set up *and* stepped inside one
  ``torch.profiler.profile(profile_memory=True)`` session, which records every allocation and free of
  torch's CPU allocator (pointer and size). Replaying those events in time order gives the exact live
  bytes the method owns at every instant (frees of blocks allocated before the session are ignored, so
  other objects cannot make the count drop); the peak is taken over the measured steps, marked with
  ``record_function``. This counts tensor storage exactly as ``max_memory_allocated`` does on CUDA (both
  exclude allocator fragmentation, Python objects and code).

What sparse_str adds to a step (``--profile`` measures each piece): per adapted weight, the pre-hook's
sigmoid / per-path gather / clamp / sub / add and their backward nodes, and a second (tiny) trainable tensor,
the score, for Adam and gradient clipping. All of it scales with the number of adapted weights, none with
atoms or edges, so the ratio is worst for small batches — which is why the default batch is small.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import mace  # noqa: F401  (mace must be imported before e3nn)
import numpy as np
import torch

#: Methods in the order they are reported; ``full`` is the reference of every ratio.
METHODS: Tuple[str, ...] = ("full", "sparse_str", "lora")
REFERENCE = "full"
#: Issue 2, item 6: sparse_str step time and peak memory relative to full fine-tuning.
STEP_TIME_LIMIT = 1.10
PEAK_MEMORY_LIMIT = 1.20
#: ``record_function`` label of the steps whose memory peak is measured.
_MEASURED_STEP = "mace_sparse_bench::measured_step"


@dataclasses.dataclass
class BenchConfig:
    """What to benchmark.

    The default model is foundation-like in its layers (64x0e+64x1o, correlation 3, 2 interactions, radial MLP
    [64,64,64], about 241k weights) and the default batch small (2 cells of 4 atoms, ~290 edges), so that a
    step takes ~0.25 s of CPU on one core of the 2-core development VM and the run about a minute and a half.
    A small batch is also the hard case for the ratio: sparse_str's extra work grows with the number of
    adapted weights, not with atoms or edges, so larger batches dilute it.

    Attributes:
        model_path: a saved MACE model to use instead of building one (``torch.load``-able).
        channels, max_L, correlation, num_interactions, radial_mlp, r_max: the built model's size.
        dtype: ``float64`` (MACE's training default) or ``float32``.
        batch_size: configurations per batch; ``atoms`` atoms per configuration (EMT-labelled fcc alloys).
        rounds, steps: interleaved rounds, and timed steps per method per round.
        warmup: untimed steps per method before timing (first-call codegen, Adam state, allocator).
        targets, granularity: the sparse_str configuration (:class:`mace_sparse.SparseConfig`).
        device: ``cpu`` or ``cuda``.
        threads: torch intra-op threads; ``0`` means every CPU this process may use. The default is 1 because
            the *ratio* is the measurement and one thread makes it reproducible: with a team of OpenMP
            threads a step's time depends on the OS scheduling the whole team at once, and on a shared
            machine one descheduled thread stalls the rest (on a 2-core VM at load 7 the same full step took
            3–21 s with 2 threads and 0.8–1.2 s with 1). MACE's small per-edge tensors gain little from
            intra-op threads anyway.
        methods: which methods to run (``full`` is always included, it is the reference).
        memory_steps: steps over which the memory peak is taken (after one warm-up step).
        profile: also break sparse_str's extra time down (:func:`overhead_breakdown`, :func:`op_time_diff`
            over ``profile_steps`` profiled steps per method).
    """

    model_path: Optional[str] = None
    channels: int = 64
    max_L: int = 1
    correlation: int = 3
    num_interactions: int = 2
    radial_mlp: Tuple[int, ...] = (64, 64, 64)
    r_max: float = 5.0
    dtype: str = "float64"
    batch_size: int = 2
    atoms: int = 4
    rounds: int = 20
    steps: int = 1
    warmup: int = 2
    targets: str = "all"
    granularity: str = "path"
    device: str = "cpu"
    threads: int = 1
    methods: Tuple[str, ...] = METHODS
    lora_rank: int = 4
    lora_alpha: float = 1.0
    measure_memory: bool = True
    memory_steps: int = 2
    profile: bool = False
    profile_steps: int = 3
    seed: int = 0

    def validate(self) -> None:
        """Reject settings that would make the numbers meaningless, with a one-line reason."""
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"--dtype must be float32 or float64; got {self.dtype!r}")
        for name in ("batch_size", "atoms", "rounds", "steps", "memory_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0; got {self.warmup}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available")
        if self.model_path is not None and not Path(self.model_path).is_file():
            raise FileNotFoundError(f"--model: no such file: {self.model_path}")


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), without numpy arrays in the result."""
    return float(np.quantile(np.asarray(values, dtype=float), q))


@dataclasses.dataclass
class MethodResult:
    """Measurements of one method. Ratios are relative to ``full`` (``None`` until computed).

    Attributes:
        step_ms / cpu_ms: wall-clock and process-CPU time of every timed step, in time order.
        median_ms / median_cpu_ms: their medians (the headline uses the wall-clock one).
        round_ratios: per round, this method's median step over full's median step *of the same round*: a
            paired estimate, insensitive to load that drifts between rounds.
    """

    name: str
    trainable_params: int
    step_ms: List[float]
    cpu_ms: List[float]
    median_ms: float
    median_cpu_ms: float
    round_ratios: List[float] = dataclasses.field(default_factory=list)
    time_ratio: Optional[float] = None
    cpu_time_ratio: Optional[float] = None
    peak_memory_bytes: Optional[int] = None
    memory_ratio: Optional[float] = None

    @property
    def peak_memory_mb(self) -> Optional[float]:
        return None if self.peak_memory_bytes is None else self.peak_memory_bytes / 2**20

    @property
    def paired_ratio(self) -> Optional[float]:
        """Median of the per-round ratios."""
        return statistics.median(self.round_ratios) if self.round_ratios else None

    @property
    def paired_ratio_iqr(self) -> Optional[Tuple[float, float]]:
        if not self.round_ratios:
            return None
        return _quantile(self.round_ratios, 0.25), _quantile(self.round_ratios, 0.75)


@dataclasses.dataclass
class BenchResult:
    """Everything one run measured, plus the headline ratios of sparse_str against full."""

    config: Dict[str, Any]
    environment: Dict[str, Any]
    batch: Dict[str, int]
    methods: Dict[str, MethodResult]
    step_time_ratio: Optional[float]
    peak_memory_ratio: Optional[float]
    breakdown: Optional[Dict[str, float]] = None
    op_diff: Optional[List[Dict[str, Any]]] = None

    @property
    def step_time_pass(self) -> Optional[bool]:
        return None if self.step_time_ratio is None else self.step_time_ratio <= STEP_TIME_LIMIT

    @property
    def peak_memory_pass(self) -> Optional[bool]:
        return None if self.peak_memory_ratio is None else self.peak_memory_ratio <= PEAK_MEMORY_LIMIT

    def _sparse_attr(self, name: str) -> Any:
        sparse = self.methods.get("sparse_str")
        return None if sparse is None else getattr(sparse, name)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-friendly view (what ``--json`` writes)."""
        methods = {}
        for name, m in self.methods.items():
            d = dataclasses.asdict(m)
            d["peak_memory_mb"] = m.peak_memory_mb
            d["paired_ratio"] = m.paired_ratio
            d["paired_ratio_iqr"] = m.paired_ratio_iqr
            methods[name] = d
        return {
            "config": self.config,
            "environment": self.environment,
            "batch": self.batch,
            "methods": methods,
            "step_time_ratio": self.step_time_ratio,
            "step_time_ratio_paired": self._sparse_attr("paired_ratio"),
            "step_cpu_time_ratio": self._sparse_attr("cpu_time_ratio"),
            "step_time_limit": STEP_TIME_LIMIT,
            "step_time_pass": self.step_time_pass,
            "peak_memory_ratio": self.peak_memory_ratio,
            "peak_memory_limit": PEAK_MEMORY_LIMIT,
            "peak_memory_pass": self.peak_memory_pass,
            "breakdown": self.breakdown,
            "op_diff": self.op_diff,
        }

    def markdown(self) -> str:
        """The result table and the two headline ratios, as printed by ``mace_sparse bench-step``."""
        return format_markdown(self)


# --------------------------------------------------------------------------------------------------------
# Set-up: MACE's defaults, data, model, methods
# --------------------------------------------------------------------------------------------------------


def mace_default_args() -> Any:
    """MACE's own ``mace_run_train`` defaults (lr, weight decay, amsgrad, clip_grad, loss weights, ...).

    Taken from MACE's parser rather than copied, so the benchmark optimises exactly like a default run.
    """
    from mace.tools import build_default_arg_parser

    return build_default_arg_parser().parse_args(["--name", "mace_sparse_bench_step"])


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """MACE builds data and models in torch's default dtype (``--default_dtype``); restore it afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _repeat_for(atoms: int) -> Tuple[int, int, int]:
    """The most compact repeat (a, b, c) of the 4-atom cubic fcc cell holding at least ``atoms`` atoms."""
    best = None
    for a in range(1, 9):
        for b in range(1, a + 1):
            for c in range(1, b + 1):
                n = 4 * a * b * c
                if n >= atoms:
                    key = (n, a - c)
                    if best is None or key < best[0]:
                        best = (key, (a, b, c))
    if best is None:
        raise ValueError(f"--atoms {atoms} is too large for this benchmark (at most {4 * 8 ** 3})")
    return best[1]


def emt_structures(n: int, atoms: int, seed: int = 0, elements: Sequence[str] = ("Cu", "Ni", "Al")) -> List[Any]:
    """``n`` rattled, strained fcc alloy cells of exactly ``atoms`` atoms, labelled with ASE's EMT.

    Same recipe as :func:`mace_sparse.data.emt_data.bulk_configs` (whose cells are fixed at 16 atoms), with
    the cell repeated to the requested size and surplus atoms removed as random vacancies.
    """
    from mace_sparse.data import emt_data

    rng = np.random.default_rng(seed)
    repeat = _repeat_for(atoms)
    out = []
    for _ in range(n):
        cell = emt_data._random_alloy(str(rng.choice(list(elements))), rng, repeat, tuple(elements))
        surplus = len(cell) - atoms
        if surplus:
            del cell[sorted(rng.choice(len(cell), size=surplus, replace=False).tolist())]
        cell.rattle(stdev=0.08, seed=int(rng.integers(1 << 30)))
        out.append(emt_data._label(cell))
    return out


def make_batch(atoms_list: Sequence[Any], z_table: Any, cutoff: float) -> Any:
    """A MACE ``Batch`` (energies and forces from ``REF_energy`` / ``REF_forces``) in the default dtype."""
    from mace import data
    from mace.tools import torch_geometric

    keys = data.KeySpecification(info_keys={"energy": "REF_energy"}, arrays_keys={"forces": "REF_forces"})
    items = [
        data.AtomicData.from_config(data.config_from_atoms(a, key_specification=keys), z_table=z_table, cutoff=cutoff)
        for a in atoms_list
    ]
    return torch_geometric.Batch.from_data_list(items)


def build_model(cfg: BenchConfig, atoms_list: Sequence[Any], z_table: Any, avg_num_neighbors: float) -> torch.nn.Module:
    """A ScaleShiftMACE as ``mace_run_train --model MACE`` builds it, with MACE's defaults for everything
    the config does not set (Bessel basis, cutoff polynomial, max_ell, MLP irreps, gate, interactions)."""
    from e3nn import o3
    from mace import modules

    args = mace_default_args()
    energies = np.array([a.info["REF_energy"] / len(a) for a in atoms_list])
    forces = np.concatenate([a.arrays["REF_forces"].ravel() for a in atoms_list])
    irreps = " + ".join(f"{cfg.channels}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(cfg.max_L + 1))
    return modules.ScaleShiftMACE(
        r_max=cfg.r_max,
        num_bessel=args.num_radial_basis,
        num_polynomial_cutoff=args.num_cutoff_basis,
        max_ell=args.max_ell,
        interaction_cls=modules.interaction_classes[args.interaction],
        interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
        num_interactions=cfg.num_interactions,
        num_elements=len(z_table),
        hidden_irreps=o3.Irreps(irreps),
        MLP_irreps=o3.Irreps(args.MLP_irreps),
        atomic_energies=np.full(len(z_table), float(energies.mean())),
        avg_num_neighbors=avg_num_neighbors,
        atomic_numbers=list(z_table.zs),
        correlation=cfg.correlation,
        gate=modules.gate_dict[args.gate],
        radial_MLP=list(cfg.radial_mlp),
        radial_type=args.radial_type,
        atomic_inter_scale=float(np.sqrt(np.mean(forces**2))),
        atomic_inter_shift=0.0,
    )


@dataclasses.dataclass
class MethodState:
    """One method ready to step: its own model copy, its optimiser, its trainable parameter count."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trainable_params: int


def setup_method(name: str, base_model: torch.nn.Module, cfg: BenchConfig, args: Any) -> MethodState:
    """Deep-copy ``base_model`` and prepare it and its optimiser the way ``mace_run_train`` would."""
    from mace.tools.scripts_utils import get_optimizer, get_params_options

    model = copy.deepcopy(base_model)
    if name == "full":
        optimizer = get_optimizer(args, get_params_options(args, model))
    elif name == "sparse_str":
        from mace_sparse.config import SparseConfig
        from mace_sparse.optim import register_threshold_decay, sparse_param_groups
        from mace_sparse.sparse_model import get_sparse_model

        sparse_cfg = SparseConfig(targets=cfg.targets, granularity=cfg.granularity)
        model = get_sparse_model(model, sparse_cfg)
        options = get_params_options(args, model)
        options["params"] = sparse_param_groups(options["params"], model, sparse_cfg, args.lr)
        optimizer = register_threshold_decay(get_optimizer(args, options))
    elif name == "lora":
        from mace.modules.lora import inject_LoRAs

        model = inject_LoRAs(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        optimizer = get_optimizer(args, get_params_options(args, model))
    else:
        raise ValueError(f"unknown method {name!r}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return MethodState(name, model, optimizer, trainable)


def train_step(
    state: MethodState, loss_fn: torch.nn.Module, batch: Any, max_grad_norm: Optional[float], device: torch.device
) -> torch.Tensor:
    """One step exactly as ``mace.tools.train.take_step`` (no EMA, as MACE's default)."""
    model, optimizer = state.model, state.optimizer
    batch = batch.to(device)
    batch_dict = batch.to_dict()
    optimizer.zero_grad(set_to_none=True)
    output = model(batch_dict, training=True, compute_force=True, compute_virials=False, compute_stress=False)
    loss = loss_fn(pred=output, ref=batch)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=max_grad_norm)
    optimizer.step()
    return loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------------
# Timing (interleaved) and memory
# --------------------------------------------------------------------------------------------------------


def time_interleaved(
    states: Sequence[MethodState],
    step: Callable[[MethodState], Any],
    rounds: int,
    steps: int,
    device: torch.device,
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, Tuple[List[List[float]], List[List[float]]]]:
    """Per method, per round, the wall and process-CPU time (ms) of each step; the order rotates every round.

    ``log`` gets one line per round (the median step of each method so far), like MACE's per-epoch lines, so
    a long benchmark on a large model shows that it advances.

    CPU time is recorded next to wall time because on a shared machine the wall clock also counts the time
    other processes held the core; the process's own CPU time does not (it still feels cache and memory
    bandwidth contention). On CUDA only the wall time (with synchronisation) means anything.
    """
    times: Dict[str, Tuple[List[List[float]], List[List[float]]]] = {s.name: ([], []) for s in states}
    for r in range(rounds):
        order = list(states[r % len(states):]) + list(states[: r % len(states)])
        for state in order:
            wall, cpu = [], []
            for _ in range(steps):
                _sync(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                step(state)
                _sync(device)
                wall.append(1e3 * (time.perf_counter() - start))
                cpu.append(1e3 * (time.process_time() - start_cpu))
            times[state.name][0].append(wall)
            times[state.name][1].append(cpu)
        if log is not None:
            medians = ", ".join(
                f"{s.name}={statistics.median(t for block in times[s.name][0] for t in block):.1f} ms" for s in states
            )
            log(f"round {r + 1}/{rounds}: median step {medians}")
    return times


def _tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views counted once)."""
    seen: Dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def batch_bytes(batch: Any) -> int:
    return _tensor_bytes([v for v in batch.to_dict().values() if isinstance(v, torch.Tensor)])


def _profiler_nodes(prof: torch.profiler.profile) -> Iterator[Any]:
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children)


def peak_live_bytes_from_profile(prof: torch.profiler.profile, mark: str = _MEASURED_STEP) -> int:
    """Peak of the live CPU bytes allocated inside the profiling session, over the ``mark``-ed ranges.

    Allocation events are replayed in time order; a free only counts when its block was allocated inside the
    session (blocks from before it belong to someone else and their frees are not always reported).
    """
    from torch._C._profiler import _EventType

    events: List[Tuple[int, int, int]] = []
    windows: List[Tuple[int, int]] = []
    for node in _profiler_nodes(prof):
        if node.typed[0] == _EventType.Allocation:
            fields = node.typed[1]
            if fields.device.type == "cpu":
                events.append((node.start_time_ns, int(fields.ptr), int(fields.alloc_size)))
        elif node.name == mark:
            windows.append((node.start_time_ns, node.end_time_ns))
    if not windows:
        raise RuntimeError("the profiler recorded no measured step")
    events.sort(key=lambda e: e[0])
    starts = sorted(start for start, _ in windows)
    live: Dict[int, int] = {}
    current = peak = 0
    next_start = 0
    for t, ptr, size in events:
        # the bytes already live when a window opens count too
        while next_start < len(starts) and starts[next_start] <= t:
            peak = max(peak, current)
            next_start += 1
        if size > 0:
            live[ptr] = size
            current += size
        else:
            current -= live.pop(ptr, 0)
        if any(start <= t <= end for start, end in windows):
            peak = max(peak, current)
    if next_start < len(starts):
        peak = max(peak, current)
    return peak


def measure_peak_memory(
    name: str,
    base_model: torch.nn.Module,
    cfg: BenchConfig,
    args: Any,
    step: Callable[[MethodState], Any],
    device: torch.device,
) -> int:
    """Peak bytes a method owns during a training step (set-up from scratch; see the module docstring)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        zero = torch.cuda.memory_allocated(device)
        state = setup_method(name, base_model, cfg, args)
        step(state)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(cfg.memory_steps):
            step(state)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - zero
        del state
        gc.collect()
        return int(peak)
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        state = setup_method(name, base_model, cfg, args)
        step(state)
        for _ in range(cfg.memory_steps):
            with torch.profiler.record_function(_MEASURED_STEP):
                step(state)
    del state
    gc.collect()
    return peak_live_bytes_from_profile(prof)


# --------------------------------------------------------------------------------------------------------
# Where sparse_str's extra time goes (``--profile``)
# --------------------------------------------------------------------------------------------------------


def overhead_breakdown(full: MethodState, sparse: MethodState, device: torch.device, repeats: int = 20) -> Dict[str, float]:
    """Time, in isolation, each piece of work sparse_str adds to a step or does differently (ms).

    * ``reparam_forward``: the forward pre-hooks, i.e. W' = W + ΔW − clamp(ΔW, −δ, δ) for every adapted weight
      (with δ = sigmoid(s), gathered per path for ``path`` granularity), with autograd recording;
    * ``reparam_backward``: back-propagating a gradient from every W' to ΔW and s (what the extra autograd
      nodes cost in the step's backward pass);
    * ``optimizer_step`` / ``clip_grad_norm``: MACE's Adam step and gradient clipping over each method's
      trainable tensors (sparse_str has a ΔW *and* a score tensor per adapted weight: twice the tensors);
    * ``pre_step_hook``: the optimiser step pre-hook (ΔW gradient scaling when ``delta_eps`` > 0, and the
      decoupled λ_τ decay).

    Each value is the smallest process-CPU time (on CUDA: synchronised wall time) over ``repeats`` rounds, and
    the pieces are run round-robin, so a burst of load on a shared machine slows all pieces of a round
    rather than all repeats of one piece. The models' parameters are changed by the optimiser steps: run
    this after the timing, never before.
    """
    from mace_sparse import optim as sparse_optim
    from mace_sparse import reparametrization as rp

    pre_step = sparse_optim.sparse_pre_step  # what register_threshold_decay installs

    consumers = [m for m in sparse.model.modules() if m.__dict__.get(rp.HOOKED_ATTR)]
    adapted = list(rp.iter_reparametrized(sparse.model))
    trainable = {s.name: [p for p in s.model.parameters() if p.requires_grad] for s in (full, sparse)}
    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def build() -> List[torch.Tensor]:
        for module in consumers:
            rp.refresh(module)
        return [owner.__dict__[name] for _, owner, name in adapted]

    def release() -> None:
        for module in consumers:
            rp.detach_after_forward(module)
        for p in trainable[sparse.name]:
            p.grad = None

    def forward_backward() -> None:
        weights = build()
        torch.autograd.backward(weights, [torch.ones_like(w) for w in weights])

    pieces: Dict[str, Tuple[Callable[[], Any], Callable[[], Any], Callable[[], Any]]] = {
        # name: (setup, timed work, teardown)
        "reparam_forward": (lambda: None, build, release),
        "reparam_forward_backward": (lambda: None, forward_backward, release),
    }
    def set_grads(state: MethodState) -> Callable[[], None]:
        def run() -> None:
            for p in trainable[state.name]:
                p.grad = torch.full_like(p, 1e-6)

        return run

    def clip(state: MethodState) -> Callable[[], Any]:
        return lambda: torch.nn.utils.clip_grad_norm_(state.model.parameters(), max_norm=10.0)

    def clear(state: MethodState) -> Callable[[], None]:
        return lambda: state.optimizer.zero_grad(set_to_none=True)

    for state in (full, sparse):
        pieces[f"optimizer_step[{state.name}]"] = (set_grads(state), state.optimizer.step, clear(state))
        pieces[f"clip_grad_norm[{state.name}]"] = (set_grads(state), clip(state), clear(state))
    pieces["pre_step_hook"] = (set_grads(sparse), lambda: pre_step(sparse.optimizer), clear(sparse))

    best = {name: math.inf for name in pieces}
    for _ in range(repeats):
        for name, (setup, work, teardown) in pieces.items():
            setup()
            _sync(device)
            start = clock()
            work()
            _sync(device)
            best[name] = min(best[name], 1e3 * (clock() - start))
            teardown()
    forward = best.pop("reparam_forward")
    out = {"reparam_forward": forward, "reparam_backward": max(best.pop("reparam_forward_backward") - forward, 0.0)}
    out.update(best)
    out["adapted_tensors"] = float(len(adapted))
    out["hooked_modules"] = float(len(consumers))
    return out


def op_time_diff(
    full: MethodState, sparse: MethodState, step: Callable[[MethodState], Any], steps: int = 3, top: int = 15
) -> List[Dict[str, Any]]:
    """Per operator, self CPU ms per step (mean over ``steps`` profiled steps) of full vs sparse_str.

    Only operators that sparse_str runs a different number of times (its own: clamp and its backward,
    sigmoid, index / index_put for per-path δ, ...) and the optimiser step are returned, the ``top`` ones by
    extra time. Operators called equally often do the same work in both methods (the model's mm, bmm, ...)
    and their difference is measurement noise, which on a busy machine is larger than the whole overhead.
    Read it as a ranking: the profiler's own cost per call lands in the self time of small operators, so
    the sum of these rows overstates the overhead; :func:`overhead_breakdown` gives the magnitudes.
    """
    per_method: Dict[str, Dict[str, Tuple[float, float]]] = {}
    for state in (full, sparse):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step(state)
        per_method[state.name] = {
            event.key: (event.self_cpu_time_total / 1e3 / steps, event.count / steps) for event in prof.key_averages()
        }
    keys = set(per_method[full.name]) | set(per_method[sparse.name])
    rows = []
    for key in keys:
        f_ms, f_n = per_method[full.name].get(key, (0.0, 0))
        s_ms, s_n = per_method[sparse.name].get(key, (0.0, 0))
        if round(f_n) == round(s_n) and not key.startswith("Optimizer."):
            continue
        rows.append({"op": key, "full_ms": f_ms, "sparse_str_ms": s_ms, "extra_ms": s_ms - f_ms,
                     "full_calls": int(f_n), "sparse_str_calls": int(s_n)})
    rows.sort(key=lambda r: -r["extra_ms"])
    return rows[:top]


# --------------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------------


def default_threads() -> int:
    """The CPUs this process may run on (its affinity mask), not the machine's core count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _ratio(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    if value is None or reference is None or reference <= 0:
        return None
    return float(value) / float(reference)


def prepare(cfg: BenchConfig) -> Tuple[torch.nn.Module, Any, Dict[str, int]]:
    """The base model and the batch (in the current default dtype), plus the batch's size."""
    from mace.tools.utils import AtomicNumberTable

    if cfg.model_path is not None:
        model = torch.load(cfg.model_path, map_location="cpu", weights_only=False)
        model = model.to(torch.get_default_dtype())
        zs = [int(z) for z in model.atomic_numbers]
        from ase.data import chemical_symbols

        elements = [chemical_symbols[z] for z in zs if chemical_symbols[z] in ("Cu", "Ni", "Al")]
        if not elements:
            raise ValueError(
                f"--model: the model knows none of Cu, Ni, Al (its elements: {zs}); the EMT batch needs them"
            )
        atoms_list = emt_structures(cfg.batch_size, cfg.atoms, cfg.seed, elements)
        z_table = AtomicNumberTable(zs)
        cutoff = float(model.r_max)
        batch = make_batch(atoms_list, z_table, cutoff)
    else:
        atoms_list = emt_structures(cfg.batch_size, cfg.atoms, cfg.seed)
        z_table = AtomicNumberTable([13, 28, 29])
        batch = make_batch(atoms_list, z_table, cfg.r_max)
        _, receivers = batch.edge_index
        avg_num_neighbors = float(torch.bincount(receivers).float().mean())
        model = build_model(cfg, atoms_list, z_table, avg_num_neighbors)
    info = {
        "configs": int(batch.num_graphs),
        "atoms": int(batch.num_nodes),
        "edges": int(batch.edge_index.shape[1]),
        "model_params": int(sum(p.numel() for p in model.parameters())),
    }
    return model, batch, info


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = lambda _msg: None) -> BenchResult:
    """Set the three methods up on one model and batch, time them interleaved, measure their peak memory."""
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


def _run(cfg: BenchConfig, methods: List[str], device: torch.device, threads: int, log: Callable[[str], None]) -> BenchResult:
    from mace.modules.loss import WeightedEnergyForcesLoss

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
    environment = {
        "torch": torch.__version__,
        "mace": getattr(mace, "__version__", "?"),
        "python": platform.python_version(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
    }
    config = dataclasses.asdict(cfg)
    config["radial_mlp"] = list(cfg.radial_mlp)
    config["methods"] = list(methods)
    return BenchResult(
        config=config,
        environment=environment,
        batch=batch_info,
        methods=results,
        step_time_ratio=sparse.time_ratio if sparse else None,
        peak_memory_ratio=sparse.memory_ratio if sparse else None,
        breakdown=breakdown,
        op_diff=op_diff,
    )


# --------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------


def _fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def _verdict(ok: Optional[bool]) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def format_markdown(result: BenchResult) -> str:
    """Markdown table (one row per method) and the two headline ratios of sparse_str with PASS/MISS.

    The ratio of median wall-clock steps is the headline (as issue 2 asks). Next to it: the paired per-round
    ratio (median and interquartile range: how noisy the machine was) and the ratio of median CPU times
    (what the method costs when other processes take turns on the core).
    """
    b = result.batch
    env = result.environment
    lines = [
        f"model {b['model_params']:,} params; batch {b['configs']} configs / {b['atoms']} atoms / {b['edges']} edges; "
        f"{result.config['dtype']}; {env['device']}, {env['threads']} thread(s); "
        f"{result.config['rounds']} rounds x {result.config['steps']} steps per method, interleaved",
        "",
        "| method | trainable params | median step ms | × full | paired × full, median [IQR] | median CPU ms "
        "| × full | peak memory MB | × full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in result.methods.values():
        iqr = m.paired_ratio_iqr
        paired = f"{m.paired_ratio:.3f} [{iqr[0]:.3f}–{iqr[1]:.3f}]" if iqr else "n/a"
        lines.append(
            f"| {m.name} | {m.trainable_params:,} | {m.median_ms:.1f} | {_fmt(m.time_ratio, '.3f')} | {paired} | "
            f"{m.median_cpu_ms:.1f} | {_fmt(m.cpu_time_ratio, '.3f')} | {_fmt(m.peak_memory_mb, '.2f')} | "
            f"{_fmt(m.memory_ratio, '.3f')} |"
        )
    lines.append("")
    lines.append(
        f"step_time_ratio (sparse_str / full, median wall-clock step): {_fmt(result.step_time_ratio, '.3f')} "
        f"(limit {STEP_TIME_LIMIT:.2f}) {_verdict(result.step_time_pass)}"
    )
    lines.append(
        f"peak_memory_ratio (sparse_str / full): {_fmt(result.peak_memory_ratio, '.3f')} "
        f"(limit {PEAK_MEMORY_LIMIT:.2f}) {_verdict(result.peak_memory_pass)}"
    )
    if result.breakdown:
        bd = result.breakdown
        lines += [
            "",
            f"sparse_str extra work, timed in isolation (least CPU ms of 20 round-robin repeats; "
            f"{int(bd['adapted_tensors'])} adapted "
            f"tensors on {int(bd['hooked_modules'])} hooked modules):",
            "",
            "| piece | ms |",
            "|---|---:|",
        ]
        for key, value in bd.items():
            if key not in ("adapted_tensors", "hooked_modules"):
                lines.append(f"| {key} | {value:.2f} |")
    if result.op_diff:
        lines += [
            "",
            "operators sparse_str calls a different number of times, and the optimiser step, by extra self-CPU "
            f"time (mean of {result.config['profile_steps']} profiled steps each, ms per step):",
            "",
            "| operator | full ms | sparse_str ms | extra ms | calls full | calls sparse_str |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in result.op_diff:
            lines.append(
                f"| {row['op']} | {row['full_ms']:.2f} | {row['sparse_str_ms']:.2f} | {row['extra_ms']:+.2f} | "
                f"{row['full_calls']} | {row['sparse_str_calls']} |"
            )
    return "\n".join(lines)


def write_json(result: BenchResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return path
