"""Multi-process CPU training: ``torchrun --nproc_per_node 2 mace_run_train ... --distributed`` with gloo.

MACE 0.3.16 sets up distributed runs for cuda and xpu only; the plugin's distributed-on-CPU patches
(``mace_sparse.integration.distributed.cpu_distributed_patches``) make the same command work on CPU. Two real
2-process runs of the console script on the tiny fixtures, one after the other (2 processes each, one torch
thread each): ``--finetune-method sparse_str`` and plain full fine-tuning.

What is checked, and how:

* every rank ends training with bit-identical weights: ``MACE_SPARSE_RANK_DIGEST`` makes each rank write a
  SHA-256 per state-dict tensor when training ends, and the digests are also compared with the checkpoint
  rank 0 saved, so they are the trained weights (latent deltas and threshold scores included);
* the saved ``ft.model`` is a plain MACE model of the foundation's class (merged from the unwrapped module,
  not from the DDP wrapper), and it predicts;
* the save-time files are written by rank 0 alone, once: a test-only ``sitecustomize`` in the runs'
  ``PYTHONPATH`` records, per rank, the files renamed into place (every artifact of this package is written
  to a temporary file and renamed).

The launcher is ``python -m torch.distributed.run``, the module behind ``torchrun``, so that the test runs with
its own interpreter whatever is on ``PATH``; the script is the ``mace_run_train`` installed beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path
from types import SimpleNamespace

import mace  # noqa: F401  (before e3nn)
import pytest
import torch

from conftest import COMMON_ARGS
from mace_sparse.integration.distributed import (
    RANK_DIGEST_ENV,
    cpu_distributed_patches,
    needs_cpu_distributed_patches,
    state_dict_digest,
)

#: Test-only start-up file for the rank processes: records the destination of every rename, per rank.
RENAME_RECORDER = textwrap.dedent(
    """
    import os, sys

    def _record_renames():
        rank, folder = os.environ.get("RANK"), os.environ.get("MACE_SPARSE_TEST_RENAMES")
        if rank is None or not folder:
            return
        log = os.path.join(folder, "rank" + rank + ".txt")

        def hook(event, args):
            if event == "os.rename":
                with open(log, "a") as handle:
                    handle.write(os.path.basename(os.fsdecode(args[1])) + "\\n")

        sys.addaudithook(hook)

    _record_renames()
    """
)


def mace_run_train_script() -> str:
    """The ``mace_run_train`` console script of this interpreter (a Python file, which the launcher runs)."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "mace_run_train"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("mace_run_train")
    assert found, "mace_run_train is not installed"
    return found


def torchrun(args, cwd: Path, extra_env: dict) -> subprocess.CompletedProcess:
    hooks = cwd / "_test_hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(RENAME_RECORDER)
    env = dict(os.environ)
    env.pop("MACE_SPARSE_DISABLE", None)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(hooks), *filter(None, [env.get("PYTHONPATH")])]),
        **extra_env,
    )
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        mace_run_train_script(), *map(str, args), "--distributed", "--launcher", "torchrun",
    ]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def small_train(emt_data, tmp_path_factory) -> Path:
    import ase.io

    path = tmp_path_factory.mktemp("data") / "slab_small.xyz"
    ase.io.write(path, ase.io.read(emt_data["slab_train"], ":12"), format="extxyz")
    return path


def distributed_run(name: str, extra, tiny_foundation, small_train, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"dist-{name}")
    args = [
        "--name", "ft", "--foundation_model", tiny_foundation, "--train_file", small_train,
        # 9 train + 3 valid configurations: 4 train (2 steps of 2) and 1 valid configuration per rank
        "--valid_fraction", "0.25", "--E0s", "foundation", "--seed", "1", "--lr", "0.01",
        "--multiheads_finetuning", "False", "--plot", "False", "--skip_evaluate_heads", "Default",
        "--save_all_checkpoints", *COMMON_ARGS, "--batch_size", "2", *extra,
    ]
    (work / "renames").mkdir()
    proc = torchrun(args, work, {RANK_DIGEST_ENV: str(work / "digest"),
                                 "MACE_SPARSE_TEST_RENAMES": str(work / "renames")})
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return work


@pytest.fixture(scope="module")
def sparse_run(tiny_foundation, small_train, tmp_path_factory) -> Path:
    return distributed_run("sparse", ["--max_num_epochs", "2", "--finetune-method", "sparse_str"],
                           tiny_foundation, small_train, tmp_path_factory)


