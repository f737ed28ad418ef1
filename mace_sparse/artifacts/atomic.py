"""Write files so that a reader never sees half of one: temp file in the same folder, then rename.

A crash (or a refused delta) must not leave a truncated ``.model`` or ``.safetensors`` behind that a later
step would happily load, so every artifact of this package is written through these helpers.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


class OutputPathError(ValueError):
    """An output location that cannot be written; the message names the path and the fix in one line."""


def unwritable_reason(directory: PathLike) -> Optional[str]:
    """Why files cannot be created in ``directory`` (or the folders that would be made for it), else ``None``.

    Creates nothing that stays: the deepest existing ancestor is probed by creating and deleting one temporary
    file. A real probe, not ``os.access``: the tests and many clusters run as root, for whom ``os.access`` says
    yes to read-only mounts and to ``/proc``, and a path below a regular file only fails when ``mkdir`` runs.
    """
    current = Path(os.path.abspath(directory))
    while not current.exists() and current != current.parent:
        current = current.parent
    if not current.is_dir():
        return f"{current} is a file, not a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=".mace_sparse_probe.", dir=current)
    except OSError as exc:
        return f"cannot create files in {current} ({exc.strerror or type(exc).__name__})"
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return None


def check_writable_file(path: PathLike) -> None:
    """Raise :class:`OutputPathError` unless ``path`` can be written as a file (checked before slow work)."""
    target = Path(path)
    if target.is_dir():
        raise OutputPathError(f"cannot write {path}: it is a directory; give a file name such as {target / 'out.model'}")
    reason = unwritable_reason(target.parent)
    if reason is not None:
        raise OutputPathError(f"cannot write {path}: {reason}; choose an output path in a writable directory")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``, on error removed.

    The location is checked first (:func:`check_writable_file`), so an impossible output fails with one clear
    line instead of an ``OSError`` from deep inside ``mkdir``, and no folder is left behind for it.
    """
    target = Path(path)
    check_writable_file(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; a saved model should get the usual mode
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (fsynced before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def atomic_write_with(path: PathLike, writer: Callable[[Path], None]) -> Path:
    """Let ``writer`` write a temporary file (e.g. ``torch.save``), then rename it onto ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)
