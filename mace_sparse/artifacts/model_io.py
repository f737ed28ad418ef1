"""Load and save whole MACE ``.model`` files for the command line, quietly and atomically.

MACE and e3nn print notices on import (one on stdout, warnings on stderr); the CLI promises machine-readable
stdout (``--json``) and a single error line on stderr, so those notices are kept out of both here.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch

from .atomic import PathLike, atomic_write_with


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
            model = torch.load(path, map_location="cpu", weights_only=False)
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