def rank_digests(work: Path):
    found = sorted((work / "digest").glob("rank*.json"))
    assert [p.name for p in found] == ["rank0.json", "rank1.json"]
    return [json.loads(p.read_text()) for p in found]


def renamed_by_rank(work: Path) -> dict:
    return {p.stem: p.read_text().split() for p in sorted((work / "renames").glob("rank*.txt"))}


def test_sparse_ranks_end_bit_identical(sparse_run):
    rank0, rank1 = rank_digests(sparse_run)
    assert (rank0["rank"], rank1["rank"]) == (0, 1) and rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["tensors"] == rank1["tensors"] and rank0["sha256"] == rank1["sha256"]
    keys = list(rank0["tensors"])
    assert any(k.endswith("_delta") for k in keys) and any(k.endswith("_threshold_score") for k in keys)
    # the digests are of the trained weights: the last checkpoint (saved by rank 0) holds exactly them
    checkpoint = torch.load(sparse_run / "checkpoints" / "ft_run-1_epoch-1.pt", map_location="cpu",
                            weights_only=False)
    assert state_dict_digest(checkpoint["model"])["tensors"] == rank0["tensors"]
    deltas = [v for k, v in checkpoint["model"].items() if k.endswith("_delta")]
    assert any(bool(d.ne(0).any()) for d in deltas)  # and training did change the deltas
    log = next(p for p in (sparse_run / "logs").glob("*.log") if not p.name.endswith("_debug.log")).read_text()
    assert "Process group initialized: True" in log and "Processes: 2" in log
    assert "sparsity=" in log


def test_sparse_files_written_once_by_rank_zero(sparse_run, tiny_foundation):
    from mace_sparse.artifacts.delta_file import apply_delta

    renamed = renamed_by_rank(sparse_run)
    assert renamed.get("rank0", []).count("ft_sparse_delta.safetensors") == 1
    assert renamed.get("rank0", []).count("ft_sparsity.json") == 1
    assert not [f for f in renamed.get("rank1", []) if f.startswith("ft")], renamed
    assert sorted(p.name for p in sparse_run.glob("*_sparse_delta.safetensors")) == ["ft_sparse_delta.safetensors"]
    # the delta rebuilds the saved model from the foundation, bit for bit
    foundation = torch.load(tiny_foundation, map_location="cpu", weights_only=False)
    saved = torch.load(sparse_run / "ft.model", map_location="cpu", weights_only=False)
    rebuilt = apply_delta(foundation, sparse_run / "ft_sparse_delta.safetensors").state_dict()
    assert list(rebuilt) == list(saved.state_dict())
    assert all(torch.equal(rebuilt[k], v) for k, v in saved.state_dict().items())


def test_sparse_saved_model_is_plain_mace(sparse_run, tiny_foundation, slab_atoms):
    """Rank 0 merged the unwrapped model: no DDP wrapper, no sparse entries, hooks or classes; it predicts.

    (That such a model loads without this package at all is shown for single-process runs in
    ``test_mace_run_train.py``.)"""
    from conftest import double_batch

    foundation = torch.load(tiny_foundation, map_location="cpu", weights_only=False).double()
    model = torch.load(sparse_run / "ft.model", map_location="cpu", weights_only=False).double()
    assert type(model) is type(foundation) and type(model).__module__ == "mace.modules.models"
    assert list(model.state_dict()) == list(foundation.state_dict())
    assert not [k for k in model.state_dict() if k.endswith(("_delta", "_threshold_score", "_foundation"))]
    assert not [type(m) for m in model.modules() if type(m).__module__.startswith("mace_sparse")]
    assert not [n for n, m in model.named_modules() if not isinstance(m, torch.jit.ScriptModule)
                and (m._forward_hooks or m._forward_pre_hooks)]
    assert not [n for n, m in model.named_modules() if any(k.startswith("_sparse") for k in m.__dict__)]
    batch = double_batch(slab_atoms[-1:], foundation)
    out = model(dict(batch), training=False, compute_force=True)
    reference = foundation(dict(batch), training=False, compute_force=True)
    assert torch.isfinite(out["forces"]).all() and out["forces"].shape == reference["forces"].shape
    assert abs(float(out["energy"][0]) - float(reference["energy"][0])) > 1e-6  # fine-tuned, not the foundation


