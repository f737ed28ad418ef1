"""The things a step-cost measurement steps: MACE's defaults, an EMT batch, a MACE model, and each method set up
on its own copy of that model the way ``mace_run_train`` sets it up.

Every optimiser and model setting not fixed by :class:`~harness.stepcost.schema.BenchConfig` comes from MACE's
own argument parser (:func:`mace_default_args`), so the benchmark follows MACE if those defaults change. The
three methods differ only in set-up (:func:`setup_method`):

* ``full``: the plain model, every weight trainable (the reference);
* ``sparse_str``: :func:`mace_sparse.get_sparse_model` + MACE's param groups passed through
  :func:`mace_sparse.optim.sparse_param_groups` + :func:`mace_sparse.register_threshold_decay` — exactly what
  the ``mace_run_train`` integration does;
* ``lora``: ``mace.modules.lora.inject_LoRAs(model, rank, alpha)``, as ``mace_run_train --lora`` does (for
  context: the other parameter-efficient method MACE ships).

The batch is EMT-labelled fcc alloy cells from :func:`harness.data.emt_data.bulk_configs`. Everything here is
built in torch's current default dtype: callers wrap it in :func:`mace_sparse.mace_io.default_dtype`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, List, Sequence, Tuple

import mace  # noqa: F401  (mace must be imported before e3nn)
import numpy as np
import torch
from ase.data import chemical_symbols
from e3nn import o3
from mace import data, modules
from mace.modules.lora import inject_LoRAs
from mace.tools import build_default_arg_parser
from mace.tools.scripts_utils import get_optimizer, get_params_options
from mace.tools.utils import AtomicNumberTable

from harness.data import emt_data
from mace_sparse import mace_io
from mace_sparse.config import SparseConfig
from mace_sparse.optim import register_threshold_decay, sparse_param_groups
from mace_sparse.sparse_model import get_sparse_model

from .schema import BenchConfig

#: Elements of the EMT batch (ASE's EMT knows these three).
EMT_ELEMENTS: Tuple[str, ...] = ("Cu", "Ni", "Al")


def mace_default_args() -> Any:
    """MACE's own ``mace_run_train`` defaults (lr, weight decay, amsgrad, clip_grad, loss weights, ...).

    Taken from MACE's parser rather than copied, so the benchmark optimises exactly like a default run.
    """
    return build_default_arg_parser().parse_args(["--name", "mace_sparse_bench_step"])


def emt_structures(n: int, atoms: int, seed: int = 0, elements: Sequence[str] = EMT_ELEMENTS) -> List[Any]:
    """``n`` rattled, strained fcc alloy cells of exactly ``atoms`` atoms, labelled with ASE's EMT."""
    return emt_data.bulk_configs(n, seed=seed, elements=tuple(elements), atoms=atoms)


def make_batch(atoms_list: Sequence[Any], z_table: Any, cutoff: float) -> Any:
    """A MACE ``Batch`` (energies and forces from ``REF_energy`` / ``REF_forces``) in the default dtype."""
    keys = data.KeySpecification(info_keys={"energy": "REF_energy"}, arrays_keys={"forces": "REF_forces"})
    return mace_io.batch(mace_io.atomic_data(atoms_list, z_table, cutoff, keys))


def build_model(cfg: BenchConfig, atoms_list: Sequence[Any], z_table: Any, avg_num_neighbors: float) -> torch.nn.Module:
    """A ScaleShiftMACE as ``mace_run_train --model MACE`` builds it, with MACE's defaults for everything
    the config does not set (Bessel basis, cutoff polynomial, max_ell, MLP irreps, gate, interactions)."""
    args = mace_default_args()
    energies = np.array([a.info["REF_energy"] / len(a) for a in atoms_list])
    forces = np.concatenate([a.arrays["REF_forces"].ravel() for a in atoms_list])
    irreps = " + ".join(f"{cfg.channels}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(cfg.max_L + 1))
    return modules.ScaleShiftMACE(
        r_max=cfg.r_max,
        num_bessel=args.num_radial_basis,
        num_polynomial_cutoff=args.num_cutoff_basis,
        max_ell=args.max_ell,
        interaction_cls=modules.interaction_classes[args.interaction],
        interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
        num_interactions=cfg.num_interactions,
        num_elements=len(z_table),
        hidden_irreps=o3.Irreps(irreps),
        MLP_irreps=o3.Irreps(args.MLP_irreps),
        atomic_energies=np.full(len(z_table), float(energies.mean())),
        avg_num_neighbors=avg_num_neighbors,
        atomic_numbers=list(z_table.zs),
        correlation=cfg.correlation,
        gate=modules.gate_dict[args.gate],
        radial_MLP=list(cfg.radial_mlp),
        radial_type=args.radial_type,
        atomic_inter_scale=float(np.sqrt(np.mean(forces**2))),
        atomic_inter_shift=0.0,
    )


def prepare(cfg: BenchConfig) -> Tuple[torch.nn.Module, Any, Dict[str, int]]:
    """The base model and the batch (in the current default dtype), plus the batch's size."""
    if cfg.model_path is not None:
        model = mace_io.load_model(cfg.model_path).to(torch.get_default_dtype())
        zs = [int(z) for z in model.atomic_numbers]
        elements = [chemical_symbols[z] for z in zs if chemical_symbols[z] in EMT_ELEMENTS]
        if not elements:
            raise ValueError(
                f"--model: the model knows none of Cu, Ni, Al (its elements: {zs}); the EMT batch needs them"
            )
        atoms_list = emt_structures(cfg.batch_size, cfg.atoms, cfg.seed, elements)
        batch = make_batch(atoms_list, AtomicNumberTable(zs), float(model.r_max))
    else:
        atoms_list = emt_structures(cfg.batch_size, cfg.atoms, cfg.seed)
        z_table = AtomicNumberTable([13, 28, 29])
        batch = make_batch(atoms_list, z_table, cfg.r_max)
        _, receivers = batch.edge_index
        avg_num_neighbors = float(torch.bincount(receivers).float().mean())
        model = build_model(cfg, atoms_list, z_table, avg_num_neighbors)
    info = {
        "configs": int(batch.num_graphs),
        "atoms": int(batch.num_nodes),
        "edges": int(batch.edge_index.shape[1]),
        "model_params": int(sum(p.numel() for p in model.parameters())),
    }
    return model, batch, info


@dataclasses.dataclass
class MethodState:
    """One method ready to step: its own model copy, its optimiser, its trainable parameter count."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trainable_params: int


def setup_method(name: str, base_model: torch.nn.Module, cfg: BenchConfig, args: Any) -> MethodState:
    """Deep-copy ``base_model`` and prepare it and its optimiser the way ``mace_run_train`` would."""
    model = copy.deepcopy(base_model)
    if name == "full":
        optimizer = get_optimizer(args, get_params_options(args, model))
    elif name == "sparse_str":
        sparse_cfg = SparseConfig(targets=cfg.targets, granularity=cfg.granularity)
        model = get_sparse_model(model, sparse_cfg)
        options = get_params_options(args, model)
        options["params"] = sparse_param_groups(options["params"], model, sparse_cfg, args.lr)
        optimizer = register_threshold_decay(get_optimizer(args, options))
    elif name == "lora":
        model = inject_LoRAs(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        optimizer = get_optimizer(args, get_params_options(args, model))
    else:
        raise ValueError(f"unknown method {name!r}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return MethodState(name, model, optimizer, trainable)
