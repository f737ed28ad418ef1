"""The seams of ``mace_run_train`` this package wires a run's :class:`.run_hooks.FineTuneHooks` into.

MACE as released has no plugin mechanism, so for the length of a sparse_str or moment-head run
(:func:`run_patches`) the package replaces a few names that ``mace.cli.run_train.run`` looks up at call time.
Where MACE carries the plugin hook proposed in ``patches/mace-torch-0.3.16-plugin-hooks.patch``
(``mace.tools.plugins``) and this package's ``mace.plugins`` entry point is installed, the hook calls the
first group itself (:mod:`.mace_plugin`) and only the rest is patched here (``hooked=True``). Both paths
drive one :class:`~.run_hooks.FineTuneHooks` object per run:

================================  ========  ====================================================
name in MACE                      hook      what the patch adds
================================  ========  ====================================================
``run_train.configure_model``     replaces  reparameterise the configured foundation; attach head
``run_train.get_params_options``  replaces  threshold scores / head in their own groups
``run_train.get_optimizer``       replaces  decoupled λ_τ weight decay as an optimizer step pre-hook
``run_train.get_swa``             replaces  threshold group keeps its lr ratio under SWALR (stage two)
``run_train.deepcopy``            replaces  the save-time copy is merged into a plain MACE model; the
                                            delta file and ``<name>_sparsity.json`` are written
``run_train.get_loss_fn``         replaces  moment term in the loss (moment head only)
``tools.train.valid_err_log``     stays     validation lines also report sparsity, mean δ, moments
``run_train.update_keyspec_…``,   stays     moments through MACE's data, metrics and error tables
``data.utils.config_from_atoms``,           (moment head only)
``tools.train.MACELoss``,
``run_train.create_error_table``
================================  ========  ====================================================

Each run logs one ``mace-sparse wiring:`` line naming the path taken and the names it replaced. The patches
were written against :data:`.validation.TESTED_MACE_VERSIONS`: :func:`run_patches` refuses any other release
(the run's validation has already refused it with one line). The patches of the hooked run in progress
(:func:`start_hooked_run`) are opened by the plugin and closed by :func:`.entry.install`'s ``run`` wrapper.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
from types import ModuleType
from typing import Any, Iterator, Optional

from ..config import SparseConfig
from ..magnetism.data import MAGMOMS, wrap_config_from_atoms
from ..magnetism.metrics import add_moment_columns, magnetic_metric_class
from .patching import Patcher, replaced
from .run_hooks import FineTuneHooks
from .state import HOOK_API_VERSION
from .validation import check_mace_version, guarded, validate_run_args


class _AppendToMessage(logging.Filter):
    """Appends a suffix to records while a validation line is being logged."""

    def __init__(self, suffix: str) -> None:
        super().__init__()
        self.suffix = suffix

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"{record.getMessage()}{self.suffix}"
        record.args = ()
        return True


def _patch_hooked_seams(patcher: Patcher, run_train: ModuleType, hooks: FineTuneHooks) -> None:
    """The seams that MACE's plugin hook (``patches/``) also offers: used only where MACE lacks the hook."""
    original_configure = run_train.configure_model

    def configure_model(*a, **kw):
        model, output_args = original_configure(*a, **kw)
        return hooks.configure_model(model), output_args

    original_params = run_train.get_params_options

    def get_params_options(a, model):
        return hooks.param_options(original_params(a, model), model)

    original_optimizer = run_train.get_optimizer

    def get_optimizer(a, param_options):
        return hooks.optimizer(original_optimizer(a, param_options))

    original_swa = run_train.get_swa

    def get_swa(a, model, optimizer, *rest, **kw):
        swa, swas = original_swa(a, model, optimizer, *rest, **kw)
        return hooks.swa(swa, optimizer), swas

    def deepcopy(obj, memo=None):
        return hooks.before_save(obj, copy.deepcopy(obj, memo))

    patcher.replace(run_train, "configure_model", configure_model)
    patcher.replace(run_train, "get_params_options", get_params_options)
    patcher.replace(run_train, "get_optimizer", get_optimizer)
    patcher.replace(run_train, "get_swa", get_swa)
    patcher.replace(run_train, "deepcopy", deepcopy)
    if hooks.magnetic is not None:
        original_loss = run_train.get_loss_fn

        def get_loss_fn(*a, **kw):
            return hooks.loss(original_loss(*a, **kw))

        patcher.replace(run_train, "get_loss_fn", get_loss_fn)


def _patch_unhooked_seams(patcher: Patcher, run_train: ModuleType, hooks: FineTuneHooks) -> None:
    """What the plugin hook does not cover: the validation-line suffix, and moments through data and metrics."""
    train_module = sys.modules["mace.tools.train"]  # the module: mace.tools.train is the function of that name
    original_log = train_module.valid_err_log

    def valid_err_log(valid_loss, eval_metrics, logger, log_errors, epoch=None, valid_loader_name="Default"):
        guarded(hooks.check_finite, valid_loss, epoch)  # a diverged epoch stops here, before it is checkpointed
        flt = _AppendToMessage(hooks.validation_suffix(eval_metrics))
        root = logging.getLogger()
        root.addFilter(flt)
        try:
            return original_log(valid_loss, eval_metrics, logger, log_errors, epoch, valid_loader_name)
        finally:
            root.removeFilter(flt)

    patcher.replace(train_module, "valid_err_log", valid_err_log)
    if hooks.magnetic is not None:
        _patch_magnetic_data_and_metrics(patcher, run_train, train_module, hooks)


