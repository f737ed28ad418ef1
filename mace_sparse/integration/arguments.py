"""The command-line flags this package adds to ``mace_run_train`` (also valid as YAML ``--config`` keys).

The flags are generated from the fields of :class:`~mace_sparse.config.SparseConfig` and
:class:`~mace_sparse.magnetism.config.MagneticConfig` (:mod:`mace_sparse.flags`); only ``--finetune-method``,
which chooses between MACE's fine-tuning and this package's, and the rule tying ``--sparse_budget`` to
λ_τ are written here. Each flag is registered with both spellings (``--finetune-method`` and
``--finetune_method``); configargparse maps YAML keys onto the same option strings, so either spelling works in
a config file too.
"""

from __future__ import annotations

import argparse
from typing import Optional

from .. import flags
from ..config import SparseConfig, SparseConfigError
from ..magnetism.config import MagneticConfig

FINETUNE_METHODS = ("full", "sparse_str")
SPARSE_GROUP = "mace-sparse: sparsity-promoting fine-tuning (STR)"
MAGNETIC_GROUP = "mace-sparse: magnetic-moment head"
#: The ``--sparse_*`` flags and their defaults: given on a run without ``--finetune-method sparse_str`` they
#: would do nothing, which :func:`~.run_guards.check_sparse_flags_need_method` refuses.
SPARSE_FLAG_DEFAULTS = flags.flag_defaults(SparseConfig)


def add_sparse_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the sparse_str and magnetic-head flags to MACE's parser (idempotent: each flag is registered once)."""
    group = flags.argument_group(parser, SPARSE_GROUP)
    if not flags.has_flag(parser, "finetune_method"):
        group.add_argument(
            *flags.option_strings("finetune_method"), dest="finetune_method", choices=FINETUNE_METHODS,
            default="full",
            help="'full': MACE's own fine-tuning; 'sparse_str': frozen foundation + soft-thresholded sparse delta",
        )
    flags.add_flags(group, SparseConfig)
    add_magnetic_arguments(parser)
    return parser


def add_magnetic_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``--magmom*`` flags of the per-atom magnetic-moment head."""
    flags.add_flags(flags.argument_group(parser, MAGNETIC_GROUP), MagneticConfig)
    return parser


def magnetic_config_from_args(args: argparse.Namespace) -> Optional[MagneticConfig]:
    """The :class:`MagneticConfig` asked for, or ``None`` when the head is off (``--magmom_weight 0``)."""
    config = flags.config_from_namespace(MagneticConfig, args)
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
    # not given: the field's default (1.0), or 0 with a budget, which then alone sets the sparsity
    overrides = {"threshold_weight_decay": 0.0} if budget is not None else {}
    return flags.config_from_namespace(SparseConfig, args, **overrides)


__all__ = [
    "add_sparse_arguments", "add_magnetic_arguments", "magnetic_config_from_args", "sparse_config_from_args",
    "SparseConfigError", "FINETUNE_METHODS", "SPARSE_FLAG_DEFAULTS",
]
