"""Run-level checks that MACE 0.3.16 never makes, each of which let a run "succeed" with a wrong result.

Issue 15 ("Nothing silent"), measured on mace-torch 0.3.16 without these checks:

* **sparse flags without the method** (``--sparse_targets linear`` on a full or ``--lora`` run): ignored.
* **two YAML spellings of one key** (``sparse_threshold_weight_decay: 2.5`` and
  ``sparse-threshold-weight-decay: 0.5``): configargparse keeps one of them without a word.
* **an output that cannot be written** (a directory at ``<name>_sparse_delta.safetensors``): the error went
  to the log after training, and the run exited 0.
* **``--restart_latest`` with other settings**: ``load_latest`` fails inside MACE, which swallows the error,
  starts from epoch 0 and overwrites the old checkpoints. This package records the settings of a run next to
  its checkpoints (:data:`SETTINGS_SUFFIX`) and compares them before anything is loaded.
* **a diverging run** (``--lr 1e3``): MACE validates a NaN loss, checkpoints it and saves a NaN model, exit 0.

Every check raises :class:`~mace_sparse.config.SparseConfigError` with one line; the callers in
:mod:`.validation` turn it into MACE's one-line exit, before MACE's ``run()`` writes anything (the
divergence check, necessarily, during training: before the diverged epoch is checkpointed).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
import yaml

from ..artifacts.atomic import atomic_write_bytes
from ..config import SparseConfig, SparseConfigError
from ..mace_io import output_paths
from ..magnetism.head import HEAD_NAME
from ..reparametrization import DELTA
from .arguments import SPARSE_FLAG_DEFAULTS

#: Next to the checkpoints ``<tag>_epoch-<N>.pt``: the mace-sparse settings the run was started with.
SETTINGS_SUFFIX = "_mace_sparse.json"


# ------------------------------------------------------------------------------------- what the user gave


def _spelled(flag: str) -> Tuple[str, str]:
    return f"--{flag}", f"--{flag.replace('_', '-')}"


def given_on_command_line(flag: str, argv: Optional[List[str]] = None) -> bool:
    """Whether ``--flag`` (either spelling, also as ``--flag=value``) appears among the arguments."""
    spellings = _spelled(flag)
    return any(token.split("=", 1)[0] in spellings for token in (sys.argv[1:] if argv is None else argv))


def config_keys(args: Any) -> Dict[str, Any]:
    """The raw keys and values of the ``--config`` YAML file of the run (empty without one)."""
    path = getattr(args, "config", None)
    if not path or not Path(str(path)).is_file():
        return {}
    with open(str(path), encoding="utf-8") as handle:
        loaded = yaml.safe_load(handle)
    return loaded if isinstance(loaded, dict) else {}


def explicitly_given(args: Any, flag: str) -> bool:
    """``--flag`` on the command line or (in either spelling) in the ``--config`` file."""
    if given_on_command_line(flag):
        return True
    return any(str(key).replace("-", "_") == flag for key in config_keys(args))


def check_sparse_flags_need_method(args: Any) -> None:
    """``--sparse_*`` flags only act with ``--finetune-method sparse_str``: refuse them on any other run."""
    if getattr(args, "finetune_method", "full") == "sparse_str":
        return
    for flag, default in SPARSE_FLAG_DEFAULTS.items():
        if getattr(args, flag, default) != default or explicitly_given(args, flag):
            method = "--lora" if getattr(args, "lora", False) else f"--finetune-method {args.finetune_method}"
            raise SparseConfigError(
                f"--{flag} only acts with --finetune-method sparse_str, but this run uses {method}; "
                f"add --finetune-method sparse_str or drop --{flag}"
            )


def check_config_spellings(args: Any, every_key: bool) -> None:
    """Refuse a YAML config that sets one option under two spellings (``a_b`` and ``a-b``) to different values.

    ``every_key``: check MACE's keys too (sparse_str and moment-head runs); otherwise only this package's.
    """
    ours = set(SPARSE_FLAG_DEFAULTS) | {"finetune_method"} | {k for k in vars(args) if k.startswith("magmom")}
    seen: Dict[str, Tuple[str, Any]] = {}
    for key, value in config_keys(args).items():
        canonical = str(key).replace("-", "_")
        if not every_key and canonical not in ours:
            continue
        if canonical in seen and seen[canonical][1] != value:
            first, other = seen[canonical]
            raise SparseConfigError(
                f"{args.config} sets {first}: {other!r} and {key}: {value!r}, two spellings of one option; "
                f"keep one of them"
            )
        seen.setdefault(canonical, (str(key), value))


# ---------------------------------------------------------------------------------------- promised outputs


def promised_outputs(args: Any, sparse: bool, magnetic: bool) -> List[Tuple[Path, str]]:
    """Every file a sparse_str / moment-head run promises to write, with what it is (for the message)."""
    work_dir = getattr(args, "work_dir", None) or "."
    model_dir = Path(getattr(args, "model_dir", None) or work_dir)
    checkpoints = Path(getattr(args, "checkpoints_dir", None) or os.path.join(work_dir, "checkpoints"))
    tag = f"{args.name}_run-{args.seed}"
    stems = [args.name] + ([f"{args.name}_stagetwo"] if getattr(args, "swa", False) else [])
    out: List[Tuple[Path, str]] = []
    for stem, suffix in zip(stems, ["", "_stagetwo"]):
        out += [(model_dir / f"{stem}.model", "model"), (model_dir / f"{stem}_compiled.model", "compiled model"),
                (checkpoints / f"{tag}{suffix}.model", "checkpoint-folder model")]
        ours = output_paths(model_dir, stem)
        if sparse:
            out += [(ours.delta, "sparse delta"), (ours.sparsity, "sparsity report")]
        if magnetic:
            out.append((ours.magnetic, "model with the magnetic head"))
    return out


def check_promised_outputs(args: Any, sparse: bool, magnetic: bool) -> None:
    """No promised output may be blocked by a directory (its folder's writability is checked in input_checks)."""
    for path, what in promised_outputs(args, sparse, magnetic):
        if path.is_dir():
            raise SparseConfigError(
                f"{path} is a directory, so this run could not save its {what} there; move that directory "
                "away or choose another --name / --model_dir"
            )


# -------------------------------------------------------------------------------------------------- restart


def settings_record(sparse: Optional[SparseConfig], magnetic: bool) -> Dict[str, Any]:
    """What must be the same for ``--restart_latest`` to continue a run (written beside its checkpoints)."""
    return {"finetune_method": "sparse_str" if sparse is not None else "full",
            "sparse_config": sparse.to_dict() if sparse is not None else None, "magnetic_head": bool(magnetic)}


def settings_path(args: Any) -> Path:
    work_dir = getattr(args, "work_dir", None) or "."
    checkpoints = getattr(args, "checkpoints_dir", None) or os.path.join(work_dir, "checkpoints")
    return Path(checkpoints) / f"{args.name}_run-{args.seed}{SETTINGS_SUFFIX}"


def write_settings(args: Any, sparse: Optional[SparseConfig], magnetic: bool) -> None:
    """Record the run's settings beside its checkpoints (called when the model is configured, before training).

    Written by rank 0 only, as MACE writes its checkpoints.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return

    text = json.dumps(settings_record(sparse, magnetic), indent=1, sort_keys=True) + "\n"
    atomic_write_bytes(settings_path(args), text.encode("utf-8"))


def _latest_checkpoint(args: Any) -> Optional[Path]:
    directory = settings_path(args).parent
    pattern = re.compile(rf"^{re.escape(f'{args.name}_run-{args.seed}')}_epoch-(\d+)(_swa)?\.pt$")
    found = [(int(m.group(1)), p) for p in (directory.iterdir() if directory.is_dir() else [])
             if (m := pattern.match(p.name))]
    return max(found)[1] if found else None


def _checkpoint_kind(path: Path) -> Dict[str, Any]:
    """Method and head read from a checkpoint's parameter names (for checkpoints without a settings file)."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("model", {})
    sparse = any(key.endswith(DELTA.format("")) for key in state)
    return {"finetune_method": "sparse_str" if sparse else "full",
            "magnetic_head": any(key.startswith(f"{HEAD_NAME}.") for key in state)}


def _describe(value: Any) -> str:
    return ",".join(value) if isinstance(value, list) else repr(value)


def check_restart(args: Any, sparse: Optional[SparseConfig], magnetic: bool) -> None:
    """``--restart_latest`` must continue a run with the same method, head and sparse settings.

    Runs before MACE's ``run()`` touches a checkpoint; compares the settings file (or, for checkpoints without
    one, the parameter names of the latest checkpoint) with this run's, and names the first difference.
    """
    if not getattr(args, "restart_latest", False):
        return
    latest = _latest_checkpoint(args)
    if latest is None:
        return
    record = settings_path(args)
    try:
        old = json.loads(record.read_text()) if record.is_file() else _checkpoint_kind(latest)
    except Exception:  # noqa: BLE001  (an unreadable record or checkpoint: MACE's own restart reports it)
        return
    new = settings_record(sparse, magnetic)
    where = f"--restart_latest: the checkpoints in {latest.parent} ({latest.name})"
    if old.get("finetune_method") != new["finetune_method"]:
        raise SparseConfigError(
            f"{where} are from a --finetune-method {old.get('finetune_method')} run, this run is "
            f"--finetune-method {new['finetune_method']}; restart with the same settings, or use another --name"
        )
    if bool(old.get("magnetic_head")) != new["magnetic_head"]:
        state = "with" if old.get("magnetic_head") else "without"
        raise SparseConfigError(f"{where} are from a run {state} the magnetic head (--magmom_weight); restart with "
                                "the same --magmom_weight setting, or use another --name")
    for key, value in (new["sparse_config"] or {}).items():
        before = (old.get("sparse_config") or {}).get(key, value)
        if before != value:
            flag = {"targets": "sparse_targets", "init_threshold": "sparse_init_threshold",
                    "granularity": "sparse_threshold_granularity"}.get(key, f"sparse_{key}")
            raise SparseConfigError(
                f"{where} were made with --{flag} {_describe(before)}, this run has --{flag} {_describe(value)}; "
                f"restart with --{flag} {_describe(before)}, or use another --name"
            )


# --------------------------------------------------------------------------------------------- divergence


#: A validation loss this many times the first one is divergence too: with ``--lr 1e3`` the loss of epoch 0 was
#: 5e282 (finite; MACE checkpointed it), NaN from epoch 1. A fine-tune that works never grows its loss a
#: million-fold (the margin covers a foundation that starts with an almost zero loss on the data).
DIVERGENCE_FACTOR = 1e6


def check_finite(valid_loss: Any, parameters: Iterable[Any], epoch: Optional[int], lr: float,
                 first_loss: Optional[float] = None) -> None:
    """Stop a diverged run before it is checkpointed or saved: a non-finite validation loss or trainable weight,
    or a loss :data:`DIVERGENCE_FACTOR` times ``first_loss`` (the run's first validation loss)."""
    loss = float(valid_loss) if valid_loss is not None else 0.0
    bad_weights = any(not bool(torch.isfinite(p).all()) for p in parameters)
    exploded = first_loss is not None and math.isfinite(first_loss) and first_loss > 0 and \
        loss > DIVERGENCE_FACTOR * first_loss
    if math.isfinite(loss) and not bad_weights and not exploded:
        return
    when = f"epoch {epoch}" if epoch is not None else "the first validation (before epoch 0)"
    what = f"validation loss {loss:.3g}" + (" and non-finite weights" if bad_weights else "") + \
        (f", {loss / first_loss:.1e} times the first ({first_loss:.3g})" if exploded and math.isfinite(loss) else "")
    raise SparseConfigError(
        f"training diverged at {when} ({what}); the likely cause is a learning rate too large for this "
        f"model (--lr {lr}): lower --lr (e.g. by 10x); no model or delta was saved"
    )
