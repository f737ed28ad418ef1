"""Source domain of the benchmark foundation ``inorganic-s``: ≥ 2,000 CHGNet-labelled Al/Cu/Ni/Fe/Co/Mn/O cells.

The same kinds of cell as the bundled ``inorganic`` set (bulk, strained, rattled, vacancy and (001) surface
cells of six metals and four rocksalt monoxides, 8–24 atoms; ``harness.data.inorganic_data`` builds them),
drawn with another seed and six times as many per material, so that a MACE-MP-0-small-sized model can be
pretrained to convergence. Labels: CHGNet (a surrogate of Materials Project PBE/PBE+U): energy, forces, stress
and unsigned moments (``REF_magmoms``, not trained on).

Run ``python -m harness.data.inorganic_s [OUT_DIR]`` (default ``harness/data/inorganic_s``). Cells are labelled
in chunks cached in ``OUT_DIR/partial/``, so an interrupted run resumes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

SEED = 20261202
N_PER_MATERIAL = 250
TEST_FRACTION = 0.1
CHUNK = 100
DEFAULT_DIR = Path(__file__).resolve().parent / "inorganic_s"


def main(argv: Optional[List[str]] = None) -> None:
    """Label every cell (resuming from ``partial/``), then write ``train.xyz`` and ``test.xyz``."""
    import ase.io

    from harness.data._chgnet_label import label_all
    from harness.data._split import split, write_train_test
    from harness.data.inorganic_data import configs

    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else DEFAULT_DIR
    partial = out / "partial"
    partial.mkdir(parents=True, exist_ok=True)
    cells = configs(seed=SEED, n_per_material=N_PER_MATERIAL)
    start = time.time()
    frames = []
    for k in range(0, len(cells), CHUNK):
        cache = partial / f"{k // CHUNK:03d}.xyz"
        if not cache.is_file():
            tmp = cache.with_suffix(".tmp")
            ase.io.write(tmp, label_all(cells[k:k + CHUNK]), format="extxyz")
            tmp.rename(cache)
            print(f"[{min(k + CHUNK, len(cells))}/{len(cells)}] {time.time() - start:.0f} s", flush=True)
        frames += ase.io.read(cache, ":")
    train, test = split(frames, seed=SEED, test_fraction=TEST_FRACTION)
    write_train_test(train, test, out, [str(out)])
    print(f"labelling wall time {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
