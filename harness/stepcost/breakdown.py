"""Where sparse_str's extra step time goes (``mace_sparse bench-step --profile``).

What sparse_str adds to a step: per adapted weight, the pre-hook's sigmoid / per-path gather / clamp / sub /
add and their backward nodes, and a second (tiny) trainable tensor, the score, for Adam and gradient clipping.
All of it scales with the number of adapted weights, none with atoms or edges, so the ratio is worst for small
batches — which is why the default batch is small.

Two views: :func:`overhead_breakdown` times each piece of that work in isolation (the table of
:data:`PHASES`), and :func:`op_time_diff` ranks the operators whose call counts differ between full and
sparse_str in the torch profiler.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Dict, List, Tuple

import torch

from mace_sparse import reparametrization as rp
from mace_sparse.optim import sparse_pre_step

from .fixture import MethodState
from .take_step import sync


@dataclasses.dataclass
class _Subject:
    """A method's state and what its phases touch: trainable tensors, hooked modules, adapted weights."""

    state: MethodState
    trainable: List[torch.Tensor]
    consumers: List[torch.nn.Module]
    adapted: List[Tuple[str, torch.nn.Module, str]]

    @classmethod
    def of(cls, state: MethodState) -> "_Subject":
        return cls(
            state=state,
            trainable=[p for p in state.model.parameters() if p.requires_grad],
            consumers=[m for m in state.model.modules() if m.__dict__.get(rp.HOOKED_ATTR)],
            adapted=list(rp.iter_reparametrized(state.model)),
        )


def _nothing(_s: _Subject) -> None:
    pass


def _reparam_forward(s: _Subject) -> List[torch.Tensor]:
    """The forward pre-hooks: W' = W + ΔW − clamp(ΔW, −δ, δ) for every adapted weight, autograd recording."""
    for module in s.consumers:
        rp.refresh(module)
    return [owner.__dict__[name] for _, owner, name in s.adapted]


def _reparam_forward_backward(s: _Subject) -> None:
    weights = _reparam_forward(s)
    torch.autograd.backward(weights, [torch.ones_like(w) for w in weights])


def _release(s: _Subject) -> None:
    for module in s.consumers:
        rp.detach_after_forward(module)
    for p in s.trainable:
        p.grad = None


def _fill_grads(s: _Subject) -> None:
    for p in s.trainable:
        p.grad = torch.full_like(p, 1e-6)


def _clear_grads(s: _Subject) -> None:
    s.state.optimizer.zero_grad(set_to_none=True)


def _optimizer_step(s: _Subject) -> None:
    s.state.optimizer.step()


def _clip_grad_norm(s: _Subject) -> None:
    torch.nn.utils.clip_grad_norm_(s.state.model.parameters(), max_norm=10.0)


def _pre_step_hook(s: _Subject) -> None:
    sparse_pre_step(s.state.optimizer)  # what register_threshold_decay installs


@dataclasses.dataclass(frozen=True)
class Phase:
    """One piece of work, timed alone: on whose state, what sets it up, what is timed, what cleans up."""

    name: str
    method: str
    setup: Callable[[_Subject], Any]
    work: Callable[[_Subject], Any]
    teardown: Callable[[_Subject], Any]


#: The pieces, in the order they are reported. ``reparam_forward_backward`` is reported as ``reparam_backward``
#: (its time less ``reparam_forward``'s): back-propagating a gradient from every W' to ΔW and s, what the extra
#: autograd nodes cost in the step's backward pass. ``optimizer_step`` / ``clip_grad_norm`` are MACE's Adam step
#: and gradient clipping over each method's trainable tensors (sparse_str has a ΔW *and* a score tensor per
#: adapted weight: twice the tensors); ``pre_step_hook`` is the optimiser step pre-hook (ΔW gradient scaling
#: when ``delta_eps`` > 0, and the decoupled λ_τ decay).
PHASES: Tuple[Phase, ...] = (
    Phase("reparam_forward", "sparse_str", _nothing, _reparam_forward, _release),
    Phase("reparam_forward_backward", "sparse_str", _nothing, _reparam_forward_backward, _release),
    Phase("optimizer_step[full]", "full", _fill_grads, _optimizer_step, _clear_grads),
    Phase("clip_grad_norm[full]", "full", _fill_grads, _clip_grad_norm, _clear_grads),
    Phase("optimizer_step[sparse_str]", "sparse_str", _fill_grads, _optimizer_step, _clear_grads),
    Phase("clip_grad_norm[sparse_str]", "sparse_str", _fill_grads, _clip_grad_norm, _clear_grads),
    Phase("pre_step_hook", "sparse_str", _fill_grads, _pre_step_hook, _clear_grads),
)


def overhead_breakdown(full: MethodState, sparse: MethodState, device: torch.device, repeats: int = 20) -> Dict[str, float]:
    """Time, in isolation, each of :data:`PHASES` (ms), plus the counts of adapted tensors and hooked modules.

    Each value is the smallest process-CPU time (on CUDA: synchronised wall time) over ``repeats`` rounds, and
    the phases are run round-robin, so a burst of load on a shared machine slows all phases of a round rather
    than all repeats of one phase. The models' parameters are changed by the optimiser steps: run this after
    the timing, never before.
    """
    subjects = {"full": _Subject.of(full), "sparse_str": _Subject.of(sparse)}
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    best = {phase.name: math.inf for phase in PHASES}
    for _ in range(repeats):
        for phase in PHASES:
            subject = subjects[phase.method]
            phase.setup(subject)
            sync(device)
            start = clock()
            phase.work(subject)
            sync(device)
            best[phase.name] = min(best[phase.name], 1e3 * (clock() - start))
            phase.teardown(subject)
    forward = best.pop("reparam_forward")
    out = {"reparam_forward": forward, "reparam_backward": max(best.pop("reparam_forward_backward") - forward, 0.0)}
    out.update(best)
    out["adapted_tensors"] = float(len(subjects["sparse_str"].adapted))
    out["hooked_modules"] = float(len(subjects["sparse_str"].consumers))
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
