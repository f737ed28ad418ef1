"""A small PBE/def2-SVP relabelling of rMD17-like malonaldehyde frames: the real rMD17 level of theory.

The GFN1-xTB frames of ``rmd17_like`` are relabelled with pyscf RKS PBE/def2-SVP (density fitting with the
default def2-universal-jkfit basis, grid level 2, to fit a CPU budget of ~10 s per frame), giving a DFT target
with the same geometries. Only malonaldehyde (9 atoms) and only a few frames: DFT costs ~1000× xTB here.

Run ``python -m harness.data.rmd17_dft [OUT_DIR [train|test]]`` (default: ``mace_sparse/data/rmd17_like``,
both parts): writes
``malonaldehyde_pbe_train.xyz`` (the first N_TRAIN frames of ``malonaldehyde_train.xyz``, a random subset) and
``malonaldehyde_pbe_test.xyz`` (the first N_TEST frames of ``malonaldehyde_test.xyz``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

from mace_sparse import data as bundled_data

HARTREE_EV = 27.211386245988
BOHR_A = 0.529177210903
N_TRAIN, N_TEST = 30, 10
DEFAULT_DIR = bundled_data.path("rmd17_like")


def label(atoms):
    """PBE/def2-SVP energy (eV) and forces (eV/Å) of a closed-shell molecule, replacing the xTB labels."""
    from pyscf import dft, gto

    mol = gto.M(atom=[(s, p) for s, p in zip(atoms.get_chemical_symbols(), atoms.positions)], basis="def2-svp",
                verbose=0)
    mf = dft.RKS(mol).density_fit()
    mf.xc = "pbe"
    mf.grids.level = 2
    energy = mf.kernel()
    if not mf.converged:
        raise RuntimeError("PBE SCF did not converge")
    grad = mf.nuc_grad_method().kernel()
    out = atoms.copy()
    out.info = {"config_type": "md_500K_gfn1_geometry", "molecule": atoms.info.get("molecule", ""),
                "REF_energy": float(energy * HARTREE_EV), "level_of_theory": "RKS PBE/def2-SVP, RI-J (pyscf)"}
    out.arrays = {k: v for k, v in out.arrays.items() if k in ("numbers", "positions")}
    out.arrays["REF_forces"] = -np.array(grad) * HARTREE_EV / BOHR_A
    return out


def main(argv: List[str] | None = None) -> Dict[str, Path]:
    import ase.io

    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else DEFAULT_DIR
    parts = argv[1:] or ["train", "test"]  # one part at a time fits a short job limit
    paths = {}
    for part, n in (("train", N_TRAIN), ("test", N_TEST)):
        if part not in parts:
            continue
        frames = ase.io.read(DEFAULT_DIR / f"malonaldehyde_{part}.xyz", f":{n}")
        paths[part] = out / f"malonaldehyde_pbe_{part}.xyz"
        ase.io.write(paths[part], [label(a) for a in frames], format="extxyz")
        print(f"wrote {n} PBE frames to {paths[part]}", flush=True)
    return paths


if __name__ == "__main__":
    main()
