"""The upstream plugin-hook patch (``patches/``): it applies to mace-torch 0.3.16, and a patched MACE drives
mace-sparse through the hook instead of the runtime patches, with the same result.

The installed ``mace`` package is copied into ``tmp_path/site`` and patched there (the installed one is never
touched); ``PYTHONPATH=<site>:<repo>`` makes the subprocesses import the patched copy. The ``mace.plugins``
entry point comes from a minimal dist-info in the same directory, so the test does not depend on how (or
from which checkout) this package was installed; where the real install declares it too, MACE's loader
loads the same target once.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mace  # noqa: F401  (before e3nn)
import pytest
import torch

from conftest import COMMON_ARGS, run_mace_train

REPO = Path(__file__).resolve().parents[1]
PATCH = REPO / "patches" / "mace-torch-0.3.16-plugin-hooks.patch"
ENTRY_POINT = "mace_sparse = mace_sparse.integration.mace_plugin:MaceSparsePlugin"
#: the names only the runtime patches replace; the hook covers them (get_loss_fn only with the moment head)
HOOKED_SEAMS = ["configure_model", "get_params_options", "get_optimizer", "get_swa", "deepcopy"]
WIRING = re.compile(r"mace-sparse wiring: (.*); runtime patches: (.*)$", re.M)


def apply_patch(root: Path) -> str:
    """Apply the patch at ``root`` (the directory holding ``mace/``) with ``patch``, else ``git apply``."""
    if shutil.which("patch"):
        cmd = ["patch", "-p1", "--forward", "--fuzz=0", "--no-backup-if-mismatch", "-i", str(PATCH)]
    elif shutil.which("git"):
        cmd = ["git", "apply", "-p1", "--verbose", str(PATCH)]
    else:
        pytest.skip("neither `patch` nor `git` is installed: cannot apply the upstream patch")
    dry = cmd[:2] + ["--dry-run" if cmd[0] == "patch" else "--check"] + cmd[2:]
    for command in (dry, cmd):
        proc = subprocess.run(command, cwd=root, capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        assert not re.search(r"offset|fuzz|FAILED|reject|trailing whitespace", out, re.I), out
    return out


@pytest.fixture(scope="module")
def patched_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    shutil.copytree(Path(mace.__file__).parent, site / "mace", ignore=shutil.ignore_patterns("__pycache__"))
    apply_patch(site)
    dist = site / "mace_sparse_hooktest-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mace-sparse-hooktest\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(f"[mace.plugins]\n{ENTRY_POINT}\n")
    return site


def pythonpath(*entries: Path) -> str:
    return os.pathsep.join([*map(str, entries), *filter(None, [os.environ.get("PYTHONPATH")])])


def test_patch_touches_three_files_and_only_adds_calls(patched_site):
    plugins = (patched_site / "mace" / "tools" / "plugins.py").read_text()
    assert "HOOK_API_VERSION = 1" in plugins and '"mace.plugins"' in plugins
    text = PATCH.read_text()
    assert re.findall(r"^\+\+\+ b/(\S+)", text, re.M) == [
        "mace/cli/run_train.py", "mace/tools/arg_parser.py", "mace/tools/plugins.py"
    ]
    # it adds calls and changes nothing else: the one removed line is an import that gains `plugins`
    assert re.findall(r"^-(?!--).*$", text, re.M) == ["-from mace.tools import torch_geometric"]


PROBE = """
import json
import mace.cli.run_train as rt, mace.tools
from mace.tools import plugins
from mace_sparse.integration import entry, state

def flags():
    parser = mace.tools.build_default_arg_parser()
    return [o for a in parser._actions for o in a.option_strings if o == "--finetune_method"]

