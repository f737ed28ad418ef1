"""The magnetic-moment head: invariance, the loss on mixed data, training inside ``mace_run_train``, the saved
``_magnetic.model`` through the ASE calculator and ``mace_sparse predict``, and bad moment labels.

Moments are CHGNet predictions for distorted rocksalt oxides: the first frames of the bundled set made by
``python -m harness.data.magnetic_oxides``.
"""

from __future__ import annotations

import copy

import ase.io
import numpy as np
import pytest
import torch

import mace  # noqa: F401  (before e3nn)

from conftest import COMMON_ARGS, FOUNDATION_ARGS, double_batch, run_mace_train

from mace_sparse.magnetism.config import MagneticConfig, MagneticConfigError
from mace_sparse.magnetism.head import attach_magnetic_head, has_magnetic_head
from mace_sparse.magnetism.loss import MagneticLoss

MAG_ARGS = ["--magmom_weight", "10", "--magmoms_key", "REF_magmoms"]


@pytest.fixture(scope="module")
def oxide_files(tmp_path_factory, oxide_frames):
    """Train file with moments in most frames (some frames deliberately without), test file with moments."""
    work = tmp_path_factory.mktemp("oxides")
    train = [a.copy() for a in oxide_frames[:16]]
    for i in (3, 9):  # mixed file: frames without the key
        del train[i].arrays["REF_magmoms"]
    ase.io.write(work / "train.xyz", train)
    ase.io.write(work / "test.xyz", oxide_frames[16:22])
    return {"train": work / "train.xyz", "test": work / "test.xyz", "dir": work}


def _rotation(seed: int, reflect: bool) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return -q if reflect else q


@pytest.mark.parametrize("reflect", [False, True])
def test_head_moments_are_invariant_and_permute_with_atoms(oxide_foundation, oxide_frames, reflect,
                                                           fast_deterministic_torch):
    model = torch.load(oxide_foundation, weights_only=False).double()
    torch.manual_seed(0)
    head = attach_magnetic_head(model, MagneticConfig(weight=1.0, signed=True))
    with torch.no_grad():  # the head starts from a zero MLP output; give it random weights to test
        torch.nn.init.normal_(head.mlp[-1].weight)
        torch.nn.init.normal_(head.element_weight)
    atoms = oxide_frames[0].copy()
    atoms.pbc = False  # a free cluster: rotations need no cell handling
    moved = atoms.copy()
    rot = _rotation(7, reflect)
    moved.positions = atoms.positions @ rot.T + np.array([1.3, -2.1, 0.4])
    perm = np.random.default_rng(1).permutation(len(atoms))
    moved = moved[perm]
    m0 = model(double_batch([atoms], model), training=False, compute_force=False)["magmoms"].detach()
    m1 = model(double_batch([moved], model), training=False, compute_force=False)["magmoms"].detach()
    assert m0.shape == (len(atoms),)
    assert m0.std() > 0  # not a constant: the test would be empty otherwise
    torch.testing.assert_close(m1, m0[torch.as_tensor(perm)], rtol=0, atol=1e-10)


def test_head_starts_from_a_least_squares_fit_to_the_training_moments(oxide_foundation, oxide_frames):
    """With training frames, the head starts as the per-element least-squares linear map of the standardised
    features: before any training it predicts the fitted moments far better than the per-element mean."""
    from mace_sparse.magnetism.statistics import node_features

    model = torch.load(oxide_foundation, weights_only=False).double()
    frames = oxide_frames[:16]
    head = attach_magnetic_head(model, MagneticConfig(weight=1.0), frames=frames)
    features, attrs, used = node_features(model, frames, head.feature_index.tolist())
    torch.testing.assert_close(head.feature_shift, features.mean(0))
    pred = model(double_batch(frames, model), training=False, compute_force=False)["magmoms"].detach().numpy()
    ref = np.abs(np.concatenate([a.arrays["REF_magmoms"] for a in frames]))
    symbols = np.concatenate([a.get_chemical_symbols() for a in frames])
    mean_only = np.abs(ref - np.array([ref[symbols == s].mean() for s in symbols])).mean()
    assert np.abs(pred - ref).mean() < 0.7 * mean_only


def test_magnitude_head_is_non_negative_and_signed_head_is_not(oxide_foundation, oxide_frames):
    model = torch.load(oxide_foundation, weights_only=False).double()
    head = attach_magnetic_head(model, MagneticConfig(weight=1.0))
    with torch.no_grad():
        head.mlp[-1].bias.fill_(-20.0)
    out = model(double_batch(oxide_frames[:2], model), training=False, compute_force=False)["magmoms"]
    assert torch.all(out >= 0)
    head.signed = True
    out = model(double_batch(oxide_frames[:2], model), training=False, compute_force=False)["magmoms"]
    assert torch.all(out < 0)


