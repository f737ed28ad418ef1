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
import sys
from types import ModuleType
from typing import Any, Callable, Iterator, Optional

from ..config import SparseConfig, SparseConfigError
from .arguments import add_sparse_arguments, sparse_config_from_args
from .input_checks import check_inputs

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
    """Check the sparse flags, MACE's flags, the foundation, the data and the output dirs; one line on error.

    Runs before MACE's ``run()`` body, whose first act is to create ``--log_dir``: a refused run writes nothing.
    """
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
    try:
        check_inputs(args)  # output dirs, the foundation file, the data (see input_checks for why)
    except SparseConfigError as exc:
        _fail(str(exc))
    return config


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
def sparse_run_patches(run_train: ModuleType, args: Any, config: SparseConfig) -> Iterator[dict]:
    """Patch ``run_train`` (and MACE's train loop) for one sparse_str run; restores everything on exit.

    Yields a dict that receives the sparse-trainable model once MACE has configured it.
    """
    from .. import optim
    from ..sparse_model import get_sparse_model, is_sparse_model, merge_and_unload, sparsity_stats
    from ..sparse_model import trainable_parameters_line

    train_module = sys.modules["mace.tools.train"]
    state: dict = {"model": None}
    threshold_lr = config.threshold_lr if config.threshold_lr is not None else args.lr

    original_configure = run_train.configure_model

    def configure_model(*a, **kw):
        model, output_args = original_configure(*a, **kw)
        get_sparse_model(model, config)
        state["model"] = model
        logging.info("===========SPARSE FINE-TUNING (sparse_str)===========")
        logging.info(f"Sparse config: {json.dumps(config.to_dict())}")
        logging.info(trainable_parameters_line(model))
        return model, output_args

    original_params = run_train.get_params_options

    def get_params_options(a, model):
        options = original_params(a, model)
        options["params"] = optim.add_threshold_group(
            options["params"], model, threshold_lr, config.threshold_weight_decay, config.delta_eps
        )
        return options

    original_optimizer = run_train.get_optimizer

    def get_optimizer(a, param_options):
        return optim.register_threshold_decay(original_optimizer(a, param_options))

    original_swa = run_train.get_swa

    def get_swa(a, model, optimizer, *rest, **kw):
        result = original_swa(a, model, optimizer, *rest, **kw)
        optim.keep_threshold_lr_ratio_in_swa(optimizer, a.lr)
        return result

    saved_stages: list = []

    def deepcopy(obj, memo=None):
        copied = copy.deepcopy(obj, memo)
        if is_sparse_model(copied):
            logging.info("Merging the sparse delta into a plain MACE model")
            merge_and_unload(copied)
            # first save-time copy: stage one (<name>.model); the next one: stage two (<name>_stagetwo.model)
            stem = args.name if not saved_stages else f"{args.name}_stagetwo"
            saved_stages.append(stem)
            _write_sparse_artifacts(obj, copied, args.model_dir, stem)
        return copied

    original_log = train_module.valid_err_log

    def valid_err_log(valid_loss, eval_metrics, logger, log_errors, epoch=None, valid_loader_name="Default"):
        model = state["model"]
        if model is None:
            return original_log(valid_loss, eval_metrics, logger, log_errors, epoch, valid_loader_name)
        stats = sparsity_stats(model)
        eval_metrics["sparsity"] = stats.layer_sparsity
        eval_metrics["total_sparsity"] = stats.total_sparsity
        eval_metrics["mean_threshold"] = stats.mean_threshold
        flt = _AppendToMessage(
            f", sparsity={100 * stats.layer_sparsity:.2f} %, mean_delta={stats.mean_threshold:.3e}"
        )
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
        yield state


def _write_sparse_artifacts(sparse_model: Any, merged: Any, model_dir: str, stem: str) -> None:
    """``<stem>_sparse_delta.safetensors`` and ``<stem>_sparsity.json`` next to the model MACE is saving.

    A failure here is logged, not raised: the merged ``.model`` (the run's main result) must still be saved.
    """
    from ..artifacts.run_outputs import write_run_artifacts

    try:
        delta_path, json_path = write_run_artifacts(sparse_model, merged, model_dir, stem)
        logging.info(f"Saved sparse delta to {delta_path} and sparsity report to {json_path}")
    except Exception:  # noqa: BLE001
        logging.exception(f"Could not write the sparse delta / sparsity report for {stem}")


# ------------------------------------------------------------------------------------------ entry patches


def _patched_run(run_train: ModuleType) -> Callable:
    original_run = getattr(run_train, _ORIGINAL + "_run")

    def run(args) -> None:
        """MACE's ``run``; with ``--finetune-method sparse_str`` the sparse patches are active during it."""
        config = validate_sparse_args(args)
        if config is None:
            return original_run(args)
        with sparse_run_patches(run_train, args, config):
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
