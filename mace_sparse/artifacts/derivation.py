"""How MACE derived the model a run trained from the foundation file the user passed, recorded and replayed.

``mace_run_train`` never trains the file given as ``--foundation_model``: it selects a head
(``remove_pt_head``, ``--foundation_head``), rebuilds the model for the training elements and heads from the
foundation's own config (``extract_config_mace_model`` → ``ScaleShiftMACE``), copies the weights across with
element filtering and readout expansion (``load_foundations_elements``) and sets E0s and scale/shift from the
run. A delta is relative to that derived model, so ``mace_sparse apply --foundation <the user's file>`` needs the
same derivation: the run records its inputs in the delta header, and :func:`replay_derivation` repeats it with
MACE's own functions. The replayed model must match the recorded fingerprint bit for bit, otherwise the delta
is refused, so an incomplete replay can never produce a wrong model silently.

What is recorded are the values a replay cannot recompute without the run's data: E0s
(``atomic_energies_fn.atomic_energies``) and the scale/shift (``scale_shift.scale``/``.shift``).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..mace_io import default_dtype, load_model, model_dtype
from .fingerprint import model_fingerprint

#: Buffers of the derived model that come from the run's data (E0s, statistics), stored by value.
DATA_BUFFERS = ("atomic_energies_fn.atomic_energies", "scale_shift.scale", "scale_shift.shift")


def _load_source(path: str, dtype: torch.dtype) -> torch.nn.Module:
    """The foundation file as MACE sees it: loaded under the run's default dtype (MACE sets it first)."""
    with default_dtype(dtype):
        return load_model(path)


def record_derivation(args: Any, derived: torch.nn.Module) -> Optional[Dict[str, Any]]:
    """The inputs of MACE's derivation of ``derived`` from ``args.foundation_model`` (``None`` if not a file or
    not a ``ScaleShiftMACE``, the only foundation class MACE rebuilds offline)."""
    path = getattr(args, "foundation_model", None)
    if not path or not os.path.isfile(str(path)) or type(derived).__name__ != "ScaleShiftMACE":
        return None
    dtype = model_dtype(derived)
    source = _load_source(str(path), dtype)
    source_heads = list(getattr(source, "heads", ["Default"]))
    derived_heads = list(getattr(derived, "heads", ["Default"]))
    source_z = [int(z) for z in source.atomic_numbers]
    derived_z = [int(z) for z in derived.atomic_numbers]
    state = derived.state_dict()
    buffers = {
        name: {"shape": list(state[name].shape), "values": state[name].double().reshape(-1).tolist()}
        for name in DATA_BUFFERS
        if name in state
    }
    head = getattr(args, "foundation_head", None)
    steps: List[str] = []
    if len(source_heads) > 1:
        steps.append(f"head selection: {head or 'first non-pt head'} of {source_heads}")
    if derived_z != source_z:
        steps.append(f"element filtering: {source_z} -> {derived_z}")
    if len(derived_heads) > 1:
        steps.append(f"head expansion: {derived_heads}")
    steps.append(f"E0s: {getattr(args, 'E0s', None)}")
    return {
        "source_fingerprint": model_fingerprint(source),
        "source_file": os.path.basename(str(path)),
        "source_heads": source_heads,
        "foundation_head": head,
        "heads": derived_heads,
        "atomic_numbers": derived_z,
        "dtype": str(dtype).replace("torch.", ""),
        "load_readout": bool(getattr(args, "foundation_filter_elements", True)),
        "multiheads_finetuning": bool(getattr(args, "multiheads_finetuning", False)),
        "buffers": buffers,
        "steps": steps,
    }


def describe(derivation: Dict[str, Any]) -> str:
    """One line: what MACE did to the file (for refusals and the report)."""
    return f"{derivation.get('source_file', '?')} -> " + "; ".join(derivation.get("steps", []))


def replay_derivation(source: torch.nn.Module, derivation: Dict[str, Any]) -> torch.nn.Module:
    """Repeat MACE's derivation on ``source`` (the user's foundation file, as loaded) with MACE's own functions."""
    # MACE here, not at module level: the delta layers import this module and `mace_sparse report` reads a
    # delta without loading MACE (~3 s); only a replay (apply/revert on a derived model) needs it
    from mace import modules
    from mace.tools.finetuning_utils import load_foundations_elements
    from mace.tools.scripts_utils import extract_config_mace_model, remove_pt_head
    from mace.tools.utils import AtomicNumberTable

    dtype = getattr(torch, derivation["dtype"])
    with default_dtype(dtype):  # MACE builds every model of a run under the run's default dtype
        model = source
        if len(getattr(model, "heads", ["Default"])) > 1:  # run_train does this whenever the file has heads
            model = remove_pt_head(model, derivation.get("foundation_head"))
        config = extract_config_mace_model(model)
        zs = [int(z) for z in derivation["atomic_numbers"]]
        heads = list(derivation["heads"])
        buffers = derivation["buffers"]

        def values(name: str) -> np.ndarray:
            entry = buffers[name]
            return np.asarray(entry["values"], dtype=np.float64).reshape(entry["shape"])

        config.update(
            atomic_numbers=zs, num_elements=len(zs), heads=heads,
            atomic_energies=values("atomic_energies_fn.atomic_energies"),
            atomic_inter_scale=[1.0] * len(heads), atomic_inter_shift=[0.0] * len(heads),
        )
        derived = modules.ScaleShiftMACE(**config)
        derived = load_foundations_elements(
            derived, model, AtomicNumberTable(zs), load_readout=derivation["load_readout"],
            max_L=config["hidden_irreps"].lmax, default_dtype=dtype,
        )
        state = derived.state_dict()
        with torch.no_grad():
            for name in buffers:
                state[name].copy_(torch.as_tensor(values(name), dtype=state[name].dtype).reshape(state[name].shape))
        return derived
