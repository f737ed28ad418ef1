"""Every patch this package applies to MACE, in one place, each tied to the MACE release it was written for.

MACE as released has no plugin mechanism, so the package replaces a few names that ``mace.cli.run_train.run``
looks up at call time. Where MACE carries the plugin hook proposed in
``patches/mace-torch-0.3.16-plugin-hooks.patch`` (``mace.tools.plugins``) *and* this package's ``mace.plugins``
entry point is installed, :func:`install` leaves the seams the hook offers to the hook
(:mod:`.mace_plugin`) and patches only the rest. Both paths drive one :class:`FineTuneHooks` object per run.

* **entry patches**, installed when ``mace.cli.run_train`` is imported (:func:`install`). Without the hook:
  MACE's argument parser gains the flags, and ``run`` is wrapped so that it validates them before anything is
  written (without a flag it calls MACE's own ``run`` with the same arguments: behaviour is unchanged). With
  the hook: ``run`` is only wrapped to remove the run's remaining patches when it returns.
* **run patches**, active only while a sparse_str or moment-head run executes (:func:`run_patches`):

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

Each run logs one ``mace-sparse wiring:`` line naming the path taken and the names it replaced.

* **distributed-on-CPU patches**, active while a ``--distributed`` run with ``--device cpu`` executes, for any
  fine-tuning method (plain training included), since they lift a MACE limitation rather than add a feature
  (:func:`cpu_distributed_patches`). MACE 0.3.16 creates a process group only for cuda (nccl) and xpu (ccl)
  (``tools/distributed_tools.py``, end of ``init_distributed``) and wraps the model as
  ``DDP(model, device_ids=[local_rank])`` (``cli/run_train.py`` lines 896 and 1056), which DDP refuses for a
  CPU module. Everything else MACE does in a distributed run already works on CPU with gloo: samplers,
  barriers, rank-0 logging, rank-0 checkpoints and ``.model`` files, metric reduction.

  ============================  ===============================================================
  name in MACE                  what the patch adds
  ============================  ===============================================================
  ``run_train.init_distributed``  after MACE's own rank/world-size discovery (torchrun, slurm, mpi
                                environment), a gloo process group if MACE made none
  ``run_train.DDP``             no ``device_ids`` for the CPU model (the DDP wrap of lines 896, 1056)
  ``mace.tools.train``          only with ``MACE_SPARSE_RANK_DIGEST`` set (a debugging aid): every
                                rank writes a digest of its model's state dict when training ends
  ============================  ===============================================================

  With ``--finetune-method sparse_str`` DDP wraps the sparse-trainable model: it synchronises the gradients of
  the latent deltas and threshold scores (the only trainable parameters) and broadcasts the frozen foundation
  buffers from rank 0; the threshold decay and ΔW gradient scaling run in the optimizer step, after the
  gradient all-reduce, so every rank applies the same update. The save-time merge sees ``model``, the
  unwrapped module, on rank 0 only (MACE saves there only), so the delta file is written once.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
from types import ModuleType
from pathlib import Path
from typing import Any, Callable, Iterator, List, Mapping, Optional

from ..config import SparseConfig, SparseConfigError
from ..magnetism.config import MagneticConfig, MagneticConfigError
from . import run_guards as guards
from .arguments import add_sparse_arguments, magnetic_config_from_args, sparse_config_from_args
from .input_checks import _as_paths, check_inputs
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


def _refuse(args: Any, feature: str, incompatible: list) -> None:
    """Exit with one line if MACE is not the tested release or a flag ``feature`` cannot honour is set."""
    try:
        check_mace_version()
    except SparseConfigError as exc:
        _fail(str(exc))
    for flag, text in incompatible:
        if getattr(args, flag, False):
            _fail(f"{feature} cannot be combined with {text}")


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
    _refuse(args, "--finetune-method sparse_str", [
        ("lbfgs", "--lbfgs (sparse_str needs a gradient-step optimizer; drop --lbfgs)"),
        ("lora", "--lora (choose one fine-tuning method: drop --lora or --finetune-method sparse_str)"),
        ("enable_cueq", "--enable_cueq (sparse_str runs on the e3nn backend; drop --enable_cueq)"),
        ("only_cueq", "--only_cueq (sparse_str runs on the e3nn backend; drop --only_cueq)"),
        ("enable_oeq", "--enable_oeq (sparse_str runs on the e3nn backend; drop --enable_oeq)"),
    ])
    foundation = getattr(args, "foundation_model", None)
    if not foundation:
        _fail("--finetune-method sparse_str needs a pretrained model: add --foundation_model PATH")
    try:
        check_inputs(args)  # output dirs, the foundation file, the data (see input_checks for why)
    except SparseConfigError as exc:
        _fail(str(exc))
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
    _refuse(args, "the magnetic head (--magmom_weight > 0)", [
        ("lora", "--lora (its merge at save time does not see the head); drop --lora"),
        ("enable_cueq", "--enable_cueq (the head reads e3nn node features); drop --enable_cueq"),
        ("only_cueq", "--only_cueq (the head reads e3nn node features); drop --only_cueq"),
        ("enable_oeq", "--enable_oeq (the head reads e3nn node features); drop --enable_oeq"),
    ])
    train_files = _as_paths(getattr(args, "train_file", None))
    others = _as_paths(getattr(args, "valid_file", None)) + _as_paths(getattr(args, "test_file", None))
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


def resolve_bundled_foundation(args: Any) -> None:
    """``mace_sparse:organic`` / ``mace_sparse:inorganic`` → path of the bundled model (in ``args``)."""
    from ..foundations import resolve

    spec = getattr(args, "foundation_model", None)
    if isinstance(spec, str):
        try:
            args.foundation_model = resolve(spec)
        except (ValueError, FileNotFoundError) as exc:
            _fail(f"--foundation_model: {exc}")


def validate_run_args(args: Any) -> FineTuneHooks:
    """Every check of the flags this package adds; the hooks of the run (inactive for MACE's own runs).

    ``--foundation_model mace_sparse:<name>`` is turned into the bundled file's path first, for every run.
    """
    resolve_bundled_foundation(args)
    active = getattr(args, "finetune_method", "full") == "sparse_str" or getattr(args, "magmom_weight", 0) > 0
    _guarded(guards.check_config_spellings, args, active)
    _guarded(guards.check_sparse_flags_need_method, args)
    sparse = validate_sparse_args(args)
    magnetic = validate_magnetic_args(args)
    if magnetic is not None and sparse is None and getattr(args, "foundation_model", None):
        _guarded(check_inputs, args)  # a full fine-tune with the head gets the same early checks as sparse_str
    if sparse is not None or magnetic is not None:
        _guarded(guards.check_promised_outputs, args, sparse is not None, magnetic is not None)
    _guarded(guards.check_restart, args, sparse, magnetic is not None)  # also a plain restart on sparse checkpoints
    return FineTuneHooks(args, sparse, magnetic)


def _guarded(check: Callable, *a: Any) -> None:
    """Run one check; its :class:`SparseConfigError` becomes the one-line exit of :func:`_fail`."""
    try:
        check(*a)
    except SparseConfigError as exc:
        _fail(str(exc))


# ----------------------------------------------------------------------------------------------- patching


class _Patcher:
    """Replaces names for the length of a run and remembers which, so the run log can say how it was wired."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack = stack
        self.names: List[str] = []

    def replace(self, owner: ModuleType, name: str, new: Callable) -> None:
        self.stack.enter_context(_replaced(owner, name, new))
        self.names.append(f"{owner.__name__}.{name}")


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


def _patch_hooked_seams(patcher: _Patcher, run_train: ModuleType, hooks: FineTuneHooks) -> None:
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


def _patch_unhooked_seams(patcher: _Patcher, run_train: ModuleType, hooks: FineTuneHooks) -> None:
    """What the plugin hook does not cover: the validation-line suffix, and moments through data and metrics."""
    train_module = sys.modules["mace.tools.train"]
    original_log = train_module.valid_err_log

    def valid_err_log(valid_loss, eval_metrics, logger, log_errors, epoch=None, valid_loader_name="Default"):
        _guarded(hooks.check_finite, valid_loss, epoch)  # a diverged epoch stops here, before it is checkpointed
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
    patcher: _Patcher, run_train: ModuleType, train_module: ModuleType, hooks: FineTuneHooks
) -> None:
    """Moments through MACE's data, metrics and error tables (names looked up at call time)."""
    from ..magnetism.data import MAGMOMS, wrap_config_from_atoms
    from ..magnetism.metrics import add_moment_columns, magnetic_metric_class

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

        with _replaced(tables_module, "evaluate", evaluate):
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
    with contextlib.ExitStack() as stack:
        patcher = _Patcher(stack)
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


