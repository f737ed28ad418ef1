"""Source domain of the bundled inorganic foundation: small metal and rocksalt-oxide cells labelled by CHGNet.

The foundation must know Al, Cu, Ni, Fe, Co, Mn and O near equilibrium (bulk, strained, rattled, vacancy and
surface cells) so that the magnetic-oxide task (``magnetic_oxides``: larger, more distorted and mixed-cation cells)
is a real shift in distribution. Labels come from CHGNet, a surrogate of Materials Project PBE/PBE+U; CHGNet's
unsigned magnetic moments are stored as ``REF_magmoms`` but the foundation is not trained on them.

Run ``python -m harness.data.inorganic_data [OUT_DIR]`` (default: ``mace_sparse/data/inorganic``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

from mace_sparse import data as bundled_data

SEED = 20261123
N_PER_MATERIAL = 40
TEST_FRACTION = 0.2
DEFAULT_DIR = bundled_data.path("inorganic")

#: (builder name, lattice constant(s) in Å); experimental/PBE-like values are enough: strain and rattling follow.
METALS: Dict[str, Tuple[str, float]] = {
    "Al": ("fcc", 4.04), "Cu": ("fcc", 3.63), "Ni": ("fcc", 3.52), "Fe": ("bcc", 2.83),
    "Co": ("hcp", 2.50), "Mn": ("fcc", 3.60),
}
ROCKSALT: Dict[str, float] = {"MnO": 4.44, "FeO": 4.31, "CoO": 4.26, "NiO": 4.18}


def _metal_cell(symbol: str):
    from ase.build import bulk

    kind, a = METALS[symbol]
    if kind == "hcp":
        return bulk(symbol, "hcp", a=a, c=1.62 * a, orthorhombic=True)  # 4 atoms
    return bulk(symbol, kind, a=a, cubic=True)  # fcc 4, bcc 2 atoms


def _oxide_cell(formula: str):
    from ase.build import bulk

    return bulk(formula[:-1] + "O", "rocksalt", a=ROCKSALT[formula], cubic=True)  # 8 atoms


def _base(material: str):
    return _oxide_cell(material) if material in ROCKSALT else _metal_cell(material)


def _supercell(material: str, rng: np.random.Generator):
    """Repeat the conventional cell to 8–24 atoms (oxides 8 or 16, metals 8–16)."""
    atoms = _base(material)
    n = len(atoms)
    options = [r for r in [(1, 1, 1), (2, 1, 1), (2, 2, 1), (2, 2, 2), (3, 1, 1)] if 8 <= n * np.prod(r) <= 24]
    return atoms * options[int(rng.integers(len(options)))]


def _strain(atoms, rng: np.random.Generator, scale: float):
    eps = rng.normal(0.0, scale, (3, 3))
    eps = 0.5 * (eps + eps.T)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    return atoms


def _bulk(material, rng):
    return _strain(_supercell(material, rng), rng, 0.005), "bulk"


def _strained(material, rng):
    atoms = _strain(_supercell(material, rng), rng, 0.03)
    atoms.rattle(0.02, seed=int(rng.integers(1 << 30)))
    return atoms, "strained"


def _rattled(material, rng):
    atoms = _strain(_supercell(material, rng), rng, 0.01)
    atoms.rattle(float(rng.uniform(0.04, 0.12)), seed=int(rng.integers(1 << 30)))
    return atoms, "rattled"


def _vacancy(material, rng):
    atoms = _supercell(material, rng)
    if len(atoms) < 12:
        atoms = atoms * (2, 1, 1) if len(atoms) * 2 <= 24 else atoms
    del atoms[int(rng.integers(len(atoms)))]
    atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
    return atoms, "vacancy"


def _surface(material, rng):
    """A (001) slab: conventional cell stacked along z, 7 Å of vacuum each side, still periodic (CHGNet needs it)."""
    atoms = _base(material)
    layers = max(2, 16 // len(atoms))
    atoms = atoms * (1, 1, layers)
    atoms.center(vacuum=7.0, axis=2)
    atoms.rattle(0.04, seed=int(rng.integers(1 << 30)))
    return atoms, "surface"


#: How often each kind of cell appears per material (sums to 1).
KINDS: List[Tuple[Callable, float]] = [(_bulk, 0.15), (_strained, 0.25), (_rattled, 0.3), (_vacancy, 0.15),
                                       (_surface, 0.15)]


def configs(seed: int = SEED, n_per_material: int = N_PER_MATERIAL) -> List:
    """Unlabelled (atoms, config_type) pairs for every material, in a fixed order."""
    rng = np.random.default_rng(seed)
    builders, weights = zip(*KINDS)
    out = []
    for material in [*METALS, *ROCKSALT]:
        for _ in range(n_per_material):
            builder = builders[int(rng.choice(len(builders), p=np.array(weights)))]
            out.append(builder(material, rng))
    return out


def main(argv: List[str] | None = None) -> Dict[str, Path]:
    """Write ``train.xyz`` and ``test.xyz`` (extxyz) and return their paths."""
    from harness.data._chgnet_label import label_all
    from harness.data._split import split, write_train_test

    train, test = split(label_all(configs()), seed=SEED, test_fraction=TEST_FRACTION)
    return write_train_test(train, test, DEFAULT_DIR, argv)


if __name__ == "__main__":
    main()