def _patch_magnetic_data_and_metrics(
    patcher: Patcher, run_train: ModuleType, train_module: ModuleType, hooks: FineTuneHooks
) -> None:
    """Moments through MACE's data, metrics and error tables (names looked up at call time)."""
    data_utils = sys.modules["mace.data.utils"]
    magnetic = hooks.magnetic
    original_keyspec = run_train.update_keyspec_from_kwargs

    def update_keyspec_from_kwargs(keyspec, keydict):
        result = original_keyspec(keyspec, keydict)
        keyspec.update(arrays_keys={MAGMOMS: keydict.get("magmoms_key") or magnetic.key})
        return result

    original_table = run_train.create_error_table
    tables_module = sys.modules[original_table.__module__]
    original_evaluate = tables_module.evaluate

    def create_error_table(*a, **kw):
        seen: list = []

        def evaluate(*ea, **ekw):
            loss, metrics = original_evaluate(*ea, **ekw)
            seen.append(metrics)
            return loss, metrics

        with replaced(tables_module, "evaluate", evaluate):
            table = original_table(*a, **kw)
        return add_moment_columns(table, seen)

    patcher.replace(run_train, "update_keyspec_from_kwargs", update_keyspec_from_kwargs)
    patcher.replace(data_utils, "config_from_atoms", wrap_config_from_atoms(data_utils.config_from_atoms))
    patcher.replace(train_module, "MACELoss", magnetic_metric_class(train_module.MACELoss, magnetic.signed))
    patcher.replace(run_train, "create_error_table", create_error_table)


@contextlib.contextmanager
def run_patches(run_train: ModuleType, hooks: FineTuneHooks, hooked: bool = False) -> Iterator[FineTuneHooks]:
    """Wire ``hooks`` into ``run_train`` (and MACE's train loop and data code) for one run; restores on exit.

    ``hooked``: MACE calls ``hooks`` through its plugin hook (:mod:`.mace_plugin`), so only the seams the hook
    lacks are patched here; otherwise every seam is. Either way the same ``hooks`` object serves the run, and
    ``hooks.wiring`` records which names were replaced (logged once the run's logger exists).
    """
    check_mace_version()  # the seams above are those of the tested release
    with contextlib.ExitStack() as stack:
        patcher = Patcher(stack)
        if not hooked:
            _patch_hooked_seams(patcher, run_train, hooks)
        _patch_unhooked_seams(patcher, run_train, hooks)
        via = f"MACE plugin hook (mace.tools.plugins, API {HOOK_API_VERSION})" if hooked else "runtime patches only"
        hooks.wiring = f"{via}; runtime patches: {', '.join(patcher.names)}"
        yield hooks


@contextlib.contextmanager
def sparse_run_patches(run_train: ModuleType, args: Any, config: SparseConfig) -> Iterator[dict]:
    """:func:`run_patches` for a sparse_str run without the moment head (kept for callers of the first release).

    Yields a dict that receives the sparse-trainable model once MACE has configured it.
    """
    hooks = FineTuneHooks(args, config, None)
    state: dict = {"model": None}
    original_configure = hooks.configure_model

    def configure_model(model):
        state["model"] = original_configure(model)
        return state["model"]

    hooks.configure_model = configure_model  # type: ignore[method-assign]
    with run_patches(run_train, hooks):
        yield state


# ------------------------------------------------------------------ the run MACE's plugin hook drives


class _HookedRun:
    """The hooked run in progress: its remaining runtime patches, and the hooks MACE calls through the plugin."""

    args_id: Optional[int] = None
    stack: Optional[contextlib.ExitStack] = None
    hooks: Optional[FineTuneHooks] = None


def start_hooked_run(args: Any) -> Optional[FineTuneHooks]:
    """Validate the flags and open the run's remaining runtime patches; the run's hooks, or ``None`` if inactive.

    Called by the plugin from MACE's ``run()``. The patches are closed when ``run()`` returns (the wrapper of
    :func:`.entry.install`), or at the latest when the next run starts.
    """
    hooks = validate_run_args(args)
    if not hooks.active:
        return None
    if _HookedRun.stack is not None and _HookedRun.args_id == id(args):
        logging.getLogger(__name__).warning("mace-sparse plugin asked twice for the same run; the second ignored")
        return None
    end_hooked_run()
    stack = contextlib.ExitStack()
    stack.enter_context(run_patches(sys.modules["mace.cli.run_train"], hooks, hooked=True))
    _HookedRun.stack, _HookedRun.args_id, _HookedRun.hooks = stack, id(args), hooks
    return hooks


def hooked_run_hooks() -> Optional[FineTuneHooks]:
    """The hooks of the hooked run in progress, if any."""
    return _HookedRun.hooks


def end_hooked_run() -> None:
    """Remove the runtime patches of the hooked run in progress, if any."""
    stack, _HookedRun.stack, _HookedRun.args_id, _HookedRun.hooks = _HookedRun.stack, None, None, None
    if stack is not None:
        stack.close()
