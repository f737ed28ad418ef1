"""What the magnetic-moment head is asked to do: the ``--magmom*`` flags as one validated record.

Each field is the one declaration of its setting: default, flag, help and valid range (:mod:`mace_sparse.flags`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

from ..flags import check_settings, setting

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

    flag_prefix: ClassVar[str] = "magmom_"  # the flags are --magmom_<field> (mace_sparse.flags)

    key: str = setting(
        "REF_magmoms", flag="magmoms_key",
        help="per-atom extxyz array with the reference moments in muB (frames without it get weight 0)",
    )
    weight: float = setting(
        0.0, at_least=0.0, why="; 0 switches the head off",
        help="loss weight of the moments; the head is trained (and saved as <name>_magnetic.model) when > 0",
    )
    loss: str = setting("mse", choices=MAGMOM_LOSSES, help="per-atom moment loss")
    huber_delta: float = setting(0.01, above=0.0, help="delta of the Huber moment loss, in muB")
    signed: bool = setting(
        False, switch="store_true",
        help="predict signed moments (default: magnitudes; geometry alone cannot tell up-down from down-up)",
    )
    hidden: int = setting(
        64, flag="magmom_head_hidden", at_least=1, help="width of the moment head's hidden layers",
    )
    head_lr: Optional[float] = setting(
        None, above=0.0, why="; omit it to use --lr",
        help="learning rate of the moment head's own optimizer group (default: --lr)",
    )

    def __post_init__(self) -> None:
        if not self.key:
            raise MagneticConfigError("--magmoms_key is empty; give the name of the per-atom array, e.g. REF_magmoms")
        if self.key in ASE_RESERVED_KEYS:
            raise MagneticConfigError(
                f"--magmoms_key {self.key}: ASE reads an extxyz column of that name as calculator results, not as a "
                "per-atom array, so MACE never sees it; rename the column (e.g. REF_magmoms) and pass that name"
            )
        check_settings(self, MagneticConfigError, template="{flag} must {condition} (got {value}){why}")

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
