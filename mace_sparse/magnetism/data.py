"""Per-atom moments in MACE's data pipeline, and the checks that catch bad moment labels before training.

MACE collates a batch with the keys of its first item, so a frame without moments next to one with them would
crash collation. Like MACE's optional ``charges``, every frame therefore gets a ``magmoms`` array (zeros where
the file has none) and a per-atom ``magmoms_weight`` (0 for those frames), and the loss ignores weight-0 atoms.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import ase.io
import numpy as np

MAGMOMS = "magmoms"
MAGMOMS_WEIGHT = "magmoms_weight"


def with_moment_fields(config: Any) -> Any:
    """Zero-fill absent moments and add the per-atom weight to a MACE ``Configuration`` (in place)."""
    if MAGMOMS not in config.property_weights:
        return config
    num_atoms = len(config.atomic_numbers)
    moments = config.properties.get(MAGMOMS)
    weight = float(config.property_weights.get(MAGMOMS, 1.0))
    if moments is None:
        moments, weight = np.zeros(num_atoms), 0.0
    config.properties[MAGMOMS] = np.asarray(moments, dtype=float).reshape(num_atoms)
    config.properties[MAGMOMS_WEIGHT] = np.full(num_atoms, weight)
    config.property_weights[MAGMOMS] = weight
    config.property_weights[MAGMOMS_WEIGHT] = weight  # MACE's dataset summary expects a weight per property
    return config


def wrap_config_from_atoms(original: Callable) -> Callable:
    """``mace.data.utils.config_from_atoms`` that always yields moment fields when moments are requested."""

    def config_from_atoms(*args: Any, **kwargs: Any) -> Any:
        return with_moment_fields(original(*args, **kwargs))

    config_from_atoms.__wrapped__ = original  # type: ignore[attr-defined]
    return config_from_atoms


class MomentDataError(ValueError):
    """Bad moment labels in a data file; the message names the file, frame and fix."""


def check_moment_file(path: str, key: str) -> int:
    """Validate the moments in one extxyz file; returns how many frames carry them.

    A frame may lack the key (its weight is 0), but where present the array must hold one finite number per
    atom (3-vectors are refused: the head predicts collinear moments).
    """
    labelled = 0
    for index, atoms in enumerate(ase.io.iread(path, index=":")):
        if key not in atoms.arrays:
            continue
        values = np.asarray(atoms.arrays[key])
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.shape != (len(atoms),):
            raise MomentDataError(
                f"{path}: frame {index}: per-atom array {key!r} has shape {tuple(values.shape)}, expected "
                f"({len(atoms)},) (one collinear moment per atom in muB); fix the file or pass another --magmoms_key"
            )
        if not np.all(np.isfinite(values.astype(float))):
            raise MomentDataError(
                f"{path}: frame {index}: {key!r} contains NaN or inf; fix or drop that frame"
            )
        labelled += 1
    return labelled


def check_moment_files(train_files: Iterable[str], other_files: Iterable[str], key: str) -> None:
    """Check every readable extxyz file and require moments in at least one training frame."""
    train_total = 0
    train_list: List[str] = [f for f in train_files if f]
    for path in train_list:
        if _is_xyz(path):
            train_total += check_moment_file(path, key)
    for path in other_files:
        if path and _is_xyz(path):
            check_moment_file(path, key)
    if train_list and all(_is_xyz(p) for p in train_list) and train_total == 0:
        raise MomentDataError(
            f"--magmom_weight > 0 but no frame of {', '.join(train_list)} has the per-atom array {key!r}; "
            "pass the right --magmoms_key or set --magmom_weight 0"
        )


def element_mean_moments(files: Iterable[str], key: str, signed: bool = False) -> Dict[int, float]:
    """Mean reference moment per atomic number over the labelled frames of the extxyz ``files``."""
    sums: Dict[int, float] = {}
    counts: Dict[int, int] = {}
    for path in files:
        if not _is_xyz(path):
            continue
        for atoms in ase.io.iread(path, index=":"):
            if key not in atoms.arrays:
                continue
            values = np.asarray(atoms.arrays[key], dtype=float).reshape(-1)
            values = values if signed else np.abs(values)
            for z, value in zip(atoms.numbers, values):
                sums[int(z)] = sums.get(int(z), 0.0) + float(value)
                counts[int(z)] = counts.get(int(z), 0) + 1
    return {z: sums[z] / counts[z] for z in sums}


def _is_xyz(path: Optional[str]) -> bool:
    return bool(path) and Path(path).suffix.lower() in (".xyz", ".extxyz") and Path(path).is_file()
