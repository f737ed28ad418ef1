"""The one evaluator of the harness: errors of a saved model on a test set, and how much of the foundation a
fine-tune changed.

Evaluation is batched, in float64, with the saved model itself (every ``.model`` a method writes is a plain MACE
model), computed here rather than read from MACE's log, so that every experiment scores every method the same
way; it agrees with MACE's own ``MACECalculator`` to the last digit. :func:`evaluate_file` computes the errors;
:func:`evaluate` (benchmark records) and :func:`errors` (foundation cards) only name them for their reports.

Element filtering. MACE's fine-tuning keeps only the elements of the training data
(``load_foundations_elements`` slices the element-dependent weights and, with ``--E0s average``, refits the
atomic energies), so the fine-tuned model cannot evaluate a source-domain configuration that holds another
element. Forgetting is therefore measured on the source configurations made only of the case's training
elements, for the foundation (zero-shot) and every fine-tune alike; the JSON records how many that were.

Changed parameters. The reference is the model as MACE configured it at step 0 (element-filtered, rescaled),
not the foundation file. For a sparse_str run it is recovered bit for bit from the run's own delta file
(:func:`reference_from_sparse_run`); see :mod:`harness.pipeline.runner` for the other cases.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Union

import ase.io
import mace  # noqa: F401  (before e3nn)
import numpy as np
import torch
from mace import data

from mace_sparse.artifacts.delta_file import changed_mask, revert_delta
from mace_sparse.artifacts.fingerprint import model_fingerprint
from mace_sparse.mace_io import atomic_data, default_dtype, load_trusted_model, loader, z_table

PathLike = Union[str, Path]


def load_model(path: PathLike) -> torch.nn.Module:
    """A saved model as the evaluator scores it: float64, eval mode."""
    return load_trusted_model(path, dtype=torch.float64, eval_mode=True)


def file_elements(path: Path) -> Set[int]:
    """Atomic numbers present in an extxyz file."""
    return {int(z) for atoms in ase.io.read(str(path), ":") for z in atoms.numbers}


def read_frames(path: Path, elements: Optional[Set[int]] = None) -> list:
    """Frames of an extxyz file, only those made of ``elements`` if given."""
    frames = ase.io.read(str(path), ":")
    if elements is not None:
        frames = [a for a in frames if set(int(z) for z in a.numbers) <= elements]
    return frames


def evaluate(model_path: Path, xyz: Path, energy_key: str = "REF_energy", forces_key: str = "REF_forces",
             magmoms_key: Optional[str] = None) -> Dict[str, float]:
    """MAE of ``model_path`` on ``xyz`` (:func:`evaluate_file`) under the benchmark records' names:
    ``energy_mae_per_atom`` / ``energy_mae_per_config`` (meV), ``force_mae`` (meV/Å), ``magmom_mae`` and
    ``magmom_rmse`` (μB, for a ``_magnetic.model`` only) and ``configs``; NaN errors for an empty file."""
    configs = len(read_frames(xyz))
    if configs == 0:
        nan = float("nan")
        return {"energy_mae_per_atom": nan, "energy_mae_per_config": nan, "force_mae": nan, "configs": 0}
    scores = evaluate_file(model_path, xyz, energy_key, forces_key, magmoms_key)
    out = {"energy_mae_per_atom": scores["energy_mae_mev_per_atom"], "energy_mae_per_config": scores["energy_mae_mev"],
           "force_mae": scores["force_mae_mev_per_a"], "configs": configs}
    if "magmom_mae_mub" in scores:
        out["magmom_mae"] = scores["magmom_mae_mub"]
        out["magmom_rmse"] = scores["magmom_rmse_mub"]
    return out


def errors(model_path: PathLike, frames: List, energy_key: str = "REF_energy",
           forces_key: str = "REF_forces") -> Dict:
    """The foundation cards' names for :func:`evaluate_file` on ``frames``: ``n_configs``, energy MAE per atom
    (meV/atom) and MAE/RMSE of the force components (meV/Å)."""
    scores = evaluate_file(model_path, frames, energy_key, forces_key)
    return {"n_configs": len(frames), "energy_mae_mev_per_atom": scores["energy_mae_mev_per_atom"],
            "forces_mae_mev_per_A": scores["force_mae_mev_per_a"],
            "forces_rmse_mev_per_A": scores["force_rmse_mev_per_a"]}


def evaluate_file(
    model_path: PathLike,
    xyz: Union[PathLike, List],
    energy_key: str = "REF_energy",
    forces_key: str = "REF_forces",
    magmoms_key: Optional[str] = None,
    batch_size: int = 8,
) -> Dict[str, float]:
    """MAE of energy (meV/atom and meV per structure), forces (meV/Å) and, for a ``_magnetic.model``,
    moments (μB, magnitudes unless the head is signed) over every frame of ``xyz`` (a file or a list of
    frames); also the force-component RMSE (meV/Å)."""
    model = load_model(Path(model_path))
    frames = list(xyz) if isinstance(xyz, list) else read_frames(Path(xyz))
    keys = data.KeySpecification(info_keys={"energy": energy_key}, arrays_keys={"forces": forces_key})
    with default_dtype(torch.float64):
        items = atomic_data(frames, z_table(model), float(model.r_max), keys)
    de, de_atom, df, dm = [], [], [], []
    signed = bool(getattr(getattr(model, "magnetic_head", None), "signed", False))
    offset = 0
    for batch in loader(items, batch_size):
        out = model(batch.to_dict(), training=False, compute_force=True)
        counts = (batch.ptr[1:] - batch.ptr[:-1]).double()
        diff = (out["energy"] - batch.energy).detach()
        de.append(diff.abs())
        de_atom.append((diff / counts).abs())
        df.append((out["forces"] - batch.forces).detach().reshape(-1))
        if magmoms_key is not None and "magmoms" in out:
            predicted = out["magmoms"].detach().numpy()
            start = 0
            for n in counts.int().tolist():
                atoms = frames[offset]
                offset += 1
                if magmoms_key in atoms.arrays:
                    ref = np.asarray(atoms.arrays[magmoms_key], dtype=float).reshape(-1)
                    ref = ref if signed else np.abs(ref)
                    dm.append(np.abs(predicted[start:start + n] - ref))
                start += n
        else:
            offset += batch.num_graphs
    result = {
        "energy_mae_mev_per_atom": 1e3 * float(torch.cat(de_atom).mean()),
        "energy_mae_mev": 1e3 * float(torch.cat(de).mean()),
        "force_mae_mev_per_a": 1e3 * float(torch.cat(df).abs().mean()),
        "force_rmse_mev_per_a": 1e3 * float(torch.cat(df).square().mean().sqrt()),
    }
    if dm:
        result["magmom_mae_mub"] = float(np.concatenate(dm).mean())
        result["magmom_rmse_mub"] = float(np.sqrt(np.mean(np.square(np.concatenate(dm)))))
    return result


def write_frames(frames: Sequence, path: Path) -> Path:
    """Write ``frames`` as extxyz (the evaluated subset is kept next to the runs, so it can be re-checked)."""
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
    model = load_trusted_model(model_path)
    return revert_delta(model, delta_path, inplace=True)


def fingerprint(model: torch.nn.Module) -> str:
    return model_fingerprint(model)
