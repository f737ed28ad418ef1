"""Seeded train/test split shared by the bundled data sets (the test split is never seen in training)."""

from __future__ import annotations

from typing import List, Tuple

import numpy as np


def split(items: List, seed: int, test_fraction: float = 0.2) -> Tuple[List, List]:
    """Random split of ``items`` into (train, test), order preserved inside each part."""
    order = np.random.default_rng(seed + 1).permutation(len(items))
    test = set(order[: int(round(test_fraction * len(items)))].tolist())
    return [a for i, a in enumerate(items) if i not in test], [a for i, a in enumerate(items) if i in test]
