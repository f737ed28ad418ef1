"""Source domain of the bundled organic foundation: small H/C/N/O molecules and dimers labelled by GFN2-xTB.

Molecules are ASE's G2 set (closed-shell H/C/N/O members) and the S22 dimers (hydrogen-bonded and stacked
complexes up to 30 atoms), sampled by short GFN2-xTB Langevin MD at 500 K plus one rattled copy each. The
rMD17-like task (``rmd17_like``) is labelled with GFN1-xTB on molecules absent here, so fine-tuning on it
shifts both the chemistry and the level of theory.

Run ``python -m harness.data.organic_data [OUT_DIR]`` (default: ``mace_sparse/data/organic``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from harness.data._split import split, write_train_test
from mace_sparse import data as bundled_data

SEED = 4242
METHOD = "GFN2-xTB"
MD_FRAMES = 5
MD_EVERY = 40
DEFAULT_DIR = bundled_data.path("organic")


def molecules() -> List[Tuple[str, object]]:
    """(name, atoms) of the closed-shell H/C/N/O molecules of G2 and the S22 complexes, in a fixed order."""
    from ase.collections import g2, s22

    out = []
    for name in g2.names:
        atoms = g2[name]
        closed_shell = sum(atoms.numbers) % 2 == 0 and not atoms.get_initial_magnetic_moments().any()
        if len(atoms) > 1 and closed_shell and set(atoms.get_chemical_symbols()) <= {"H", "C", "N", "O"}:
            out.append((name, atoms))
    out.extend((name, s22[name]) for name in s22.names)
    return out


def configs(seed: int = SEED) -> List:
    """Labelled frames: per molecule, MD_FRAMES Langevin frames and one rattled equilibrium geometry."""
    from harness.data._xtb_sampling import label, md_frames

    rng = np.random.default_rng(seed)
    out = []
    for name, atoms in molecules():
        atoms.info = {}
        out.extend(md_frames(atoms, METHOD, MD_FRAMES, MD_EVERY, int(rng.integers(1 << 30)), "md_500K"))
        rattled = atoms.copy()
        rattled.rattle(0.05, seed=int(rng.integers(1 << 30)))
        out.append(label(rattled, METHOD, "rattled"))
        for frame in out[-MD_FRAMES - 1:]:
            frame.info["molecule"] = name
    return out


def main(argv: List[str] | None = None) -> Dict[str, Path]:
    """Write ``train.xyz`` and ``test.xyz`` (extxyz) and return their paths."""
    train, test = split(configs(), seed=SEED)
    return write_train_test(train, test, DEFAULT_DIR, argv)


if __name__ == "__main__":
    main()
