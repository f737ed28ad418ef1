"""What the magnetic-moment head is asked to do: the four ``--magmom*`` flags as one validated record."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

MAGMOM_LOSSES = ("mse", "huber")
#: extxyz columns that ASE turns into calculator results on reading (they never reach ``atoms.arrays``)
ASE_RESERVED_KEYS = ("magmoms", "magmom", "forces", "charges", "energies")


class MagneticConfigError(ValueError):
    """A magnetic-head setting that cannot work; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class MagneticConfig:
    """Settings of the per-atom magnetic-moment head.

    ``weight`` is the loss weight of the moments next to MACE's energy/force terms; the head exists only when
    it is positive. ``signed`` is off by default because a head that sees only the geometry cannot tell a
    ↑↓ arrangement from ↓↑: it predicts magnitudes |m| and compares them with |m_ref|.
    """

    key: str = "REF_magmoms"
    weight: float = 0.0
    loss: str = "mse"
    huber_delta: float = 0.01
    signed: bool = False
    hidden: int = 64
    head_lr: Optional[float] = None

    def __post_init__(self) -> None:
        if not self.key:
            raise MagneticConfigError("--magmoms_key is empty; give the name of the per-atom array, e.g. REF_magmoms")
        if self.key in ASE_RESERVED_KEYS:
            raise MagneticConfigError(
                f"--magmoms_key {self.key}: ASE reads an extxyz column of that name as calculator results, not as a "
                "per-atom array, so MACE never sees it; rename the column (e.g. REF_magmoms) and pass that name"
            )
        if not math.isfinite(self.weight) or self.weight < 0:
            raise MagneticConfigError(f"--magmom_weight must be >= 0 (got {self.weight}); 0 switches the head off")
        if self.loss not in MAGMOM_LOSSES:
            raise MagneticConfigError(f"--magmom_loss must be one of {', '.join(MAGMOM_LOSSES)} (got {self.loss!r})")
        if not (math.isfinite(self.huber_delta) and self.huber_delta > 0):
            raise MagneticConfigError(f"--magmom_huber_delta must be > 0 (got {self.huber_delta})")
        if self.head_lr is not None and not (math.isfinite(self.head_lr) and self.head_lr > 0):
            raise MagneticConfigError(f"--magmom_head_lr must be > 0 (got {self.head_lr}); omit it to use --lr")
        if self.hidden < 1:
            raise MagneticConfigError(f"--magmom_head_hidden must be >= 1 (got {self.hidden})")

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
