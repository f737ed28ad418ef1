"""EMT-labelled Cu/Ni/Al structures: a bulk "source" domain and a surface "target" domain.

ASE's EMT is a real (if simple) many-body potential that needs no download, so it gives honest labels for
tiny foundations in tests and for the quick-start run. Bulk cells are the foundation's domain; slabs with
vacuum are a domain shift the bulk-trained foundation has not seen. Everything is seeded.

Run ``python -m harness.data.emt_data OUT_DIR`` to write the extxyz files.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List

import numpy as np

ELEMENTS = ("Cu", "Ni", "Al")
LATTICE = {"Cu": 3.61, "Ni": 3.52, "Al": 4.05}


def _label(atoms):
    from ase.calculators.emt import EMT

    atoms.calc = EMT()
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    atoms.calc = None
    atoms.info["REF_energy"] = float(energy)
    atoms.arrays["REF_forces"] = np.array(forces)
    atoms.info.pop("adsorbate_info", None)
    return atoms


def _random_alloy(base: str, rng: np.random.Generator, repeat=(2, 2, 1), elements=ELEMENTS):
    from ase.build import bulk

    atoms = bulk(base, "fcc", a=LATTICE[base] * rng.uniform(0.97, 1.03), cubic=True) * repeat
    symbols = list(atoms.get_chemical_symbols())
    for i in range(len(symbols)):
        if rng.random() < 0.3:
            symbols[i] = str(rng.choice(elements))
    atoms.set_chemical_symbols(symbols)
    return atoms


def bulk_configs(n: int, seed: int = 0, elements=ELEMENTS) -> List:
    """Rattled, strained fcc alloy cells (the source domain)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        atoms = _random_alloy(str(rng.choice(elements)), rng, (2, 2, 1), elements)
        atoms.rattle(stdev=0.08, seed=int(rng.integers(1 << 30)))
        out.append(_label(atoms))
    return out


def slab_configs(n: int, seed: int = 1, elements=ELEMENTS) -> List:
    """Rattled (100) slabs with vacuum (the target domain: surfaces the bulk foundation never saw)."""
    from ase.build import fcc100

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = str(rng.choice(elements))
        atoms = fcc100(base, size=(2, 2, 3), a=LATTICE[base], vacuum=4.0, periodic=True)
        symbols = list(atoms.get_chemical_symbols())
        for i in range(len(symbols)):
            if rng.random() < 0.3:
                symbols[i] = str(rng.choice(elements))
        atoms.set_chemical_symbols(symbols)
        atoms.rattle(stdev=0.1, seed=int(rng.integers(1 << 30)))
        out.append(_label(atoms))
    return out


def write_datasets(out_dir: str | Path, n_bulk: int = 60, n_slab: int = 40, elements=ELEMENTS) -> dict:
    """Write bulk_train/bulk_test/slab_train/slab_test extxyz files; returns their paths."""
    import ase.io

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bulk = bulk_configs(n_bulk, seed=0, elements=elements)
    slab = slab_configs(n_slab, seed=1, elements=elements)
    split_b, split_s = int(0.75 * n_bulk), int(0.6 * n_slab)
    files = {
        "bulk_train": (bulk[:split_b]),
        "bulk_test": (bulk[split_b:]),
        "slab_train": (slab[:split_s]),
        "slab_test": (slab[split_s:]),
    }
    paths = {}
    for name, configs in files.items():
        path = out / f"{name}.xyz"
        ase.io.write(path, configs, format="extxyz")
        paths[name] = path
    return paths


if __name__ == "__main__":
    write_datasets(sys.argv[1] if len(sys.argv) > 1 else ".")
