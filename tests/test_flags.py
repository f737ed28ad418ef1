"""One declaration per setting: the flags of ``mace_run_train`` are generated from the config dataclasses.

Every field of :class:`SparseConfig` / :class:`MagneticConfig` has exactly one flag on MACE's parser (both
spellings, registered once however often the plugin adds them), with the field's default and help; range
checks refuse with one line; a parsed Namespace (command line or YAML ``--config``) builds the config back.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import ClassVar, Optional, Tuple

import mace  # noqa: F401  (before e3nn)
import pytest

from mace_sparse import flags
from mace_sparse.config import SparseConfig, SparseConfigError
from mace_sparse.integration.arguments import (
    SPARSE_FLAG_DEFAULTS,
    add_sparse_arguments,
    magnetic_config_from_args,
    sparse_config_from_args,
)
from mace_sparse.magnetism.config import MagneticConfig, MagneticConfigError

CONFIGS = [SparseConfig, MagneticConfig]


@pytest.fixture(scope="module")
def mace_parser():
    from mace.tools.arg_parser import build_default_arg_parser

    parser = build_default_arg_parser()
    add_sparse_arguments(parser)
    add_sparse_arguments(parser)  # the plugin and the runtime patch may both add them: still once
    return parser


def _actions_for(parser, name):
    return [a for a in parser._actions if a.dest == name]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_has_exactly_one_flag_with_its_default_and_help(mace_parser, cls):
    fields = dataclasses.fields(cls)
    assert fields and all(f.metadata.get("help") for f in fields), "every field is a setting with help"
    for field in fields:
        name = flags.flag_name(cls, field)
        actions = _actions_for(mace_parser, name)
        assert len(actions) == 1, f"{name}: {len(actions)} flags"
        (action,) = actions
        assert action.option_strings == [f"--{name.replace('_', '-')}", f"--{name}"]
        assert action.help
        expected = field.metadata.get("cli_default", field.default)
        assert action.default == expected, name
        if "{default" not in field.metadata["help"]:
            assert action.help == field.metadata["help"]
    options = [opt for a in mace_parser._actions for opt in a.option_strings]
    assert len(options) == len(set(options)), "an option string registered twice"


def test_flag_names_and_defaults_are_the_ones_mace_sparse_always_had(mace_parser):
    assert SPARSE_FLAG_DEFAULTS == {
        "sparse_targets": "linear,skip_tp,contraction,radial,norm,scalar,embedding",
        "sparse_init_threshold": 1e-3, "sparse_threshold_lr": None, "sparse_threshold_weight_decay": None,
        "sparse_threshold_granularity": "layer", "sparse_delta_eps": 1.0, "sparse_delta_lr_factor": 3.0,
        "sparse_delta_init_std": 0.0, "sparse_straight_through": True, "sparse_threshold_scale": "absolute",
        "sparse_budget": None, "sparse_selection": "magnitude", "sparse_retrain_support": False,
    }
    magnetic = {a.dest: a.default for a in mace_parser._actions if a.dest.startswith("magmom")}
    assert magnetic == {"magmoms_key": "REF_magmoms", "magmom_weight": 0.0, "magmom_loss": "mse",
                        "magmom_huber_delta": 0.01, "magmom_signed": False, "magmom_head_hidden": 64,
                        "magmom_head_lr": None}
    help_text = mace_parser.format_help()
    for name in [*SPARSE_FLAG_DEFAULTS, *magnetic, "finetune_method"]:
        assert f"--{name}" in help_text
    (decay,) = _actions_for(mace_parser, "sparse_threshold_weight_decay")
    assert "default 1, 0 with --sparse_budget" in decay.help  # {default:g} filled from the field


def test_defaults_round_trip_to_the_dataclass_defaults(mace_parser):
    args = mace_parser.parse_args(["--name", "t", "--train_file", "x.xyz", "--finetune_method", "sparse_str"])
    assert sparse_config_from_args(args) == SparseConfig()
    assert magnetic_config_from_args(args) is None  # weight 0: the head is off
    plain = mace_parser.parse_args(["--name", "t", "--train_file", "x.xyz"])
    assert sparse_config_from_args(plain) is None


def test_every_setting_round_trips_from_the_command_line(mace_parser):
    args = mace_parser.parse_args([
        "--name", "t", "--train_file", "x.xyz", "--finetune-method", "sparse_str",
        "--sparse_targets", "linear", "radial", "--sparse-init-threshold", "0.01", "--sparse_threshold_lr=0.5",
        "--sparse_threshold_granularity", "path", "--sparse_delta_eps", "0", "--sparse_delta_lr_factor", "1",
        "--sparse_delta_init_std", "0.01", "--sparse_straight_through", "False", "--sparse_threshold_scale",
        "relative", "--sparse_budget", "0.05", "--sparse_retrain_support", "yes",
        "--magmoms_key", "m", "--magmom_weight", "2", "--magmom_loss", "huber", "--magmom_huber_delta", "0.1",
        "--magmom-signed", "--magmom_head_hidden", "8", "--magmom_head_lr", "0.001",
    ])
    assert sparse_config_from_args(args) == SparseConfig(
        targets=("linear", "radial"), init_threshold=0.01, threshold_lr=0.5, threshold_weight_decay=0.0,
        granularity="path", delta_eps=0.0, delta_lr_factor=1.0, delta_init_std=0.01, straight_through=False,
        threshold_scale="relative", budget=0.05, retrain_support=True,
    )
    assert magnetic_config_from_args(args) == MagneticConfig(
        key="m", weight=2.0, loss="huber", huber_delta=0.1, signed=True, hidden=8, head_lr=0.001)
    lam = mace_parser.parse_args(["--name", "t", "--train_file", "x", "--finetune_method", "sparse_str",
                                  "--sparse_threshold_weight_decay", "2.5"])
    assert sparse_config_from_args(lam).threshold_weight_decay == 2.5 and sparse_config_from_args(lam).budget is None


def test_yaml_config_keys_in_either_spelling_reach_the_dataclass(mace_parser, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("name: t\ntrain_file: x.xyz\nfinetune-method: sparse_str\nsparse_targets: [linear, radial]\n"
                      "sparse-straight-through: false\nsparse_budget: 0.1\nmagmom_weight: 1\nmagmom_signed: true\n")
    args = mace_parser.parse_args(["--config", str(config)])
    sparse = sparse_config_from_args(args)
    assert (sparse.targets, sparse.straight_through, sparse.budget) == (("linear", "radial"), False, 0.1)
    assert magnetic_config_from_args(args) == MagneticConfig(weight=1.0, signed=True)


@pytest.mark.parametrize("cls, error, kwargs, line", [
    (SparseConfig, SparseConfigError, {"delta_eps": -1.0}, "--sparse_delta_eps must be >= 0 (0 = plain Adam); got -1.0"),
    (SparseConfig, SparseConfigError, {"threshold_lr": 0.0}, "--sparse_threshold_lr must be > 0; got 0.0"),
    (SparseConfig, SparseConfigError, {"budget": 1.0},
     "--sparse_budget is the share of weights allowed to change, in (0, 1) (e.g. 0.05); got 1.0"),
    (SparseConfig, SparseConfigError, {"granularity": "atom"},
     "--sparse_threshold_granularity must be one of layer, path, element; got 'atom'"),
    (SparseConfig, SparseConfigError, {"delta_lr_factor": float("nan")},
     "--sparse_delta_lr_factor must be > 0 (ΔW lr = factor × --lr); got nan"),
    (SparseConfig, SparseConfigError, {"retrain_support": "no"}, "--sparse_retrain_support must be True or False; got 'no'"),
    (MagneticConfig, MagneticConfigError, {"weight": -1.0}, "--magmom_weight must be >= 0 (got -1.0); 0 switches the head off"),
    (MagneticConfig, MagneticConfigError, {"hidden": 0}, "--magmom_head_hidden must be >= 1 (got 0)"),
    (MagneticConfig, MagneticConfigError, {"loss": "l1"}, "--magmom_loss must be one of mse, huber (got 'l1')"),
])
def test_range_checks_refuse_with_one_line(cls, error, kwargs, line):
    with pytest.raises(error) as info:
        cls(**kwargs)
    assert str(info.value) == line and "\n" not in line


def test_a_bad_value_on_the_command_line_is_refused_by_the_dataclass(mace_parser):
    args = mace_parser.parse_args(["--name", "t", "--train_file", "x", "--finetune_method", "sparse_str",
                                   "--sparse_budget", "2"])
    with pytest.raises(SparseConfigError, match=r"^--sparse_budget is the share .*; got 2.0$"):
        sparse_config_from_args(args)
    with pytest.raises(SystemExit):  # argparse's own refusal of a word that is no boolean
        mace_parser.parse_args(["--name", "t", "--train_file", "x", "--sparse_straight_through", "maybe"])


# ------------------------------------------------------------- the helper itself, as the bench settings use it


@dataclasses.dataclass
class _Bench:
    flag_hyphens: ClassVar[bool] = True

    model_path: Optional[str] = flags.setting(None, flag="model", help="a saved model")
    batch_size: int = flags.setting(2, at_least=1, help="configurations per batch")
    radial_mlp: Tuple[int, ...] = flags.setting(
        (64, 64), parse=lambda t: tuple(int(x) for x in t.strip("[]").split(",")), cli_default="[64,64]",
        help="hidden widths")
    measure_memory: bool = flags.setting(True, flag="no_memory", switch="store_false", help="skip memory")
    seed: int = 0  # not a setting: no flag

    def __post_init__(self) -> None:
        flags.check_settings(self, ValueError)


def test_generic_flags_hyphen_spelling_subset_and_idempotence():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=7)  # already there: left alone
    flags.add_flags(parser, _Bench, only=["model_path", "batch_size", "radial_mlp"])
    flags.add_flags(parser, _Bench)
    flags.add_flags(parser, _Bench)
    options = [opt for a in parser._actions for opt in a.option_strings]
    assert options == ["-h", "--help", "--batch-size", "--model", "--radial-mlp", "--no-memory"]
    args = parser.parse_args(["--model", "m.model", "--radial-mlp", "[8,8,8]", "--no-memory"])
    assert flags.config_from_namespace(_Bench, args) == _Bench(
        model_path="m.model", batch_size=7, radial_mlp=(8, 8, 8), measure_memory=False)
    assert flags.config_from_namespace(_Bench, parser.parse_args([])).radial_mlp == (64, 64)
    assert flags.flag_defaults(_Bench, only=["radial_mlp"]) == {"radial_mlp": "[64,64]"}
    with pytest.raises(ValueError, match=r"^--batch-size must be >= 1; got 0$"):
        _Bench(batch_size=0)
    with pytest.raises(ValueError, match="no setting 'seed'"):
        flags.add_flags(parser, _Bench, only=["seed"])
    prefixed = flags.add_flags(argparse.ArgumentParser(), SparseConfig, prefix="x_", only=["budget", "targets"])
    assert sorted(a.dest for a in prefixed._actions[1:]) == ["x_budget", "x_targets"]
