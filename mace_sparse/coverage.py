"""How much of what MACE would train a sparse_str run adapts, per kind, and what it leaves frozen and why.

A run that silently freezes part of the model is worse than one that refuses: the user asked for a
fine-tune and gets a smaller one. So the start of every run logs the share of MACE's trainable parameters
adapted per kind, and names every Parameter left frozen, with the reason, in one warning line.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mace.modules.symmetric_contraction import EmptyParam

from .config import TARGET_KINDS
from .mace_groups import mace_optimised_parameters
from .model_walker import find_targets

#: The reason given for a learnable Parameter outside MACE's optimizer groups.
NOT_OPTIMISED = "MACE never optimises it, so it is not trainable in a MACE fine-tune either"


@dataclasses.dataclass
class Coverage:
    """Entry counts of one model before reparameterisation.

    Attributes:
        trainable: entries of the Parameters MACE would optimise (outside ``exclude_prefixes``).
        adapted: entries adapted per kind (kinds in ``TARGET_KINDS`` order, zero counts left out).
        frozen: ``(name, entries, reason)`` of every learnable Parameter sparse_str does not adapt.
    """

    trainable: int
    adapted: Dict[str, int]
    frozen: List[Tuple[str, int, str]]

    @property
    def adapted_total(self) -> int:
        return sum(self.adapted.values())

    def share_line(self) -> str:
        """``sparse_str adapts 100.0% of the N parameters MACE would train: linear 21.0% (n), ...``."""
        total = max(self.trainable, 1)
        parts = [f"{kind} {100.0 * n / total:.1f}% ({n:,})" for kind, n in self.adapted.items()]
        return (
            f"sparse_str adapts {100.0 * self.adapted_total / total:.1f}% of the {self.trainable:,} parameters "
            f"MACE would train: {', '.join(parts) if parts else 'nothing'}"
        )

    def frozen_line(self) -> Optional[str]:
        """One line naming every frozen Parameter with its reason (same reasons grouped), or ``None``."""
        if not self.frozen:
            return None
        by_reason: Dict[str, List[Tuple[str, int]]] = {}
        for name, n, reason in self.frozen:
            by_reason.setdefault(reason, []).append((name, n))
        parts = []
        for reason, items in by_reason.items():
            entries = sum(n for _, n in items)
            parts.append(f"{', '.join(name for name, _ in items)} ({entries:,} entries: {reason})")
        return "sparse_str leaves frozen: " + "; ".join(parts)


def _skipped(prefix: str, exclude_prefixes: Sequence[str]) -> bool:
    return any(prefix == p or prefix.startswith(p + ".") for p in exclude_prefixes)


def coverage_of(model: torch.nn.Module, targets: Sequence[str], exclude_prefixes: Sequence[str] = ()) -> Coverage:
    """What :func:`~mace_sparse.get_sparse_model` with ``targets`` would adapt of ``model`` (unchanged).

    Parameters under ``exclude_prefixes`` are trained in full by the caller and left out of the counts.
    """
    every_kind = {t.qualified_name: t.kind for t in find_targets(model, TARGET_KINDS, exclude_prefixes)}
    optimised = mace_optimised_parameters(model)
    asked = set(targets)
    adapted = {kind: 0 for kind in TARGET_KINDS}
    frozen: List[Tuple[str, int, str]] = []
    trainable = 0
    owners = dict(model.named_modules())
    for name, param in model.named_parameters():
        if _skipped(name, exclude_prefixes) or isinstance(param, EmptyParam) or param.numel() == 0:
            continue
        if not param.requires_grad:
            continue  # frozen before sparse_str saw it (by the user or MACE): not ours to report
        if optimised is not None and name not in optimised:
            frozen.append((name, param.numel(), NOT_OPTIMISED))
            continue
        trainable += param.numel()
        kind = every_kind.get(name)
        if kind is None:
            owner = owners.get(name.rsplit(".", 1)[0] if "." in name else "")
            frozen.append((name, param.numel(), f"no sparse_str kind for a {type(owner).__name__} Parameter"))
        elif kind not in asked:
            frozen.append((name, param.numel(), f"kind {kind} not in --sparse_targets"))
        else:
            adapted[kind] += param.numel()
    return Coverage(trainable=trainable, adapted={k: n for k, n in adapted.items() if n}, frozen=frozen)
