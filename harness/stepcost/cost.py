"""Training-step time and peak memory of every method of a benchmark case, as ratios to full fine-tuning.

Measured in-process with the machinery of ``mace_sparse bench-step`` (:mod:`harness.stepcost`), not from the
``mace_run_train`` runs: the runs of one benchmark execute one after another (or side by side with ``--jobs``)
on a machine whose load drifts, so their wall times are not comparable to a few percent. Here every method is
set up on copies of the same step-0 model (the case's foundation as MACE configured it) and the same batch
(the first ``batch_size`` training configurations of the case), exactly as ``mace_run_train`` prepares it
(MACE's param groups and Adam; :func:`harness.stepcost.fixture.setup_method`), and timed interleaved round by
round; peak memory is the profiler-counted peak of live tensor bytes of a step (CUDA: ``max_memory_allocated``).
The two λ_τ presets of sparse_str share a measurement: λ_τ changes which entries move, not the work of a step.

The median epoch time of each real run (from MACE's log) is kept in the JSON next to these numbers.

A method is anything with the attributes of :class:`CostMethod` (the benchmark's ``Method`` records), so this
module does not depend on how the benchmark describes its methods.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import statistics
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch
from mace.modules.loss import WeightedEnergyForcesLoss

from mace_sparse.mace_io import default_dtype, z_table

from .fixture import MethodState, make_batch, mace_default_args, setup_method
from .memory import batch_bytes, measure_peak_memory
from .schema import BenchConfig
from .take_step import train_step
from .timing import time_interleaved

#: How each kind of benchmark method is set up for the step (``freeze`` is full fine-tuning with MACE's
#: ``--freeze``, see :func:`_setup`).
_SETUP_OF_KIND = {"full": "full", "lora": "lora", "sparse_str": "sparse_str", "freeze": "full"}


class CostMethod(Protocol):
    """What :func:`measure_step_costs` reads of a method."""

    kind: str
    targets: Optional[str]
    cost_key: Optional[str]


@dataclasses.dataclass
class StepCost:
    """Median wall-clock step (the table's figure), median process-CPU step (less sensitive to other processes
    on a shared machine; JSON only), peak live tensor bytes, trainable parameters."""

    median_ms: float
    peak_memory_bytes: Optional[int]
    trainable_params: int
    median_cpu_ms: Optional[float] = None


def _setup(kind: str, targets: Optional[str], args: Any, lora_rank: int, lora_alpha: float, freeze: int,
           granularity: str) -> Tuple[str, BenchConfig, Any]:
    """(set-up name of :func:`setup_method`, BenchConfig, MACE args) reproducing a method's training set-up.

    ``freeze`` is a full fine-tuning set-up with MACE's ``args.freeze`` set: MACE's own ``get_params_options``
    (called by :func:`setup_method`) then freezes the modules exactly as ``mace_run_train`` does.
    """
    cfg = BenchConfig(targets=targets or "all", granularity=granularity, lora_rank=lora_rank,
                      lora_alpha=lora_alpha, memory_steps=2)
    method_args = copy.copy(args)
    if kind == "freeze":
        method_args.freeze = freeze
    return _SETUP_OF_KIND[kind], cfg, method_args


def measure_step_costs(
    base_model: torch.nn.Module,
    frames: Sequence,
    methods: Sequence[CostMethod],
    lr: float,
    rounds: int = 10,
    warmup: int = 2,
    lora_rank: int = 4,
    lora_alpha: float = 1.0,
    freeze: int = 5,
    granularity: str = "layer",
    memory: bool = True,
    log: Callable[[str], None] = lambda _m: None,
) -> Dict[str, StepCost]:
    """Step cost per ``cost_key`` of ``methods`` (``full`` always included), on one core, float64."""
    by_key: Dict[str, Tuple[str, Optional[str]]] = {}
    for m in methods:
        if m.cost_key is not None:
            by_key.setdefault(m.cost_key, (m.kind, m.targets))
    if "full" not in by_key:
        by_key = {"full": ("full", None), **by_key}
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with default_dtype(torch.float64):
            base = copy.deepcopy(base_model).double()
            batch = make_batch(list(frames), z_table(base), float(base.r_max))
            args = mace_default_args()
            args.lr = lr
            loss_fn = WeightedEnergyForcesLoss(energy_weight=args.energy_weight, forces_weight=args.forces_weight)

            def step(state: MethodState) -> torch.Tensor:
                return train_step(state, loss_fn, batch, args.clip_grad, cpu)

            setups = {key: _setup(kind, targets, args, lora_rank, lora_alpha, freeze, granularity)
                      for key, (kind, targets) in by_key.items()}
            states: List[MethodState] = []
            for key, (name, cfg, margs) in setups.items():
                state = dataclasses.replace(setup_method(name, base, cfg, margs), name=key)
                for _ in range(warmup):
                    step(state)
                states.append(state)
            log(f"timing {len(states)} step set-ups ({', '.join(setups)}): {rounds} interleaved rounds")
            times = time_interleaved(states, step, rounds, 1, cpu)
            trainable = {s.name: s.trainable_params for s in states}
            del states
            gc.collect()
            out: Dict[str, StepCost] = {}
            for key, (name, cfg, margs) in setups.items():
                wall = [t for block in times[key][0] for t in block]
                cpu_ms = [t for block in times[key][1] for t in block]
                peak = None
                if memory:
                    peak = measure_peak_memory(name, base, cfg, margs, step, cpu) + batch_bytes(batch)
                out[key] = StepCost(statistics.median(wall), peak, trainable[key], statistics.median(cpu_ms))
    finally:
        torch.set_num_threads(threads)
    return out
