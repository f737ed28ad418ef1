"""Every patch this package applies to MACE, in one place, each tied to the MACE release it was written for.

``mace_run_train`` has no plugin mechanism (see ``patches/`` for the hook we propose upstream), so the package
replaces a few names that ``mace.cli.run_train.run`` looks up at call time. Three kinds of patch:

* **entry patches**, installed when ``mace.cli.run_train`` is imported (:func:`install`): MACE's argument
  parser gains the sparse flags, and ``run`` is wrapped so that it validates them before anything is written.
  Without a sparse flag the wrapped ``run`` calls MACE's own ``run`` with the same arguments: behaviour is
  unchanged (except that a ``--distributed`` CPU run, which MACE cannot start, gets the patches below).
* **run patches**, active only while a ``--finetune-method sparse_str`` run or a run with the magnetic head
  (``--magmom_weight > 0``) executes (:func:`run_patches`), then removed again. Each only forwards to the
  matching stage of :class:`~mace_sparse.integration.run_hooks.FineTuneHooks`, where the behaviour lives:

  ============================  ===============================================================
  name in MACE                  what the patch adds
  ============================  ===============================================================
  ``run_train.configure_model``  reparameterise the configured (element-filtered) foundation
  ``run_train.get_params_options``  threshold scores in their own group, frozen weights dropped
  ``run_train.get_optimizer``   decoupled λ_τ weight decay as an optimizer step pre-hook
  ``run_train.get_swa``         threshold group keeps its lr ratio under SWALR (stage two)
  ``run_train.deepcopy``        the save-time copy is merged into a plain MACE model; the delta file
                                and ``<name>_sparsity.json`` are written beside it
  ``tools.train.valid_err_log`` validation lines also report sparsity and mean δ (and moment errors)
  ============================  ===============================================================

  With the magnetic head also (:func:`_enter_magnetic_patches`): ``configure_model`` attaches the head and
  ``get_params_options`` gives it a group; ``deepcopy`` writes ``<name>_magnetic.model``; and

  ==================================  =========================================================
  ``run_train.update_keyspec_from_kwargs``  the per-atom moment array joins MACE's key specification
  ``data.utils.config_from_atoms``    frames without moments get zeros with weight 0 (``charges`` pattern)
  ``run_train.get_loss_fn``           MACE's loss plus the weighted moment term
  ``tools.train.MACELoss``            the evaluation metric also collects moment errors
  ``run_train.create_error_table``    MAE/RMSE moment columns in the final error tables
  ==================================  =========================================================

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
import sys
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping, Optional

from ..config import SparseConfig, SparseConfigError
from ..magnetism.config import MagneticConfig, MagneticConfigError
from .arguments import add_sparse_arguments, magnetic_config_from_args, sparse_config_from_args
from .input_checks import check_inputs
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
    sparse = validate_sparse_args(args)
    magnetic = validate_magnetic_args(args)
    if magnetic is not None and sparse is None and getattr(args, "foundation_model", None):
        try:
            check_inputs(args)  # a full fine-tune with the head gets the same early checks as sparse_str
        except SparseConfigError as exc:
            _fail(str(exc))
    return FineTuneHooks(args, sparse, magnetic)


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
        """MACE's ``run``; with sparse_str or the moment head this package's patches are active during it, and
        in a ``--distributed`` CPU run the gloo patches."""
        hooks = validate_run_args(args)
        with contextlib.ExitStack() as stack:
            if needs_cpu_distributed_patches(args):
                stack.enter_context(cpu_distributed_patches(run_train, args))
            if hooks.active:
                stack.enter_context(run_patches(run_train, hooks))
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
