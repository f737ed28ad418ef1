"""Runs that exited 0 with a wrong or missing result (issue 15, items 1–3 and 6–9), now refused in one line.

The refusals before training call the real entry point (``mace.cli.run_train.main``) in-process, as
``test_input_checks.py`` does: ``SystemExit(message)`` is one stderr line with exit status 1, and the work dir
is checked to be untouched. The restart and divergence cases need a real run and are marked ``slow``.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import mace  # noqa: F401  (before e3nn)
import pytest

from conftest import COMMON_ARGS, PREFIX, refused_in_process, run_mace_train, written_files
from mace_sparse.config import SparseConfig



@pytest.fixture(scope="module")
def run_train_module():
    import mace.cli.run_train as run_train

    from mace_sparse.integration.entry import install

    install(run_train)
    return run_train


def base_args(foundation, train_file, method=("--finetune-method", "sparse_str")):
    return ["--name", "ft", "--train_file", str(train_file), "--valid_fraction", "0.2", "--max_num_epochs", "1",
            "--seed", "1", "--energy_key", "REF_energy", "--forces_key", "REF_forces", "--device", "cpu",
            "--E0s", "foundation", *method, "--foundation_model", str(foundation)]


refused = refused_in_process


def parsed(args, monkeypatch, work: Path):
    """MACE's parser (with this package's flags) on ``args``, as ``mace_run_train`` would see them."""
    import mace.tools

    work.mkdir(exist_ok=True)
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["mace_run_train", *map(str, args)])
    return mace.tools.build_default_arg_parser().parse_args(list(map(str, args)))


@pytest.fixture(scope="module")
def shifted_data(emt_data, tmp_path_factory):
    """Slab frames whose energies sit on another absolute reference (−3000 eV/atom, like all-electron DFT);
    the same frames unshifted; and both with moments (for a magnetic-head run)."""
    import ase.io
    import numpy as np

    root = tmp_path_factory.mktemp("e0")
    frames = ase.io.read(emt_data["slab_train"], ":10")
    out = {}
    for name, shift, moments in (("shifted", -3000.0, False), ("plain", 0.0, False), ("shifted_mag", -3000.0, True),
                                 ("cohesive", -5.0, False)):
        copies = [a.copy() for a in frames]
        for a in copies:
            a.info["REF_energy"] = a.info["REF_energy"] + shift * len(a)
            if moments:
                a.arrays["REF_magmoms"] = np.full(len(a), 0.5)
        out[name] = root / f"{name}.xyz"
        ase.io.write(out[name], copies)
    return out


# -------------------------------------------------------------------------------------- item 1: E0 mismatch


def test_e0_mismatch_is_refused_before_training(run_train_module, tiny_foundation, shifted_data, tmp_path,
                                                monkeypatch):
    line = refused(run_train_module, monkeypatch, tmp_path / "w1", base_args(tiny_foundation, shifted_data["shifted"]))
    assert "--E0s foundation: the training energies (about -2999" in line, line
    assert "eV/atom away from what the foundation predicts" in line
    assert "use --E0s average (or estimated), or give the E0s of your own DFT setup as a dict" in line
    # an explicit dict equal to the foundation's E0s is the same mistake
    import torch

    from mace_sparse.integration.e0_check import foundation_e0s

    model = torch.load(tiny_foundation, map_location="cpu", weights_only=False)
    explicit = str(foundation_e0s(model))
    args = base_args(tiny_foundation, shifted_data["shifted"])
    args[args.index("foundation")] = explicit
    assert "eV/atom away" in refused(run_train_module, monkeypatch, tmp_path / "w2", args)
    # the moment head (full fine-tuning) gets the same check
    mag = base_args(tiny_foundation, shifted_data["shifted_mag"], method=("--magmom_weight", "1"))
    assert "eV/atom away" in refused(run_train_module, monkeypatch, tmp_path / "w3", mag)


def test_fitted_or_matching_e0s_pass_the_check(tiny_foundation, shifted_data, tmp_path, monkeypatch):
    from mace_sparse.integration.validation import validate_run_args

    args = base_args(tiny_foundation, shifted_data["shifted"])
    args[args.index("foundation")] = "average"  # fitted to the data by MACE: any reference is fine
    assert validate_run_args(parsed(args, monkeypatch, tmp_path / "a")).sparse is not None
    plain = base_args(tiny_foundation, shifted_data["plain"])  # the foundation's own reference: no false alarm
    assert validate_run_args(parsed(plain, monkeypatch, tmp_path / "b")).sparse is not None
    # an offset of a cohesive energy (isolated-atom E0s on a foundation fitted with --E0s average) is chemistry
    cohesive = base_args(tiny_foundation, shifted_data["cohesive"])
    assert validate_run_args(parsed(cohesive, monkeypatch, tmp_path / "c")).sparse is not None
    assert written_files(tmp_path / "a") == [] and written_files(tmp_path / "b") == []


# ----------------------------------------------------------------------------------- item 2: forces key


@pytest.mark.parametrize("flag,typo", [("forces_key", "REF_force"), ("energy_key", "REF_E")])
def test_an_explicit_label_key_found_in_no_frame_is_refused(run_train_module, tiny_foundation, emt_data, tmp_path,
                                                            monkeypatch, flag, typo):
    args = base_args(tiny_foundation, emt_data["slab_train"])
    args[args.index(f"--{flag}") + 1] = typo
    line = refused(run_train_module, monkeypatch, tmp_path / "w", args)
    assert line.startswith(PREFIX + f"--{flag} '{typo}' is in no configuration of the training data"), line
    assert "REF_forces" in line and "REF_energy" in line and "give the key your file uses" in line


# -------------------------------------------------------------------------- item 3: sparse flags, no method


@pytest.mark.parametrize("method", [(), ("--lora", "True")], ids=["full", "lora"])
def test_sparse_flags_without_sparse_str_are_refused(run_train_module, tiny_foundation, emt_data, tmp_path,
                                                     monkeypatch, method):
    args = base_args(tiny_foundation, emt_data["slab_train"], method=method) + ["--sparse_targets", "linear"]
    line = refused(run_train_module, monkeypatch, tmp_path / "w", args)
    using = "--lora" if method else "--finetune-method full"
    assert line == (PREFIX + f"--sparse_targets only acts with --finetune-method sparse_str, but this run uses "
                    f"{using}; add --finetune-method sparse_str or drop --sparse_targets"), line


# ------------------------------------------------------------------------------------- item 6: YAML spellings


def test_conflicting_yaml_spellings_are_refused_and_a_yaml_list_is_accepted(run_train_module, tiny_foundation,
                                                                             emt_data, tmp_path, monkeypatch):
    from mace_sparse.integration.validation import validate_run_args

    config = tmp_path / "config.yaml"
    config.write_text("sparse_threshold_weight_decay: 2.5\nsparse-threshold-weight-decay: 0.5\n")
    args = base_args(tiny_foundation, emt_data["slab_train"]) + ["--config", config]
    line = refused(run_train_module, monkeypatch, tmp_path / "w", args)
    assert line == (PREFIX + f"{config} sets sparse_threshold_weight_decay: 2.5 and "
                    "sparse-threshold-weight-decay: 0.5, two spellings of one option; keep one of them"), line
    config.write_text("sparse_targets: [linear, radial]\nsparse_delta_eps: 0.5\nsparse-delta-eps: 0.5\n")
    hooks = validate_run_args(parsed(args, monkeypatch, tmp_path / "ok"))  # same value twice: not a conflict
    assert hooks.sparse.targets == ("linear", "radial") and hooks.sparse.delta_eps == 0.5
    assert written_files(tmp_path / "ok") == []


# --------------------------------------------------------------------------------- item 7: promised outputs


def test_a_directory_at_a_promised_output_is_refused_before_training(run_train_module, tiny_foundation, emt_data,
                                                                     tmp_path, monkeypatch):
    work = tmp_path / "w"
    (work / "ft_sparse_delta.safetensors").mkdir(parents=True)
    line = refused(run_train_module, monkeypatch, work, base_args(tiny_foundation, emt_data["slab_train"]),
                   keep=["ft_sparse_delta.safetensors"])
    assert line == (PREFIX + f"{Path('ft_sparse_delta.safetensors')} is a directory, so this run could not save its "
                    "sparse delta there; move that directory away or choose another --name / --model_dir"), line


def test_a_delta_that_fails_at_save_time_fails_the_run(monkeypatch):
    """Should a promised output still fail to be written (the disk fills during training), the failure is kept
    and the run exits non-zero with that line after MACE's own saves (it was only logged before)."""
    from mace_sparse.integration import run_hooks

    def no_space(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_hooks, "write_run_artifacts", no_space)  # artifacts.run_outputs' writer, as bound there
    line = run_hooks._write_sparse_artifacts(None, None, ".", "ft")
    assert line.startswith("the run finished but could not write the sparse delta / sparsity report of ft "
                           "([Errno 28] No space left on device)"), line
    # the wrapped run() exits with that line once MACE's run() has returned (its own saves done)
    import types

    from mace_sparse.integration import entry

    hooks = run_hooks.FineTuneHooks(None, None, None)
    calls = []

    def mace_run(args):
        calls.append(args)
        hooks.failures.append(line)  # what before_save records when the delta cannot be written

    fake = types.SimpleNamespace(_mace_sparse_original_run=mace_run)
    monkeypatch.setattr(entry, "validate_run_args", lambda args: hooks)
    with pytest.raises(SystemExit) as info:
        entry._patched_run(fake)(types.SimpleNamespace(distributed=False))
    assert calls and info.value.code == PREFIX + line


