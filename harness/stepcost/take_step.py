"""One training step, as ``mace_run_train`` takes it: MACE's own ``mace.tools.train.take_step``, called, not copied.

What a "step" is (mace-torch 0.3.16, ``mace/tools/train.py``): ``zero_grad(set_to_none=True)``, forward with
``training=True, compute_force=True``, the loss, ``backward``, gradient clipping to ``max_grad_norm``
(``--clip_grad``, 10 by default), the optimiser step and the EMA update (none here: MACE's default is no EMA).
MACE's function also moves the batch to the device (a no-op for a batch already there) and turns the loss into
a numpy scalar for its log (one device sync per step on CUDA, paid alike by every method). Calling it rather
than a copy keeps the benchmark's step the training loop's step if MACE changes it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from mace.tools.train import take_step

from .fixture import MethodState

#: What the step computes: energies and forces (MACE's ``output_args`` for an energy/forces loss).
OUTPUT_ARGS = {"forces": True, "virials": False, "stress": False}


def train_step(
    state: MethodState, loss_fn: torch.nn.Module, batch: Any, max_grad_norm: Optional[float], device: torch.device
) -> torch.Tensor:
    """One step of ``state``'s model and optimiser on ``batch`` (MACE's ``take_step``, no EMA); the loss."""
    loss, _ = take_step(
        model=state.model,
        loss_fn=loss_fn,
        batch=batch,
        optimizer=state.optimizer,
        ema=None,
        output_args=OUTPUT_ARGS,
        max_grad_norm=max_grad_norm,
        device=device,
    )
    return loss.detach()


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a clock read after it times the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
