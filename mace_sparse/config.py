"""What a sparse fine-tune is asked to do, and the checks that reject impossible requests.

The config is plain data (like peft's ``LoraConfig``): the same object drives the Python API and the
``mace_run_train`` integration, so both accept and refuse exactly the same settings.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

#: Weight kinds that can be adapted, in the order they are reported (:mod:`mace_sparse.model_walker` says
#: which MACE weights each covers). Together they cover every Parameter MACE 0.3.16 optimises.
TARGET_KINDS: Tuple[str, ...] = ("linear", "skip_tp", "contraction", "radial", "norm", "scalar", "embedding")

#: Default targets. On the small foundations this package trains on, the radial MLP holds most of the
#: parameters and "linear only" caps accuracy (see README, "Choosing targets"), so every kind is adapted.
DEFAULT_TARGETS: Tuple[str, ...] = TARGET_KINDS

GRANULARITIES: Tuple[str, ...] = ("layer", "path")

#: ``absolute``: δ in the weight's units (the paper); ``relative``: δ as a fraction of each tensor's rms.
THRESHOLD_SCALES: Tuple[str, ...] = ("absolute", "relative")


class SparseConfigError(ValueError):
    """A setting the method cannot honour; the message names the problem and the fix in one line."""


def parse_targets(spec: str | Tuple[str, ...] | list) -> Tuple[str, ...]:
    """Turn ``"linear,radial"`` / ``"all"`` / a sequence (of names or comma lists) into known kinds, in order."""
    parts = [spec] if isinstance(spec, str) else [str(s) for s in spec]  # a list: YAML or several CLI words
    items = [s.strip() for part in parts for s in part.split(",") if s.strip()]
    if not items:
        raise SparseConfigError(
            "--sparse_targets is empty: give a comma list of "
            f"{', '.join(TARGET_KINDS)} or 'all'"
        )
    if "all" in items:
        return TARGET_KINDS
    unknown = [s for s in items if s not in TARGET_KINDS]
    if unknown:
        raise SparseConfigError(
            f"--sparse_targets: unknown weight kind {unknown[0]!r}; "
            f"choose from {', '.join(TARGET_KINDS)} or 'all'"
        )
    return tuple(k for k in TARGET_KINDS if k in items)


@dataclasses.dataclass
class SparseConfig:
    """Settings of soft-threshold reparameterised (STR) fine-tuning.

    Attributes:
        targets: weight kinds to adapt (:data:`TARGET_KINDS`; ``all`` is every kind, i.e. every Parameter
            MACE would optimise).
        init_threshold: initial δ. δ is **absolute**, as in the paper: an entry of ΔW changes the model only
            once its magnitude exceeds δ. δ = sigmoid(s) with a learnable score s, so 0 < δ < 1.
        threshold_lr: learning rate of the threshold scores (``None``: the model learning rate).
        threshold_weight_decay: λ_τ, the sparsity knob. Decoupled (AdamW-style) decay of the score s
            towards 0, i.e. of δ towards 0.5: a larger λ_τ holds δ higher, so fewer ΔW entries pass it.
        granularity: ``layer`` (one δ per weight tensor) or ``path`` (one δ per irrep path / instruction).
        delta_eps: κ of the gradient-scaled ΔW update (see ``mace_sparse.optim``); 0 means plain Adam.
        delta_lr_factor: the latent deltas train at this multiple of the run's learning rate, so that the
            entries that matter get past δ early in a short fine-tune (measured, ``mace_sparse.optim``).
        delta_init_std: ΔW starts at ``randn · delta_init_std``. 0 (the default) starts exactly at the
            foundation; the paper's released code uses 1e-2 (so its step 0 is not the foundation).
        straight_through: ``True`` (default): the ΔW gradient passes the threshold unchanged (no dead zone at
            ΔW = 0); ``False``: the exact gradient of the soft threshold, zero where |ΔW| ≤ δ (the paper's code).
        threshold_scale: ``absolute`` (default) or ``relative``: δ (and a budget's cut) as a fraction of each
            tensor's rms, so that small-valued kinds (contraction weights) are not pruned wholesale.
        retrain_support: in MACE's stage two (``--swa``), fix which entries may move and train those without a
            threshold (``mace_sparse.support``), removing the soft threshold's shrinkage of every kept entry.
        budget: at most this share (0 < F < 1) of the model's weights may differ from the foundation, at every
            step (a global cut on |ΔW| / scale; ``mace_sparse.budget``). ``None``: no budget, λ_τ alone decides.
    """

    targets: Tuple[str, ...] = DEFAULT_TARGETS
    init_threshold: float = 1e-3
    threshold_lr: Optional[float] = None
    threshold_weight_decay: float = 1.0
    granularity: str = "layer"
    delta_eps: float = 1.0
    delta_lr_factor: float = 3.0
    delta_init_std: float = 0.0
    straight_through: bool = True
    threshold_scale: str = "absolute"
    budget: Optional[float] = None
    retrain_support: bool = False

    def __post_init__(self) -> None:
        self.targets = parse_targets(self.targets)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`SparseConfigError` with a one-line message for any setting out of range."""
        if not 0.0 < float(self.init_threshold) < 1.0:
            raise SparseConfigError(
                f"--sparse_init_threshold must lie in (0, 1) (δ = sigmoid(score)); got {self.init_threshold}"
            )
        if self.threshold_lr is not None and not float(self.threshold_lr) > 0.0:
            raise SparseConfigError(
                f"--sparse_threshold_lr must be > 0; got {self.threshold_lr}"
            )
        if not float(self.threshold_weight_decay) >= 0.0:
            raise SparseConfigError(
                f"--sparse_threshold_weight_decay (λ_τ) must be >= 0; got {self.threshold_weight_decay}"
            )
        if not float(self.delta_eps) >= 0.0:
            raise SparseConfigError(f"--sparse_delta_eps must be >= 0 (0 = plain Adam); got {self.delta_eps}")
        if not float(self.delta_lr_factor) > 0.0:
            raise SparseConfigError(
                f"--sparse_delta_lr_factor must be > 0 (ΔW lr = factor × --lr); got {self.delta_lr_factor}"
            )
        if not float(self.delta_init_std) >= 0.0:
            raise SparseConfigError(
                f"--sparse_delta_init_std must be >= 0 (0 = start exactly at the foundation); got {self.delta_init_std}"
            )
        if not isinstance(self.straight_through, bool):
            raise SparseConfigError(f"--sparse_straight_through must be True or False; got {self.straight_through!r}")
        if self.threshold_scale not in THRESHOLD_SCALES:
            raise SparseConfigError(
                f"--sparse_threshold_scale must be one of {', '.join(THRESHOLD_SCALES)}; got {self.threshold_scale!r}"
            )
        if self.budget is not None and not 0.0 < float(self.budget) < 1.0:
            raise SparseConfigError(
                f"--sparse_budget is the share of weights allowed to change, in (0, 1) (e.g. 0.05); got {self.budget}"
            )
        if self.granularity not in GRANULARITIES:
            raise SparseConfigError(
                f"--sparse_threshold_granularity must be one of {', '.join(GRANULARITIES)}; "
                f"got {self.granularity!r}"
            )

    def to_dict(self) -> dict:
        """JSON-friendly view, written into logs and delta-file metadata."""
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d
