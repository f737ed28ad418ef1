"""Errors of a saved model on an extxyz file, computed here (float64, batched) rather than read from MACE's log,
so that every benchmark scores every method the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np

PathLike = Union[str, Path]


def evaluate_file(
    model_path: PathLike,
    xyz: PathLike,
    energy_key: str = "REF_energy",
    forces_key: str = "REF_forces",
    magmoms_key: Optional[str] = None,
    batch_size: int = 8,
) -> Dict[str, float]:
    """MAE of energy (meV/atom and meV per structure), forces (meV/Å) and, for a ``_magnetic.model``,
    moments (μB, magnitudes unless the head is signed) over every frame of ``xyz``."""
    import ase.io
    import torch

    import mace  # noqa: F401  (before e3nn)
    from mace import data
    from mace.tools import torch_geometric
    from mace.tools.utils import AtomicNumberTable

    model = torch.load(model_path, map_location="cpu", weights_only=False).double().eval()
    frames = ase.io.read(str(xyz), ":")
    z_table = AtomicNumberTable([int(z) for z in model.atomic_numbers])
    keys = data.KeySpecification(info_keys={"energy": energy_key}, arrays_keys={"forces": forces_key})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        items = [data.AtomicData.from_config(data.config_from_atoms(a, key_specification=keys), z_table=z_table,
                                             cutoff=float(model.r_max)) for a in frames]
    finally:
        torch.set_default_dtype(previous)
    loader = torch_geometric.dataloader.DataLoader(items, batch_size=batch_size, shuffle=False)
    de, de_atom, df, dm = [], [], [], []
    signed = bool(getattr(getattr(model, "magnetic_head", None), "signed", False))
    offset = 0
    for batch in loader:
        out = model(batch.to_dict(), training=False, compute_force=True)
        counts = (batch.ptr[1:] - batch.ptr[:-1]).double()
        diff = (out["energy"] - batch.energy).detach()
        de.append(diff.abs())
        de_atom.append((diff / counts).abs())
        df.append((out["forces"] - batch.forces).detach().abs().reshape(-1))
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
        "force_mae_mev_per_a": 1e3 * float(torch.cat(df).mean()),
    }
    if dm:
        result["magmom_mae_mub"] = float(np.concatenate(dm).mean())
        result["magmom_rmse_mub"] = float(np.sqrt(np.mean(np.square(np.concatenate(dm)))))
    return result
