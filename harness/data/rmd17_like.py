"""The rMD17-like target task: 500 K MD of aspirin, benzene, malonaldehyde and paracetamol labelled by GFN1-xTB.

rMD17 itself (DFT PBE/def2-SVP MD) cannot be downloaded here, so this set mimics its design: one molecule per
file, frames from a single 500 K trajectory. Both the dynamics and the labels are GFN1-xTB, a different level of
theory from the organic foundation (GFN2-xTB), and aspirin, malonaldehyde and paracetamol are not in the
foundation's data, so fine-tuning has something to learn and something to forget.

Geometries: GFN1-xTB minima of structures embedded from SMILES once (the coordinates are written below, so no
cheminformatics package is needed); benzene comes from ``ase.build.molecule``. For every molecule the train file
holds the first 200 sampled frames in a seeded random order (its first N frames are a random subset of size N,
e.g. 50) and the test file the last 50 frames of the trajectory, which the train frames never neighbour.

Run ``python -m harness.data.rmd17_like [OUT_DIR]`` (default: ``mace_sparse/data/rmd17_like``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

from mace_sparse import data as bundled_data

SEED = 17
METHOD = "GFN1-xTB"
N_TRAIN, N_TEST = 200, 50
#: MD steps (0.5 fs) between stored frames: 5 fs, about half a C–H stretch period (rMD17 frames are also correlated).
EVERY = 10
DEFAULT_DIR = bundled_data.path("rmd17_like")

XYZ = {
    "aspirin": """
C    3.18419    0.70196   -0.48337
C    1.88496    0.23473    0.10279
O    1.47906    0.47675    1.20058
O    1.20312   -0.52555   -0.79645
C   -0.13211   -0.78612   -0.58207
C   -0.53114   -2.11061   -0.45266
C   -1.87041   -2.40796   -0.25506
C   -2.80724   -1.38460   -0.17418
C   -2.40703   -0.06565   -0.30482
C   -1.06532    0.25811   -0.52135
C   -0.66134    1.67661   -0.72666
O    0.37842    2.05627   -1.20058
O   -1.61911    2.53869   -0.35492
H    3.64029   -0.08525   -1.07899
H    3.85330    1.02839    0.30820
H    2.95318    1.54450   -1.13566
H    0.21636   -2.89247   -0.50600
H   -2.18359   -3.44118   -0.15736
H   -3.85330   -1.61700   -0.01289
H   -3.14052    0.72990   -0.25240
H   -1.29551    3.44118   -0.50845
""",
    "malonaldehyde": """
O   -0.47507   -1.63708    0.55333
C   -0.72749   -0.44737    0.70645
C   -0.02968    0.60426    0.01738
C    0.96462    0.28098   -0.85290
O    1.32973   -0.95033   -1.10435
H   -1.52654   -0.12842    1.40222
H   -0.29508    1.63708    0.19173
H    1.52654    1.03699   -1.40222
H    0.74261   -1.55106   -0.54198
""",
    "paracetamol": """
C   -3.82039   -0.77592   -0.02695
C   -2.35528   -1.12424   -0.21859
O   -1.98581   -2.22604   -0.55233
N   -1.53809   -0.05843    0.02123
C   -0.13435   -0.00867   -0.05994
C    0.64317   -1.06092   -0.53605
C    2.02199   -0.92431   -0.59649
C    2.63271    0.25694   -0.18542
O    3.98237    0.42270   -0.23729
C    1.85710    1.31065    0.29319
C    0.48134    1.17470    0.35355
H   -4.12075   -0.03182   -0.76392
H   -4.41772   -1.67502   -0.15945
H   -3.98908   -0.36876    0.96894
H   -1.97745    0.79891    0.32187
H    0.18814   -1.98502   -0.86238
H    2.62966   -1.74202   -0.96894
H    4.41772   -0.36554   -0.58852
H    2.34061    2.22604    0.61143
H   -0.12565    1.99394    0.72464
""",
}
MOLECULES = ("aspirin", "benzene", "malonaldehyde", "paracetamol")


def geometry(name: str):
    """Starting geometry of ``name`` (one of MOLECULES) as ASE atoms."""
    from ase import Atoms
    from ase.build import molecule

    if name == "benzene":
        return molecule("C6H6")
    if name not in XYZ:
        raise ValueError(f"unknown molecule {name!r}; expected one of {', '.join(MOLECULES)}")
    rows = [line.split() for line in XYZ[name].strip().splitlines()]
    return Atoms([r[0] for r in rows], positions=np.array([[float(x) for x in r[1:]] for r in rows]))


def trajectory(name: str, seed: int) -> List:
    """N_TRAIN + N_TEST labelled frames of one 500 K GFN1-xTB Langevin trajectory, in time order."""
    from harness.data._xtb_sampling import md_frames

    frames = md_frames(geometry(name), METHOD, N_TRAIN + N_TEST, EVERY, seed, "md_500K", equilibrate=200)
    for frame in frames:
        frame.info["molecule"] = name
    return frames


def main(argv: List[str] | None = None) -> Dict[str, Path]:
    """Write ``<molecule>_train.xyz`` (200, shuffled) and ``<molecule>_test.xyz`` (50) for every molecule."""
    import ase.io

    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else DEFAULT_DIR
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for k, name in enumerate(MOLECULES):
        frames = trajectory(name, SEED + k)
        order = np.random.default_rng(SEED + 100 + k).permutation(N_TRAIN)
        paths[f"{name}_train"] = out / f"{name}_train.xyz"
        paths[f"{name}_test"] = out / f"{name}_test.xyz"
        ase.io.write(paths[f"{name}_train"], [frames[i] for i in order], format="extxyz")
        ase.io.write(paths[f"{name}_test"], frames[N_TRAIN:], format="extxyz")
        print(f"{name}: {N_TRAIN} train, {len(frames) - N_TRAIN} test", flush=True)
    return paths


if __name__ == "__main__":
    main()
