"""Every patch this package applies to MACE, in one place, each tied to the MACE release it was written for.

``mace_run_train`` has no plugin mechanism (see ``patches/`` for the hook we propose upstream), so the package
replaces a few names that ``mace.cli.run_train.run`` looks up at call time. Two kinds of patch:

* **entry patches**, installed when ``mace.cli.run_train`` is imported (:func:`install`): MACE's argument
  parser gains the sparse flags, and ``run`` is wrapped so that it validates them before anything is written.
  Without a sparse flag the wrapped ``run`` calls MACE's own ``run`` with the same arguments: behaviour is
  unchanged.
* **run patches**, active only while a ``--finetune-method sparse_str`` run executes
  (:func:`sparse_run_patches`), then removed again:

  ============================  ===============================================================
  name in MACE                  what the patch adds
  ============================  ===============================================================
  ``run_train.configure_model``  reparameterise the configured (element-filtered) foundation
  ``run_train.get_params_options``  threshold scores in their own group, frozen weights dropped
  ``run_train.get_optimizer``   decoupled λ_τ weight decay as an optimizer step pre-hook
  ``run_train.get_swa``         threshold group keeps its lr ratio under SWALR (stage two)
  ``run_train.deepcopy``        the save-time copy is merged into a plain MACE model; the delta file
                                and ``<name>_sparsity.json`` are written beside it
  ``tools.train.valid_err_log`` validation lines also report sparsity and mean δ
  ============================  ===============================================================
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Optional

from ..config import SparseConfig, SparseConfigError
from ..magnetism.config import MagneticConfig, MagneticConfigError
from .arguments import add_sparse_arguments, magnetic_config_from_args, sparse_config_from_args
from .run_hooks import FineTuneHooks

#: mace-torch releases these patches were written and tested against.
TESTED_MACE_VERSIONS = ("0.3.16",)

_ORIGINAL = "_mace_sparse_original"


def installed_mace_version() -> str:
    import mace

    return str(getattr(mace, "__version__", "unknown"))


def check_mace_version() -> None:
    """Refuse to patch a MACE release the patches were not tested against."""
    version = installed_mace_version()
    if version not in TESTED_MACE_VERSIONS:
        raise SparseConfigError(
            f"mace-sparse was tested with mace-torch {', '.join(TESTED_MACE_VERSIONS)} but {version} is installed; "
            f"install a tested release (pip install 'mace-torch=={TESTED_MACE_VERSIONS[-1]}')"
        )


def _fail(message: str) -> None:
    """One clear line on stderr and a non-zero exit, before MACE has written anything."""
    raise SystemExit(f"mace_run_train: error: {message}")


def validate_sparse_args(args: Any) -> Optional[SparseConfig]:
    """Check the sparse flags against each other and MACE's flags; exits with one line on a bad combination."""
    try:
        config = sparse_config_from_args(args)
    except SparseConfigError as exc:
        _fail(str(exc))
    if config is None:
        return None
    try:
        check_mace_version()
    except SparseConfigError as exc:
        _fail(str(exc))
    incompatible = [
        ("lbfgs", "--lbfgs (sparse_str needs a gradient-step optimizer; drop --lbfgs)"),
        ("lora", "--lora (choose one fine-tuning method: drop --lora or --finetune-method sparse_str)"),
        ("enable_cueq", "--enable_cueq (sparse_str runs on the e3nn backend; drop --enable_cueq)"),
        ("only_cueq", "--only_cueq (sparse_str runs on the e3nn backend; drop --only_cueq)"),
        ("enable_oeq", "--enable_oeq (sparse_str runs on the e3nn backend; drop --enable_oeq)"),
    ]
    for flag, text in incompatible:
        if getattr(args, flag, False):
            _fail(f"--finetune-method sparse_str cannot be combined with {text}")
    foundation = getattr(args, "foundation_model", None)
    if not foundation:
        _fail("--finetune-method sparse_str needs a pretrained model: add --foundation_model PATH")
    if _looks_like_path(foundation) and not Path(foundation).is_file():
        _fail(f"--foundation_model {foundation!r} does not exist; give the path of a MACE .model file")
    return config