# ------------------------------------------------------------------------------- choosing hook or patches

#: The version of MACE's plugin hook API (``mace.tools.plugins.HOOK_API_VERSION``) this package implements.
HOOK_API_VERSION = 1

HOOK = "hook"
RUNTIME = "runtime"


class _Wiring:
    """Process-wide choice between MACE's plugin hook and the runtime patches, and the hooked run in progress."""

    mode: Optional[str] = None  # None until install() has decided
    run_args_id: Optional[int] = None
    run_stack: Optional[contextlib.ExitStack] = None
    run_hooks: Optional[FineTuneHooks] = None


def upstream_hook() -> Optional[ModuleType]:
    """``mace.tools.plugins`` when MACE carries the plugin hook *and* will call this package through it.

    Both are needed: a patched MACE without this package's ``mace.plugins`` entry point (an install from an
    older checkout) would never call the plugin, and an unpatched MACE ignores the entry point.
    """
    try:
        from mace.tools import plugins
    except ImportError:
        return None
    if getattr(plugins, "HOOK_API_VERSION", 0) < HOOK_API_VERSION:
        return None
    from .mace_plugin import MaceSparsePlugin

    try:
        loaded = plugins.load_plugins()
    except Exception:  # noqa: BLE001  (a broken plugin machinery: patch at run time instead)
        return None
    return plugins if any(isinstance(p, MaceSparsePlugin) for p in loaded) else None