class _Zero(torch.nn.Module):
    def forward(self, ref, pred, ddp=None):
        return torch.zeros(())


def _ref(moments, weights, batch, graph_weight):
    return {"magmoms": torch.tensor(moments).view(-1, 1), "magmoms_weight": torch.tensor(weights).view(-1, 1),
            "batch": torch.tensor(batch), "weight": torch.tensor(graph_weight)}


def test_loss_ignores_atoms_of_frames_without_moments_and_compares_magnitudes():
    ref = _ref([2.0, -1.0, 0.0, 5.0], [1.0, 1.0, 0.0, 0.0], [0, 0, 1, 1], [1.0, 1.0])
    pred = {"magmoms": torch.tensor([1.5, 1.5, 9.0, 9.0])}
    mse = MagneticLoss(_Zero(), MagneticConfig(weight=2.0))(ref, pred)
    # magnitudes: |−1| = 1; labelled atoms only: ((1.5−2)² + (1.5−1)²)/2 = 0.25, times the weight 2
    assert float(mse) == pytest.approx(0.5)
    signed = MagneticLoss(_Zero(), MagneticConfig(weight=1.0, signed=True))(ref, pred)
    assert float(signed) == pytest.approx((0.25 + 6.25) / 2)
    huber = MagneticLoss(_Zero(), MagneticConfig(weight=1.0, loss="huber", huber_delta=0.1))(ref, pred)
    assert float(huber) == pytest.approx(0.1 * (0.5 - 0.05))
    nothing = MagneticLoss(_Zero(), MagneticConfig(weight=1.0))(_ref([1.0], [0.0], [0], [1.0]), {"magmoms": torch.ones(1)})
    assert float(nothing) == 0.0 and torch.isfinite(nothing)


@pytest.mark.parametrize(
    "kwargs, text",
    [({"weight": -1.0}, "--magmom_weight"), ({"weight": 1.0, "loss": "l1"}, "--magmom_loss"),
     ({"weight": 1.0, "huber_delta": 0.0}, "--magmom_huber_delta"), ({"key": ""}, "--magmoms_key"), ({"key": "magmoms"}, "rename the column"),
     ({"weight": 1.0, "head_lr": 0.0}, "--magmom_head_lr")],
)
def test_bad_magnetic_settings_are_named(kwargs, text):
    with pytest.raises(MagneticConfigError, match=text):
        MagneticConfig(**kwargs)


@pytest.fixture(scope="module")
def magnetic_run(oxide_files, oxide_foundation):
    """One sparse_str fine-tune with the head on a mixed file (frames with and without moments)."""
    work = oxide_files["dir"] / "run"
    work.mkdir()
    proc = run_mace_train(
        ["--name", "mag", "--foundation_model", oxide_foundation, "--train_file", oxide_files["train"],
         "--valid_fraction", "0.25", "--test_file", oxide_files["test"], "--E0s", "foundation",
         "--max_num_epochs", "6", "--lr", "0.01", "--seed", "1", "--plot", "False",
         "--multiheads_finetuning", "False", "--finetune-method", "sparse_str", *MAG_ARGS, *COMMON_ARGS],
        cwd=work, env_extra={"OMP_NUM_THREADS": "1"},
    )
    return work, proc


def _log_text(work):
    return "\n".join(p.read_text() for p in (work / "logs").glob("*.log"))


@pytest.mark.slow
def test_mixed_file_trains_and_reports_moment_errors(magnetic_run, oxide_files, oxide_foundation):
    """Frames with and without moments train together; the errors reach the log lines and the error tables;
    the head was trained away from its least-squares start. (Accuracy is measured by ``bench-magnetic``: a
    tiny 8-channel model on 12 cells says little about it.)"""
    import math

    from mace_sparse.magnetism.model import MagneticMACE

    work, _ = magnetic_run
    text = _log_text(work)
    lines = [line for line in text.splitlines() if "MAE_magmom=" in line]
    assert any("Initial" in line for line in lines) and any("Epoch 5" in line for line in lines)
    values = [float(line.split("MAE_magmom=")[1].split()[0]) for line in lines]
    assert all(math.isfinite(v) and 0 <= v < 5 for v in values)
    assert "sparsity=" in lines[-1]
    assert "MAE magmom / muB" in text and "RMSE magmom / muB" in text  # final error tables
    trained = torch.load(work / "mag_magnetic.model", weights_only=False)
    assert isinstance(trained, MagneticMACE)
    start = torch.load(oxide_foundation, weights_only=False).double()
    frames = ase.io.read(oxide_files["train"], ":")
    initial = attach_magnetic_head(start, MagneticConfig(weight=10.0), frames=frames)
    torch.testing.assert_close(trained.magnetic_head.feature_shift, initial.feature_shift)  # same data start
    assert not torch.allclose(trained.magnetic_head.element_weight, initial.element_weight)  # and it trained


