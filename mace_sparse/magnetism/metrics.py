"""Moment errors (MAE and RMSE in μB) inside MACE's own metric object, so they reach the validation log,
``results/*.txt`` and the final error tables from the same evaluation pass MACE already runs."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from .loss import moment_targets


def magnetic_metric_class(base: type, signed: bool) -> type:
    """A subclass of MACE's ``MACELoss`` metric that also accumulates per-atom moment errors."""

    class MagneticMACELoss(base):  # type: ignore[misc, valid-type]
        def __init__(self, loss_fn: torch.nn.Module) -> None:
            super().__init__(loss_fn=loss_fn)
            self.add_state("delta_magmoms", default=[], dist_reduce_fx="cat")

        def update(self, batch: Any, output: Dict[str, Any]) -> None:  # noqa: D401
            super().update(batch, output)
            targets = moment_targets(batch, output, signed)
            if targets is not None:
                predicted, reference, weights = targets
                labelled = weights > 0
                self.delta_magmoms.append((reference - predicted)[labelled].detach())

        def compute(self):
            loss, aux = super().compute()
            aux.update(moment_errors(self.delta_magmoms))
            return loss, aux

    MagneticMACELoss.__qualname__ = f"Magnetic{base.__name__}"
    return MagneticMACELoss


def moment_errors(deltas: Any) -> Dict[str, Optional[float]]:
    """``mae_magmom`` / ``rmse_magmom`` in μB, ``None`` when no labelled atom was seen."""
    if isinstance(deltas, list):
        deltas = torch.cat(deltas) if deltas else None
    if deltas is None or deltas.numel() == 0:
        return {"mae_magmom": None, "rmse_magmom": None}
    return {
        "mae_magmom": float(deltas.abs().mean()),
        "rmse_magmom": float(torch.sqrt(torch.square(deltas).mean())),
    }


def log_suffix(eval_metrics: Dict[str, Any]) -> str:
    """Text appended to MACE's validation line."""
    mae, rmse = eval_metrics.get("mae_magmom"), eval_metrics.get("rmse_magmom")
    if mae is None or rmse is None:
        return ""
    return f", MAE_magmom={mae:.4f} muB, RMSE_magmom={rmse:.4f} muB"


def add_moment_columns(table: Any, metrics: List[Dict[str, Any]]) -> Any:
    """Append MAE/RMSE moment columns to one of MACE's PrettyTable error tables (one metric dict per row)."""
    if len(metrics) != len(table.rows):
        return table

    def cell(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.4f}"

    table.add_column("MAE magmom / muB", [cell(m.get("mae_magmom")) for m in metrics])
    table.add_column("RMSE magmom / muB", [cell(m.get("rmse_magmom")) for m in metrics])
    return table
