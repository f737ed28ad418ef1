"""sparse_str through the real console scripts (``mace_run_train``, ``mace_sparse_train``) in subprocesses.

All runs start together (two at a time, one torch thread each) in a module fixture; the tests then read their
logs and outputs. The saved models are inspected by a separate interpreter started with ``python -S`` (no
``.pth`` start-up files, so neither this plugin's hook nor its editable install is on the path) and
``MACE_SPARSE_DISABLE=1``: if a saved model needed anything from ``mace_sparse`` it would not even unpickle.

Runs use a 12-structure training file, ``--plot False`` and ``--skip_evaluate_heads Default`` (MACE's final
error tables) to stay fast; none of that touches what is tested.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import mace  # noqa: F401  (before e3nn)
import pytest
import torch

from conftest import COMMON_ARGS, run_mace_train
from mace_sparse.config import SparseConfig

DEFAULTS = SparseConfig()
#: a granularity that is not the default, so that the YAML / flag runs prove the setting was read
OTHER_GRANULARITY = "path" if DEFAULTS.granularity == "layer" else "layer"

VALID_LINE = re.compile(
    r"INFO: (Initial|Epoch (\d+)): head: Default, loss=([\d.]+), .*, sparsity=([\d.]+) %, mean_delta=([\d.eE+-]+)$"
)


def log_text(work: Path) -> str:
    logs = sorted((work / "logs").glob("*.log"))
    logs = [p for p in logs if not p.name.endswith("_debug.log")]
    assert logs, f"no log in {work}"
    return logs[0].read_text()


def sparse_config_line(work: Path) -> dict:
    found = re.findall(r"Sparse config: (\{.*\})$", log_text(work), flags=re.M)
    assert len(found) == 1, "expected exactly one 'Sparse config' line"
    return json.loads(found[0])


def validation_lines(work: Path):
    return [m.groups() for m in map(VALID_LINE.search, log_text(work).splitlines()) if m]


@pytest.fixture(scope="module")
def small_train(emt_data, tmp_path_factory) -> Path:
    import ase.io

    path = tmp_path_factory.mktemp("data") / "slab_small.xyz"
    ase.io.write(path, ase.io.read(emt_data["slab_train"], ":12"), format="extxyz")
    return path


@pytest.fixture(scope="module")
def runs(tiny_foundation, small_train, tmp_path_factory):
    base = [
        "--name", "ft", "--foundation_model", tiny_foundation, "--train_file", small_train,
        "--valid_fraction", "0.2", "--E0s", "foundation", "--seed", "1", "--lr", "0.01",
        "--multiheads_finetuning", "False", "--plot", "False", "--skip_evaluate_heads", "Default", *COMMON_ARGS,
    ]
    specs = {
        # longest first: YAML config (non-default granularity) + stage two, 3 epochs
        "yaml": (
            "mace_run_train", ["--config", "sparse.yaml", "--swa", "--start_swa", "2", "--max_num_epochs", "3"], {}
        ),
        "hyphen": ("mace_run_train", ["--finetune-method", "sparse_str", "--max_num_epochs", "2"], {}),
        # the explicit console script, also with the start-up hook off, underscore spelling
        "script": (
            "mace_sparse_train",
            ["--finetune_method", "sparse_str", "--max_num_epochs", "2", "--sparse-targets", "linear,radial",
             "--sparse-init-threshold", "0.002", "--sparse_threshold_weight_decay", "0.5",
             "--sparse-threshold-granularity", OTHER_GRANULARITY],
            {"MACE_SPARSE_DISABLE": "1"},
        ),
        "plain_disabled": ("mace_run_train", ["--max_num_epochs", "1"], {"MACE_SPARSE_DISABLE": "1"}),
        "plain_enabled": ("mace_run_train", ["--max_num_epochs", "1"], {}),
    }

    def one(name):
        script, extra, env = specs[name]
        work = tmp_path_factory.mktemp(f"run-{name}")
        if name == "yaml":
            (work / "sparse.yaml").write_text(
                f"finetune_method: sparse_str\nsparse_threshold_granularity: {OTHER_GRANULARITY}\n"
                "sparse_threshold_lr: 0.005\n"
            )
        proc = run_mace_train(base + extra, cwd=work, env_extra={"OMP_NUM_THREADS": "1", **env}, check=False,
                              script=script)
        return proc, work

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(one, name) for name in specs}
        return {name: f.result() for name, f in futures.items()}


def completed(runs, name) -> Path:
    proc, work = runs[name]
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return work


INSPECT = textwrap.dedent(
    """
    import json, sys
    import mace
    import torch
    import ase.io
    from mace.calculators import MACECalculator
    from mace import data
    from mace.tools import torch_geometric
    from mace.tools.utils import AtomicNumberTable

    spec = json.loads(sys.argv[1])
    torch.set_default_dtype(torch.float64)
    atoms = ase.io.read(spec["structure"], 0)
    foundation = torch.load(spec["foundation"], map_location="cpu", weights_only=False).double()
    # what MACE itself saves for a plain fine-tune of this foundation (its fine-tuning model is rebuilt from
    # the foundation's config, e.g. the Bessel weights become a Parameter there): the sparse run must match it
    reference = torch.load(spec["reference"], map_location="cpu", weights_only=False).double()

    def batch_for(model):
        z_table = AtomicNumberTable([int(z) for z in model.atomic_numbers])
        item = data.AtomicData.from_config(data.config_from_atoms(atoms), z_table=z_table, cutoff=float(model.r_max))
        return torch_geometric.Batch.from_data_list([item]).to_dict()

    def energy(model):
        return float(model(batch_for(model), training=False, compute_force=True)["energy"][0])

    names = lambda items: [n for n, _ in items]
    shapes = lambda model: [tuple(p.shape) for p in model.parameters()]
    classes = lambda model: [type(m).__name__ for m in model.modules()]

    out = {"foundation_energy": energy(foundation)}
    for path in spec["models"]:
        model = torch.load(path, map_location="cpu", weights_only=False)
        res = {
            "classes": sorted({type(m).__module__ for m in model.modules()}),
            "hooks": [n for n, m in model.named_modules()
                      if not isinstance(m, torch.jit.ScriptModule) and (m._forward_hooks or m._forward_pre_hooks)],
            "private_attrs": [n for n, m in model.named_modules()
                              if any(k.startswith("_sparse") for k in m.__dict__)],
            "param_names_equal": names(model.named_parameters()) == names(reference.named_parameters()),
            "shapes_equal": shapes(model) == shapes(reference),
            "classes_equal": classes(model) == classes(reference),
            "state_keys_equal": (list(model.state_dict()) == list(foundation.state_dict())
                                 == list(reference.state_dict())),
            "all_trainable": all(p.requires_grad for p in model.parameters()),
            "direct_energy": energy(model.double()),
        }
        calc = MACECalculator(model_paths=path, device="cpu", default_dtype="float64")
        a = atoms.copy()
        a.calc = calc
        res["calc_energy"] = float(a.get_potential_energy())
        forces = a.get_forces()
        res["calc_forces_shape"] = list(forces.shape)
        res["calc_forces_finite"] = bool((abs(forces) < 1e6).all())
        compiled = path.replace(".model", "_compiled.model")
        try:
            jit_model = torch.jit.load(compiled, map_location="cpu")
            res["compiled_energy"] = float(jit_model(batch_for(model), training=False, compute_force=True)["energy"][0])
        except Exception as exc:
            res["compiled_energy"] = repr(exc)
        out[path] = res
    out["mace_sparse_modules"] = sorted(k for k in sys.modules if k.split(".")[0] == "mace_sparse")
    try:
        import mace_sparse  # noqa
        out["mace_sparse_importable"] = True
    except ImportError:
        out["mace_sparse_importable"] = False
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def inspected(runs, tiny_foundation, emt_data, tmp_path_factory):
    """Models of the sparse runs, loaded and evaluated by a plain-MACE interpreter."""
    models = []
    outputs = {"hyphen": ["ft.model"], "script": ["ft.model"], "yaml": ["ft.model", "ft_stagetwo.model"]}
    for name, files in outputs.items():
        proc, work = runs[name]
        models += [str(work / f) for f in files if (work / f).is_file()]
    paths = sysconfig.get_paths()
    env = {"MACE_SPARSE_DISABLE": "1", "PYTHONPATH": ":".join(dict.fromkeys([paths["purelib"], paths["platlib"]])),
           "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    reference = completed(runs, "plain_disabled") / "ft.model"
    spec = {"models": models, "foundation": str(tiny_foundation), "reference": str(reference),
            "structure": str(emt_data["slab_test"])}
    proc = subprocess.run(
        [sys.executable, "-S", "-c", INSPECT, json.dumps(spec)],
        cwd=tmp_path_factory.mktemp("inspect"), env=env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


# ---------------------------------------------------------------------------------------------- sparse runs


def test_sparse_run_end_to_end(runs):
    work = completed(runs, "hyphen")
    for f in ("ft.model", "ft_compiled.model"):
        assert (work / f).is_file(), f
    assert list((work / "checkpoints").glob("ft_run-1_epoch-*.pt"))
    text = log_text(work)
    assert "SPARSE FINE-TUNING (sparse_str)" in text
    assert re.search(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: [\d.]+", text)
    config = sparse_config_line(work)
    assert config == DEFAULTS.to_dict()  # no sparse flag but the method: the defaults

    lines = validation_lines(work)
    assert [tag for tag, *_ in lines] == ["Initial", "Epoch 0", "Epoch 1"]
    for tag, _, loss, sparsity, mean_delta in lines:
        assert 0.0 <= float(sparsity) <= 100.0
        assert 0.0 < float(mean_delta) < 1.0
        assert float(loss) >= 0.0
    assert float(lines[0][3]) == 100.0  # ΔW = 0 before the first step: nothing changed yet
    assert float(lines[0][4]) == pytest.approx(DEFAULTS.init_threshold, rel=1e-3)  # the default initial δ
    assert float(lines[-1][2]) < float(lines[0][2])  # it trained


@pytest.mark.parametrize("name, model", [("hyphen", "ft.model"), ("script", "ft.model"), ("yaml", "ft.model"),
                                         ("yaml", "ft_stagetwo.model")])
def test_saved_model_is_plain_mace(runs, inspected, name, model):
    work = completed(runs, name)
    res = inspected[str(work / model)]
    assert not [c for c in res["classes"] if c.startswith("mace_sparse")], res["classes"]
    assert res["hooks"] == [] and res["private_attrs"] == []
    assert res["param_names_equal"] and res["shapes_equal"] and res["classes_equal"] and res["state_keys_equal"]
    assert res["all_trainable"]
    assert inspected["mace_sparse_modules"] == [] and inspected["mace_sparse_importable"] is False
    # the calculator evaluates it, and it is a fine-tuned model, not the foundation
    assert res["calc_forces_shape"] == [12, 3] and res["calc_forces_finite"]
    assert res["calc_energy"] == pytest.approx(res["direct_energy"], rel=1e-10, abs=1e-10)
    assert abs(res["direct_energy"] - inspected["foundation_energy"]) > 1e-6
    # the TorchScript export MACE writes beside it gives the same energy
    assert isinstance(res["compiled_energy"], float), res["compiled_energy"]
    assert res["compiled_energy"] == pytest.approx(res["direct_energy"], rel=1e-10, abs=1e-10)


def test_underscore_spelling_and_mace_sparse_train(runs):
    """``mace_sparse_train`` with the start-up hook off, flags in both spellings."""
    work = completed(runs, "script")
    assert (work / "ft.model").is_file() and (work / "ft_compiled.model").is_file()
    config = sparse_config_line(work)
    assert config["targets"] == ["linear", "radial"]
    assert config["init_threshold"] == 0.002
    assert config["threshold_weight_decay"] == 0.5
    assert config["granularity"] == OTHER_GRANULARITY
    lines = validation_lines(work)
    assert len(lines) == 3 and float(lines[0][4]) == pytest.approx(2e-3, rel=1e-3)


def test_yaml_config_and_stage_two(runs):
    work = completed(runs, "yaml")
    config = sparse_config_line(work)
    assert config["granularity"] == OTHER_GRANULARITY
    assert config["threshold_lr"] == 0.005
    text = log_text(work)
    assert "Stage Two" in text
    assert len(validation_lines(work)) == 4  # Initial + 3 epochs, all with the sparsity field
    for f in ("ft.model", "ft_compiled.model", "ft_stagetwo.model", "ft_stagetwo_compiled.model"):
        assert (work / f).is_file(), f
    assert list((work / "checkpoints").glob("*_swa.pt"))


# ----------------------------------------------------------------------------------- no flags: no change


def test_no_behaviour_change_without_flags(runs, tiny_foundation):
    """Plain fine-tuning with the plugin installed is bit-identical to the same run with the plugin off."""
    disabled = completed(runs, "plain_disabled")
    enabled = completed(runs, "plain_enabled")
    for work in (disabled, enabled):
        assert "SPARSE" not in log_text(work) and "sparsity=" not in log_text(work)
    a = torch.load(disabled / "ft.model", map_location="cpu", weights_only=False).state_dict()
    b = torch.load(enabled / "ft.model", map_location="cpu", weights_only=False).state_dict()
    foundation = torch.load(tiny_foundation, map_location="cpu", weights_only=False).state_dict()
    assert list(a) == list(b) == list(foundation)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    # the comparison is not vacuous: the runs did change the foundation's weights
    assert any(not torch.equal(a[k].double(), foundation[k].double()) for k in a)
    # and the logs agree line for line (after the timestamps)
    def epoch_lines(work):
        return [line[24:] for line in log_text(work).splitlines() if "INFO: Epoch" in line or "Initial:" in line]

    assert epoch_lines(disabled) == epoch_lines(enabled) and len(epoch_lines(disabled)) == 2
