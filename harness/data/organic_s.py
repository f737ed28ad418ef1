"""Source domain of the benchmark foundation ``organic-s``: ≥ 3,000 GFN2-xTB frames of small H/C/N/O molecules.

Larger and more varied than the bundled ``organic`` set (398 frames at one temperature), so that a
MACE-OFF23-small-sized model can be pretrained to convergence on it:

- molecules: the closed-shell H/C/N/O molecules of ASE's G2 set, the S22 complexes, and the three rMD17-like
  molecules that G2 lacks (aspirin, malonaldehyde, paracetamol; benzene is in G2), so that the chemistry of the
  fine-tuning task is covered as MACE-OFF's SPICE covers rMD17's;
- sampling per molecule: GFN2-xTB Langevin MD at 300, 600 and 900 K (its own trajectories and seeds: none of
  the rMD17-like fine-tuning or test frames, which are GFN1-xTB MD, is used) plus randomly rattled copies of the
  reference geometry (σ 0.02–0.06 Å: a cheap stand-in for conformer and off-equilibrium sampling; at σ up to
  0.12 Å one frame in six had force components above 10 eV/Å, up to 389 eV/Å, which would dominate the loss).
- frames whose largest force component exceeds :data:`MAX_FORCE` are dropped (the count is printed).

The split is by frame (seeded), 10 % test. Run ``python -m harness.data.organic_s [OUT_DIR]`` (default
``harness/data/organic_s``). Progress is printed per molecule; the frames of finished molecules are cached in
``OUT_DIR/partial/`` so an interrupted run resumes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

SEED = 20261201
METHOD = "GFN2-xTB"
TEMPERATURES_K = (300.0, 600.0, 900.0)
FRAMES_PER_TEMPERATURE = 13
MD_EVERY = 20
RATTLED = 6
TEST_FRACTION = 0.1
#: eV/Å; a safety net against unphysical frames (none expected at the amplitudes above).
MAX_FORCE = 20.0
DEFAULT_DIR = Path(__file__).resolve().parent / "organic_s"


def molecules() -> List:
    """(name, atoms) of every source molecule, in a fixed order."""
    from harness.data.organic_data import molecules as g2_s22
    from harness.data.rmd17_like import geometry

    return [*g2_s22(), *((name, geometry(name)) for name in ("aspirin", "malonaldehyde", "paracetamol"))]


def molecule_frames(name: str, atoms, seed: int) -> List:
    """All labelled frames of one molecule: MD at each temperature, then rattled copies."""
    from harness.data._xtb_sampling import label, md_frames

    rng = np.random.default_rng(seed)
    atoms = atoms.copy()
    atoms.info = {}
    frames = []
    for temperature in TEMPERATURES_K:
        frames += md_frames(atoms, METHOD, FRAMES_PER_TEMPERATURE, MD_EVERY, int(rng.integers(1 << 30)),
                            f"md_{temperature:.0f}K", temperature_k=temperature)
    for _ in range(RATTLED):
        rattled = atoms.copy()
        rattled.rattle(float(rng.uniform(0.02, 0.06)), seed=int(rng.integers(1 << 30)))
        frames.append(label(rattled, METHOD, "rattled"))
    for frame in frames:
        frame.info["molecule"] = name
    return frames


def main(argv: Optional[List[str]] = None) -> None:
    """Label every molecule (resuming from ``partial/``), then write ``train.xyz`` and ``test.xyz``."""
    import ase.io

    from harness.data._split import split, write_train_test

    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else DEFAULT_DIR
    partial = out / "partial"
    partial.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    mols = molecules()
    seeds = [int(s) for s in rng.integers(1 << 30, size=len(mols))]
    start = time.time()
    frames = []
    for k, ((name, atoms), seed) in enumerate(zip(mols, seeds)):
        cache = partial / f"{k:03d}.xyz"
        if not cache.is_file():
            tmp = cache.with_suffix(".tmp")
            ase.io.write(tmp, molecule_frames(name, atoms, seed), format="extxyz")
            tmp.rename(cache)
            print(f"[{k + 1}/{len(mols)}] {name} ({len(atoms)} atoms) {time.time() - start:.0f} s", flush=True)
        frames += ase.io.read(cache, ":")
    kept = [f for f in frames if float(np.abs(f.arrays["REF_forces"]).max()) <= MAX_FORCE]
    print(f"{len(frames) - len(kept)} of {len(frames)} frames dropped (a force component > {MAX_FORCE} eV/Å)")
    train, test = split(kept, seed=SEED, test_fraction=TEST_FRACTION)
    write_train_test(train, test, out, [str(out)])
    print(f"labelling wall time {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
