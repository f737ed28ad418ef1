"""Shared fixtures: EMT-labelled data and a tiny foundation pretrained with the real ``mace_run_train``.

The foundation is made once (about 25 s on one loaded core) and cached in pytest's cache directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mace  # noqa: F401  (before e3nn)

#: Settings of the tiny foundation: small enough for CI, with ℓ up to 1, correlation 2, 2 interactions.
FOUNDATION_ARGS = [
    "--model", "MACE", "--num_channels", "8", "--max_L", "1", "--r_max", "4.0",
    "--num_radial_basis", "6", "--radial_MLP", "[16,16]", "--correlation", "2",
]
COMMON_ARGS = [
    "--energy_key", "REF_energy", "--forces_key", "REF_forces", "--default_dtype", "float64",
    "--device", "cpu", "--batch_size", "4",
]


def run_mace_train(args, cwd, env_extra=None, check=True, script="mace_run_train"):
    """Run a console script (the real one on PATH) and return the CompletedProcess."""
    env = dict(os.environ)
    env.pop("MACE_SPARSE_DISABLE", None)
    env.update(env_extra or {})
    proc = subprocess.run([script, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def emt_data(tmp_path_factory) -> dict:
    from harness.data.emt_data import write_datasets

    return write_datasets(tmp_path_factory.mktemp("emt"), n_bulk=40, n_slab=30)


@pytest.fixture(scope="session")
def tiny_foundation(request, tmp_path_factory, emt_data) -> Path:
    """Path of a tiny MACE foundation pretrained on EMT bulk cells with ``mace_run_train``."""
    return pretrained_once(request, tmp_path_factory, Path(emt_data["bulk_train"]), epochs=6)


def pretrained_once(request, tmp_path_factory, train_file: Path, epochs: int) -> Path:
    """A tiny foundation trained by the real ``mace_run_train`` on ``train_file``, once per checkout.

    Kept in pytest's cache under a key made of everything that decides its weights (the MACE, torch and Python
    versions, the settings and the training file's bytes), so a later session does not pay the ~25 s again;
    ``pytest --cache-clear`` retrains. Each session gets its own copy, so no test can alter the cached one.
    """
    args = ["--name", "foundation", "--train_file", "train.xyz", "--valid_fraction", "0.2", "--E0s", "average",
            "--max_num_epochs", str(epochs), "--lr", "0.01", "--seed", "3", "--plot", "False",
            *FOUNDATION_ARGS, *COMMON_ARGS]
    digest = hashlib.sha256(repr((mace.__version__, torch.__version__, sys.version_info[:2], args)).encode())
    digest.update(train_file.read_bytes())
    cached = Path(request.config.cache.mkdir("foundations")) / digest.hexdigest()[:16] / "foundation.model"
    if not cached.is_file():
        work = tmp_path_factory.mktemp("foundation")
        shutil.copyfile(train_file, work / "train.xyz")
        with training_allowed():
            run_mace_train(args, cwd=work, env_extra={"MACE_SPARSE_DISABLE": "1", "OMP_NUM_THREADS": "1"})
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / "foundation.model", cached.with_suffix(".tmp"))
        os.replace(cached.with_suffix(".tmp"), cached)
    path = tmp_path_factory.mktemp("foundation_copy") / "foundation.model"
    shutil.copyfile(cached, path)
    return path


@pytest.fixture()
def foundation_model(tiny_foundation):
    """A fresh float64 copy of the tiny foundation as a torch module."""
    import torch

    model = torch.load(tiny_foundation, map_location="cpu", weights_only=False)
    return model.double()


def batch_of(atoms_list, model, cutoff=4.0):
    """A MACE batch dict for ASE atoms, using the model's element table."""
    from mace import data
    from mace.tools import torch_geometric
    from mace.tools.utils import AtomicNumberTable

    z_table = AtomicNumberTable([int(z) for z in model.atomic_numbers])
    items = [
        data.AtomicData.from_config(data.config_from_atoms(a), z_table=z_table, cutoff=cutoff) for a in atoms_list
    ]
    return torch_geometric.Batch.from_data_list(items).to_dict()


@pytest.fixture()
def slab_atoms(emt_data):
    import ase.io

    return ase.io.read(emt_data["slab_train"], ":")


@pytest.fixture(scope="module")
def fast_deterministic_torch():
    """One intra-op thread: these models are tiny, and a second thread only costs (up to 50x on a busy machine,
    where OpenMP threads spin). No TorchScript re-optimisation: e3nn's scripted modules are fused after their
    first profiled calls, which changes results in the last bit between early and later calls of a process;
    exact comparisons need the same code path every call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.jit.optimized_execution(False):
        yield
    torch.set_num_threads(threads)


def double_batch(atoms_list, model):
    """A MACE batch dict built in float64 (positions, cell, shifts), with every floating tensor in float64."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # AtomicData takes the default dtype: float32 would round positions
    try:
        batch = batch_of(atoms_list, model)
    finally:
        torch.set_default_dtype(previous)
    return {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}


