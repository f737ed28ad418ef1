"""Where mace-sparse enters ``mace_run_train``: :func:`install`, called once per process.

Two callers: the interpreter start-up hook (:mod:`mace_sparse._bootstrap`) when ``mace_run_train`` imports
``mace.cli.run_train``, and ``mace_sparse_train`` (:mod:`.train_cli`). :func:`install` chooses how the package
reaches MACE for the rest of the process (recorded in :mod:`.state`):

* MACE carries the plugin hook of ``patches/mace-torch-0.3.16-plugin-hooks.patch`` and this package's
  ``mace.plugins`` entry point is installed (:func:`upstream_hook`): the hook adds the flags and starts the
  run (:mod:`.mace_plugin`); ``run`` is only wrapped to remove the run's remaining runtime patches when it
  returns (:func:`.seams.end_hooked_run`).
* otherwise: MACE's argument parser gains the flags, and ``run`` is wrapped so that it validates them before
  anything is written (:mod:`.validation`) and wires the run's seams (:func:`.seams.run_patches`); a
  ``--distributed`` CPU run also gets :func:`.distributed.cpu_distributed_patches`. Without a flag of this
  package it calls MACE's own ``run`` with the same arguments: behaviour is unchanged.

Either way a run whose promised output (delta file, sparsity record) was not written exits non-zero after
MACE's own saves.
"""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Callable, Optional

import mace.tools

from .arguments import add_sparse_arguments
from .distributed import cpu_distributed_patches, needs_cpu_distributed_patches
from .mace_plugin import MaceSparsePlugin
from .seams import end_hooked_run, hooked_run_hooks, run_patches
from .state import HOOK, HOOK_API_VERSION, RUNTIME, set_wiring_mode
from .validation import fail, validate_run_args

_ORIGINAL = "_mace_sparse_original"


def upstream_hook() -> Optional[ModuleType]:
    """``mace.tools.plugins`` when MACE carries the plugin hook *and* will call this package through it.

    Both are needed: a patched MACE without this package's ``mace.plugins`` entry point (an install from an
    older checkout) would never call the plugin, and an unpatched MACE ignores the entry point.
    """
    try:
        from mace.tools import plugins  # only a MACE with the upstream patch has it
    except ImportError:
        return None
    if getattr(plugins, "HOOK_API_VERSION", 0) < HOOK_API_VERSION:
        return None
    try:
        loaded = plugins.load_plugins()
    except Exception:  # noqa: BLE001  (a broken plugin machinery: patch at run time instead)
        return None
    return plugins if any(isinstance(p, MaceSparsePlugin) for p in loaded) else None


def _patched_run(run_train: ModuleType) -> Callable:
    original_run = getattr(run_train, _ORIGINAL + "_run")

    def run(args) -> None:
        """MACE's ``run``; with sparse_str or the moment head this package's patches are active during it, and
        in a ``--distributed`` CPU run the gloo patches."""
        hooks = validate_run_args(args)
        with contextlib.ExitStack() as stack:
            if needs_cpu_distributed_patches(args):
                stack.enter_context(cpu_distributed_patches(run_train, args))
            if hooks.active:
                stack.enter_context(run_patches(run_train, hooks))
            result = original_run(args)
        if hooks.failures:
            fail(hooks.failures[0])  # a promised output was not written: the run did not succeed
        return result

    run.__doc__ = (original_run.__doc__ or "") + "\n(mace-sparse: validates and applies --finetune-method)"
    return run


def _scoped_run(run_train: ModuleType) -> Callable:
    original_run = getattr(run_train, _ORIGINAL + "_run")

    def run(args) -> None:
        """MACE's ``run``; the plugin hook drives mace-sparse, this only removes its leftover patches after."""
        try:
            result = original_run(args)
            hooks = hooked_run_hooks()
        finally:
            end_hooked_run()
        if hooks is not None and hooks.failures:
            fail(hooks.failures[0])  # a promised output was not written: the run did not succeed
        return result

    run.__doc__ = (original_run.__doc__ or "") + "\n(mace-sparse: via the mace.plugins hook)"
    return run


def install(run_train: Optional[ModuleType] = None) -> None:
    """Activate mace-sparse in ``mace.cli.run_train`` (idempotent).

    Called by the import hook when ``mace_run_train`` imports its module, and by ``mace_sparse_train``.
    Where MACE carries the plugin hook (:func:`upstream_hook`), the hook adds the flags, validates and calls
    :class:`~.run_hooks.FineTuneHooks`; ``run`` is only wrapped to remove the remaining runtime patches when it
    returns. Otherwise MACE's parser is wrapped to add the flags and ``run`` to validate and patch every seam.
    """
    if run_train is None:
        # not at module level: importing mace.cli.run_train runs the start-up hook, which imports this module
        import mace.cli.run_train as run_train  # noqa: F811
    if getattr(run_train, _ORIGINAL + "_run", None) is not None:
        return
    setattr(run_train, _ORIGINAL + "_run", run_train.run)
    if upstream_hook() is not None:
        set_wiring_mode(HOOK)
        run_train.run = _scoped_run(run_train)
        return
    set_wiring_mode(RUNTIME)
    original_parser = mace.tools.build_default_arg_parser

    def build_default_arg_parser():
        return add_sparse_arguments(original_parser())

    build_default_arg_parser.__wrapped__ = original_parser
    mace.tools.build_default_arg_parser = build_default_arg_parser
    run_train.run = _patched_run(run_train)
