"""Label molecules with tblite's xTB methods and sample them by Langevin MD: shared by the organic data sets.

The organic foundation is trained on GFN2-xTB and the rMD17-like task is labelled with GFN1-xTB, so one helper
takes the method as an argument. MD is driven by the same method that labels the frames, with a seeded Langevin
thermostat, so every frame is a fair sample of that method's own potential energy surface.
"""

from __future__ import annotations

from typing import List

import numpy as np


def calculator(method: str):
    """A quiet tblite calculator (``method`` is ``"GFN2-xTB"`` or ``"GFN1-xTB"``), closed shell, neutral."""
    from tblite.ase import TBLite

    return TBLite(method=method, verbosity=0)


def label(atoms, method: str, config_type: str, calc=None):
    """Attach REF_energy, REF_forces and config_type computed with ``method``; drop the calculator."""
    atoms = atoms.copy()
    atoms.calc = calc or calculator(method)
    energy = float(atoms.get_potential_energy())
    forces = np.array(atoms.get_forces())
    atoms.calc = None
    atoms.info = {"config_type": config_type, "REF_energy": energy}
    atoms.arrays = {k: v for k, v in atoms.arrays.items() if k in ("numbers", "positions")}
    atoms.arrays["REF_forces"] = forces
    return atoms


def md_frames(atoms, method: str, n_frames: int, every: int, seed: int, config_type: str,
              temperature_k: float = 500.0, timestep_fs: float = 0.5, equilibrate: int = 100) -> List:
    """Run seeded Langevin MD with ``method`` and return ``n_frames`` labelled frames taken every ``every`` steps."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation

    rng = np.random.RandomState(seed)
    atoms = atoms.copy()
    atoms.info = {}
    calc = calculator(method)
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    dyn = Langevin(atoms, timestep=timestep_fs * units.fs, temperature_K=temperature_k, friction=0.02 / units.fs,
                   fixcm=False, rng=rng)  # free molecules: a drifting centre of mass changes nothing
    dyn.run(equilibrate)
    frames = []
    for _ in range(n_frames):
        dyn.run(every)
        frame = atoms.copy()
        frame.calc = None
        frames.append(label(frame, method, config_type, calc))
    return frames