# ---------------------------------------------------------------------------------------- item 8: restart


def _digest(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.slow
def test_restart_with_other_settings_is_refused_before_any_checkpoint_is_touched(
        run_train_module, tiny_foundation, emt_data, tmp_path, monkeypatch):
    import ase.io

    work = tmp_path / "run"
    work.mkdir()
    data = work / "slab.xyz"
    ase.io.write(data, ase.io.read(emt_data["slab_train"], ":8"))
    args = ["--name", "ft", "--foundation_model", tiny_foundation, "--train_file", data, "--valid_fraction", "0.25",
            "--E0s", "foundation", "--seed", "1", "--lr", "0.01", "--max_num_epochs", "1", "--plot", "False",
            "--multiheads_finetuning", "False", "--finetune-method", "sparse_str", *COMMON_ARGS]
    run_mace_train(args, cwd=work, env_extra={"OMP_NUM_THREADS": "1"})
    checkpoints = work / "checkpoints"
    assert (checkpoints / "ft_run-1_mace_sparse.json").is_file()
    before = _digest(checkpoints)
    restart = args + ["--max_num_epochs", "2", "--restart_latest"]
    monkeypatch.chdir(work)

    def refused_restart(extra, drop=()):
        argv = [a for a in restart if str(a) not in drop] + extra
        monkeypatch.setattr(sys, "argv", ["mace_run_train", *map(str, argv)])
        with pytest.raises(SystemExit) as info:
            run_train_module.main()
        assert _digest(checkpoints) == before  # not a byte of a checkpoint changed
        line = info.value.code
        assert isinstance(line, str) and line.startswith(PREFIX + "--restart_latest: the checkpoints in ") and \
            "\n" not in line, line
        return line

    line = refused_restart(["--sparse_targets", "linear"])
    every = ",".join(SparseConfig().targets)  # the default: every kind
    assert f"were made with --sparse_targets {every}, this run has --sparse_targets " \
           f"linear; restart with --sparse_targets {every}" in line, line
    line = refused_restart([], drop=("--finetune-method", "sparse_str"))
    assert "are from a --finetune-method sparse_str run, this run is --finetune-method full" in line, line
    (checkpoints / "ft_run-1_mace_sparse.json").unlink()  # checkpoints of a release without the settings file
    before = _digest(checkpoints)
    line = refused_restart([], drop=("--finetune-method", "sparse_str"))
    assert "are from a --finetune-method sparse_str run" in line, line


# -------------------------------------------------------------------------------------- item 9: divergence


@pytest.mark.slow
def test_a_diverging_sparse_run_stops_with_one_line_and_saves_nothing(tiny_foundation, emt_data, tmp_path):
    import ase.io

    work = tmp_path / "run"
    work.mkdir()
    data = work / "slab.xyz"
    ase.io.write(data, ase.io.read(emt_data["slab_train"], ":8"))
    args = ["--name", "ft", "--foundation_model", tiny_foundation, "--train_file", data, "--valid_fraction", "0.25",
            "--E0s", "foundation", "--seed", "1", "--lr", "1e3", "--max_num_epochs", "2", "--plot", "False",
            "--multiheads_finetuning", "False", "--finetune-method", "sparse_str", *COMMON_ARGS]
    proc = run_mace_train(args, cwd=work, env_extra={"OMP_NUM_THREADS": "1"}, check=False)
    assert proc.returncode != 0, proc.stdout[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # MACE logged loss=5e282 at epoch 0 (and checkpointed it), NaN from epoch 1
    assert lines[-1].startswith(PREFIX + "training diverged at epoch 0 (validation loss "), lines[-3:]
    assert "times the first" in lines[-1] or "nan" in lines[-1], lines[-1]
    assert "likely cause is a learning rate too large for this model (--lr 1000.0): lower --lr" in lines[-1]
    saved = [p.name for p in work.rglob("*") if p.suffix in (".model", ".safetensors", ".json", ".pt")]
    assert saved == [] or saved == ["ft_run-1_mace_sparse.json"], saved  # no model, delta, report or checkpoint


def test_divergence_criteria():
    """Non-finite loss or weights, or a loss a million times the first, stop the run; ordinary noise does not."""
    import torch

    from mace_sparse.config import SparseConfigError
    from mace_sparse.integration.run_guards import check_finite

    finite = [torch.ones(3)]
    check_finite(40.0, finite, 3, 0.01, first_loss=45.0)
    check_finite(1e-2, finite, 3, 0.01, first_loss=1e-7)  # 1e5x of an almost perfect start: still training
    for loss, weights, fragment in ((float("nan"), finite, "validation loss nan"),
                                    (5e282, finite, "times the first (45)"),
                                    (1.0, [torch.tensor([1.0, float("inf")])], "and non-finite weights")):
        with pytest.raises(SparseConfigError) as info:
            check_finite(loss, weights, 0, 1000.0, first_loss=45.0)
        assert str(info.value).startswith("training diverged at epoch 0 (") and fragment in str(info.value)
        assert "lower --lr" in str(info.value) and "\n" not in str(info.value)
