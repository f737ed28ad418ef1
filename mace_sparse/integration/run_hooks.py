"""What mace-sparse does at each stage of one ``mace_run_train`` run, independent of how it is called.

Two callers drive the same :class:`FineTuneHooks` object:

* the runtime patches of :mod:`.seams` (MACE as released has no plugin mechanism), and
* MACE's ``mace.plugins`` entry-point hook, where the upstream patch in ``patches/`` is applied.

Keeping the behaviour here and only the *wiring* in the callers means both paths train the same model.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any, Dict, List, Optional

import torch

from .. import optim
from ..artifacts.atomic import atomic_write_with
from ..artifacts.derivation import record_derivation
from ..artifacts.run_outputs import write_run_artifacts
from ..config import SparseConfig
from ..coverage import coverage_of
from ..mace_io import output_paths
from ..magnetism.config import MagneticConfig
from ..magnetism.head import HEAD_NAME, attach_magnetic_head, detach_magnetic_head, has_magnetic_head
from ..magnetism.loss import MagneticLoss
from ..magnetism.metrics import log_suffix
from ..magnetism.model import MagneticMACE
from ..magnetism.statistics import training_frames
from ..sparse_model import (
    DERIVATION_ATTR,
    get_sparse_model,
    is_sparse_model,
    merge_and_unload,
    sparsity_stats,
    trainable_parameters_line,
)
from ..support import FixSupportOnFirstCall
from .run_guards import check_finite, write_settings


class FineTuneHooks:
    """Per-run state and the stage hooks of a sparse_str and/or magnetic-head run."""

    def __init__(self, args: Any, sparse: Optional[SparseConfig], magnetic: Optional[MagneticConfig]) -> None:
        self.args = args
        self.sparse = sparse
        self.magnetic = magnetic if magnetic is not None and magnetic.enabled else None
        self.model: Optional[torch.nn.Module] = None
        self.saved_stems: List[str] = []
        #: one line per promised output that could not be written (the run then fails after MACE's own saves)
        self.failures: List[str] = []
        #: the run's first validation loss (divergence is judged against it)
        self.first_valid_loss: Optional[float] = None
        #: how the caller wired these hooks into MACE (set by the caller, logged with the model set-up)
        self.wiring: Optional[str] = None

    @property
    def active(self) -> bool:
        return self.sparse is not None or self.magnetic is not None

    # ------------------------------------------------------------------------------------------- model
    def configure_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Attach the moment head (fully trainable) and/or reparameterise the backbone, in place."""
        if self.model is not None:
            # two callers wired into one run (plugin hook and runtime patch) would reparameterise twice
            raise RuntimeError("mace-sparse: configure_model called twice in one run (hook and patch both active?)")
        if self.wiring is not None:
            logging.info(f"mace-sparse wiring: {self.wiring}")
        if getattr(self.args, "name", None) is not None:  # a mace_run_train run (not hooks driven from Python)
            write_settings(self.args, self.sparse, self.magnetic is not None)  # read by a later --restart_latest
        if self.magnetic is not None:
            train_files = getattr(self.args, "train_file", None) or []
            train_files = [train_files] if isinstance(train_files, str) else list(train_files)
            head = attach_magnetic_head(model, self.magnetic, frames=training_frames(train_files, limit=256))
            logging.info("===========MAGNETIC-MOMENT HEAD===========")
            logging.info(f"Magnetic config: {json.dumps(self.magnetic.to_dict())}")
            logging.info(f"Moment head: {sum(p.numel() for p in head.parameters())} trainable parameters")
        if self.sparse is not None:
            exclude = (HEAD_NAME,) if self.magnetic is not None else ()
            coverage = coverage_of(model, self.sparse.targets, exclude)
            derivation = _record_derivation(self.args, model)
            get_sparse_model(model, self.sparse, exclude_prefixes=exclude)
            if derivation is not None:
                model.__dict__[DERIVATION_ATTR] = derivation
                logging.info(f"Derivation recorded for the delta file: {derivation['steps']}")
            logging.info("===========SPARSE FINE-TUNING (sparse_str)===========")
            logging.info(f"Sparse config: {json.dumps(self.sparse.to_dict())}")
            logging.info(coverage.share_line())
            frozen = coverage.frozen_line()
            if frozen is not None:
                logging.warning(frozen)
            logging.info(trainable_parameters_line(model))
        self.model = model
        return model

    def param_options(self, options: Dict[str, Any], model: torch.nn.Module) -> Dict[str, Any]:
        """Add the head's own group and move threshold scores to theirs (frozen weights dropped)."""
        module = getattr(model, "module", model)
        if self.magnetic is not None:
            head_params = list(getattr(module, HEAD_NAME).parameters())
            ids = {id(p) for p in head_params}
            for group in options["params"]:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            group = {"name": "magnetic_head", "params": head_params, "weight_decay": 0.0}
            if self.magnetic.head_lr is not None:
                group["lr"] = self.magnetic.head_lr
            options["params"].append(group)
        if self.sparse is not None:
            options["params"] = optim.sparse_param_groups(options["params"], module, self.sparse, self.args.lr)
        return options

    def optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        if self.sparse is None:
            return optimizer
        return optim.register_threshold_decay(optimizer)

    def swa(self, swa: Any, optimizer: torch.optim.Optimizer) -> Any:
        """Stage two (``--swa``): keep the threshold lr ratio under SWALR, and keep the moment term in the
        stage-two loss MACE builds afresh (it would otherwise stop training the head)."""
        if self.sparse is not None:
            optim.keep_threshold_lr_ratio_in_swa(optimizer, self.args.lr)
        if swa is not None and self.magnetic is not None and hasattr(swa, "loss_fn"):
            swa.loss_fn = self.loss(swa.loss_fn)
        if swa is not None and self.sparse is not None and self.sparse.retrain_support and hasattr(swa, "loss_fn"):
            swa.loss_fn = FixSupportOnFirstCall(swa.loss_fn, lambda: self.model)
        return swa

    def loss(self, loss_fn: torch.nn.Module) -> torch.nn.Module:
        if self.magnetic is None:
            return loss_fn
        if isinstance(loss_fn, MagneticLoss):
            return loss_fn
        return MagneticLoss(loss_fn, self.magnetic)

    # -------------------------------------------------------------------------------------------- save
    def before_save(self, training_model: torch.nn.Module, copied: torch.nn.Module) -> torch.nn.Module:
        """Turn MACE's save-time copy into a plain MACE model; write the delta file and the magnetic model.

        The first call is stage one (``<name>``), a second one stage two (``<name>_stagetwo``).
        """
        sparse = is_sparse_model(copied)
        magnetic = has_magnetic_head(copied)
        if not (sparse or magnetic):
            return copied
        stem = self.args.name if not self.saved_stems else f"{self.args.name}_stagetwo"
        self.saved_stems.append(stem)
        head = None
        sparse_source: torch.nn.Module = training_model
        if magnetic:
            head = detach_magnetic_head(copied)
            if sparse:
                sparse_source = copy.deepcopy(copied)  # the delta describes the backbone only
        if sparse:
            logging.info("Merging the sparse delta into a plain MACE model")
            merge_and_unload(copied)
            failure = _write_sparse_artifacts(sparse_source, copied, self.args.model_dir, stem)
            if failure is not None:
                self.failures.append(failure)
        if head is not None:
            _save_magnetic_model(MagneticMACE(copy.deepcopy(copied), head), self.args.model_dir, stem)
        return copied

    def check_finite(self, valid_loss: Any, epoch: Optional[int]) -> None:
        """Stop a diverged sparse_str run at its validation line (see :func:`.run_guards.check_finite`)."""
        if self.sparse is None or self.model is None:
            return
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        check_finite(valid_loss, trainable, epoch, float(self.args.lr), self.first_valid_loss)
        if self.first_valid_loss is None:
            self.first_valid_loss = float(valid_loss)

    # ----------------------------------------------------------------------------------------- logging
    def validation_suffix(self, eval_metrics: Dict[str, Any]) -> str:
        """Extra text for MACE's per-epoch validation line (sparsity, mean δ, moment errors)."""
        suffix = ""
        if self.magnetic is not None:
            suffix += log_suffix(eval_metrics)
        if self.sparse is not None and self.model is not None:
            stats = sparsity_stats(self.model)
            eval_metrics["sparsity"] = stats.layer_sparsity
            eval_metrics["total_sparsity"] = stats.total_sparsity
            eval_metrics["mean_threshold"] = stats.mean_threshold
            suffix += f", sparsity={100 * stats.layer_sparsity:.2f} %, mean_delta={stats.mean_threshold:.3e}"
        return suffix


