"""The files a ``mace_run_train --finetune-method sparse_str`` run writes next to ``<name>.model``.

Called from the patched save-time ``deepcopy`` (:mod:`mace_sparse.integration.seams`) with the same
API a Python user has (:func:`build_delta`, :func:`write_delta`), so a run's delta and a hand-made one are
the same thing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch

from ..mace_io import output_paths
from .atomic import PathLike
from .delta_diff import build_delta
from .delta_format import write_delta
from .report import report_data, write_sparsity_json


def write_run_artifacts(
    sparse_model: torch.nn.Module, merged: torch.nn.Module, model_dir: PathLike, stem: str
) -> Tuple[Path, Path]:
    """Write ``<stem>_sparse_delta.safetensors`` and ``<stem>_sparsity.json`` into ``model_dir`` (atomically)."""
    paths = output_paths(model_dir, stem)
    delta = build_delta(sparse_model, merged=merged)
    delta_path = write_delta(delta, paths.delta)
    write_sparsity_json(delta, paths.sparsity, report_data(delta))
    return delta_path, paths.sparsity
