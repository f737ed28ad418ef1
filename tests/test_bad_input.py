"""Impossible requests fail before MACE writes anything, with one line on stderr naming the problem and the fix.

One case of each kind (a bad flag value, an incompatible MACE flag, a missing / wrong foundation) runs the real
``mace_run_train`` in an empty work dir and is checked for exit status, stderr and written files. The other
cases call the same ``mace_run_train`` entry point (``mace.cli.run_train.main``) in-process: it raises
``SystemExit(message)``, which the interpreter prints to stderr as that one line with exit status 1, and the
work dir is checked the same way (this saves an 8 s MACE import per case). The mace version guard is checked
in-process too.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
from pathlib import Path

import mace  # noqa: F401  (before e3nn)
import pytest

from conftest import run_mace_train
from mace_sparse.config import SparseConfig

PREFIX = "mace_run_train: error: "

# name -> (extra args, fragments the error line must contain: the problem, then the fix, run as a subprocess?)
CASES = {
    "unknown-target": (
        ["--sparse_targets", "linear,foo"],
        ["--sparse_targets", "unknown weight kind 'foo'", "choose from linear, skip_tp, contraction, radial"],
        True,
    ),
    "init-threshold-zero": (
        ["--sparse_init_threshold=0"], ["--sparse_init_threshold must lie in (0, 1)", "got 0"], False
    ),
    "init-threshold-negative": (
        ["--sparse_init_threshold=-0.1"], ["--sparse_init_threshold must lie in (0, 1)", "got -0.1"], False
    ),
    "init-threshold-one": (
        ["--sparse_init_threshold=1.0"], ["--sparse_init_threshold must lie in (0, 1)", "got 1.0"], False
    ),
    "negative-lambda": (
        ["--sparse_threshold_weight_decay=-0.5"],
        ["--sparse_threshold_weight_decay", "must be >= 0", "got -0.5"],
        False,
    ),
    "lbfgs": (["--lbfgs"], ["cannot be combined with --lbfgs", "drop --lbfgs"], True),
    "lora": (["--lora", "True"], ["cannot be combined with --lora", "drop --lora"], False),
    "cueq": (
        ["--enable_cueq", "True"],
        ["cannot be combined with --enable_cueq", "e3nn backend", "drop --enable_cueq"],
        False,
    ),
    "no-foundation": (None, ["needs a pretrained model", "add --foundation_model PATH"], True),
    "missing-foundation-file": (
        ["--foundation_model", "does_not_exist/foundation.model"],
        ["--foundation_model 'does_not_exist/foundation.model' does not exist", "give the path of a MACE .model file"],
        True,
    ),
}
SUBPROCESS_CASES = [name for name, (_, _, sub) in CASES.items() if sub]
IN_PROCESS_CASES = [name for name, (_, _, sub) in CASES.items() if not sub]


def cli_args(name, foundation, train_file):
    extra = CASES[name][0]
    args = ["--name", "ft", "--train_file", str(train_file), "--valid_fraction", "0.2",
            "--max_num_epochs", "1", "--seed", "1", "--energy_key", "REF_energy", "--forces_key", "REF_forces",
            "--device", "cpu", "--finetune-method", "sparse_str"]
    if extra is None:  # no --foundation_model at all
        return args + ["--E0s", "average"]
    args += ["--E0s", "foundation"]
    if "--foundation_model" not in extra:
        args += ["--foundation_model", str(foundation)]
    return args + extra


def written_files(work: Path):
    return sorted(str(p.relative_to(work)) for p in work.rglob("*"))


def check_error_line(line, name):
    assert line.startswith(PREFIX) and "\n" not in line, line
    for fragment in CASES[name][1]:
        assert fragment in line, (fragment, line)


@pytest.fixture(scope="module")
def results(tiny_foundation, emt_data, tmp_path_factory):
    """Run the subprocess cases (two at a time, one torch thread each): name -> (proc, work dir)."""

    def one(name):
        work = tmp_path_factory.mktemp(f"bad-{name}")
        args = cli_args(name, tiny_foundation, emt_data["slab_train"])
        proc = run_mace_train(args, cwd=work, env_extra={"OMP_NUM_THREADS": "1"}, check=False)
        return proc, work

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(one, name) for name in SUBPROCESS_CASES}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_fails_early_with_one_clear_line(results, name):
    proc, work = results[name]
    assert proc.returncode != 0, proc.stdout[-2000:]
    stderr = proc.stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1, stderr
    assert lines[-1] == errors[0], stderr  # the last thing printed; the rest are library warnings
    check_error_line(errors[0], name)
    # nothing written: no logs/, checkpoints/, results/, model files
    assert written_files(work) == [], written_files(work)


@pytest.fixture(scope="module")
def run_train_module():
    import mace.cli.run_train as run_train

    from mace_sparse.integration.entry import install

    install(run_train)  # what the start-up hook does on this import (idempotent)
    return run_train


@pytest.mark.parametrize("name", IN_PROCESS_CASES)
def test_bad_input_fails_early_in_process(run_train_module, tiny_foundation, emt_data, tmp_path, monkeypatch, name):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["mace_run_train", *cli_args(name, tiny_foundation, emt_data["slab_train"])])
    with pytest.raises(SystemExit) as info:
        run_train_module.main()
    # SystemExit with a message: printed as one stderr line by the interpreter, exit status 1
    assert isinstance(info.value.code, str), info.value.code
    check_error_line(info.value.code, name)
    assert written_files(work) == [], written_files(work)


def _parser():
    from mace.tools.arg_parser import build_default_arg_parser

    from mace_sparse.integration.arguments import add_sparse_arguments

    return add_sparse_arguments(build_default_arg_parser())


BASE = ["--name", "t", "--train_file", "x.xyz"]


def test_validator_accepts_good_input_and_rejects_more_values(tiny_foundation, tmp_path, monkeypatch):
    """The same checks in-process: good input passes (nothing checked for plain MACE runs), more bad values fail."""
    import shutil

    from mace_sparse.integration.validation import validate_sparse_args

    monkeypatch.chdir(tmp_path)  # the output-dir checks probe the work dir (and leave nothing there)
    model = tmp_path / "f.model"
    shutil.copy(tiny_foundation, model)  # the foundation must now be a loadable MACE model
    parser = _parser()
    assert validate_sparse_args(parser.parse_args(BASE + ["--sparse_targets", "foo"])) is None  # not sparse_str
    sparse = BASE + ["--finetune_method", "sparse_str", "--foundation_model", str(model)]
    config = validate_sparse_args(parser.parse_args(sparse + ["--sparse_threshold_weight_decay=0"]))
    assert config is not None and config.threshold_weight_decay == 0.0
    assert config.granularity == SparseConfig().granularity and config.targets == SparseConfig().targets
    for bad in ("--sparse_init_threshold=1.5", "--sparse_threshold_lr=0", "--sparse_targets="):
        with pytest.raises(SystemExit) as info:
            validate_sparse_args(parser.parse_args(sparse + [bad]))
        message = str(info.value)
        assert message.startswith(PREFIX) and bad.split("=")[0] in message and "\n" not in message
    with pytest.raises(SystemExit):  # argparse's own choice check for the granularity
        parser.parse_args(sparse + ["--sparse_threshold_granularity", "tensor"])
    assert os.listdir(tmp_path) == ["f.model"]


def test_mace_version_guard(monkeypatch):
    from mace_sparse.config import SparseConfigError
    from mace_sparse.integration import validation

    validation.check_mace_version()  # the installed, tested release passes
    monkeypatch.setattr(mace, "__version__", "0.3.99")
    with pytest.raises(SparseConfigError) as info:
        validation.check_mace_version()
    message = str(info.value)
    assert "0.3.99 is installed" in message
    assert "tested with mace-torch 0.3.16" in message
    assert "pip install 'mace-torch==0.3.16'" in message
    assert "\n" not in message
    # the run-time validator turns it into the one-line exit
    from mace_sparse.integration.validation import validate_sparse_args

    args = _parser().parse_args(BASE + ["--finetune_method", "sparse_str", "--foundation_model", "x.model"])
    with pytest.raises(SystemExit) as exit_info:
        validate_sparse_args(args)
    assert str(exit_info.value) == PREFIX + message
