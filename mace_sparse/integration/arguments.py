"""The command-line flags this package adds to ``mace_run_train`` (also valid as YAML ``--config`` keys).

Each flag is registered with both spellings (``--finetune-method`` and ``--finetune_method``); configargparse
maps YAML keys onto the same option strings, so either spelling works in a config file too.
"""

from __future__ import annotations

import argparse
from typing import Optional

from ..config import DEFAULT_TARGETS, GRANULARITIES, TARGET_KINDS, THRESHOLD_SCALES, SparseConfig, SparseConfigError
from ..magnetism.config import MAGMOM_LOSSES, MagneticConfig

FINETUNE_METHODS = ("full", "sparse_str")
_DEFAULTS = SparseConfig()
_MAGNETIC_DEFAULTS = MagneticConfig()
#: The ``--sparse_*`` flags and their defaults: given on a run without ``--finetune-method sparse_str`` they
#: would do nothing, which :func:`~.run_guards.check_sparse_flags_need_method` refuses.
SPARSE_FLAG_DEFAULTS = {
    "sparse_targets": ",".join(DEFAULT_TARGETS),
    "sparse_init_threshold": _DEFAULTS.init_threshold,
    "sparse_threshold_lr": None,
    # None: 1.0, or 0 with --sparse_budget (the two together are refused; sparse_config_from_args)
    "sparse_threshold_weight_decay": None,
    "sparse_threshold_granularity": _DEFAULTS.granularity,
    "sparse_delta_eps": _DEFAULTS.delta_eps,
    "sparse_delta_lr_factor": _DEFAULTS.delta_lr_factor,
    "sparse_budget": _DEFAULTS.budget,
    "sparse_threshold_scale": _DEFAULTS.threshold_scale,
    "sparse_retrain_support": _DEFAULTS.retrain_support,
    "sparse_delta_init_std": _DEFAULTS.delta_init_std,
    "sparse_straight_through": _DEFAULTS.straight_through,
}


def _both(name: str) -> list:
    """``--a_b`` and ``--a-b`` for a flag written with underscores."""
    underscored = "--" + name
    hyphenated = "--" + name.replace("_", "-")
    return [hyphenated, underscored] if hyphenated != underscored else [underscored]


def add_sparse_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the sparse_str flags to MACE's parser (idempotent)."""
    if any("--finetune_method" in a.option_strings for a in parser._actions):
        return parser
    group = parser.add_argument_group("mace-sparse: sparsity-promoting fine-tuning (STR)")
    group.add_argument(
        *_both("finetune_method"), dest="finetune_method", choices=FINETUNE_METHODS, default="full",
        help="'full': MACE's own fine-tuning; 'sparse_str': frozen foundation + soft-thresholded sparse delta",
    )
    group.add_argument(
        *_both("sparse_targets"), dest="sparse_targets", type=str, nargs="+", default=",".join(DEFAULT_TARGETS),
        help="weight kinds to adapt, comma- or space-separated (a YAML list works too): " + ", ".join(TARGET_KINDS)
        + ", or 'all' (every parameter MACE would train; the run logs the share adapted per kind)",
    )
    group.add_argument(
        *_both("sparse_init_threshold"), dest="sparse_init_threshold", type=float,
        default=_DEFAULTS.init_threshold,
        help="initial threshold delta (absolute, as in the paper; delta = sigmoid(score))",
    )
    group.add_argument(
        *_both("sparse_threshold_lr"), dest="sparse_threshold_lr", type=float, default=None,
        help="learning rate of the thresholds (default: --lr)",
    )
    group.add_argument(
        *_both("sparse_threshold_weight_decay"), dest="sparse_threshold_weight_decay", type=float,
        default=None,
        help=f"lambda_tau, decoupled weight decay of the threshold scores: the sparsity knob (higher = sparser; "
        f"default {_DEFAULTS.threshold_weight_decay:g}, 0 with --sparse_budget, which it cannot be combined with)",
    )
    group.add_argument(
        *_both("sparse_threshold_granularity"), dest="sparse_threshold_granularity", choices=GRANULARITIES,
        default=_DEFAULTS.granularity,
        help="one threshold per weight tensor ('layer') or per irrep path / instruction ('path')",
    )
    group.add_argument(
        *_both("sparse_delta_eps"), dest="sparse_delta_eps", type=float, default=_DEFAULTS.delta_eps,
        help="kappa of the gradient-scaled delta update: delta gradients are divided by their RMS and Adam's "
        "eps is kappa, so entries move in proportion to their gradient's size (0 = plain Adam)",
    )
    group.add_argument(
        *_both("sparse_delta_lr_factor"), dest="sparse_delta_lr_factor", type=float,
        default=_DEFAULTS.delta_lr_factor,
        help="the latent deltas train at this multiple of --lr (the thresholds at --sparse_threshold_lr)",
    )
    group.add_argument(
        *_both("sparse_budget"), dest="sparse_budget", type=float, default=None,
        help="share of the foundation's weights allowed to change (e.g. 0.05): a global cut keeps at most that "
        "many entries non-zero at every step, whatever the task or run length (replaces lambda_tau)",
    )
    group.add_argument(
        *_both("sparse_threshold_scale"), dest="sparse_threshold_scale", choices=THRESHOLD_SCALES,
        default=_DEFAULTS.threshold_scale,
        help="'absolute': thresholds in weight units (the paper); 'relative': as a fraction of each tensor's rms",
    )
    group.add_argument(
        *_both("sparse_retrain_support"), dest="sparse_retrain_support", type=_bool, default=False,
        help="True: when MACE's stage two (--swa) starts, fix which delta entries may move and retrain them "
        "without a threshold (removes the soft threshold's shrinkage)",
    )
    group.add_argument(
        *_both("sparse_delta_init_std"), dest="sparse_delta_init_std", type=float,
        default=_DEFAULTS.delta_init_std,
        help="delta starts at randn * this (0: exactly the foundation at step 0; the paper's code: 1e-2)",
    )
    group.add_argument(
        *_both("sparse_straight_through"), dest="sparse_straight_through", type=_bool, default=True,
        help="True: straight-through delta gradient through the threshold (no dead zone); False: the exact "
        "soft-threshold gradient, zero where |delta| <= threshold (the paper's code)",
    )
    add_magnetic_arguments(parser)
    return parser