def validate_magnetic_args(args: Any) -> Optional[MagneticConfig]:
    """Check the ``--magmom*`` flags and the moment labels in the data files; exits with one line if bad."""
    from ..magnetism.data import MomentDataError, check_moment_files

    try:
        config = magnetic_config_from_args(args)
    except MagneticConfigError as exc:
        _fail(str(exc))
    if config is None:
        return None
    try:
        check_mace_version()
    except SparseConfigError as exc:
        _fail(str(exc))
    for flag, why in [
        ("lora", "--lora (its merge at save time does not see the head); drop --lora"),
        ("enable_cueq", "--enable_cueq (the head reads e3nn node features); drop --enable_cueq"),
        ("only_cueq", "--only_cueq (the head reads e3nn node features); drop --only_cueq"),
        ("enable_oeq", "--enable_oeq (the head reads e3nn node features); drop --enable_oeq"),
    ]:
        if getattr(args, flag, False):
            _fail(f"the magnetic head (--magmom_weight > 0) cannot be combined with {why}")
    train_files = _as_list(getattr(args, "train_file", None))
    others = _as_list(getattr(args, "valid_file", None)) + _as_list(getattr(args, "test_file", None))
    for path in train_files + others:
        if path and not Path(path).suffix.lower() in (".xyz", ".extxyz"):
            _fail(
                f"the magnetic head reads moments from extxyz files only, but got {path!r} "
                "(HDF5/LMDB datasets drop custom per-atom arrays); pass .xyz files"
            )
    try:
        check_moment_files(train_files, others, config.key)
    except MomentDataError as exc:
        _fail(str(exc))
    return config


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v]
    return [str(value)]


def validate_run_args(args: Any) -> FineTuneHooks:
    """Every check of the flags this package adds; the hooks of the run (inactive for MACE's own runs)."""
    return FineTuneHooks(args, validate_sparse_args(args), validate_magnetic_args(args))


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith(".model") or value.endswith(".pt") or Path(value).exists()


# ----------------------------------------------------------------------------------------------- patching


@contextlib.contextmanager
def _replaced(owner: Any, name: str, new: Callable) -> Iterator[None]:
    old = getattr(owner, name)
    setattr(owner, name, new)
    try:
        yield
    finally:
        setattr(owner, name, old)


class _AppendToMessage(logging.Filter):
    """Appends a suffix to records while a validation line is being logged."""

    def __init__(self, suffix: str) -> None:
        super().__init__()
        self.suffix = suffix

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"{record.getMessage()}{self.suffix}"
        record.args = ()
        return True


@contextlib.contextmanager
def run_patches(run_train: ModuleType, hooks: FineTuneHooks) -> Iterator[FineTuneHooks]:
    """Wire ``hooks`` into ``run_train`` (and MACE's train loop and data code) for one run; restores on exit."""
    train_module = sys.modules["mace.tools.train"]
    data_utils = sys.modules["mace.data.utils"]

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
        result = original_swa(a, model, optimizer, *rest, **kw)
        hooks.swa(optimizer)
        return result

    def deepcopy(obj, memo=None):
        return hooks.before_save(obj, copy.deepcopy(obj, memo))

    original_log = train_module.valid_err_log

    def valid_err_log(valid_loss, eval_metrics, logger, log_errors, epoch=None, valid_loader_name="Default"):
        flt = _AppendToMessage(hooks.validation_suffix(eval_metrics))
        root = logging.getLogger()
        root.addFilter(flt)
        try:
            return original_log(valid_loss, eval_metrics, logger, log_errors, epoch, valid_loader_name)
        finally:
            root.removeFilter(flt)

    with contextlib.ExitStack() as stack:
        stack.enter_context(_replaced(run_train, "configure_model", configure_model))
        stack.enter_context(_replaced(run_train, "get_params_options", get_params_options))
        stack.enter_context(_replaced(run_train, "get_optimizer", get_optimizer))
        stack.enter_context(_replaced(run_train, "get_swa", get_swa))
        stack.enter_context(_replaced(run_train, "deepcopy", deepcopy))
        stack.enter_context(_replaced(train_module, "valid_err_log", valid_err_log))
        if hooks.magnetic is not None:
            _enter_magnetic_patches(stack, run_train, train_module, data_utils, hooks)
        yield hooks