def assert_same_energy(model, other, batch, tol: float = 1e-12) -> None:
    """``other`` (e.g. the merged, saved model) predicts the energies ``model`` predicts on ``batch``."""
    import torch

    expected = model(batch, training=False, compute_force=False)["energy"]
    got = other(batch, training=False, compute_force=False)["energy"]
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


#: the bundled CHGNet-labelled magnetic oxide cells (mace_sparse/data/magnetic_oxides, made by harness.data.magnetic_oxides)
OXIDE_FILE = Path(__file__).resolve().parent.parent / "mace_sparse" / "data" / "magnetic_oxides" / "train.xyz"


@pytest.fixture(scope="session")
def oxide_frames():
    import ase.io

    return ase.io.read(OXIDE_FILE, ":")


@pytest.fixture(scope="session")
def oxide_foundation(request, tmp_path_factory, oxide_frames):
    """A tiny MACE pretrained (energies and forces only, never moments) on the oxide cells."""
    import ase.io

    work = tmp_path_factory.mktemp("oxide_pretraining_data")
    frames = [a.copy() for a in oxide_frames[:16]]
    for a in frames:
        a.arrays.pop("REF_magmoms", None)
    ase.io.write(work / "pre.xyz", frames)
    return pretrained_once(request, tmp_path_factory, work / "pre.xyz", epochs=4)


#: How every one-line refusal of ``mace_run_train`` starts.
PREFIX = "mace_run_train: error: "


def written_files(work: Path):
    return sorted(str(p.relative_to(work)) for p in work.rglob("*"))


def refused_in_process(run_train_module, monkeypatch, work: Path, args, keep=()) -> str:
    """Run ``mace_run_train ARGS`` in-process in ``work``; return its one error line, and check that nothing but
    ``keep`` was written there."""
    work.mkdir(exist_ok=True)
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["mace_run_train", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        run_train_module.main()
    line = info.value.code
    assert isinstance(line, str) and line.startswith(PREFIX) and "\n" not in line, line
    assert written_files(work) == sorted(keep), written_files(work)
    return line


#: Test modules in which every test starts ``mace_run_train``, ``torchrun`` or a notebook; they are marked
#: ``slow`` here (other modules mark their slow tests one by one), so ``pytest -m "not slow"`` is the fast tier.
SLOW_MODULES = {"test_mace_run_train", "test_distributed", "test_tutorials", "test_upstream_patch",
                "test_quickstart", "test_restart", "test_nonlinear_run", "test_multihead_apply"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


#: What a fast-tier test must not start (the definition of the ``slow`` marker). Only the cached foundations of
#: :func:`pretrained_once` may (inside :func:`training_allowed`).
SLOW_PROGRAMS = ("mace_run_train", "mace_sparse_train", "torchrun", "jupyter", "jupyter-nbconvert")
_GUARD = {"test": None, "allowed": 0}
_REAL_POPEN_INIT = subprocess.Popen.__init__


def _starts_slow_program(args) -> bool:
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    words = [os.path.basename(str(a).split()[0]) for a in argv[:4] if str(a).strip()]
    return any(w in SLOW_PROGRAMS for w in words)


def _guarded_popen_init(self, args, *a, **kw):
    if _GUARD["test"] is not None and not _GUARD["allowed"] and _starts_slow_program(args):
        raise AssertionError(f"{_GUARD['test']} starts {args!r} (in the test or one of its fixtures) but is not "
                             "marked slow; add @pytest.mark.slow: the fast tier, pytest -m 'not slow', starts no "
                             "training")
    _REAL_POPEN_INIT(self, args, *a, **kw)


subprocess.Popen.__init__ = _guarded_popen_init


@contextlib.contextmanager
def training_allowed():
    """Lets a cached, once-per-checkout foundation be trained from a fast-tier test's fixtures."""
    _GUARD["allowed"] += 1
    try:
        yield
    finally:
        _GUARD["allowed"] -= 1


def _guard(item) -> None:
    """Arm the guard for a fast-tier test (its fixtures and its body), disarm it for a slow one."""
    _GUARD["test"] = None if item.get_closest_marker("slow") else item.nodeid


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    """Keep the tiers honest: a fast-tier test whose fixtures start ``mace_run_train``/``torchrun`` fails."""
    _guard(item)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _guard(item)
    yield
    _GUARD["test"] = None


def random_orthogonal(det: int, seed: int):
    """A random 3×3 orthogonal matrix of determinant ``det`` (+1: rotation, −1: rotation times reflection)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q @ np.diag(np.sign(np.diag(r)))
    if np.sign(np.linalg.det(q)) != det:
        q[:, 0] *= -1
    assert np.allclose(q @ q.T, np.eye(3)) and round(np.linalg.det(q)) == det
    return q
