"""Energy and force errors of a MACE ``.model`` file on labelled extxyz frames, for the cards and the tests.

Kept apart from ``mace_run_train``'s own error table so that a card can report the same MAE definition that the
tests check: energy MAE per atom (meV/atom) and force-component MAE and RMSE (meV/Å).
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np


def predict(model_path: str, frames: List) -> List[Dict[str, np.ndarray]]:
    """Energy and forces of every frame with the model in ``model_path`` (float64, CPU)."""
    import mace  # noqa: F401  (before e3nn)
    from mace.calculators import MACECalculator

    calc = MACECalculator(model_paths=str(model_path), device="cpu", default_dtype="float64")
    out = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calc
        out.append({"energy": float(atoms.get_potential_energy()), "forces": np.array(atoms.get_forces())})
    return out


def errors(model_path: str, frames: List, energy_key: str = "REF_energy", forces_key: str = "REF_forces") -> Dict:
    """MAE of energy per atom (meV/atom) and MAE/RMSE of force components (meV/Å) over ``frames``."""
    preds = predict(model_path, frames)
    de = [abs(p["energy"] - a.info[energy_key]) / len(a) for p, a in zip(preds, frames)]
    df = np.concatenate([(p["forces"] - a.arrays[forces_key]).ravel() for p, a in zip(preds, frames)])
    return {
        "n_configs": len(frames),
        "energy_mae_mev_per_atom": 1000 * float(np.mean(de)),
        "forces_mae_mev_per_A": 1000 * float(np.mean(np.abs(df))),
        "forces_rmse_mev_per_A": 1000 * float(np.sqrt(np.mean(df ** 2))),
    }