def wiring_mode() -> Optional[str]:
    """``"hook"`` or ``"runtime"`` once :func:`install` has run in this process, else ``None``."""
    return _Wiring.mode


def plugin_enabled() -> bool:
    """Whether the ``mace.plugins`` entry point should act when MACE calls it.

    After :func:`install` chose the hook: yes (also under ``MACE_SPARSE_DISABLE=1`` when ``mace_sparse_train``
    installed explicitly). After it chose the runtime patches: no, they already do the work. Before any
    install: unless ``MACE_SPARSE_DISABLE`` is set, the switch that also turns the start-up hook off.
    """
    if _Wiring.mode is not None:
        return _Wiring.mode == HOOK
    from .._bootstrap import disabled

    return not disabled()


def start_hooked_run(args: Any) -> Optional[FineTuneHooks]:
    """Validate the flags and open the run's remaining runtime patches; the run's hooks, or ``None`` if inactive.

    Called by the plugin from MACE's ``run()``. The patches are closed when ``run()`` returns (the wrapper of
    :func:`install`), or at the latest when the next run starts.
    """
    hooks = validate_run_args(args)
    if not hooks.active:
        return None
    if _Wiring.run_stack is not None and _Wiring.run_args_id == id(args):
        logging.getLogger(__name__).warning("mace-sparse plugin asked twice for the same run; the second ignored")
        return None
    end_hooked_run()
    stack = contextlib.ExitStack()
    stack.enter_context(run_patches(sys.modules["mace.cli.run_train"], hooks, hooked=True))
    _Wiring.run_stack, _Wiring.run_args_id, _Wiring.run_hooks = stack, id(args), hooks
    return hooks


def end_hooked_run() -> None:
    """Remove the runtime patches of the hooked run in progress, if any."""
    stack, _Wiring.run_stack, _Wiring.run_args_id, _Wiring.run_hooks = _Wiring.run_stack, None, None, None
    if stack is not None:
        stack.close()


# ------------------------------------------------------------------------------------------ entry patches


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
            _fail(hooks.failures[0])  # a promised output was not written: the run did not succeed
        return result

    run.__doc__ = (original_run.__doc__ or "") + "\n(mace-sparse: validates and applies --finetune-method)"
    return run


def _scoped_run(run_train: ModuleType) -> Callable:
    original_run = getattr(run_train, _ORIGINAL + "_run")

    def run(args) -> None:
        """MACE's ``run``; the plugin hook drives mace-sparse, this only removes its leftover patches after."""
        try:
            result = original_run(args)
            hooks = _Wiring.run_hooks
        finally:
            end_hooked_run()
        if hooks is not None and hooks.failures:
            _fail(hooks.failures[0])  # a promised output was not written: the run did not succeed
        return result

    run.__doc__ = (original_run.__doc__ or "") + "\n(mace-sparse: via the mace.plugins hook)"
    return run


def install(run_train: Optional[ModuleType] = None) -> None:
    """Activate mace-sparse in ``mace.cli.run_train`` (idempotent).

    Called by the import hook when ``mace_run_train`` imports its module, and by ``mace_sparse_train``.
    Where MACE carries the plugin hook (:func:`upstream_hook`), the hook adds the flags, validates and calls
    :class:`FineTuneHooks`; ``run`` is only wrapped to remove the remaining runtime patches when it returns.
    Otherwise MACE's parser is wrapped to add the flags and ``run`` to validate and patch every seam.
    """
    import mace.tools

    if run_train is None:
        import mace.cli.run_train as run_train  # noqa: F811
    if getattr(run_train, _ORIGINAL + "_run", None) is not None:
        return
    setattr(run_train, _ORIGINAL + "_run", run_train.run)
    if upstream_hook() is not None:
        _Wiring.mode = HOOK
        run_train.run = _scoped_run(run_train)
        return
    _Wiring.mode = RUNTIME
    original_parser = mace.tools.build_default_arg_parser

    def build_default_arg_parser():
        return add_sparse_arguments(original_parser())

    build_default_arg_parser.__wrapped__ = original_parser
    mace.tools.build_default_arg_parser = build_default_arg_parser
    run_train.run = _patched_run(run_train)