def test_plain_fine_tuning_distributed(tiny_foundation, small_train, tmp_path_factory):
    """Full fine-tuning (no sparse flag) takes the same gloo path: the fix is MACE's, not sparse_str's."""
    work = distributed_run("plain", ["--max_num_epochs", "1"], tiny_foundation, small_train, tmp_path_factory)
    rank0, rank1 = rank_digests(work)
    assert rank0["tensors"] == rank1["tensors"]
    assert not [k for k in rank0["tensors"] if k.endswith("_delta")]
    checkpoint = torch.load(work / "checkpoints" / "ft_run-1_epoch-0.pt", map_location="cpu", weights_only=False)
    assert state_dict_digest(checkpoint["model"])["tensors"] == rank0["tensors"]
    assert (work / "ft.model").is_file() and not list(work.glob("*_sparse_delta.safetensors"))
    assert "SPARSE" not in next((work / "logs").glob("ft_run-1.log")).read_text()


# ------------------------------------------------------------------------------- the patches themselves


def test_patches_apply_to_cpu_distributed_runs_only():
    def args(**kw):
        return SimpleNamespace(**{"distributed": True, "device": "cpu", "launcher": "torchrun", **kw})

    assert needs_cpu_distributed_patches(args())
    assert not needs_cpu_distributed_patches(args(distributed=False))
    assert not needs_cpu_distributed_patches(args(device="cuda"))  # MACE sets cuda and xpu up itself


def test_ddp_loses_device_ids_and_everything_is_restored(monkeypatch):
    import mace.tools

    monkeypatch.delenv(RANK_DIGEST_ENV, raising=False)
    wrapped = []
    fake_run_train = SimpleNamespace(
        init_distributed=lambda a: (0, 0, 1), DDP=lambda module, **kw: wrapped.append((module, kw))
    )
    originals = dict(vars(fake_run_train))
    train = mace.tools.train
    args = SimpleNamespace(distributed=True, device="cpu", launcher="none")
    with cpu_distributed_patches(fake_run_train, args):
        fake_run_train.DDP("model", device_ids=[0], find_unused_parameters=True)
        # launcher "none": MACE reports a single process and no group is made
        assert fake_run_train.init_distributed(args) == (0, 0, 1)
        assert not torch.distributed.is_initialized()
        assert mace.tools.train is train  # the digest wrapper only with MACE_SPARSE_RANK_DIGEST set
    assert wrapped == [("model", {"find_unused_parameters": True})]
    assert vars(fake_run_train) == originals


def test_magnetic_head_distributed(oxide_foundation, oxide_frames, tmp_path_factory):
    """sparse_str with the moment head under 2 ranks: identical weights (head included), both model files."""
    import ase.io

    from mace_sparse.magnetism.model import MagneticMACE

    frames = [a.copy() for a in oxide_frames[:12]]
    del frames[5].arrays["REF_magmoms"]  # a frame without moments shares the batches
    train = tmp_path_factory.mktemp("oxide-data") / "train.xyz"
    ase.io.write(train, frames)
    work = distributed_run("magnetic", ["--max_num_epochs", "1", "--finetune-method", "sparse_str",
                                        "--magmom_weight", "10"], oxide_foundation, train, tmp_path_factory)
    rank0, rank1 = rank_digests(work)
    assert rank0["tensors"] == rank1["tensors"]
    assert any(k.startswith("magnetic_head.") for k in rank0["tensors"])
    assert isinstance(torch.load(work / "ft_magnetic.model", weights_only=False), MagneticMACE)
    plain = torch.load(work / "ft.model", weights_only=False)
    assert not any(k.startswith("magnetic_head") for k in plain.state_dict())
    assert renamed_by_rank(work).get("rank0", []).count("ft_magnetic.model") == 1


@pytest.mark.slow
def test_fisher_budget_ranks_alike_on_every_rank(tiny_foundation, small_train, tmp_path_factory):
    """--sparse_selection fisher sums the gradients after DDP has averaged them, so both ranks hold the same
    importance sums and the same selection, and end bit-identical."""
    work = distributed_run("fisher", ["--max_num_epochs", "2", "--finetune-method", "sparse_str", "--sparse_budget",
                                      "0.03", "--sparse_selection", "fisher"], tiny_foundation, small_train,
                           tmp_path_factory)
    rank0, rank1 = rank_digests(work)
    assert rank0["tensors"] == rank1["tensors"] and rank0["sha256"] == rank1["sha256"]
    checkpoint = torch.load(work / "checkpoints" / "ft_run-1_epoch-1.pt", map_location="cpu", weights_only=False)
    sums = {k: v for k, v in checkpoint["model"].items() if k.endswith("_importance")}
    assert sums and set(sums) <= set(rank0["tensors"]) and sum(float(v.sum()) for v in sums.values()) > 0
    report = json.loads((work / "ft_sparsity.json").read_text())
    assert 0 < report["changed_entries"] <= int(0.03 * report["total_entries"])
