"""Bad inputs that MACE 0.3.16 reports late, with a traceback, or never (issue 6), refused early in one line.

What MACE does without these checks (measured with the plugin off, same tiny foundation and data):
* train file with an element the foundation lacks: ``ValueError: np.int64(8) is not in list`` traceback after
  data loading, with ``logs/`` already written (``--E0s foundation`` and ``--E0s average`` alike);
* NaN energy / inf forces: no error; ``loss=nan`` for every epoch and a NaN ``ft.model`` is saved;
* a foundation file that is not a MACE model: an unpickling or ``AttributeError`` traceback;
* an unwritable ``--model_dir``: only noticed when the trained model is saved at the end.

Most cases call the real entry point (``mace.cli.run_train.main``) in-process, as ``test_bad_input.py`` does
(it raises ``SystemExit(message)``: one stderr line, exit status 1); one runs the ``mace_run_train`` executable
to show the same line and an untouched work dir end to end.
"""

from __future__ import annotations

import os
import pickle
import sys

import mace  # noqa: F401  (before e3nn)
import numpy as np
import pytest
import torch

from conftest import PREFIX, refused_in_process, run_mace_train, written_files

FIX_MODEL = "give a .model file saved by mace_run_train"


@pytest.fixture(scope="module")
def bad_data(emt_data, tmp_path_factory) -> dict:
    """Copies of the slab training file with one defect each (and one with custom label keys)."""
    import ase.io

    root = tmp_path_factory.mktemp("bad_data")
    frames = ase.io.read(emt_data["slab_train"], ":")
    out = {}

    def write(name, edit):
        copies = [a.copy() for a in frames]
        edit(copies)
        path = root / f"{name}.xyz"
        ase.io.write(path, copies)
        out[name] = path

    def with_oxygen(cs):
        symbols = cs[3].get_chemical_symbols()
        symbols[0] = "O"
        cs[3].set_chemical_symbols(symbols)

    def nan_energy(cs):
        cs[5].info["REF_energy"] = float("nan")

    def inf_forces(cs):
        cs[7].arrays["REF_forces"][2, 1] = np.inf

    def custom_keys(cs):
        # finite under the default keys, NaN under the keys the run names: the check must read the latter
        for a in cs:
            a.info["my_energy"] = a.info["REF_energy"]
            a.arrays["my_forces"] = a.arrays["REF_forces"].copy()
        cs[2].arrays["my_forces"][0, 0] = np.nan

    write("with_O", with_oxygen)
    write("nan_energy", nan_energy)
    write("inf_forces", inf_forces)
    write("custom_keys", custom_keys)
    return out


@pytest.fixture(scope="module")
def not_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("not_models")
    (root / "text.model").write_text("this is not a model\n")
    torch.save({"model": 1}, root / "dict.model")
    torch.save(torch.zeros(3), root / "tensor.model")
    with open(root / "pickle.model", "wb") as handle:
        pickle.dump({"weights": [1, 2]}, handle)
    torch.save(torch.nn.Linear(2, 2), root / "module.model")
    return {p.stem: p for p in root.iterdir()}


@pytest.fixture(scope="module")
def run_train_module():
    import mace.cli.run_train as run_train

    from mace_sparse.integration.entry import install

    install(run_train)
    return run_train


def base_args(foundation, train_file):
    return ["--name", "ft", "--train_file", str(train_file), "--valid_fraction", "0.2", "--max_num_epochs", "1",
            "--seed", "1", "--energy_key", "REF_energy", "--forces_key", "REF_forces", "--device", "cpu",
            "--E0s", "foundation", "--finetune-method", "sparse_str", "--foundation_model", str(foundation)]


# ------------------------------------------------------------------------------------- item 5: foundation


@pytest.mark.parametrize(
    "kind, problem",
    [
        ("text", "text.model is not a MACE model (cannot load it: UnpicklingError"),
        ("pickle", "pickle.model is not a MACE model (cannot load it:"),
        ("dict", "dict.model holds a dict, not a MACE model"),
        ("tensor", "tensor.model holds a Tensor, not a MACE model"),
        ("module", "module.model holds a Linear without atomic_numbers, r_max, interactions, not a MACE model"),
    ],
)
def test_foundation_that_is_not_a_mace_model(run_train_module, not_models, emt_data, tmp_path, monkeypatch,
                                             kind, problem):
    line = refused_in_process(run_train_module, monkeypatch, tmp_path / "work",
                              base_args(not_models[kind], emt_data["slab_train"]))
    assert line.startswith(PREFIX + "--foundation_model: "), line
    assert problem in line and line.endswith(FIX_MODEL + " (torch.save of the whole model)"), line


def test_foundation_that_is_a_directory(run_train_module, emt_data, tmp_path, monkeypatch):
    line = refused_in_process(run_train_module, monkeypatch, tmp_path / "work",
                              base_args(tmp_path, emt_data["slab_train"]))
    assert line == PREFIX + f"--foundation_model {str(tmp_path)!r} is a directory; give the path of a MACE .model file"


# ---------------------------------------------------------------------------------------- item 6: elements