# ------------------------------------------------------------------------------- distributed on CPU

#: Debugging aid: set to a directory and every rank of a distributed run writes ``rank<R>.json`` there when
#: training ends (SHA-256 of each state-dict tensor and of all of them), so that the ranks' weights can be
#: compared although MACE saves checkpoints and models on rank 0 only.
RANK_DIGEST_ENV = "MACE_SPARSE_RANK_DIGEST"


def needs_cpu_distributed_patches(args: Any) -> bool:
    """True for a ``--distributed`` run on ``--device cpu``: the case MACE 0.3.16 does not set up itself."""
    return bool(getattr(args, "distributed", False)) and str(getattr(args, "device", "")) == "cpu"


def state_dict_digest(state_dict: Mapping[str, Any]) -> dict:
    """SHA-256 of every tensor of a state dict (raw bytes, so equal digests mean bit-identical tensors), and
    one over all of them in order. Also used by tests to digest a checkpoint's ``"model"`` entry."""
    import hashlib

    import torch

    per_key = {}
    total = hashlib.sha256()
    for key, value in state_dict.items():
        if not torch.is_tensor(value):
            continue
        raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        digest = hashlib.sha256(raw).hexdigest()
        per_key[key] = digest
        total.update(f"{key}:{value.dtype}:{tuple(value.shape)}:{digest};".encode())
    return {"sha256": total.hexdigest(), "tensors": per_key}


def write_rank_digest(model: Any, directory: str) -> Path:
    """Write ``<directory>/rank<R>.json``: this process's rank and :func:`state_dict_digest` of ``model``."""
    import torch.distributed as dist

    model = getattr(model, "module", model)  # a DDP wrapper would prefix every key with "module."
    grouped = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if grouped else 0
    world_size = dist.get_world_size() if grouped else 1
    record = {"rank": rank, "world_size": world_size, **state_dict_digest(model.state_dict())}
    path = Path(directory) / f"rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return path


@contextlib.contextmanager
def cpu_distributed_patches(run_train: ModuleType, args: Any) -> Iterator[None]:
    """Make MACE's ``--distributed`` path run on CPU processes with the gloo backend; restores on exit.

    On a MACE release other than :data:`TESTED_MACE_VERSIONS` nothing is patched (a warning is printed):
    MACE's own behaviour, whatever it is there, is kept.
    """
    import mace.tools
    import torch.distributed as dist

    try:
        check_mace_version()
    except SparseConfigError as exc:
        sys.stderr.write(f"mace-sparse: distributed CPU training not set up by the plugin ({exc})\n")
        yield
        return

    original_init = run_train.init_distributed

    def init_distributed(a: Any) -> tuple:
        """MACE's rank discovery, then a gloo group: MACE 0.3.16 only creates nccl (cuda) or ccl (xpu) groups.

        ``env://`` reads MASTER_ADDR and MASTER_PORT from the environment: torchrun sets them, MACE's slurm
        branch exports them, its mpi branch expects them from the user (tested: torchrun and slurm).
        """
        rank, local_rank, world_size = original_init(a)
        if a.distributed and a.launcher != "none" and not dist.is_initialized():
            dist.init_process_group(backend="gloo", init_method="env://", rank=rank, world_size=world_size)
        return rank, local_rank, world_size

    original_ddp = run_train.DDP

    def DDP(module: Any, device_ids: Optional[list] = None, **kw: Any) -> Any:  # noqa: N802  (MACE's name)
        """DDP for a CPU module: ``device_ids`` must be left out (DDP raises otherwise)."""
        return original_ddp(module, **kw)

    with contextlib.ExitStack() as stack:
        stack.enter_context(_replaced(run_train, "init_distributed", init_distributed))
        stack.enter_context(_replaced(run_train, "DDP", DDP))
        digest_dir = os.environ.get(RANK_DIGEST_ENV, "").strip()
        if digest_dir:
            original_train = mace.tools.train

            def train(*a: Any, **kw: Any) -> Any:
                """MACE's training loop, then this rank's weight digest (``MACE_SPARSE_RANK_DIGEST``)."""
                result = original_train(*a, **kw)
                write_rank_digest(kw["model"] if "model" in kw else a[0], digest_dir)
                return result

            stack.enter_context(_replaced(mace.tools, "train", train))
        yield
