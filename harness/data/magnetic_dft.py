"""A tiny DFT check set for the magnetic task: MnO, FeO, CoO, NiO diatomics at five bond lengths, UKS PBE.

CHGNet's moments (``magnetic_oxides``) are a learned surrogate; these few molecules carry real (if molecular)
DFT spin moments, so a magnetic head can be sanity-checked against first principles. pyscf UKS PBE/def2-SVP in
each molecule's high-spin ground-state multiplicity; moments are Mulliken α−β populations in μB, stored unsigned
as ``REF_magmoms`` (same convention as CHGNet) and signed as ``DFT_spin_signed``. Unconverged SCFs are skipped.

Run ``python -m harness.data.magnetic_dft [OUT_FILE]``
(default: ``mace_sparse/data/magnetic_oxides/dft_molecules.xyz``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List

import numpy as np

from mace_sparse import data as bundled_data

HARTREE_EV = 27.211386245988
BOHR_A = 0.529177210903
#: 2S of the high-spin ground state and the experimental bond length (Å) of each monoxide.
MOLECULES = {"Mn": (5, 1.646), "Fe": (4, 1.616), "Co": (3, 1.629), "Ni": (2, 1.627)}
SCALES = (0.94, 0.98, 1.02, 1.06, 1.10)
DEFAULT_FILE = bundled_data.path("magnetic_oxides") / "dft_molecules.xyz"


def label(metal: str, bond: float):
    """UKS PBE/def2-SVP energy, forces and Mulliken spin moments of the monoxide, or None if the SCF fails."""
    from ase import Atoms
    from pyscf import dft, gto

    spin, _ = MOLECULES[metal]
    mol = gto.M(atom=f"{metal} 0 0 0; O 0 0 {bond}", basis="def2-svp", spin=spin, verbose=0)
    mf = dft.UKS(mol)
    mf.xc = "pbe"
    mf.max_cycle = 150
    energy = mf.kernel()
    if not mf.converged:
        return None
    grad = mf.nuc_grad_method().kernel()
    spins = np.array(mf.mulliken_spin_pop(verbose=0)[1], dtype=float)
    atoms = Atoms(f"{metal}O", positions=[[0, 0, 0], [0, 0, bond]])
    atoms.info = {"config_type": "dft_molecule", "REF_energy": float(energy * HARTREE_EV),
                  "level_of_theory": "UKS PBE/def2-SVP (pyscf)", "multiplicity": spin + 1}
    atoms.arrays["REF_forces"] = -np.array(grad) * HARTREE_EV / BOHR_A
    atoms.arrays["REF_magmoms"] = np.abs(spins)
    atoms.arrays["DFT_spin_signed"] = spins
    return atoms


def main(argv: List[str] | None = None) -> Path:
    import ase.io

    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else DEFAULT_FILE
    frames = []
    for metal, (_, r0) in MOLECULES.items():
        for scale in SCALES:
            atoms = label(metal, round(r0 * scale, 4))
            print(f"{metal}O r={r0 * scale:.3f}: {'ok' if atoms is not None else 'SCF not converged, skipped'}",
                  flush=True)
            if atoms is not None:
                frames.append(atoms)
    ase.io.write(out, frames, format="extxyz")
    print(f"wrote {len(frames)} molecules to {out}")
    return out


if __name__ == "__main__":
    main()
