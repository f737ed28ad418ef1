"""Errors of a model on a test set, and how much of the foundation a fine-tune changed.

Evaluation is batched, in float64, with the saved model itself (every ``.model`` a method writes is a plain MACE
model), independent of MACE's logged metrics; it is the project's shared evaluation
(:mod:`mace_sparse.benchmarks.evaluation`), which agrees with MACE's own ``MACECalculator`` to the last digit.

Element filtering. MACE's fine-tuning keeps only the elements of the training data
(``load_foundations_elements`` slices the element-dependent weights and, with ``--E0s average``, refits the
atomic energies), so the fine-tuned model cannot evaluate a source-domain configuration that holds another
element. Forgetting is therefore measured on the source configurations made only of the case's training
elements, for the foundation (zero-shot) and every fine-tune alike; the JSON records how many that were.

Changed parameters. The reference is the model as MACE configured it at step 0 (element-filtered, rescaled),
not the foundation file. For a sparse_str run it is recovered bit for bit from the run's own delta file
(:func:`reference_from_sparse_run`); see :mod:`mace_sparse.benchmarks.bench_runner` for the other cases.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, Optional, Sequence, Set

import torch


def load_model(path: Path) -> torch.nn.Module:
    import mace  # noqa: F401  (before e3nn)

    model = torch.load(str(path), map_location="cpu", weights_only=False)
    return model.double().eval()


def file_elements(path: Path) -> Set[int]:
    """Atomic numbers present in an extxyz file."""
    import ase.io

    return {int(z) for atoms in ase.io.read(str(path), ":") for z in atoms.numbers}


def read_frames(path: Path, elements: Optional[Set[int]] = None) -> list:
    """Frames of an extxyz file, only those made of ``elements`` if given."""
    import ase.io

    frames = ase.io.read(str(path), ":")
    if elements is not None:
        frames = [a for a in frames if set(int(z) for z in a.numbers) <= elements]
    return frames


def evaluate(model_path: Path, xyz: Path, energy_key: str = "REF_energy", forces_key: str = "REF_forces",
             magmoms_key: Optional[str] = None) -> Dict[str, float]:
    """MAE of ``model_path`` on ``xyz`` with the project's shared evaluation
    (:func:`mace_sparse.benchmarks.evaluation.evaluate_file`: float64, batched), under this module's names:
    ``energy_mae_per_atom`` / ``energy_mae_per_config`` (meV), ``force_mae`` (meV/Å), ``magmom_mae`` (μB,
    for a ``_magnetic.model`` only) and ``configs``; NaN errors for an empty file."""
    from .evaluation import evaluate_file

    configs = len(read_frames(xyz))
    if configs == 0:
        nan = float("nan")
        return {"energy_mae_per_atom": nan, "energy_mae_per_config": nan, "force_mae": nan, "configs": 0}
    scores = evaluate_file(model_path, xyz, energy_key, forces_key, magmoms_key)
    out = {"energy_mae_per_atom": scores["energy_mae_mev_per_atom"], "energy_mae_per_config": scores["energy_mae_mev"],
           "force_mae": scores["force_mae_mev_per_a"], "configs": configs}
    if "magmom_mae_mub" in scores:
        out["magmom_mae"] = scores["magmom_mae_mub"]
    return out


def write_frames(frames: Sequence, path: Path) -> Path:
    """Write ``frames`` as extxyz (the evaluated subset is kept next to the runs, so it can be re-checked)."""
    import ase.io

    path.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(str(path), list(frames), format="extxyz")
    return path


@dataclasses.dataclass
class ParamChange:
    changed: int
    total: int

    @property
    def changed_percent(self) -> float:
        return 100.0 * self.changed / self.total if self.total else float("nan")


def count_changed(reference: torch.nn.Module, model: torch.nn.Module) -> ParamChange:
    """Parameter entries whose bits differ between ``model`` and ``reference`` (same names and shapes).

    Counted over parameters, as sparse_str's ``<name>_sparsity.json`` counts them (buffers such as the
    atomic energies are not weights). Bitwise, so a weight that moved and came back to the same float
    counts as unchanged, and -0.0 vs 0.0 as changed.
    """
    from ..artifacts.delta_file import changed_mask

    ref = dict(reference.named_parameters())
    new = dict(model.named_parameters())
    if set(ref) != set(new):
        odd = sorted(set(ref) ^ set(new))
        raise ValueError(f"the fine-tuned model and its reference differ in parameters (e.g. {odd[0]!r})")
    changed = total = 0
    for name, tensor in ref.items():
        other = new[name]
        if tensor.shape != other.shape:
            raise ValueError(f"{name}: shape {tuple(other.shape)} in the fine-tuned model, {tuple(tensor.shape)} "
                             "in the reference")
        total += tensor.numel()
        changed += int(changed_mask(tensor.to(other.dtype), other).sum())
    return ParamChange(changed, total)


def reference_from_sparse_run(model_path: Path, delta_path: Path) -> torch.nn.Module:
    """The step-0 model of a sparse_str run: its saved model with the delta reverted (checked by fingerprint)."""
    from ..artifacts.delta_file import revert_delta

    model = torch.load(str(model_path), map_location="cpu", weights_only=False)
    return revert_delta(model, delta_path, inplace=True)


def fingerprint(model: torch.nn.Module) -> str:
    from ..artifacts.fingerprint import model_fingerprint

    return model_fingerprint(model)
