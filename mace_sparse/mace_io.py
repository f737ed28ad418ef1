"""Everything this package reads from and writes for MACE, in one place: atoms → MACE batch, model files, and the
names of the files a run writes.

* **Batches.** :func:`atomic_data` turns ASE frames into MACE's ``AtomicData`` (``config_from_atoms`` →
  ``AtomicData.from_config``) for a model (:func:`z_table`, cutoff ``r_max``, :func:`heads`);
  :func:`batch` and :func:`loader` put them together. ``AtomicData`` takes torch's *default* dtype, so the
  data are built under :func:`default_dtype` — MACE's own ``mace.tools.torch_tools.default_dtype``, which
  restores the previous dtype on a normal exit only; the wrapper here restores it on an exception too. Models
  that MACE builds in the default dtype (``remove_pt_head``, ``ScaleShiftMACE``) are built under it as well.
* **Model files.** A ``.model`` is a pickled ``torch.nn.Module`` (``torch.save`` of the whole model):
  :func:`load_model` is the checked load of the command line and the run's input checks (anything else is
  refused with one line, MACE's import notices kept off stdout/stderr); :func:`load_trusted_model` is the raw
  load of a file this package or the harness wrote itself (optionally cast and put in eval mode);
  :func:`save_model` writes one atomically. Every ``torch.load(..., weights_only=False)`` of a model goes
  through :func:`read_model_file`.
* **Output names.** ``<stem>_sparse_delta.safetensors``, ``<stem>_sparsity.json`` and ``<stem>_magnetic.model``
  (:func:`output_paths`), declared once for the run that writes them, its guards and the harness that reads them.

torch is imported at module level; MACE only inside the functions that need it (its import takes seconds and
prints notices, and :mod:`mace_sparse.artifacts.run_outputs` and the harness's training wrapper import this
module for the output names alone).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import warnings
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Union

import torch

from .artifacts.atomic import PathLike, atomic_write_with

# ------------------------------------------------------------------------------------------------ output names

DELTA_SUFFIX = "_sparse_delta.safetensors"
SPARSITY_SUFFIX = "_sparsity.json"
MAGNETIC_SUFFIX = "_magnetic.model"


@dataclasses.dataclass(frozen=True)
class OutputPaths:
    """The files this package adds next to MACE's ``<stem>.model``."""

    delta: Path
    sparsity: Path
    magnetic: Path


def output_paths(directory: PathLike, stem: str) -> OutputPaths:
    """``<directory>/<stem>_sparse_delta.safetensors``, ``..._sparsity.json`` and ``..._magnetic.model``."""
    directory = Path(directory)
    return OutputPaths(directory / f"{stem}{DELTA_SUFFIX}", directory / f"{stem}{SPARSITY_SUFFIX}",
                       directory / f"{stem}{MAGNETIC_SUFFIX}")


# ------------------------------------------------------------------------------------------------ dtype


@contextlib.contextmanager
def default_dtype(dtype: Union[torch.dtype, str]) -> Iterator[None]:
    """MACE's ``default_dtype`` context manager, restoring the previous default dtype on an exception too."""
    from mace.tools.torch_tools import default_dtype as mace_default_dtype  # MACE: seconds, only to build

    previous = torch.get_default_dtype()
    try:
        with mace_default_dtype(dtype):
            yield
    finally:
        torch.set_default_dtype(previous)


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's (first) parameter."""
    return next(model.parameters()).dtype


# ------------------------------------------------------------------------------------------------ atoms → batch


def z_table(model: torch.nn.Module) -> Any:
    """MACE's ``AtomicNumberTable`` of the model's elements, in the model's order."""
    from mace.tools.utils import AtomicNumberTable  # MACE: lazily (module docstring)

    return AtomicNumberTable([int(z) for z in model.atomic_numbers])


def heads(model: torch.nn.Module) -> List[str]:
    """The model's heads (``["Default"]`` for a model without any)."""
    return list(getattr(model, "heads", None) or ["Default"])


def atomic_data(
    frames: Sequence[Any],
    table: Any,
    cutoff: float,
    keys: Optional[Any] = None,
    head: Optional[str] = None,
    head_names: Optional[Sequence[str]] = None,
) -> List[Any]:
    """MACE's ``AtomicData`` of every frame, in the current default dtype (wrap in :func:`default_dtype`).

    ``keys``: MACE's ``KeySpecification`` of the labels to read (none by default); ``head``: the head every
    configuration is evaluated on (MACE's ``"Default"`` if not given); ``head_names``: the model's heads
    (:func:`heads`; MACE takes ``["Default"]`` if not given).
    """
    from mace import data  # MACE: lazily (module docstring)

    keys = data.KeySpecification() if keys is None else keys
    items = []
    for atoms in frames:
        config = data.config_from_atoms(atoms, key_specification=keys)
        if head is not None:
            config.head = head
        items.append(data.AtomicData.from_config(
            config, z_table=table, cutoff=float(cutoff), heads=None if head_names is None else list(head_names)))
    return items