def _enter_magnetic_patches(
    stack: contextlib.ExitStack, run_train: ModuleType, train_module: ModuleType, data_utils: ModuleType,
    hooks: FineTuneHooks,
) -> None:
    """Moments through MACE's data, loss, metrics and error tables (names looked up at call time)."""
    from ..magnetism.data import MAGMOMS, wrap_config_from_atoms
    from ..magnetism.metrics import add_moment_columns, magnetic_metric_class

    magnetic = hooks.magnetic
    original_keyspec = run_train.update_keyspec_from_kwargs

    def update_keyspec_from_kwargs(keyspec, keydict):
        result = original_keyspec(keyspec, keydict)
        keyspec.update(arrays_keys={MAGMOMS: keydict.get("magmoms_key") or magnetic.key})
        return result

    original_loss = run_train.get_loss_fn

    def get_loss_fn(*a, **kw):
        return hooks.loss(original_loss(*a, **kw))

    original_table = run_train.create_error_table
    tables_module = sys.modules[original_table.__module__]
    original_evaluate = tables_module.evaluate

    def create_error_table(*a, **kw):
        seen: list = []

        def evaluate(*ea, **ekw):
            loss, metrics = original_evaluate(*ea, **ekw)
            seen.append(metrics)
            return loss, metrics

        with _replaced(tables_module, "evaluate", evaluate):
            table = original_table(*a, **kw)
        return add_moment_columns(table, seen)

    stack.enter_context(_replaced(run_train, "update_keyspec_from_kwargs", update_keyspec_from_kwargs))
    stack.enter_context(_replaced(data_utils, "config_from_atoms", wrap_config_from_atoms(data_utils.config_from_atoms)))
    stack.enter_context(_replaced(run_train, "get_loss_fn", get_loss_fn))
    stack.enter_context(_replaced(train_module, "MACELoss", magnetic_metric_class(train_module.MACELoss, magnetic.signed)))
    stack.enter_context(_replaced(run_train, "create_error_table", create_error_table))


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


# ------------------------------------------------------------------------------------------ entry patches


def _patched_run(run_train: ModuleType) -> Callable:
    original_run = getattr(run_train, _ORIGINAL + "_run")

    def run(args) -> None:
        """MACE's ``run``; with sparse_str or the moment head this package's patches are active during it."""
        hooks = validate_run_args(args)
        if not hooks.active:
            return original_run(args)
        with run_patches(run_train, hooks):
            return original_run(args)

    run.__doc__ = (original_run.__doc__ or "") + "\n(mace-sparse: validates and applies --finetune-method)"
    return run


def install(run_train: Optional[ModuleType] = None) -> None:
    """Install the entry patches into ``mace.cli.run_train`` (idempotent).

    Called by the import hook when ``mace_run_train`` imports its module, and by ``mace_sparse_train``.
    """
    import mace.tools

    if run_train is None:
        import mace.cli.run_train as run_train  # noqa: F811
    if getattr(run_train, _ORIGINAL + "_run", None) is not None:
        return
    setattr(run_train, _ORIGINAL + "_run", run_train.run)
    original_parser = mace.tools.build_default_arg_parser

    def build_default_arg_parser():
        return add_sparse_arguments(original_parser())

    build_default_arg_parser.__wrapped__ = original_parser
    mace.tools.build_default_arg_parser = build_default_arg_parser
    run_train.run = _patched_run(run_train)
