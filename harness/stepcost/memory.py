"""Peak memory of a training step: the bytes of tensors a method owns at their peak, counted alike on every device.

What is counted: the method's model copy and reparameterisation, gradients, optimiser state, activations and
temporaries at their peak during a step (the batch, shared, is added once for everyone by the caller:
:func:`batch_bytes`). Every method is set up from scratch for the measurement, one at a time, after the timing
(so global caches such as e3nn's are already warm and charged to nobody).

* CUDA: the allocator's own counters. ``memory_allocated()`` before the method is set up is the zero point;
  after one warm-up step (which creates Adam's state) the peak counter is reset and ``max_memory_allocated()``
  over the measured steps is read.
* CPU has no allocator peak counter, and process RSS is the wrong instrument: glibc keeps freed blocks, serves
  large ones with ``mmap`` and returns them at its own pace, so ``ru_maxrss`` differences of a few MB are
  allocator policy, not tensors. Instead the method is set up *and* stepped inside one
  ``torch.profiler.profile(profile_memory=True)`` session, which records every allocation and free of torch's
  CPU allocator (pointer and size). Replaying those events in time order gives the exact live bytes the method
  owns at every instant; the peak is taken over the measured steps, marked with ``record_function``. This
  counts tensor storage exactly as ``max_memory_allocated`` does on CUDA (both exclude allocator
  fragmentation, Python objects and code).

The replay reads the profiler's event tree through torch's **private** API, all of it in one function
(:func:`_allocations_and_marks`): torch offers no public access to individual allocation events. It was last
checked with torch 2.13.0; if a torch release changes that API, the CPU measurement stops with one line saying
so (``--no-memory`` or a CUDA device still work).
"""

from __future__ import annotations

import gc
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

from .fixture import MethodState, setup_method
from .schema import BenchConfig

#: ``record_function`` label of the steps whose memory peak is measured.
MEASURED_STEP = "mace_sparse_bench::measured_step"


def _tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views counted once)."""
    seen: Dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def batch_bytes(batch: Any) -> int:
    """Bytes of the batch's tensors (shared by all methods, so added once to each method's peak)."""
    return _tensor_bytes([v for v in batch.to_dict().values() if isinstance(v, torch.Tensor)])


def _api_changed(exc: Exception) -> RuntimeError:
    """The one-line error of the version guard (see the module docstring)."""
    return RuntimeError(
        f"torch {torch.__version__} changed the private profiler API the CPU peak-memory replay reads "
        f"({type(exc).__name__}: {exc}); run with --no-memory, or on a CUDA device"
    )


def _allocations_and_marks(prof: torch.profiler.profile, mark: str) -> Tuple[List[Tuple[int, int, int]],
                                                                            List[Tuple[int, int]]]:
    """The session's CPU allocation events ``(time ns, pointer, size; negative: a free)`` and the ``(start, end)``
    of every ``mark``-ed range, read from the profiler's event tree.

    All of the replay's use of torch's private profiler API is here: ``_EventType``,
    ``kineto_results.experimental_event_tree()`` and the nodes' ``typed`` fields.
    """
    events: List[Tuple[int, int, int]] = []
    windows: List[Tuple[int, int]] = []
    try:
        # imported here, not at the top, so that a torch without it fails only the CPU memory measurement
        from torch._C._profiler import _EventType

        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.typed[0] == _EventType.Allocation:
                fields = node.typed[1]
                if fields.device.type == "cpu":
                    events.append((node.start_time_ns, int(fields.ptr), int(fields.alloc_size)))
            elif node.name == mark:
                windows.append((node.start_time_ns, node.end_time_ns))
    except (ImportError, AttributeError, IndexError, TypeError) as exc:
        raise _api_changed(exc) from exc
    return events, windows


def peak_live_bytes_from_profile(prof: torch.profiler.profile, mark: str = MEASURED_STEP) -> int:
    """Peak of the live CPU bytes allocated inside the profiling session, over the ``mark``-ed ranges.

    Allocation events are replayed in time order; a free only counts when its block was allocated inside the
    session (blocks from before it belong to someone else and their frees are not always reported).
    """
    events, windows = _allocations_and_marks(prof, mark)
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
    """Peak bytes method ``name`` owns during a training step (set up from scratch; see the module docstring)."""
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
            with torch.profiler.record_function(MEASURED_STEP):
                step(state)
    del state
    gc.collect()
    return peak_live_bytes_from_profile(prof)
