"""Input checks of a ``--finetune-method sparse_str`` run that MACE 0.3.16 makes late, with a traceback, or never.

They run from :func:`~mace_sparse.integration.validation.validate_sparse_args`, i.e. before MACE's ``run()``
creates its log directory, so a refused run leaves nothing on disk. What MACE 0.3.16 does without them
(measured, see ``tests/test_input_checks.py``):

* **output folders**: ``--model_dir``/``--results_dir`` are first written when training has *finished*; an
  unwritable one loses the whole run at the end. ``--log_dir``/``--checkpoints_dir`` fail with a traceback.
* **foundation file that is not a MACE model** (text, a pickled dict, a tensor): an ``UnpicklingError`` or
  ``AttributeError`` traceback, after the log directory was made.
* **elements the foundation does not know**: ``ValueError: np.int64(8) is not in list`` deep in the E0s or
  ``load_foundations_elements`` code, after data loading. Fine-tuning cannot add an element to a foundation
  (there is no embedding row for it), and sparse_str keeps the foundation frozen, so the only fixes are other
  data or another foundation.
* **NaN/inf labels**: no error at all. Training runs with ``loss=nan`` and MACE saves a NaN model.

Only sparse_str runs are checked: without ``--finetune-method sparse_str`` the plugin promises MACE's own
behaviour, unchanged. The data scan reads each ASE-readable file once with ``ase.io.iread`` (frame by frame, no
neighbour lists); HDF5/LMDB inputs and named foundation models (downloaded by MACE) are left to MACE.
"""

from __future__ import annotations

import ast
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import ase.io
import numpy as np
from ase.data import chemical_symbols

from ..artifacts.atomic import unwritable_reason
from ..mace_io import load_model
from ..config import SparseConfigError
from .e0_check import check_e0s
from .run_guards import explicitly_given

#: The output folders ``mace_run_train`` writes to, and how ``mace.tools.check_args`` defaults them (a folder
#: below ``--work_dir``; ``""`` is the work dir itself).
OUTPUT_DIRS: Tuple[Tuple[str, str], ...] = (
    ("log_dir", "logs"),
    ("checkpoints_dir", "checkpoints"),
    ("results_dir", "results"),
    ("model_dir", ""),
)

#: File extensions MACE reads as pre-processed datasets, not through ASE (left to MACE).
_NON_ASE_SUFFIXES = (".h5", ".hdf5", ".lmdb", ".aselmdb", ".mdb", ".npz")


def check_output_dirs(args: Any) -> None:
    """Every output folder must be creatable and writable now, not when training is over.

    Uses :func:`~mace_sparse.artifacts.atomic.unwritable_reason`, which probes with a temporary file and creates
    nothing that stays (``os.access`` would wave root through on read-only mounts and ``/proc``).
    """
    work_dir = getattr(args, "work_dir", None) or "."
    wanted = [("work_dir", work_dir, work_dir)]
    for flag, default in OUTPUT_DIRS:
        given = getattr(args, flag, None)
        wanted.append((flag, given, given or os.path.join(work_dir, default)))
    seen: Set[str] = set()
    for flag, given, directory in wanted:
        if os.path.abspath(directory) in seen:
            continue
        seen.add(os.path.abspath(directory))
        reason = unwritable_reason(directory)
        if reason is not None:
            shown = f"--{flag} {given}" if given else f"--{flag} (default {directory})"
            raise SparseConfigError(f"{shown} is not writable: {reason}; choose a writable directory with --{flag}")


def check_foundation_model(foundation: str, head: Optional[str] = None) -> Optional[List[int]]:
    """The atomic numbers of the foundation file (see :func:`load_foundation_for_checks`)."""
    model = load_foundation_for_checks(foundation, head)
    return None if model is None else sorted(int(z) for z in model.atomic_numbers.tolist())


def load_foundation_for_checks(foundation: str, head: Optional[str] = None) -> Any:
    """Load a foundation *file* as MACE will, refusing anything that is not a MACE model.

    A ``--foundation_head`` the file does not have is refused too (MACE 0.3.16 raises ``ValueError: Head ...
    not found in model`` with a traceback after the log directory was made, or ignores it on a one-head file).

    Returns ``None`` for a named model (``small``, ``medium_off``, ...), which MACE downloads itself. Costs one
    extra ``torch.load`` of the foundation (about a second for MACE-MP medium), once per run.
    """
    path = Path(foundation)
    if not path.exists():
        if _looks_like_path(foundation):
            raise SparseConfigError(
                f"--foundation_model {foundation!r} does not exist; give the path of a MACE .model file"
            )
        return None  # a model name: MACE resolves and downloads it
    if path.is_dir():
        raise SparseConfigError(
            f"--foundation_model {foundation!r} is a directory; give the path of a MACE .model file"
        )
    try:
        model = load_model(path)
    except ValueError as exc:
        raise SparseConfigError(f"--foundation_model: {exc}") from None
    heads = list(getattr(model, "heads", None) or ["Default"])
    if head is not None and head not in heads:
        raise SparseConfigError(
            f"--foundation_head {head!r} is not a head of {foundation} (it has {', '.join(heads)}); "
            "give one of those"
        )
    return model


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".model", ".pt", ".pth"))