def model_data(model: torch.nn.Module, frames: Sequence[Any], keys: Optional[Any] = None,
               head: Optional[str] = None, dtype: Optional[torch.dtype] = None, table: Any = None) -> List[Any]:
    """:func:`atomic_data` for ``model``: its elements (or ``table``), cutoff and heads, on ``head`` (its first
    head if not given), built under ``dtype`` (the model's own if not given)."""
    names = heads(model)
    with default_dtype(model_dtype(model) if dtype is None else dtype):
        return atomic_data(frames, z_table(model) if table is None else table, float(model.r_max), keys,
                           names[0] if head is None else head, names)


def batch(items: Sequence[Any]) -> Any:
    """One MACE ``Batch`` of ``items``."""
    from mace.tools import torch_geometric  # MACE: lazily (module docstring)

    return torch_geometric.Batch.from_data_list(list(items))


def loader(items: Sequence[Any], batch_size: int) -> Any:
    """MACE's ``DataLoader`` over ``items`` in order."""
    from mace.tools import torch_geometric  # MACE: lazily (module docstring)

    return torch_geometric.dataloader.DataLoader(list(items), batch_size=batch_size, shuffle=False)


# ------------------------------------------------------------------------------------------------ model files


def import_mace_quietly() -> None:
    """``import mace`` (always before e3nn) without its import-time notices."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        import mace  # noqa: F401
        import mace.modules  # noqa: F401


#: What a MACE model has that ``mace_run_train`` reads from a foundation before anything else.
MACE_MODEL_ATTRIBUTES = ("atomic_numbers", "r_max", "interactions")

#: The fix named in every "not a model" message.
MODEL_FIX = "give a .model file saved by mace_run_train (torch.save of the whole model)"


def read_model_file(path: PathLike, device: str = "cpu") -> Any:
    """``torch.load`` of a whole pickled model (``weights_only=False``: a pickle, only for files you trust)."""
    return torch.load(str(path), map_location=device, weights_only=False)


def load_trusted_model(path: PathLike, dtype: Optional[torch.dtype] = None, eval_mode: bool = False,
                       device: str = "cpu") -> torch.nn.Module:
    """A model file written by this package or the harness, unchecked; cast to ``dtype`` and put in eval mode
    if asked."""
    model = read_model_file(path, device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval() if eval_mode else model


def load_model(path: PathLike) -> torch.nn.Module:
    """A full MACE model saved with ``torch.save`` (a pickle: only load files you trust).

    Anything else (a text file, a pickled dict, a bare tensor, a state dict) is refused with one
    :class:`ValueError` line naming the file, what it holds and the fix, so that neither the CLI nor
    ``mace_run_train`` gets as far as an ``AttributeError`` deep inside MACE.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such model file: {path}; {MODEL_FIX}")
    import_mace_quietly()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            model = read_model_file(path)
    except Exception as exc:  # noqa: BLE001  (any unpickling failure means "not a model file")
        raise ValueError(
            f"{path} is not a MACE model (cannot load it: {type(exc).__name__}: {_one_line(exc)}); {MODEL_FIX}"
        ) from exc
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a MACE model; {MODEL_FIX}")
    missing = [name for name in MACE_MODEL_ATTRIBUTES if not hasattr(model, name)]
    if missing:
        raise ValueError(
            f"{path} holds a {type(model).__name__} without {', '.join(missing)}, not a MACE model; {MODEL_FIX}"
        )
    return model


def save_model(model: torch.nn.Module, path: PathLike) -> Path:
    """``torch.save`` the whole model to ``path`` via a temporary file and a rename.

    A write that fails underneath torch (a full disk, a quota, a file-size limit) surfaces from its zip writer
    as ``RuntimeError: ... unexpected pos``; it is re-raised as the ``OSError`` it is, with the usual cause.
    """

    def write(tmp: Path) -> None:
        try:
            torch.save(model, tmp)
        except RuntimeError as exc:
            raise OSError(f"could not write {path} ({_one_line(exc)[:120]}): the disk is full or a quota/size limit "
                          "was reached; free space or choose another -o (nothing was written)") from None

    return atomic_write_with(path, write)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]
