"""An ASE calculator for ``<name>_magnetic.model``: energy, forces, stress and per-atom magnetic moments.

MACE's own ``MACECalculator`` returns a fixed set of properties, so moments need a calculator of their own.
This one is deliberately small: one structure per call, MACE's own data conversion, one forward pass that
yields every property.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Union

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.data import chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress

import mace  # noqa: F401  (before e3nn)

from ..mace_io import batch as mace_batch
from ..mace_io import heads, model_data, read_model_file, z_table
from .model import MagneticMACE


class MagneticModelError(ValueError):
    """The file given is not a model saved with a magnetic head."""


def load_magnetic_model(path: Union[str, Path], device: str = "cpu") -> MagneticMACE:
    """Load ``<name>_magnetic.model``; a plain MACE model or another file is refused with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise MagneticModelError(f"{path}: no such file; give the <name>_magnetic.model written by a run with --magmom_weight > 0")
    try:
        model = read_model_file(path, device)
    except Exception as exc:  # noqa: BLE001
        raise MagneticModelError(f"{path}: not a torch model file ({type(exc).__name__}); give a <name>_magnetic.model") from None
    if not isinstance(model, MagneticMACE):
        raise MagneticModelError(
            f"{path}: a {type(model).__name__}, not a model with a magnetic head; use the <name>_magnetic.model "
            "written next to <name>.model (plain MACE models are served by mace.calculators.MACECalculator)"
        )
    return model.to(device).eval()


class MagneticMACECalculator(Calculator):
    """ASE calculator: ``energy`` (eV), ``forces`` (eV/Å), ``stress`` (eV/Å³, periodic cells) and
    ``magmoms`` (μB per atom, magnitudes unless the head was trained ``--magmom_signed``).

    ``get_magnetic_moments()`` returns the per-atom moments; ``get_magnetic_moment()`` their sum.
    """

    implemented_properties: List[str] = ["energy", "free_energy", "forces", "stress", "magmoms", "magmom"]

    def __init__(self, model_path: Union[str, Path], device: str = "cpu", default_dtype: Optional[str] = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = load_magnetic_model(model_path, device)
        self.device = device
        parameter = next(self.model.parameters())
        self.dtype = {"float64": torch.float64, "float32": torch.float32}.get(default_dtype or "", parameter.dtype)
        self.model.to(self.dtype)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.r_max = float(self.model.r_max)
        self.z_table = z_table(self.model)
        self.heads = heads(self.model)

    def _batch(self, atoms: Any) -> dict:
        unknown = sorted(set(atoms.get_chemical_symbols()) - {_symbol(z) for z in self.z_table.zs})
        if unknown:
            raise ValueError(
                f"elements {', '.join(unknown)} are not in this model (it knows "
                f"{', '.join(_symbol(z) for z in self.z_table.zs)}); fine-tune on data that contains them"
            )
        graphs = model_data(self.model, [atoms], dtype=self.dtype, table=self.z_table)
        batch = mace_batch(graphs).to(self.device)
        return batch.to_dict()

    def calculate(self, atoms: Any = None, properties: Optional[List[str]] = None,
                  system_changes: List[str] = all_changes) -> None:
        super().calculate(atoms, properties or ["energy"], system_changes)
        batch = self._batch(self.atoms)
        periodic = bool(np.any(self.atoms.pbc)) and abs(self.atoms.cell.volume) > 0
        output = self.model(batch, training=False, compute_force=True, compute_stress=periodic)
        energy = float(output["energy"].detach().cpu().reshape(-1)[0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": output["forces"].detach().cpu().numpy().astype(float),
            "magmoms": output["magmoms"].detach().cpu().numpy().astype(float).reshape(-1),
        }
        self.results["magmom"] = float(self.results["magmoms"].sum())
        if periodic and output.get("stress") is not None:
            stress = output["stress"].detach().cpu().numpy().reshape(3, 3)
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)


def _symbol(z: int) -> str:
    return chemical_symbols[int(z)]