def _bool(text: str) -> bool:
    """``True``/``False`` (any case, also yes/no, 1/0) for a flag that takes a value, as MACE's own booleans do."""
    value = str(text).strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def add_magnetic_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``--magmom*`` flags of the per-atom magnetic-moment head."""
    group = parser.add_argument_group("mace-sparse: magnetic-moment head")
    group.add_argument(
        *_both("magmoms_key"), dest="magmoms_key", type=str, default=_MAGNETIC_DEFAULTS.key,
        help="per-atom extxyz array with the reference moments in muB (frames without it get weight 0)",
    )
    group.add_argument(
        *_both("magmom_weight"), dest="magmom_weight", type=float, default=_MAGNETIC_DEFAULTS.weight,
        help="loss weight of the moments; the head is trained (and saved as <name>_magnetic.model) when > 0",
    )
    group.add_argument(
        *_both("magmom_loss"), dest="magmom_loss", choices=MAGMOM_LOSSES, default=_MAGNETIC_DEFAULTS.loss,
        help="per-atom moment loss",
    )
    group.add_argument(
        *_both("magmom_huber_delta"), dest="magmom_huber_delta", type=float,
        default=_MAGNETIC_DEFAULTS.huber_delta, help="delta of the Huber moment loss, in muB",
    )
    group.add_argument(
        *_both("magmom_signed"), dest="magmom_signed", action="store_true", default=False,
        help="predict signed moments (default: magnitudes; geometry alone cannot tell up-down from down-up)",
    )
    group.add_argument(
        *_both("magmom_head_hidden"), dest="magmom_head_hidden", type=int, default=_MAGNETIC_DEFAULTS.hidden,
        help="width of the moment head's hidden layers",
    )
    group.add_argument(
        *_both("magmom_head_lr"), dest="magmom_head_lr", type=float, default=None,
        help="learning rate of the moment head's own optimizer group (default: --lr)",
    )
    return parser


def magnetic_config_from_args(args: argparse.Namespace) -> Optional[MagneticConfig]:
    """The :class:`MagneticConfig` asked for, or ``None`` when the head is off (``--magmom_weight 0``)."""
    config = MagneticConfig(
        key=getattr(args, "magmoms_key", _MAGNETIC_DEFAULTS.key),
        weight=getattr(args, "magmom_weight", 0.0),
        loss=getattr(args, "magmom_loss", _MAGNETIC_DEFAULTS.loss),
        huber_delta=getattr(args, "magmom_huber_delta", _MAGNETIC_DEFAULTS.huber_delta),
        signed=getattr(args, "magmom_signed", False),
        hidden=getattr(args, "magmom_head_hidden", _MAGNETIC_DEFAULTS.hidden),
        head_lr=getattr(args, "magmom_head_lr", None),
    )
    return config if config.enabled else None


def sparse_config_from_args(args: argparse.Namespace) -> Optional[SparseConfig]:
    """The :class:`SparseConfig` asked for on the command line, or ``None`` for MACE's own fine-tuning."""
    if getattr(args, "finetune_method", "full") != "sparse_str":
        return None
    budget = getattr(args, "sparse_budget", None)
    lambda_tau = getattr(args, "sparse_threshold_weight_decay", None)
    if budget is not None and lambda_tau is not None:
        raise SparseConfigError(
            "--sparse_budget and --sparse_threshold_weight_decay both set how sparse the delta gets: give one "
            "(the budget for a share of weights changed, lambda_tau as the expert knob)"
        )
    if lambda_tau is None:
        lambda_tau = 0.0 if budget is not None else _DEFAULTS.threshold_weight_decay
    return SparseConfig(
        targets=args.sparse_targets,
        init_threshold=args.sparse_init_threshold,
        threshold_lr=args.sparse_threshold_lr,
        threshold_weight_decay=lambda_tau,
        granularity=args.sparse_threshold_granularity,
        delta_eps=args.sparse_delta_eps,
        delta_lr_factor=args.sparse_delta_lr_factor,
        delta_init_std=getattr(args, "sparse_delta_init_std", _DEFAULTS.delta_init_std),
        straight_through=getattr(args, "sparse_straight_through", True),
        threshold_scale=getattr(args, "sparse_threshold_scale", _DEFAULTS.threshold_scale),
        budget=budget,
        retrain_support=getattr(args, "sparse_retrain_support", False),
    )


__all__ = ["add_sparse_arguments", "add_magnetic_arguments", "magnetic_config_from_args", "sparse_config_from_args", "SparseConfigError", "FINETUNE_METHODS"]
