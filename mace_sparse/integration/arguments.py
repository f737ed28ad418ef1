"""The command-line flags this package adds to ``mace_run_train`` (also valid as YAML ``--config`` keys).

Each flag is registered with both spellings (``--finetune-method`` and ``--finetune_method``); configargparse
maps YAML keys onto the same option strings, so either spelling works in a config file too.
"""

from __future__ import annotations

import argparse
from typing import Optional

from ..config import DEFAULT_TARGETS, GRANULARITIES, TARGET_KINDS, SparseConfig, SparseConfigError
from ..magnetism.config import MAGMOM_LOSSES, MagneticConfig

FINETUNE_METHODS = ("full", "sparse_str")
_DEFAULTS = SparseConfig()
_MAGNETIC_DEFAULTS = MagneticConfig()


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
        *_both("sparse_targets"), dest="sparse_targets", type=str, default=",".join(DEFAULT_TARGETS),
        help="comma list of weight kinds to adapt: " + ", ".join(TARGET_KINDS)
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
        default=_DEFAULTS.threshold_weight_decay,
        help="lambda_tau, decoupled weight decay of the threshold scores: the sparsity knob (higher = sparser)",
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
    add_magnetic_arguments(parser)
    return parser


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
    return SparseConfig(
        targets=args.sparse_targets,
        init_threshold=args.sparse_init_threshold,
        threshold_lr=args.sparse_threshold_lr,
        threshold_weight_decay=args.sparse_threshold_weight_decay,
        granularity=args.sparse_threshold_granularity,
        delta_eps=args.sparse_delta_eps,
        delta_lr_factor=args.sparse_delta_lr_factor,
    )


__all__ = ["add_sparse_arguments", "add_magnetic_arguments", "magnetic_config_from_args", "sparse_config_from_args", "SparseConfigError", "FINETUNE_METHODS"]
