"""Validation of a ``mace_run_train`` run's arguments, before MACE's ``run()`` writes anything.

Every refusal is one line on stderr and a non-zero exit (:func:`fail`), raised before the first act of MACE's
``run()`` (creating ``--log_dir``), so a refused run leaves nothing behind. This module also holds the
guard every MACE patch of the package is tied to: :data:`TESTED_MACE_VERSIONS` and
:func:`check_mace_version`. The checks themselves live in :mod:`.run_guards` (flags, restarts, promised
outputs) and :mod:`.input_checks` (output dirs, foundation, data); this module runs them in order and turns
their :class:`~mace_sparse.config.SparseConfigError` into the one-line exit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, NoReturn, Optional, Tuple

from ..config import SparseConfig, SparseConfigError
from ..foundations import resolve
from ..magnetism.config import MagneticConfig, MagneticConfigError
from ..magnetism.data import MomentDataError, check_moment_files
from . import run_guards as guards
from .arguments import magnetic_config_from_args, sparse_config_from_args
from .input_checks import _as_paths, check_inputs
from .run_hooks import FineTuneHooks

#: mace-torch releases the patches of this package were written and tested against.
TESTED_MACE_VERSIONS = ("0.3.16",)


def installed_mace_version() -> str:
    # mace is imported here, not at module level: validating a run's flags must not cost MACE's import
    # (seconds) where the caller has not loaded it (in mace_run_train it is loaded already)
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


def fail(message: str) -> NoReturn:
    """One clear line on stderr and a non-zero exit, before MACE has written anything."""
    raise SystemExit(f"mace_run_train: error: {message}")


def guarded(check: Callable, *a: Any) -> None:
    """Run one check; its :class:`SparseConfigError` becomes the one-line exit of :func:`fail`."""
    try:
        check(*a)
    except SparseConfigError as exc:
        fail(str(exc))


def refuse(args: Any, feature: str, incompatible: List[Tuple[str, str]]) -> None:
    """Exit with one line if MACE is not the tested release or a flag ``feature`` cannot honour is set."""
    guarded(check_mace_version)
    for flag, text in incompatible:
        if getattr(args, flag, False):
            fail(f"{feature} cannot be combined with {text}")


def _parsed(build: Callable[[Any], Any], error: type, args: Any) -> Any:
    """The config ``build`` makes of the flags (``None``: the feature is off); its refusal as one line."""
    try:
        return build(args)
    except error as exc:
        fail(str(exc))


def validate_sparse_args(args: Any) -> Optional[SparseConfig]:
    """Check the sparse flags, MACE's flags, the foundation, the data and the output dirs; one line on error.

    Runs before MACE's ``run()`` body, whose first act is to create ``--log_dir``: a refused run writes nothing.
    """
    config = _parsed(sparse_config_from_args, SparseConfigError, args)
    if config is None:
        return None
    refuse(args, "--finetune-method sparse_str", [
        ("lbfgs", "--lbfgs (sparse_str needs a gradient-step optimizer; drop --lbfgs)"),
        ("lora", "--lora (choose one fine-tuning method: drop --lora or --finetune-method sparse_str)"),
        ("enable_cueq", "--enable_cueq (sparse_str runs on the e3nn backend; drop --enable_cueq)"),
        ("only_cueq", "--only_cueq (sparse_str runs on the e3nn backend; drop --only_cueq)"),
        ("enable_oeq", "--enable_oeq (sparse_str runs on the e3nn backend; drop --enable_oeq)"),
    ])
    if not getattr(args, "foundation_model", None):
        fail("--finetune-method sparse_str needs a pretrained model: add --foundation_model PATH")
    guarded(check_inputs, args)  # output dirs, the foundation file, the data (see input_checks for why)
    return config


def validate_magnetic_args(args: Any) -> Optional[MagneticConfig]:
    """Check the ``--magmom*`` flags and the moment labels in the data files; exits with one line if bad."""
    config = _parsed(magnetic_config_from_args, MagneticConfigError, args)
    if config is None:
        return None
    refuse(args, "the magnetic head (--magmom_weight > 0)", [
        ("lora", "--lora (its merge at save time does not see the head); drop --lora"),
        ("enable_cueq", "--enable_cueq (the head reads e3nn node features); drop --enable_cueq"),
        ("only_cueq", "--only_cueq (the head reads e3nn node features); drop --only_cueq"),
        ("enable_oeq", "--enable_oeq (the head reads e3nn node features); drop --enable_oeq"),
    ])
    train_files = _as_paths(getattr(args, "train_file", None))
    others = _as_paths(getattr(args, "valid_file", None)) + _as_paths(getattr(args, "test_file", None))
    for path in train_files + others:
        if path and not Path(path).suffix.lower() in (".xyz", ".extxyz"):
            fail(
                f"the magnetic head reads moments from extxyz files only, but got {path!r} "
                "(HDF5/LMDB datasets drop custom per-atom arrays); pass .xyz files"
            )
    try:
        check_moment_files(train_files, others, config.key)
    except MomentDataError as exc:
        fail(str(exc))
    return config


def resolve_bundled_foundation(args: Any) -> None:
    """``mace_sparse:organic`` / ``mace_sparse:inorganic`` → path of the bundled model (in ``args``)."""
    spec = getattr(args, "foundation_model", None)
    if isinstance(spec, str):
        try:
            args.foundation_model = resolve(spec)
        except (ValueError, FileNotFoundError) as exc:
            fail(f"--foundation_model: {exc}")


def validate_run_args(args: Any) -> FineTuneHooks:
    """Every check of the flags this package adds; the hooks of the run (inactive for MACE's own runs).

    ``--foundation_model mace_sparse:<name>`` is turned into the bundled file's path first, for every run.
    """
    resolve_bundled_foundation(args)
    active = getattr(args, "finetune_method", "full") == "sparse_str" or getattr(args, "magmom_weight", 0) > 0
    guarded(guards.check_config_spellings, args, active)
    guarded(guards.check_sparse_flags_need_method, args)
    sparse = validate_sparse_args(args)
    magnetic = validate_magnetic_args(args)
    if magnetic is not None and sparse is None and getattr(args, "foundation_model", None):
        guarded(check_inputs, args)  # a full fine-tune with the head gets the same early checks as sparse_str
    if sparse is not None or magnetic is not None:
        guarded(guards.check_promised_outputs, args, sparse is not None, magnetic is not None)
    guarded(guards.check_restart, args, sparse, magnetic is not None)  # also a plain restart on sparse checkpoints
    return FineTuneHooks(args, sparse, magnetic)
