"""The magnetic fine-tuning task: distorted and mixed-cation rocksalt MnO/FeO/CoO/NiO cells with magnetic moments.

Cells are 16- or 32-atom rocksalt supercells, strained and rattled harder than the inorganic foundation's source
data, half of them with random cation substitution ((Mn,Ni)O, (Fe,Co)O, ...). CHGNet labels energy, forces,
stress and per-atom magnetic moments; CHGNet's moments are unsigned magnitudes in μB (it sees geometry only, so
it cannot tell ↑ from ↓), stored as ``REF_magmoms``. CHGNet is a surrogate of Materials Project PBE/PBE+U.

Run ``python -m harness.data.magnetic_oxides [OUT_DIR]`` (default: ``mace_sparse/data/magnetic_oxides``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

from mace_sparse import data as bundled_data

SEED = 777
N_TRAIN, N_TEST = 150, 50
CATIONS = ("Mn", "Fe", "Co", "Ni")
#: Rocksalt lattice constants (Å) of the pure oxides; mixtures use the composition-weighted mean (Vegard).
LATTICE = {"Mn": 4.44, "Fe": 4.31, "Co": 4.26, "Ni": 4.18}
DEFAULT_DIR = bundled_data.path("magnetic_oxides")


def _cell(rng: np.random.Generator):
    """One seeded, unlabelled cell and its config_type (``pure`` or ``mixed``)."""
    from ase.build import bulk

    base = str(rng.choice(CATIONS))
    atoms = bulk(base + "O", "rocksalt", a=1.0, cubic=True) * ((2, 1, 1) if rng.random() < 0.5 else (2, 2, 1))
    symbols = atoms.get_chemical_symbols()
    cation_sites = [i for i, s in enumerate(symbols) if s != "O"]
    kind = "pure"
    if rng.random() < 0.5:
        kind = "mixed"
        other = str(rng.choice([c for c in CATIONS if c != base]))
        n_sub = max(1, int(round(rng.uniform(0.2, 0.5) * len(cation_sites))))
        for i in rng.choice(cation_sites, size=n_sub, replace=False):
            symbols[int(i)] = other
        atoms.set_chemical_symbols(symbols)
    a = float(np.mean([LATTICE[symbols[i]] for i in cation_sites]))
    eps = rng.normal(0.0, 0.03, (3, 3))
    atoms.set_cell(atoms.cell.array * a @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
    atoms.rattle(float(rng.uniform(0.04, 0.12)), seed=int(rng.integers(1 << 30)))
    return atoms, kind


def configs(n: int = N_TRAIN + N_TEST, seed: int = SEED) -> List:
    """``n`` unlabelled (atoms, config_type) pairs in a fixed order."""
    rng = np.random.default_rng(seed)
    return [_cell(rng) for _ in range(n)]


def main(argv: List[str] | None = None) -> Dict[str, Path]:
    """Write ``train.xyz`` (150) and ``test.xyz`` (50) and return their paths."""
    from harness.data._chgnet_label import label_all
    from harness.data._split import write_train_test

    labelled = label_all(configs())
    return write_train_test(labelled[:N_TRAIN], labelled[N_TRAIN:], DEFAULT_DIR, argv)


if __name__ == "__main__":
    main()
