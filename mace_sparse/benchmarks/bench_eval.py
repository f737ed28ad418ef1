"""Errors of a model on a test set, and how much of the foundation a fine-tune changed.

Evaluation is batched, in float64, with the saved model itself (no training-time hooks: every ``.model`` a
method writes is a plain MACE model), independent of MACE's logged metrics.

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
from typing import Iterable, Optional, Sequence, Set

import torch


@dataclasses.dataclass
class Errors:
    """Mean absolute errors: energy per atom and per configuration (meV), forces per component (meV/Å)."""

    energy_mae_per_atom: float
    energy_mae_per_config: float
    force_mae: float
    configs: int


def load_model(path: Path) -> torch.nn.Module:
    import mace  # noqa: F401  (before e3nn)

    model = torch.load(str(path), map_location="cpu", weights_only=False)
    return model.double().eval()


def model_elements(model: torch.nn.Module) -> Set[int]:
    return {int(z) for z in model.atomic_numbers}


def file_elements(path: Path) -> Set[int]:
    import ase.io

    return {int(z) for atoms in ase.io.read(str(path), ":") for z in atoms.numbers}


def read_frames(path: Path, elements: Optional[Set[int]] = None) -> list:
    """Frames of an extxyz file, only those made of ``elements`` if given."""
    import ase.io

    frames = ase.io.read(str(path), ":")
    if elements is not None:
        frames = [a for a in frames if set(int(z) for z in a.numbers) <= elements]
    return frames


def evaluate(model: torch.nn.Module, frames: Sequence, energy_key: str = "REF_energy",
             forces_key: str = "REF_forces", batch_size: int = 16) -> Errors:
    """Energy and force MAE of ``model`` on ``frames`` (ASE atoms with reference labels), in float64."""
    from mace import data
    from mace.tools import torch_geometric
    from mace.tools.utils import AtomicNumberTable

    if not frames:
        nan = float("nan")
        return Errors(nan, nan, nan, 0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # AtomicData takes the default dtype for positions and labels
    try:
        z_table = AtomicNumberTable([int(z) for z in model.atomic_numbers])
        keys = data.KeySpecification(info_keys={"energy": energy_key}, arrays_keys={"forces": forces_key})
        items = [
            data.AtomicData.from_config(data.config_from_atoms(a, key_specification=keys), z_table=z_table,
                                        cutoff=float(model.r_max))
            for a in frames
        ]
        loader = torch_geometric.dataloader.DataLoader(items, batch_size=batch_size, shuffle=False)
        e_atom, e_conf, f_abs = [], [], []
        for batch in loader:
            out = model(batch.to_dict(), training=False, compute_force=True)
            n_atoms = (batch.ptr[1:] - batch.ptr[:-1]).to(torch.float64)
            diff = (out["energy"].detach() - batch.energy).abs()
            e_conf.append(diff)
            e_atom.append(diff / n_atoms)
            f_abs.append((out["forces"].detach() - batch.forces).abs().reshape(-1))
    finally:
        torch.set_default_dtype(previous)
    return Errors(
        energy_mae_per_atom=1000.0 * float(torch.cat(e_atom).mean()),
        energy_mae_per_config=1000.0 * float(torch.cat(e_conf).mean()),
        force_mae=1000.0 * float(torch.cat(f_abs).mean()),
        configs=len(frames),
    )


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


def union_elements(paths: Iterable[Path]) -> Set[int]:
    out: Set[int] = set()
    for p in paths:
        out |= file_elements(p)
    return out
