"""``MagneticMACE``: the saved form of a MACE model plus its moment head (``<name>_magnetic.model``).

A wrapper, not a subclass: ``.mace`` is the plain MACE model (bit-identical to ``<name>.model``), so the
energy/force part can always be taken out and used with MACE's own tools.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from .head import MagneticHead


class MagneticMACE(torch.nn.Module):
    """MACE energy/forces/stress plus ``magmoms`` (μB per atom) from one forward pass."""

    def __init__(self, mace_model: torch.nn.Module, head: MagneticHead):
        super().__init__()
        self.mace = mace_model
        self.magnetic_head = head

    @property
    def r_max(self) -> torch.Tensor:
        return self.mace.r_max

    @property
    def atomic_numbers(self) -> torch.Tensor:
        return self.mace.atomic_numbers

    @property
    def heads(self) -> Any:
        return getattr(self.mace, "heads", ["Default"])

    def forward(self, data: Dict[str, torch.Tensor], **kwargs: Any) -> Dict[str, Any]:
        output = self.mace(data, **kwargs)
        output["magmoms"] = self.magnetic_head(output["node_feats"], data["node_attrs"])
        return output
