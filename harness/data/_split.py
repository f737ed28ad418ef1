"""Seeded train/test split shared by the bundled data sets (the test split is never seen in training)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np


def split(items: List, seed: int, test_fraction: float = 0.2) -> Tuple[List, List]:
    """Random split of ``items`` into (train, test), order preserved inside each part."""
    order = np.random.default_rng(seed + 1).permutation(len(items))
    test = set(order[: int(round(test_fraction * len(items)))].tolist())
    return [a for i, a in enumerate(items) if i not in test], [a for i, a in enumerate(items) if i in test]


def write_train_test(train: List, test: List, default_dir: Path, argv: Optional[List[str]] = None) -> Dict[str, Path]:
    """Write ``train.xyz`` and ``test.xyz`` (extxyz) into ``argv[0]`` or ``default_dir``; returns their paths.

    The command-line tail shared by the data scripts (``python -m harness.data.<set> [OUT_DIR]``).
    """
    import ase.io

    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else default_dir
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.xyz", "test": out / "test.xyz"}
    ase.io.write(paths["train"], train, format="extxyz")
    ase.io.write(paths["test"], test, format="extxyz")
    print(f"wrote {len(train)} train and {len(test)} test configurations to {out}")
    return paths