def _record_derivation(args: Any, model: torch.nn.Module) -> Optional[Dict[str, Any]]:
    """How MACE derived ``model`` from the foundation file; a failure only costs ``apply`` on that file."""
    try:
        return record_derivation(args, model)
    except Exception as exc:  # noqa: BLE001  (the run must go on; apply then needs the derived model itself)
        logging.warning(f"mace-sparse: could not record how MACE derived the model ({type(exc).__name__}: {exc})")
        return None


def _save_magnetic_model(model: torch.nn.Module, model_dir: str, stem: str) -> None:
    path = output_paths(model_dir, stem).magnetic
    to_save = copy.deepcopy(model).cpu()
    atomic_write_with(path, lambda tmp: torch.save(to_save, tmp))
    logging.info(f"Saved model with magnetic-moment head to {path}")


def _write_sparse_artifacts(sparse_model: Any, merged: Any, model_dir: str, stem: str) -> Optional[str]:
    """``<stem>_sparse_delta.safetensors`` and ``<stem>_sparsity.json`` next to the model MACE is saving.

    A failure is logged and returned as one line, not raised: the merged ``.model`` (the run's main result) is
    still saved, and the run then exits non-zero with that line (a promised output is missing).
    """
    try:
        delta_path, json_path = write_run_artifacts(sparse_model, merged, model_dir, stem)
        logging.info(f"Saved sparse delta to {delta_path} and sparsity report to {json_path}")
        return None
    except Exception as exc:  # noqa: BLE001
        logging.exception(f"Could not write the sparse delta / sparsity report for {stem}")
        return (f"the run finished but could not write the sparse delta / sparsity report of {stem} "
                f"({' '.join(str(exc).split())[:200]}); the merged model was saved, the delta was not")
