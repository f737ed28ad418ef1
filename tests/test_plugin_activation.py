"""The start-up hook: cheap for programs that never import MACE, active in mace_run_train, off on request."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = (
    "import json, sys\n"
    "before = {m: m in sys.modules for m in ('torch', 'mace', 'mace_sparse._bootstrap')}\n"
    "print(json.dumps(before))\n"
)

PARSER_PROBE = (
    "import json, mace.cli.run_train as rt, mace.tools\n"
    "p = mace.tools.build_default_arg_parser()\n"
    "opts = sorted(o for a in p._actions for o in a.option_strings if 'finetune' in o or 'sparse' in o)\n"
    "print(json.dumps(opts))\n"
)


def _python(code: str, disable: bool = False, last: int = 1):
    """The last line the code prints (the last ``last`` lines, as a list, when ``last`` > 1)."""
    env = dict(os.environ)
    env.pop("MACE_SPARSE_DISABLE", None)
    if disable:
        env["MACE_SPARSE_DISABLE"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if last == 1 else lines[-last:]


def test_startup_hook_imports_nothing_heavy():
    loaded = json.loads(_python(PROBE))
    assert loaded == {"torch": False, "mace": False, "mace_sparse._bootstrap": True}


def test_startup_hook_loads_only_the_off_switch():
    """At start-up the package contributes the hook and the leaf it reads ``MACE_SPARSE_DISABLE`` from, no more."""
    code = "import json, sys\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith('mace_sparse'))))\n"
    assert json.loads(_python(code)) == ["mace_sparse", "mace_sparse._bootstrap", "mace_sparse.integration",
                                         "mace_sparse.integration.state"]


#: One interpreter for both checks of the plugin's parser (each start of one that imports MACE costs ~5 s):
#: the flags MACE's parser lists, then a sparse_str command line parsed into a SparseConfig.
PLUGIN_PROBE = PARSER_PROBE + (
    "a = p.parse_args(['--name', 'x', '--finetune-method', 'sparse_str', '--sparse-targets', 'linear,radial'])\n"
    "from mace_sparse.integration.arguments import sparse_config_from_args\n"
    "print(json.dumps(sparse_config_from_args(a).to_dict()))\n"
)


@pytest.fixture(scope="module")
def plugin_probe():
    lines = _python(PLUGIN_PROBE, last=2)
    return json.loads(lines[0]), json.loads(lines[1])


def test_flags_appear_in_mace_parser_when_run_train_is_imported(plugin_probe):
    options, _ = plugin_probe
    for name in ("finetune_method", "sparse_targets", "sparse_init_threshold", "sparse_threshold_lr",
                 "sparse_threshold_weight_decay", "sparse_threshold_granularity"):
        assert f"--{name}" in options
        assert f"--{name.replace('_', '-')}" in options


def test_disable_variable_leaves_mace_untouched():
    assert json.loads(_python(PARSER_PROBE, disable=True)) == []


def test_sparse_defaults_parse_from_mace_parser(plugin_probe):
    _, config = plugin_probe
    assert config["targets"] == ["linear", "radial"]
    assert config["granularity"] in ("layer", "path")
