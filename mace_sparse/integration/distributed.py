"""``mace_run_train --distributed --device cpu``: the patches that let MACE's distributed path run on CPU.

Active while a ``--distributed`` run with ``--device cpu`` executes, for any fine-tuning method (plain
training included), since they lift a MACE limitation rather than add a feature (:func:`cpu_distributed_patches`).
MACE 0.3.16 creates a process group only for cuda (nccl) and xpu (ccl) (``tools/distributed_tools.py``, end of
``init_distributed``) and wraps the model as ``DDP(model, device_ids=[local_rank])`` (``cli/run_train.py``
lines 896 and 1056), which DDP refuses for a CPU module. Everything else MACE does in a distributed run already
works on CPU with gloo: samplers, barriers, rank-0 logging, rank-0 checkpoints and ``.model`` files, metric
reduction.

==============================  ===============================================================
name in MACE                    what the patch adds
==============================  ===============================================================
``run_train.init_distributed``  after MACE's own rank/world-size discovery (torchrun, slurm, mpi
                                environment), a gloo process group if MACE made none
``run_train.DDP``               no ``device_ids`` for the CPU model (the DDP wrap of lines 896, 1056)
``mace.tools.train``            only with ``MACE_SPARSE_RANK_DIGEST`` set (a debugging aid): every
                                rank writes a digest of its model's state dict when training ends
==============================  ===============================================================

With ``--finetune-method sparse_str`` DDP wraps the sparse-trainable model: it synchronises the gradients of
the latent deltas and threshold scores (the only trainable parameters) and broadcasts the frozen foundation
buffers from rank 0; the threshold decay and ΔW gradient scaling run in the optimizer step, after the
gradient all-reduce, so every rank applies the same update. The save-time merge sees ``model``, the
unwrapped module, on rank 0 only (MACE saves there only), so the delta file is written once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Mapping, Optional

import mace.tools  # before anything that imports e3nn; its train loop is patched below
import torch
import torch.distributed as dist

from ..config import SparseConfigError
from .patching import replaced
from .validation import check_mace_version

#: Debugging aid: set to a directory and every rank of a distributed run writes ``rank<R>.json`` there when
#: training ends (SHA-256 of each state-dict tensor and of all of them), so that the ranks' weights can be
#: compared although MACE saves checkpoints and models on rank 0 only.
RANK_DIGEST_ENV = "MACE_SPARSE_RANK_DIGEST"


def needs_cpu_distributed_patches(args: Any) -> bool:
    """True for a ``--distributed`` run on ``--device cpu``: the case MACE 0.3.16 does not set up itself."""
    return bool(getattr(args, "distributed", False)) and str(getattr(args, "device", "")) == "cpu"


def state_dict_digest(state_dict: Mapping[str, Any]) -> dict:
    """SHA-256 of every tensor of a state dict (raw bytes, so equal digests mean bit-identical tensors), and
    one over all of them in order. Also used by tests to digest a checkpoint's ``"model"`` entry."""
    per_key = {}
    total = hashlib.sha256()
    for key, value in state_dict.items():
        if not torch.is_tensor(value):
            continue
        raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        digest = hashlib.sha256(raw).hexdigest()
        per_key[key] = digest
        total.update(f"{key}:{value.dtype}:{tuple(value.shape)}:{digest};".encode())
    return {"sha256": total.hexdigest(), "tensors": per_key}


def write_rank_digest(model: Any, directory: str) -> Path:
    """Write ``<directory>/rank<R>.json``: this process's rank and :func:`state_dict_digest` of ``model``."""
    model = getattr(model, "module", model)  # a DDP wrapper would prefix every key with "module."
    grouped = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if grouped else 0
    world_size = dist.get_world_size() if grouped else 1
    record = {"rank": rank, "world_size": world_size, **state_dict_digest(model.state_dict())}
    path = Path(directory) / f"rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return path


@contextlib.contextmanager
def cpu_distributed_patches(run_train: ModuleType, args: Any) -> Iterator[None]:
    """Make MACE's ``--distributed`` path run on CPU processes with the gloo backend; restores on exit.

    On a MACE release other than :data:`.validation.TESTED_MACE_VERSIONS` nothing is patched (a warning is
    printed): MACE's own behaviour, whatever it is there, is kept.
    """
    try:
        check_mace_version()
    except SparseConfigError as exc:
        sys.stderr.write(f"mace-sparse: distributed CPU training not set up by the plugin ({exc})\n")
        yield
        return

    original_init = run_train.init_distributed

    def init_distributed(a: Any) -> tuple:
        """MACE's rank discovery, then a gloo group: MACE 0.3.16 only creates nccl (cuda) or ccl (xpu) groups.

        ``env://`` reads MASTER_ADDR and MASTER_PORT from the environment: torchrun sets them, MACE's slurm
        branch exports them, its mpi branch expects them from the user (tested: torchrun and slurm).
        """
        rank, local_rank, world_size = original_init(a)
        if a.distributed and a.launcher != "none" and not dist.is_initialized():
            dist.init_process_group(backend="gloo", init_method="env://", rank=rank, world_size=world_size)
        return rank, local_rank, world_size

    original_ddp = run_train.DDP

    def DDP(module: Any, device_ids: Optional[list] = None, **kw: Any) -> Any:  # noqa: N802  (MACE's name)
        """DDP for a CPU module: ``device_ids`` must be left out (DDP raises otherwise)."""
        return original_ddp(module, **kw)

    with contextlib.ExitStack() as stack:
        stack.enter_context(replaced(run_train, "init_distributed", init_distributed))
        stack.enter_context(replaced(run_train, "DDP", DDP))
        digest_dir = os.environ.get(RANK_DIGEST_ENV, "").strip()
        if digest_dir:
            original_train = mace.tools.train

            def train(*a: Any, **kw: Any) -> Any:
                """MACE's training loop, then this rank's weight digest (``MACE_SPARSE_RANK_DIGEST``)."""
                result = original_train(*a, **kw)
                write_rank_digest(kw["model"] if "model" in kw else a[0], digest_dir)
                return result

            stack.enter_context(replaced(mace.tools, "train", train))
        yield
