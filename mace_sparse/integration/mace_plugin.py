"""mace-sparse as a plugin of MACE's ``mace.plugins`` hook (``patches/mace-torch-0.3.16-plugin-hooks.patch``).

Registered in ``pyproject.toml`` under the entry-point group ``mace.plugins``. MACE as released never loads
it; a MACE patched with the hook does, and then calls the methods below instead of this package replacing
names in ``mace.cli.run_train`` (:func:`.entry.install` decides between the two paths, :mod:`.state` records
the choice). The run behaviour itself is :class:`.run_hooks.FineTuneHooks`, shared with the runtime patches,
so both paths train and save the same model; this module only translates the hook's signatures, and
:func:`.seams.start_hooked_run` validates the run and patches what the hook does not cover.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional

import torch

from .arguments import add_sparse_arguments
from .run_hooks import FineTuneHooks
from .seams import start_hooked_run
from .state import HOOK_API_VERSION, plugin_enabled


class MaceSparseRun:
    """The per-run object MACE's hook calls: each stage forwarded to the run's :class:`FineTuneHooks`."""

    def __init__(self, hooks: FineTuneHooks) -> None:
        self.hooks = hooks

    def configure_model(self, model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
        return self.hooks.configure_model(model)

    def param_options(
        self, options: Dict[str, Any], model: torch.nn.Module, args: argparse.Namespace
    ) -> Dict[str, Any]:
        return self.hooks.param_options(options, model)

    def optimizer(self, optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> torch.optim.Optimizer:
        return self.hooks.optimizer(optimizer)

    def swa(self, swa: Any, optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> Any:
        return self.hooks.swa(swa, optimizer)

    def wrap_loss(self, loss_fn: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
        return self.hooks.loss(loss_fn)

    def before_save(
        self, model: torch.nn.Module, model_to_save: torch.nn.Module, args: argparse.Namespace
    ) -> torch.nn.Module:
        return self.hooks.before_save(model, model_to_save)


class MaceSparsePlugin:
    """Entry point of the ``mace.plugins`` group: adds the flags, and takes part in sparse_str / moment runs.

    Stays out (no flags, no run) where :func:`.state.plugin_enabled` says the runtime patches are in
    charge or ``MACE_SPARSE_DISABLE`` is set, so a run is never configured twice.
    """

    #: the hook API this plugin was written for (``mace.tools.plugins.HOOK_API_VERSION``)
    hook_api_version = HOOK_API_VERSION

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        if plugin_enabled():
            add_sparse_arguments(parser)  # idempotent: never registers a flag twice

    def start_run(self, args: argparse.Namespace) -> Optional[MaceSparseRun]:
        """``None`` for MACE's own runs; validates the flags (exits with one line if bad) before MACE writes."""
        if not plugin_enabled():
            return None
        hooks = start_hooked_run(args)
        return MaceSparseRun(hooks) if hooks is not None else None


__all__ = ["MaceSparsePlugin", "MaceSparseRun"]