out = {"mace": mace.__file__, "disabled_flags": flags(), "disabled_mode": state.wiring_mode()}
entry.install(rt)  # what mace_sparse_train does
out.update(mode=state.wiring_mode(), flags=flags(), plugins=[type(x).__name__ for x in plugins.load_plugins()])
print(json.dumps(out))
"""


def test_disable_switch_and_explicit_install_with_the_hook(patched_site):
    """MACE_SPARSE_DISABLE=1 leaves a hooked MACE untouched; mace_sparse_train's explicit install re-enables it
    through the hook, adding each flag once."""
    env = {k: v for k, v in os.environ.items() if k != "MACE_SPARSE_DISABLE"}
    env.update(PYTHONPATH=pythonpath(patched_site, REPO), OMP_NUM_THREADS="1", MACE_SPARSE_DISABLE="1")
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mace"].startswith(str(patched_site))
    assert out["disabled_flags"] == [] and out["disabled_mode"] is None
    assert out["mode"] == "hook" and out["flags"] == ["--finetune_method"] and out["plugins"] == ["MaceSparsePlugin"]


@pytest.fixture(scope="module")
def two_runs(tiny_foundation, emt_data, patched_site, tmp_path_factory):
    """The same sparse_str run on the patched MACE (hook) and on the installed one (runtime patches)."""
    import ase.io

    data = tmp_path_factory.mktemp("hookdata") / "slab_small.xyz"
    ase.io.write(data, ase.io.read(emt_data["slab_train"], ":12"), format="extxyz")
    args = [
        "--name", "ft", "--foundation_model", tiny_foundation, "--train_file", data, "--valid_fraction", "0.2",
        "--E0s", "foundation", "--seed", "1", "--lr", "0.01", "--multiheads_finetuning", "False",
        "--plot", "False", "--skip_evaluate_heads", "Default", "--max_num_epochs", "2",
        "--finetune-method", "sparse_str", *COMMON_ARGS,
    ]

    def one(name: str, path: str):
        work = tmp_path_factory.mktemp(f"run-{name}")
        run_mace_train(args, cwd=work, env_extra={"PYTHONPATH": path, "OMP_NUM_THREADS": "1"})
        logs = [p for p in sorted((work / "logs").glob("*.log")) if not p.name.endswith("_debug.log")]
        return work, logs[0].read_text()

    paths = {"hook": pythonpath(patched_site, REPO), "runtime": pythonpath(REPO)}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # one torch thread each
        futures = {name: pool.submit(one, name, path) for name, path in paths.items()}
        return {name: future.result() for name, future in futures.items()}


def wiring(log: str):
    found = WIRING.findall(log)
    assert len(found) == 1, "expected one 'mace-sparse wiring' line"
    via, names = found[0]
    return via, names.split(", ")


def test_hook_replaces_the_runtime_patches_of_its_seams(two_runs):
    _, log = two_runs["hook"]
    via, patched = wiring(log)
    assert via.startswith("MACE plugin hook")
    assert "Plugins taking part in this run: mace_sparse.integration.mace_plugin.MaceSparseRun" in log
    assert not [n for n in patched if n.startswith("mace.cli.run_train.")], patched
    assert patched == ["mace.tools.train.valid_err_log"]  # the validation-line suffix has no hook
    assert len(re.findall(r"Sparse config: ", log)) == 1  # configured once, not by hook and patch both
    assert re.search(r"Epoch 1: .*, sparsity=[\d.]+ %, mean_delta=", log)


def test_without_the_hook_the_runtime_patches_are_used(two_runs):
    _, log = two_runs["runtime"]
    via, patched = wiring(log)
    assert via == "runtime patches only" and "Plugins taking part" not in log
    assert [f"mace.cli.run_train.{n}" for n in HOOKED_SEAMS] == patched[: len(HOOKED_SEAMS)]
    assert "mace.tools.train.valid_err_log" in patched


def test_hook_and_runtime_patches_give_the_same_outputs(two_runs):
    (hook_dir, _), (runtime_dir, _) = two_runs["hook"], two_runs["runtime"]
    for work in (hook_dir, runtime_dir):
        for name in ("ft.model", "ft_compiled.model", "ft_sparse_delta.safetensors", "ft_sparsity.json"):
            assert (work / name).is_file(), (work, name)
    hook_model = torch.load(hook_dir / "ft.model", map_location="cpu", weights_only=False)
    runtime_model = torch.load(runtime_dir / "ft.model", map_location="cpu", weights_only=False)
    assert not [m for m in hook_model.modules() if type(m).__module__.startswith("mace_sparse")]
    a, b = hook_model.state_dict(), runtime_model.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    hook_report = json.loads((hook_dir / "ft_sparsity.json").read_text())
    runtime_report = json.loads((runtime_dir / "ft_sparsity.json").read_text())
    assert hook_report.keys() == runtime_report.keys()


def test_configure_model_twice_is_refused(foundation_model):
    from mace_sparse.config import SparseConfig
    from mace_sparse.integration.run_hooks import FineTuneHooks

    hooks = FineTuneHooks(None, SparseConfig(), None)
    hooks.configure_model(foundation_model)
    with pytest.raises(RuntimeError, match="twice"):
        hooks.configure_model(foundation_model)
