"""Process-wide wiring state of the MACE integration, and its off switch (``MACE_SPARSE_DISABLE``).

One process can reach MACE through two paths: MACE's ``mace.plugins`` hook (a MACE carrying
``patches/mace-torch-0.3.16-plugin-hooks.patch``) or this package's runtime patches. :func:`.entry.install`
chooses one per process and records it here; the plugin (:mod:`.mace_plugin`) reads it so that a run is never
configured twice.

A leaf on purpose: the interpreter start-up hook (:mod:`mace_sparse._bootstrap`) imports this module in every
Python process of the environment to read the off switch, so it imports nothing but ``os`` (no ``typing``, no
other module of the package).
"""

from __future__ import annotations

import os

#: Environment variable that turns the start-up hook and the ``mace.plugins`` entry point off.
DISABLE_ENV = "MACE_SPARSE_DISABLE"

#: The version of MACE's plugin hook API (``mace.tools.plugins.HOOK_API_VERSION``) this package implements.
HOOK_API_VERSION = 1

#: :func:`wiring_mode` values: MACE's plugin hook drives the run, or the runtime patches do.
HOOK = "hook"
RUNTIME = "runtime"


def disabled() -> bool:
    """Whether ``MACE_SPARSE_DISABLE`` is set to something other than empty, ``0``, ``false`` or ``no``."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


class _Wiring:
    """The process-wide choice between MACE's plugin hook and the runtime patches."""

    mode: str | None = None  # None until install() has decided


def wiring_mode() -> str | None:
    """``"hook"`` or ``"runtime"`` once :func:`.entry.install` has run in this process, else ``None``."""
    return _Wiring.mode


def set_wiring_mode(mode: str) -> None:
    """Record the path :func:`.entry.install` chose (:data:`HOOK` or :data:`RUNTIME`)."""
    if mode not in (HOOK, RUNTIME):
        raise ValueError(f"unknown wiring mode {mode!r}")
    _Wiring.mode = mode


def plugin_enabled() -> bool:
    """Whether the ``mace.plugins`` entry point should act when MACE calls it.

    After :func:`.entry.install` chose the hook: yes (also under ``MACE_SPARSE_DISABLE=1`` when
    ``mace_sparse_train`` installed explicitly). After it chose the runtime patches: no, they already do the
    work. Before any install: unless ``MACE_SPARSE_DISABLE`` is set, the switch that also turns the start-up
    hook off.
    """
    if _Wiring.mode is not None:
        return _Wiring.mode == HOOK
    return not disabled()