@pytest.mark.slow
def test_outputs_plain_model_and_magnetic_model(magnetic_run, oxide_frames):
    from mace.calculators import MACECalculator

    from mace_sparse import MagneticMACECalculator
    from mace_sparse.magnetism.model import MagneticMACE

    work, _ = magnetic_run
    plain = torch.load(work / "mag.model", weights_only=False)
    assert type(plain).__name__ == "ScaleShiftMACE"
    assert not has_magnetic_head(plain) and not plain._forward_hooks
    assert not any("magnetic" in k or k.endswith("_delta") for k in plain.state_dict())
    magnetic = torch.load(work / "mag_magnetic.model", weights_only=False)
    assert isinstance(magnetic, MagneticMACE)
    assert (work / "mag_sparse_delta.safetensors").is_file()
    for a, b in zip(plain.state_dict().values(), magnetic.mace.state_dict().values()):
        assert torch.equal(a, b)

    calc = MagneticMACECalculator(work / "mag_magnetic.model", device="cpu")
    ref = MACECalculator(model_paths=str(work / "mag.model"), device="cpu", default_dtype="float64")
    atoms = oxide_frames[20].copy()
    atoms.calc = calc
    twin = atoms.copy()
    twin.calc = ref
    assert atoms.get_potential_energy() == pytest.approx(twin.get_potential_energy(), abs=1e-9)
    np.testing.assert_allclose(atoms.get_forces(), twin.get_forces(), atol=1e-9)
    np.testing.assert_allclose(atoms.get_stress(), twin.get_stress(), atol=1e-9)
    moments = atoms.get_magnetic_moments()
    assert moments.shape == (len(atoms),) and np.all(moments >= 0)
    direct = magnetic(double_batch([atoms], magnetic.mace), training=False, compute_force=False)["magmoms"]
    np.testing.assert_allclose(moments, direct.detach().numpy(), atol=1e-12)
    assert atoms.get_magnetic_moment() == pytest.approx(moments.sum())


@pytest.mark.slow
def test_predict_command_writes_moments_and_refuses_plain_model(magnetic_run, oxide_files):
    from mace_sparse.cli import main

    work, _ = magnetic_run
    out = work / "predicted.xyz"
    assert main(["predict", "--model", str(work / "mag_magnetic.model"), "--configs", str(oxide_files["test"]),
                 "-o", str(out)]) == 0
    frames = ase.io.read(out, ":")
    assert len(frames) == 6
    assert all(f.arrays["MACE_magmoms"].shape == (len(f),) for f in frames)
    assert all("MACE_energy" in f.info and "MACE_forces" in f.arrays and "MACE_stress" in f.info for f in frames)
    bad = work / "never.xyz"
    assert main(["predict", "--model", str(work / "mag.model"), "--configs", str(oxide_files["test"]),
                 "-o", str(bad)]) == 2
    assert not bad.exists()


@pytest.mark.slow
def test_full_finetune_with_head(oxide_files, oxide_foundation):
    work = oxide_files["dir"] / "full"
    work.mkdir()
    run_mace_train(
        ["--name", "full", "--foundation_model", oxide_foundation, "--train_file", oxide_files["train"],
         "--valid_fraction", "0.25", "--E0s", "foundation", "--max_num_epochs", "2", "--lr", "0.01", "--seed", "1",
         "--plot", "False", "--multiheads_finetuning", "False", *MAG_ARGS, *COMMON_ARGS],
        cwd=work, env_extra={"OMP_NUM_THREADS": "1"},
    )
    assert (work / "full_magnetic.model").is_file() and (work / "full.model").is_file()
    assert not (work / "full_sparse_delta.safetensors").exists()
    assert "MAE_magmom=" in _log_text(work)


