"""Label periodic cells with CHGNet: the one place that knows how CHGNet's outputs map to extxyz keys.

CHGNet (weights inside the ``chgnet`` wheel) is a universal potential fitted to Materials Project PBE/PBE+U
relaxations, so its labels are a surrogate of that level of theory, not DFT. Its ASE calculator returns stress in
eV/Å³ with ASE's sign convention and unsigned magnetic moments (μB) per atom.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable, List

import numpy as np


@lru_cache(maxsize=1)
def _calculator():
    """One CHGNet calculator per process (loading the weights takes seconds)."""
    import torch
    from chgnet.model.dynamics import CHGNetCalculator

    torch.manual_seed(0)
    return CHGNetCalculator(use_device="cpu", on_isolated_atoms="ignore")


def label(atoms, config_type: str):
    """Attach REF_energy, REF_forces, REF_stress (periodic cells), REF_magmoms and config_type; drop the calculator."""
    calc = _calculator()
    atoms.calc = calc
    energy = float(atoms.get_potential_energy())
    forces = np.array(atoms.get_forces())
    magmoms = np.array(calc.results["magmoms"], dtype=float).reshape(-1)
    stress = np.array(atoms.get_stress(voigt=True)) if atoms.pbc.all() else None
    atoms.calc = None
    atoms.info = {"config_type": config_type, "REF_energy": energy}
    if stress is not None:
        atoms.info["REF_stress"] = stress
    atoms.arrays["REF_forces"] = forces
    atoms.arrays["REF_magmoms"] = magmoms
    return atoms


def label_all(configs: Iterable) -> List:
    """Label a list of (atoms, config_type) pairs in order."""
    return [label(atoms, kind) for atoms, kind in configs]
