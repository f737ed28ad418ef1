"""The mechanics of patching MACE: replace a name for a bounded time and put the original back.

MACE as released has no plugin mechanism, so the package replaces names that MACE looks up at call time
(:mod:`.seams` for a sparse_str / moment-head run, :mod:`.distributed` for ``--distributed`` on CPU). Every
replacement here is a context manager, so a run's patches are removed when the run ends, also when it raises.
"""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Any, Callable, Iterator, List


@contextlib.contextmanager
def replaced(owner: Any, name: str, new: Any) -> Iterator[None]:
    """``owner.name = new`` while the context is open; the old value is restored on exit."""
    old = getattr(owner, name)
    setattr(owner, name, new)
    try:
        yield
    finally:
        setattr(owner, name, old)


class Patcher:
    """Replaces names for the length of a run and remembers which, so the run log can say how it was wired."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack = stack
        self.names: List[str] = []

    def replace(self, owner: ModuleType, name: str, new: Callable) -> None:
        self.stack.enter_context(replaced(owner, name, new))
        self.names.append(f"{owner.__name__}.{name}")