def _bad_file(tmp_path, oxide_frames, mutate):
    frames = [a.copy() for a in oxide_frames[:4]]
    mutate(frames)
    path = tmp_path / "bad.xyz"
    ase.io.write(path, frames)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda fr: fr[2].arrays.__setitem__("REF_magmoms", np.ones((len(fr[2]), 3))), "frame 2: per-atom array 'REF_magmoms' has shape"),
        (lambda fr: fr[1].arrays["REF_magmoms"].__setitem__(0, np.nan), "frame 1: 'REF_magmoms' contains NaN or inf"),
        (lambda fr: [a.arrays.pop("REF_magmoms") for a in fr], "no frame of"),
    ],
    ids=["vector_moments", "nan", "missing_everywhere"],
)
def test_bad_moment_labels_stop_with_one_line_and_write_nothing(tmp_path, oxide_frames, oxide_foundation, mutate, message):
    path = _bad_file(tmp_path, oxide_frames, mutate)
    proc = run_mace_train(
        ["--name", "bad", "--foundation_model", oxide_foundation, "--train_file", path, "--valid_fraction", "0.25",
         "--E0s", "foundation", "--max_num_epochs", "1", "--multiheads_finetuning", "False",
         "--finetune-method", "sparse_str", *MAG_ARGS, *COMMON_ARGS],
        cwd=tmp_path, check=False, env_extra={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mace_run_train: error:") and message in last, proc.stderr[-2000:]
    assert not any((tmp_path / d).exists() for d in ("logs", "checkpoints", "results"))
    assert not list(tmp_path.glob("*.model"))


def test_stage_two_loss_keeps_the_moment_term():
    """MACE builds a fresh loss for stage two (--swa); without the hook the head would stop learning there."""
    from types import SimpleNamespace

    from mace_sparse.integration.run_hooks import FineTuneHooks

    hooks = FineTuneHooks(SimpleNamespace(lr=0.01, name="x", model_dir="."), None, MagneticConfig(weight=3.0))
    container = SimpleNamespace(loss_fn=_Zero())
    assert hooks.swa(container, optimizer=None) is container
    assert isinstance(container.loss_fn, MagneticLoss) and container.loss_fn.config.weight == 3.0
    hooks.swa(container, optimizer=None)
    assert isinstance(container.loss_fn.base, _Zero)  # not wrapped twice
    assert hooks.swa(None, optimizer=None) is None


def test_offsets_start_each_element_at_its_mean_training_moment(oxide_foundation, oxide_files):
    """Like MACE's E0s: with a zeroed MLP the head predicts each element's mean |moment| of the training file."""
    from mace_sparse.magnetism.data import element_mean_moments

    frames = ase.io.read(oxide_files["train"], ":")
    means = element_mean_moments([str(oxide_files["train"])], "REF_magmoms")
    for z, mean in means.items():
        values = np.concatenate([np.abs(a.arrays["REF_magmoms"][a.numbers == z]) for a in frames
                                 if "REF_magmoms" in a.arrays])
        assert mean == pytest.approx(values.mean())
    model = torch.load(oxide_foundation, weights_only=False).double()
    head = attach_magnetic_head(model, MagneticConfig(weight=1.0), element_means=means)
    with torch.no_grad():
        head.mlp[-1].weight.zero_()
        head.mlp[-1].bias.zero_()
    atoms = frames[0]
    out = model(double_batch([atoms], model), training=False, compute_force=False)["magmoms"].detach().numpy()
    np.testing.assert_allclose(out, [means[int(z)] for z in atoms.numbers], rtol=1e-6)


@pytest.mark.slow
def test_bench_magnetic_runs_through_the_benchmark_runner(tmp_path, oxide_files, oxide_foundation):
    """``mace_sparse bench-magnetic`` with and without the head: the same runner, evaluator and report format."""
    import json

    from mace_sparse.cli import main

    out = tmp_path / "bench"
    code = main(["bench-magnetic", "--foundation_model", str(oxide_foundation),
                 "--train_file", str(oxide_files["train"]), "--test_file", str(oxide_files["test"]), "--epochs", "2", "--seeds", "0", "--variants",
                 "sparse_str + head", "sparse_str, no head", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "bench_magnetic.json").read_text())
    assert set(report["runs"]) == {"sparse_str + head", "sparse_str, no head"}
    head, plain = report["runs"]["sparse_str + head"][0], report["runs"]["sparse_str, no head"][0]
    assert np.isfinite(head["magmom_mae_mub"]) and "magmom_mae_mub" not in plain
    for scores in (head, plain):
        assert np.isfinite(scores["force_mae_mev_per_a"]) and 0.0 <= scores["unchanged_adapted"] <= 1.0
    assert report["summary"]["sparse_str + head"]["magmom_mae_mub"]["std"] == 0.0
    text = (out / "bench_magnetic.md").read_text()
    assert "| sparse_str + head |" in text and "moment MAE" in text
