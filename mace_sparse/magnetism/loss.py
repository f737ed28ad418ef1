"""The moment term added to MACE's loss, and the per-atom errors used by metrics.

Atoms of frames that carry no moments have weight 0 (see :mod:`.data`), so mixed batches are fine; the term
is a weighted mean over the atoms that do carry moments, which keeps its size independent of how many
unlabelled frames share the batch.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from .config import MagneticConfig


def moment_targets(ref: Any, pred: dict, signed: bool) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(predicted, reference, per-atom weight) as flat tensors, or ``None`` when either side lacks moments."""
    reference = getattr(ref, "magmoms", None) if not isinstance(ref, dict) else ref.get("magmoms")
    predicted = pred.get("magmoms")
    if reference is None or predicted is None:
        return None
    reference = reference.reshape(-1).to(predicted.dtype)
    if not signed:
        reference = reference.abs()
    weights = ref["magmoms_weight"].reshape(-1).to(predicted.dtype)
    batch_index = ref["batch"]
    weights = weights * ref["weight"].to(predicted.dtype)[batch_index]
    return predicted.reshape(-1), reference, weights


class MagneticLoss(torch.nn.Module):
    """MACE's loss plus ``weight ×`` the weighted mean moment error (MSE or Huber, in μB²)."""

    def __init__(self, base: torch.nn.Module, config: MagneticConfig):
        super().__init__()
        self.base = base
        self.config = config

    def forward(self, ref: Any, pred: dict, ddp: Optional[bool] = None) -> torch.Tensor:
        loss = self.base(ref=ref, pred=pred, ddp=ddp)
        targets = moment_targets(ref, pred, self.config.signed)
        if targets is None:
            return loss
        predicted, reference, weights = targets
        if self.config.loss == "huber":
            per_atom = torch.nn.functional.huber_loss(
                predicted, reference, reduction="none", delta=self.config.huber_delta
            )
        else:
            per_atom = torch.square(predicted - reference)
        total = weights.sum()
        term = torch.where(total > 0, (weights * per_atom).sum() / total.clamp_min(1e-12), total * 0)
        return loss + self.config.weight * term

    def __repr__(self) -> str:
        c = self.config
        return f"MagneticLoss(base={self.base!r}, magmom_weight={c.weight}, loss={c.loss}, signed={c.signed})"
