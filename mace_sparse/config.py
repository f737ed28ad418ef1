"""What a sparse fine-tune is asked to do, and the checks that reject impossible requests.

The config is plain data (like peft's ``LoraConfig``): the same object drives the Python API and the
``mace_run_train`` integration, so both accept and refuse exactly the same settings. Each field is the one
declaration of its setting: default, ``--sparse_*`` flag, help and valid range (:mod:`mace_sparse.flags`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Tuple

from .flags import check_settings, setting

#: Weight kinds that can be adapted, in the order they are reported (:mod:`mace_sparse.model_walker` says
#: which MACE weights each covers). Together they cover every Parameter MACE 0.3.16 optimises.
TARGET_KINDS: Tuple[str, ...] = ("linear", "skip_tp", "contraction", "radial", "norm", "scalar", "embedding")

#: Default targets. On the small foundations this package trains on, the radial MLP holds most of the
#: parameters and "linear only" caps accuracy (see README, "Choosing targets"), so every kind is adapted.
DEFAULT_TARGETS: Tuple[str, ...] = TARGET_KINDS

#: How many thresholds δ a weight gets: ``layer`` one per tensor, ``path`` one per irrep path / instruction,
#: ``element`` one per chemical element of the model for element-indexed weights (symmetric contraction, the
#: element-dependent skip tensor product, o3.Linear layers that read the one-hot element; one per tensor for the
#: rest). Element-indexed weights differ in scale and use per element, and one δ can prune an element wholesale.
GRANULARITIES: Tuple[str, ...] = ("layer", "path", "element")

#: ``absolute``: δ in the weight's units (the paper); ``relative``: δ as a fraction of each tensor's rms.
THRESHOLD_SCALES: Tuple[str, ...] = ("absolute", "relative")

#: How a budget ranks the entries it lets change: ``magnitude`` by the latent |ΔW| (relative to the tensor's scale
#: with relative thresholds), ``fisher`` by the accumulated squared gradient, an importance signal that does not
#: depend on the gradient keeping its sign (:mod:`mace_sparse.budget`).
SELECTIONS: Tuple[str, ...] = ("magnitude", "fisher")


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
        granularity: ``layer`` (one δ per weight tensor), ``path`` (one δ per irrep path / instruction) or
            ``element`` (one δ per chemical element for element-indexed weights, one per tensor otherwise; see
            :data:`GRANULARITIES`).
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
        selection: how the budget ranks entries: ``magnitude`` (latent |ΔW|) or ``fisher`` (accumulated squared
            gradient of the loss with respect to the weight, the diagonal empirical Fisher). Needs a budget.
    """

    flag_prefix: ClassVar[str] = "sparse_"  # the flags are --sparse_<field> (mace_sparse.flags)

    targets: Tuple[str, ...] = setting(
        DEFAULT_TARGETS, parse=str, nargs="+", cli_default=",".join(DEFAULT_TARGETS),
        help="weight kinds to adapt, comma- or space-separated (a YAML list works too): " + ", ".join(TARGET_KINDS)
        + ", or 'all' (every parameter MACE would train; the run logs the share adapted per kind)",
    )
    init_threshold: float = setting(
        1e-3, above=0.0, below=1.0, why=" (δ = sigmoid(score))",
        help="initial threshold delta (absolute, as in the paper; delta = sigmoid(score))",
    )
    threshold_lr: Optional[float] = setting(
        None, above=0.0, help="learning rate of the thresholds (default: --lr)",
    )
    # the flag's default None means "not given": 1.0, or 0 with --sparse_budget (integration.arguments)
    threshold_weight_decay: float = setting(
        1.0, at_least=0.0, cli_default=None, message="{flag} (λ_τ) must {condition}{why}; got {value}",
        help="lambda_tau, decoupled weight decay of the threshold scores: the sparsity knob (higher = sparser; "
        "default {default:g}, 0 with --sparse_budget, which it cannot be combined with)",
    )
    granularity: str = setting(
        "layer", flag="sparse_threshold_granularity", choices=GRANULARITIES,
        help="one threshold per weight tensor ('layer'), per irrep path / instruction ('path'), or ('element') "
        "per chemical element for element-indexed weights (contraction, skip tensor product, element embeddings) "
        "and per tensor for the rest",
    )
    delta_eps: float = setting(
        1.0, at_least=0.0, why=" (0 = plain Adam)",
        help="kappa of the gradient-scaled delta update: delta gradients are divided by their RMS and Adam's "
        "eps is kappa, so entries move in proportion to their gradient's size (0 = plain Adam)",
    )
    delta_lr_factor: float = setting(
        3.0, above=0.0, why=" (ΔW lr = factor × --lr)",
        help="the latent deltas train at this multiple of --lr (the thresholds at --sparse_threshold_lr)",
    )
    delta_init_std: float = setting(
        0.0, at_least=0.0, why=" (0 = start exactly at the foundation)",
        help="delta starts at randn * this (0: exactly the foundation at step 0; the paper's code: 1e-2)",
    )
    straight_through: bool = setting(
        True,
        help="True: straight-through delta gradient through the threshold (no dead zone); False: the exact "
        "soft-threshold gradient, zero where |delta| <= threshold (the paper's code)",
    )
    threshold_scale: str = setting(
        "absolute", choices=THRESHOLD_SCALES,
        help="'absolute': thresholds in weight units (the paper); 'relative': as a fraction of each tensor's rms",
    )
    budget: Optional[float] = setting(
        None, above=0.0, below=1.0,
        message="{flag} is the share of weights allowed to change, in {interval} (e.g. 0.05); got {value}",
        help="share of the foundation's weights allowed to change (e.g. 0.05): a global cut keeps at most that "
        "many entries non-zero at every step, whatever the task or run length (replaces lambda_tau)",
    )
    selection: str = setting(
        "magnitude", choices=SELECTIONS,
        help="how --sparse_budget picks the entries that may change: 'magnitude' (largest latent |delta|) or "
        "'fisher' (largest accumulated squared gradient, the diagonal empirical Fisher)",
    )
    retrain_support: bool = setting(
        False,
        help="True: when MACE's stage two (--swa) starts, fix which delta entries may move and retrain them "
        "without a threshold (removes the soft threshold's shrinkage)",
    )

    def __post_init__(self) -> None:
        self.targets = parse_targets(self.targets)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`SparseConfigError` with a one-line message for any setting out of range."""
        check_settings(self, SparseConfigError)
        if self.selection == "fisher" and self.budget is None:
            raise SparseConfigError("--sparse_selection fisher ranks entries for a budget: give --sparse_budget F "
                                    "too (e.g. 0.05), or leave --sparse_selection at magnitude")
        if self.selection == "fisher" and not self.straight_through:
            raise SparseConfigError("--sparse_selection fisher needs --sparse_straight_through True: the exact "
                                    "threshold gradient is zero outside the selection, so nothing new could enter it")

    def to_dict(self) -> dict:
        """JSON-friendly view, written into logs and delta-file metadata."""
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d
