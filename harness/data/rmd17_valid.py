"""Validation frames for the rMD17-like fine-tuning cases: the same distribution as the training pool, no overlap.

The bundled ``mace_sparse/data/rmd17_like/<molecule>_train.xyz`` holds 200 frames (a case with N = 200 uses them
all) and ``<molecule>_test.xyz`` the 50 frames that end the same trajectory. Validation frames, which pick the
learning rate, the best epoch and the early stop, must come from neither, so they are drawn here from an
independent trajectory of the same molecule under the same protocol as the training pool (GFN1-xTB Langevin MD
at 500 K, 0.5 fs, 200 steps of equilibration, a frame every 10 steps; ``harness.data.rmd17_like``), with its
own seed.

Run ``python -m harness.data.rmd17_valid [OUT_DIR]`` (default ``harness/data/rmd17_valid``): writes
``<molecule>_valid.xyz`` (50 frames each) for every molecule.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Optional

SEED = 1717
N_VALID = 50
DEFAULT_DIR = Path(__file__).resolve().parent / "rmd17_valid"


def main(argv: Optional[List[str]] = None) -> Dict[str, Path]:
    import ase.io

    from harness.data._xtb_sampling import md_frames
    from harness.data.rmd17_like import EVERY, METHOD, MOLECULES, geometry

    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else DEFAULT_DIR
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for k, name in enumerate(MOLECULES):
        frames = md_frames(geometry(name), METHOD, N_VALID, EVERY, SEED + k, "md_500K", equilibrate=200)
        for frame in frames:
            frame.info["molecule"] = name
        paths[name] = out / f"{name}_valid.xyz"
        ase.io.write(paths[name], frames, format="extxyz")
        print(f"{name}: {len(frames)} validation frames", flush=True)
    return paths


if __name__ == "__main__":
    main()
