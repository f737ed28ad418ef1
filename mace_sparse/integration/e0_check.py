"""Refuse a run whose E0s do not match the absolute energies of its training data (issue 15, item 1).

MACE predicts ``E = Σ_i E0[z_i] + E_interaction``. With ``--E0s foundation`` (the README's example) and DFT
data on another absolute reference (another code, pseudopotentials or all-electron: real PBE iron is about
−3460 eV/atom against −8.3 eV/atom for the bundled inorganic foundation), every label is thousands of eV away
from what the model can predict; MACE trains on and exits 0 with a ruined model (validation RMSE_F 98,031
meV/Å, 13,000 K after 50 MD steps). The mismatch is visible before training: the foundation, with the E0s the
run will use, predicts the first training frames tens to thousands of eV per atom away from their labels,
while any usable reference leaves less than a cohesive energy (< 10 eV/atom).

Only E0s fixed before training are checked (``foundation``, an explicit dict, a JSON file); ``average`` and
``estimated`` are fitted to the training data by MACE and absorb any reference.
"""

from __future__ import annotations

import ast
import json
import logging
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..config import SparseConfigError
from ..mace_io import atomic_data, batch, default_dtype, heads, model_dtype, z_table

#: Median |label − prediction| per atom above which the E0s are taken to be on another reference. Chemistry stays
#: below it: a foundation on data it can fine-tune to is within tenths of an eV/atom, and even E0s that differ
#: from the foundation's by a whole cohesive energy (isolated-atom E0s on a foundation fitted with ``average``)
#: move the labels by less than ~9 eV/atom (tungsten's cohesive energy). Another absolute reference (another
#: code or pseudopotential set, all-electron DFT) is off by tens to thousands of eV/atom.
MAX_OFFSET_EV_PER_ATOM = 10.0
#: Training frames evaluated (one batch through the foundation: about a second for a MACE-MP-sized model).
FRAMES = 16


def run_e0s(spec: Any, foundation_e0s: Dict[int, float]) -> Optional[Dict[int, float]]:
    """The E0s the run will use if they are fixed before training, else ``None`` (fitted by MACE, not checked)."""
    if spec is None:
        return None
    text = str(spec).strip()
    if text.lower() == "foundation":
        return dict(foundation_e0s)
    if text.lower() in ("average", "estimated"):
        return None
    try:
        if text.endswith(".json") and Path(text).is_file():
            loaded = json.loads(Path(text).read_text())
        else:
            loaded = ast.literal_eval(text)
        return {int(z): float(e) for z, e in dict(loaded).items()}
    except (ValueError, SyntaxError, TypeError):
        return None  # a malformed --E0s is MACE's to report


def foundation_e0s(model: Any, head_index: int = 0) -> Dict[int, float]:
    """Atomic number -> the foundation's E0 (of head ``head_index`` for a multi-head model)."""
    energies = model.atomic_energies_fn.atomic_energies.detach().cpu().double()
    if energies.dim() == 2:
        energies = energies[min(head_index, energies.shape[0] - 1)]
    return {int(z): float(e) for z, e in zip(model.atomic_numbers.tolist(), energies.tolist())}


def _head(model: Any, args: Any) -> Tuple[str, int]:
    names = heads(model)
    wanted = getattr(args, "foundation_head", None)
    name = wanted if wanted in names else names[0]
    return name, names.index(name)


def predict_energies(model: Any, frames: Sequence[Any], head: str) -> np.ndarray:
    """The foundation's total energies of ``frames`` (one batch, no forces)."""
    with default_dtype(model_dtype(model)):
        items = atomic_data(frames, z_table(model), float(model.r_max), head=head, head_names=heads(model))
        output = model(batch(items).to_dict(), training=False, compute_force=False)
    return output["energy"].detach().cpu().double().numpy()


def check_e0s(args: Any, model: Any, frames: List[Tuple[Any, float]]) -> None:
    """Refuse if the run's fixed E0s put the training labels far from anything the foundation can predict.

    ``frames``: (atoms, reference energy) of the first training configurations with an energy label.
    """
    if not frames:
        return
    head, head_index = _head(model, args)
    own = foundation_e0s(model, head_index)
    used = run_e0s(getattr(args, "E0s", None), own)
    if used is None:
        return
    if any(int(z) not in used for atoms, _ in frames for z in atoms.numbers):
        return  # an element without an E0: MACE reports that itself
    sample = frames[:FRAMES]
    try:
        predicted = predict_energies(model, [atoms for atoms, _ in sample], head)
    except Exception as exc:  # noqa: BLE001  (a model this check cannot evaluate: MACE's run decides, unchecked)
        logging.getLogger(__name__).debug(f"mace-sparse: E0 check skipped ({type(exc).__name__}: {exc})")
        return
    offsets = []
    for (atoms, energy), total in zip(sample, predicted):
        shift = sum(used[int(z)] - own.get(int(z), 0.0) for z in atoms.numbers)  # the run's E0s, not the model's
        offsets.append((energy - (total + shift)) / len(atoms))
    median = statistics.median(offsets)
    if abs(median) <= MAX_OFFSET_EV_PER_ATOM:
        return
    reference = float(np.mean([energy / len(atoms) for atoms, energy in sample]))
    raise SparseConfigError(
        f"--E0s {args.E0s}: the training energies (about {reference:.1f} eV/atom) are {median:+.1f} eV/atom away "
        f"from what the foundation predicts with these E0s, so the data use another energy reference; "
        "use --E0s average (or estimated), or give the E0s of your own DFT setup as a dict {Z: E0, ...}"
    )