@pytest.mark.slow
def test_elements_missing_from_the_foundation_fail_before_anything_is_written(tiny_foundation, bad_data, tmp_path):
    """The real executable: one line naming the element, where it is and the fix; no logs/checkpoints/results."""
    work = tmp_path / "work"
    work.mkdir()
    dirs = ["--model_dir", work / "models", "--log_dir", work / "logs", "--checkpoints_dir", work / "ckpt",
            "--results_dir", work / "results"]
    proc = run_mace_train(base_args(tiny_foundation, bad_data["with_O"]) + dirs, cwd=work,
                          env_extra={"OMP_NUM_THREADS": "1"}, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert [line for line in lines if "error" in line.lower()] == [lines[-1]], proc.stderr
    assert lines[-1] == (
        PREFIX + "the training data contain O, which the foundation model does not know (it has Al, Ni, Cu; "
        f"first O in {bad_data['with_O']}, configuration 3); fine-tuning cannot add elements: remove the "
        "configurations with O or use a foundation trained on them"
    )
    assert written_files(work) == []


def test_atomic_numbers_flag_with_an_unknown_element(run_train_module, tiny_foundation, emt_data, tmp_path,
                                                     monkeypatch):
    args = base_args(tiny_foundation, emt_data["slab_train"]) + ["--atomic_numbers", "[8, 13, 28, 29]"]
    line = refused_in_process(run_train_module, monkeypatch, tmp_path / "work", args)
    assert line == PREFIX + (
        "--atomic_numbers lists O, which the foundation model does not know (it has Al, Ni, Cu); fine-tuning "
        "cannot add elements: drop O from --atomic_numbers or use a foundation trained on them"
    )


# ---------------------------------------------------------------------------------------- item 7: NaN/inf


@pytest.mark.parametrize(
    "case, flag, index, what",
    [
        ("nan_energy", "train_file", 5, "energy label ('REF_energy' contains nan)"),
        ("inf_forces", "train_file", 7, "forces label ('REF_forces' contains inf)"),
        ("inf_forces", "test_file", 7, "forces label ('REF_forces' contains inf)"),  # every file MACE reads
    ],
)
def test_non_finite_labels_name_the_file_and_configuration(run_train_module, tiny_foundation, emt_data, bad_data,
                                                           tmp_path, monkeypatch, case, flag, index, what):
    args = base_args(tiny_foundation, emt_data["slab_train"] if flag != "train_file" else bad_data[case])
    if flag == "test_file":
        args += ["--test_file", bad_data[case]]
    line = refused_in_process(run_train_module, monkeypatch, tmp_path / "work", args)
    assert line == PREFIX + (
        f"--{flag} {bad_data[case]}: configuration {index} (0-based) has a non-finite {what}; fix or remove "
        "that configuration (MACE would train on a NaN loss and save a NaN model)"
    )


def test_non_finite_check_reads_the_keys_the_run_names(run_train_module, tiny_foundation, bad_data, tmp_path,
                                                       monkeypatch):
    args = base_args(tiny_foundation, bad_data["custom_keys"]) + ["--energy_key", "my_energy",
                                                                  "--forces_key", "my_forces"]
    line = refused_in_process(run_train_module, monkeypatch, tmp_path / "work", args)
    assert "configuration 2 (0-based) has a non-finite forces label ('my_forces' contains nan)" in line


# ------------------------------------------------------------------------------------- item 10: output dirs


@pytest.mark.parametrize(
    "flag, where, reason",
    [
        ("model_dir", "file/sub", "{work}/file is a file, not a directory"),
        ("checkpoints_dir", "file/a/b", "{work}/file is a file, not a directory"),
        ("log_dir", "/proc/mace_sparse_logs", "cannot create files in /proc (No such file or directory)"),
    ],
)
def test_unwritable_output_dir_is_refused_before_training(run_train_module, tiny_foundation, emt_data, tmp_path,
                                                          monkeypatch, flag, where, reason):
    """Runs as root in CI, so a mode bit cannot make a folder unwritable: a path below a regular file, or /proc."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "file").write_text("a regular file\n")
    target = where if where.startswith("/") else str(work / where)
    args = base_args(tiny_foundation, emt_data["slab_train"]) + [f"--{flag}", target]
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["mace_run_train", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        run_train_module.main()
    assert info.value.code == PREFIX + (
        f"--{flag} {target} is not writable: {reason.format(work=work)}; choose a writable directory with --{flag}"
    )
    assert written_files(work) == ["file"]


# ------------------------------------------------------------------------------------------- good input


def test_good_input_passes_every_check_and_writes_nothing(tiny_foundation, emt_data, tmp_path, monkeypatch):
    """No false alarm on the bundled data, and the checks themselves leave no file (their probes are removed)."""
    from mace.tools.arg_parser import build_default_arg_parser

    from mace_sparse.integration.arguments import add_sparse_arguments
    from mace_sparse.integration.validation import validate_sparse_args

    monkeypatch.chdir(tmp_path)
    parser = add_sparse_arguments(build_default_arg_parser())
    args = parser.parse_args(base_args(tiny_foundation, emt_data["slab_train"])
                             + ["--test_file", str(emt_data["slab_test"]), "--model_dir", str(tmp_path / "m")])
    assert validate_sparse_args(args) is not None
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------- items 1-3 through the Python API


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(targets="linear,foo"),
         "--sparse_targets: unknown weight kind 'foo'; choose from linear, skip_tp, contraction, radial, norm, scalar, embedding or 'all'"),
        (dict(init_threshold=0.0), "--sparse_init_threshold must lie in (0, 1) (δ = sigmoid(score)); got 0.0"),
        (dict(init_threshold=-1e-3), "--sparse_init_threshold must lie in (0, 1) (δ = sigmoid(score)); got -0.001"),
        (dict(init_threshold=1.0), "--sparse_init_threshold must lie in (0, 1) (δ = sigmoid(score)); got 1.0"),
        (dict(threshold_weight_decay=-1.0), "--sparse_threshold_weight_decay (λ_τ) must be >= 0; got -1.0"),
    ],
)
def test_python_api_refuses_the_same_values_with_the_same_line(kwargs, message):
    """``SparseConfig`` is what both the API and ``mace_run_train`` use, so the message is the same one line."""
    from mace_sparse.config import SparseConfig, SparseConfigError

    with pytest.raises(SparseConfigError) as info:
        SparseConfig(**kwargs)
    assert str(info.value) == message