# -------------------------------------------------------------------------------------------------- data


@dataclass
class DataFile:
    """One ASE-readable data file of the run and the label keys MACE will read from it."""

    flag: str
    path: str
    energy_key: str
    forces_key: str
    stress_key: str


@dataclass
class DataScan:
    """What a scan of the data files found: elements and where each was first seen."""

    first_seen: Dict[int, Tuple[str, int]] = field(default_factory=dict)  # Z -> (file, configuration index)
    configurations: int = 0
    #: label kind ("energy", "forces") -> whether any training frame carries it under the run's key
    train_labels: Dict[str, bool] = field(default_factory=dict)
    #: per-atom arrays and info keys seen in the training frames (named in a wrong-key message)
    train_keys: Set[str] = field(default_factory=set)
    #: (atoms, energy) of the first training frames with an energy label, for the E0 check
    energy_frames: List[Tuple[Any, float]] = field(default_factory=list)


def _as_paths(value: Any) -> List[str]:
    """MACE's ``--train_file`` is a path, or a list of paths (YAML list, or a ``"[...]"`` string)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return [text]
        return [str(v) for v in parsed] if isinstance(parsed, (list, tuple)) else [text]
    return [text]


def _ase_readable(path: str) -> bool:
    p = Path(path)
    return p.is_file() and not path.lower().endswith(_NON_ASE_SUFFIXES)


def data_files(args: Any) -> List[DataFile]:
    """The ASE-readable train/valid/test files of the run (per head with ``--heads``), with their label keys."""
    defaults = {
        "energy_key": getattr(args, "energy_key", "REF_energy"),
        "forces_key": getattr(args, "forces_key", "REF_forces"),
        "stress_key": getattr(args, "stress_key", "REF_stress"),
    }
    sources: List[Dict[str, Any]] = [vars(args) if hasattr(args, "__dict__") else dict(args)]
    heads = getattr(args, "heads", None)
    if isinstance(heads, str):
        try:
            heads = ast.literal_eval(heads)
        except (ValueError, SyntaxError):
            heads = None
    if isinstance(heads, dict):
        sources = [h for h in heads.values() if isinstance(h, dict)]
    files: List[DataFile] = []
    for number, source in enumerate(sources):
        keys = {k: source.get(k) or v for k, v in defaults.items()}
        # the replay data of multihead fine-tuning enters the same element table (and the same crash)
        replay = ("pt_train_file", "pt_valid_file") if number == 0 and not isinstance(heads, dict) else ()
        for flag in ("train_file", "valid_file", "test_file", *replay):
            for path in _as_paths(source.get(flag)):
                if _ase_readable(path):
                    files.append(DataFile(flag, path, **keys))
    return files


def _label(atoms: Any, key: str, per_atom: bool) -> Any:
    """The label MACE would read: ``info``/``arrays`` first, then what extxyz put into a calculator."""
    value = atoms.arrays.get(key) if per_atom else atoms.info.get(key)
    if value is None and atoms.calc is not None:
        value = getattr(atoms.calc, "results", {}).get(key)
    return value


def _non_finite(value: Any) -> Optional[str]:
    """``"nan"``/``"inf"`` if a numeric label holds one, else ``None`` (non-numeric labels are MACE's business)."""
    try:
        array = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return None
    if np.isfinite(array).all():
        return None
    return "nan" if np.isnan(array).any() else "inf"


def scan_data(files: Sequence[DataFile]) -> DataScan:
    """Read every file once; raise at the first non-finite energy/forces/stress label, collect the elements."""
    scan = DataScan()
    for item in files:
        try:
            frames: Iterable = ase.io.iread(item.path, index=":")
            for index, atoms in enumerate(frames):
                scan.configurations += 1
                for z in set(int(z) for z in atoms.numbers):
                    scan.first_seen.setdefault(z, (item.path, index))
                for key, per_atom, kind in ((item.energy_key, False, "energy"), (item.forces_key, True, "forces"),
                                            (item.stress_key, False, "stress")):
                    value = _label(atoms, key, per_atom)
                    if item.flag == "train_file":
                        _note_training_label(scan, atoms, kind, value)
                    bad = _non_finite(value) if value is not None else None
                    if bad is not None:
                        raise SparseConfigError(
                            f"--{item.flag} {item.path}: configuration {index} (0-based) has a non-finite {kind} "
                            f"label ({key!r} contains {bad}); fix or remove that configuration "
                            "(MACE would train on a NaN loss and save a NaN model)"
                        )
        except SparseConfigError:
            raise
        except Exception as exc:  # noqa: BLE001  (unreadable files: MACE reports them in its own words)
            logging.getLogger(__name__).debug(f"mace-sparse: not scanning {item.path}: {exc}")
    return scan


#: Frames kept for the E0 check (see :mod:`.e0_check`).
_E0_FRAMES = 16


def _note_training_label(scan: DataScan, atoms: Any, kind: str, value: Any) -> None:
    scan.train_labels[kind] = scan.train_labels.get(kind, False) or value is not None
    if kind == "energy":
        scan.train_keys.update(k for k in atoms.info if isinstance(k, str))
        scan.train_keys.update(k for k in atoms.arrays if k not in ("numbers", "positions"))
        if value is not None and _non_finite(value) is None and len(scan.energy_frames) < _E0_FRAMES:
            try:
                scan.energy_frames.append((atoms, float(np.asarray(value, dtype=float).reshape(-1)[0])))
            except (TypeError, ValueError, IndexError):
                pass


def check_label_keys(args: Any, scan: DataScan) -> None:
    """An explicitly given ``--energy_key``/``--forces_key`` must be in some training frame.

    Without this, MACE trains an energy-only (or forces-only) model from a misspelt key and exits 0.
    """
    for kind in ("forces", "energy"):
        flag = f"{kind}_key"
        if scan.train_labels.get(kind, True) or not explicitly_given(args, flag):
            continue
        key = getattr(args, flag)
        seen = ", ".join(sorted(scan.train_keys)) or "none"
        raise SparseConfigError(
            f"--{flag} {key!r} is in no configuration of the training data (their keys: {seen}); "
            f"give the key your file uses, e.g. --{flag} <one of those>"
        )


def check_elements(scan: DataScan, foundation_zs: Sequence[int], atomic_numbers: Optional[str]) -> None:
    """Every element of the data (and of ``--atomic_numbers``) must be one the foundation was trained on."""
    known = set(int(z) for z in foundation_zs)
    wanted: Dict[int, str] = {}
    for z, (path, index) in scan.first_seen.items():
        wanted.setdefault(z, f"{path}, configuration {index}")
    if atomic_numbers:
        try:
            for z in ast.literal_eval(str(atomic_numbers)):
                wanted.setdefault(int(z), "--atomic_numbers")
        except (ValueError, SyntaxError, TypeError):
            pass  # MACE reports a malformed --atomic_numbers itself
    missing = sorted(z for z in wanted if z not in known)
    if not missing:
        return

    def symbol(z: int) -> str:
        return chemical_symbols[z] if 0 < z < len(chemical_symbols) else f"Z={z}"

    names = ", ".join(symbol(z) for z in missing)
    where = wanted[missing[0]]
    has = ", ".join(symbol(z) for z in sorted(known))
    if where == "--atomic_numbers":
        raise SparseConfigError(
            f"--atomic_numbers lists {names}, which the foundation model does not know (it has {has}); "
            f"fine-tuning cannot add elements: drop {names} from --atomic_numbers or use a foundation trained on them"
        )
    raise SparseConfigError(
        f"the training data contain {names}, which the foundation model does not know (it has {has}; "
        f"first {symbol(missing[0])} in {where}); fine-tuning cannot add elements: remove the configurations "
        f"with {names} or use a foundation trained on them"
    )


def check_inputs(args: Any) -> None:
    """All checks of this module, cheapest first; raises :class:`SparseConfigError` with one line."""
    started = time.perf_counter()
    check_output_dirs(args)
    foundation = load_foundation_for_checks(str(args.foundation_model), getattr(args, "foundation_head", None))
    files = data_files(args)
    scan = scan_data(files)
    check_label_keys(args, scan)
    if foundation is not None:
        check_elements(scan, sorted(int(z) for z in foundation.atomic_numbers.tolist()),
                       getattr(args, "atomic_numbers", None))
        check_e0s(args, foundation, scan.energy_frames)
    # MACE's logger is not set up yet (it would create --log_dir); the cost is kept for debugging only
    logging.getLogger(__name__).debug(
        f"mace-sparse input checks: {scan.configurations} configurations in {len(files)} files, "
        f"{time.perf_counter() - started:.2f} s"
    )
