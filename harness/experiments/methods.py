"""Methods of the experiments and the ``mace_run_train`` command each one is.

Every trained method is one real ``mace_run_train`` subprocess from the case's foundation; the data, epochs,
learning rate, batch size, seed and ``--multiheads_finetuning False`` are shared (:func:`train_command`), only
the method's own flags differ:

* ``zero-shot``: no training; the foundation is evaluated as it is.
* ``full``: ``--finetune_method full`` (MACE's default fine-tuning: every weight trainable).
* ``lora``: MACE's ``--lora True --lora_rank R --lora_alpha A`` (defaults 4 and 1, MACE's own). MACE merges the
  low-rank update into the weights before saving, so the ``.model`` is plain.
* ``freeze``: MACE's ``--freeze N``. In mace-torch 0.3.16 (``scripts_utils.get_params_options``) N is a
  threshold, not a layer count: N ≥ 1 freezes the node embedding, N ≥ 5 also every interaction block (radial
  MLPs, linear_up/linear, skip_tp), N ≥ 6 the products, N ≥ 7 the readouts; 2–4 act like 1, and N ≤ 0 freezes
  nothing. The default N = 5 trains the products (symmetric contractions and their linear) and the readouts:
  the usual "freeze the lower layers" baseline.
* ``lora-r16``: the same with rank 16 (the trade-off plot's second LoRA point; no step-cost measurement).
* ``paper-recipe``: sparse_str as the paper's authors release it (:data:`PAPER_RECIPE_FLAGS`): random ΔW start,
  δ₀ = 1e-4, exact threshold gradients, plain Adam on ΔW, λ_τ 0.3, Linear and tensor-product weights only.
* ``sparse_str-M-all``: the command line's defaults (λ_τ 1, κ 1).
* ``sparse_str-B5-all``: a sparsity budget instead of λ_τ: ``--sparse_budget 0.05`` with relative thresholds.
* ``sparse_str-B5-fisher``: the same budget, entries ranked by accumulated squared gradient instead of the latent
  |ΔW| (``--sparse_selection fisher``): the importance-signal comparison. Its step cost is measured as the
  other sparse_str-all methods' (the ranking's extra work is not timed separately).
* ``sparse_str-M-element``: the command line's defaults with one δ per chemical element for the element-indexed
  weights (``--sparse_threshold_granularity element``); not in full mode's list (run it with ``--methods``).
* ``sparse_str-M-noramp``: the defaults with δ₀ = 0.5 (:data:`NO_RAMP_THRESHOLD`) instead of 1e-3. δ = sigmoid(s)
  and the decay pulls s to 0, so the defaults' δ ramps from 1e-3 up to ~0.5 over ~1/(lr·λ_τ) steps, pruning what
  passed early on; at lr 0.003 on 50 frames that ramp outlasts the patience of early stopping (README, "Full
  mode"). Started at the ramp's end, the thresholds only fall.
* ``sparse_str-B5-all-s2`` / ``-rt``: the same run continued in MACE's stage two (same lr and loss weights) once
  stage one stops, without / with ``--sparse_retrain_support`` (the support fixed, the kept entries retrained).
* ``sparse_str-{L,H}-{linear,all}``: ``--finetune_method sparse_str`` with a preset of :data:`SPARSE_PRESETS`
  and ``--sparse_targets linear`` or ``all``; everything else is the command line's default (ΔW at 3× the lr).
  L = λ_τ 0.3, the largest λ_τ the paper sweeps, below our default (1): accuracy first, fewer unchanged
  weights. H = λ_τ 2 with κ = 3 (``--sparse_delta_eps``): the sparse end. λ_τ alone cannot make a run much
  sparser than λ_τ ≈ 2 does, because δ = sigmoid(s) and the decay pulls s towards 0, so δ saturates at 0.5;
  the larger κ slows the entries with small gradients, so fewer of them ever pass δ (README, "Choosing the
  defaults", has the measurements).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

from .tasks import BenchCase

#: The two sparse_str presets: λ_τ (``--sparse_threshold_weight_decay``) and κ (``--sparse_delta_eps``); see the
#: module docstring for why these two.
SPARSE_PRESETS: Dict[str, Dict[str, float]] = {
    "L": {"lambda_tau": 0.3, "delta_eps": 1.0},
    "M": {"lambda_tau": 1.0, "delta_eps": 1.0},
    "H": {"lambda_tau": 2.0, "delta_eps": 3.0},
}
#: Targets run per preset: M (the command line's defaults) only with ``all``, to keep the run count down.
PRESET_TARGETS: Dict[str, Tuple[str, ...]] = {"L": ("linear", "all"), "M": ("all",), "H": ("linear", "all")}
#: The budget preset ``sparse_str-B5-all``: at most 5 % of the weights change (``--sparse_budget``), thresholds
#: relative to each tensor's rms, λ_τ 0 (the budget replaces it).
BUDGET_PRESET = 0.05
#: Epochs of stage two for the ``-s2`` / ``-rt`` methods, on top of stage one's cap (patience ends it earlier).
STAGE_TWO_EPOCHS = 50
#: A second LoRA rank, for the accuracy / share-changed trade-off.
LARGE_LORA_RANK = 16
#: The released method as its authors describe it: ΔW started at randn·1e-2, δ₀ = 1e-4, exact gradients
#: through the threshold, plain Adam on ΔW at the run's lr (κ = 0, factor 1), decoupled (AdamW-style) decay
#: of the threshold scores, targets the e3nn Linear and tensor-product weights (``linear``, ``skip_tp``).
PAPER_RECIPE_FLAGS: Tuple[str, ...] = (
    "--finetune_method", "sparse_str", "--sparse_targets", "linear,skip_tp", "--sparse_delta_init_std", "0.01",
    "--sparse_init_threshold", "1e-4", "--sparse_straight_through", "False", "--sparse_delta_eps", "0",
    "--sparse_delta_lr_factor", "1", "--sparse_threshold_weight_decay", "0.3",
)
#: The λ_τ-driven method the threshold variants (other presets, per-element δ, the paper's recipe) take their lr
#: from when they are not tuned themselves; the budget variants take the budget preset's.
THRESHOLD_DEFAULTS = "sparse_str-M-all"
#: ``sparse_str-M-noramp``'s δ₀: sigmoid(0), the fixed point of the threshold scores' decay.
NO_RAMP_THRESHOLD = 0.5
DEFAULT_FREEZE = 5
DEFAULT_LORA_RANK = 4
DEFAULT_LORA_ALPHA = 1.0

REFERENCE = "full"
ZERO_SHOT = "zero-shot"


@dataclasses.dataclass(frozen=True)
class Method:
    """A method: its name, kind, its own ``mace_run_train`` flags and how its step cost is measured.

    ``cost_key`` names the training-step set-up whose time and memory stand for the method (see
    :mod:`harness.stepcost.cost`); the two λ_τ presets share one, since λ_τ changes which entries
    move, not the work of a step.
    """

    name: str
    kind: str
    flags: Tuple[str, ...]
    cost_key: Optional[str]
    lambda_tau: Optional[float] = None
    targets: Optional[str] = None
    #: the run continues in MACE's stage two (``--swa``) once stage one stops, and the stage-two model is scored
    stage_two: bool = False
    #: an untuned (secondary) method takes the lr chosen for this tuned method when it ran (a variant of it), before
    #: the first tuned method of its kind (:func:`harness.pipeline.tuning.borrowed_lrs`)
    lr_from: Optional[str] = None

    @property
    def trains(self) -> bool:
        return self.kind != ZERO_SHOT


def parse_sparse_flags(text: str) -> Tuple[str, ...]:
    """``--sparse-flags`` of ``mace_sparse bench``: extra ``--sparse_*`` flags for every sparse_str method.

    They are checked against the plugin's own flags here, so a typo stops the benchmark before its first run
    rather than inside every ``mace_run_train``.
    """
    import argparse
    import shlex

    from mace_sparse.integration.arguments import add_sparse_arguments

    tokens = tuple(shlex.split(text or ""))
    parser = add_sparse_arguments(argparse.ArgumentParser(add_help=False, exit_on_error=False))
    try:
        _, unknown = parser.parse_known_args(list(tokens))
    except argparse.ArgumentError as exc:
        raise ValueError(f"--sparse-flags: {exc}") from None
    # these two would change which method a row is, not how it is tuned
    method_flags = [t for t in tokens if t.startswith("-") and t.split("=", 1)[0].replace("-", "_").strip("_") in
                    ("finetune_method", "sparse_targets")]
    bad = method_flags + unknown
    if bad:
        raise ValueError(
            f"--sparse-flags: {bad[0]!r} is not a sparse_str tuning flag; give --sparse_* flags of "
            "mace_run_train other than --sparse_targets (e.g. --sparse-flags='--sparse_delta_lr_factor 1')"
        )
    return tokens


def all_methods(
    freeze: int = DEFAULT_FREEZE, lora_rank: int = DEFAULT_LORA_RANK, lora_alpha: float = DEFAULT_LORA_ALPHA,
    sparse_flags: Sequence[str] = (),
) -> Dict[str, Method]:
    """Every method by name, in report order; ``sparse_flags`` are appended to every sparse_str method's flags
    (later flags win in ``mace_run_train``, so they override a preset's)."""
    budget = ("--finetune_method", "sparse_str", "--sparse_budget", str(BUDGET_PRESET),
              "--sparse_threshold_scale", "relative", "--sparse_targets", "all", *sparse_flags)
    methods: List[Method] = [
        Method(ZERO_SHOT, ZERO_SHOT, (), None),
        Method("full", "full", ("--finetune_method", "full"), "full"),
        Method("lora", "lora", ("--lora", "True", "--lora_rank", str(lora_rank), "--lora_alpha", str(lora_alpha)),
               "lora"),
        Method(f"lora-r{LARGE_LORA_RANK}", "lora", ("--lora", "True", "--lora_rank", str(LARGE_LORA_RANK),
                                                    "--lora_alpha", str(lora_alpha)), None, lr_from="lora"),
        Method("freeze", "freeze", ("--freeze", str(freeze)), "freeze"),
        Method("paper-recipe", "sparse_str", PAPER_RECIPE_FLAGS, "paper-recipe", lambda_tau=0.3,
               targets="linear,skip_tp", lr_from=THRESHOLD_DEFAULTS),
        Method("sparse_str-B5-all", "sparse_str", budget, "sparse_str-all", targets="all"),
        Method("sparse_str-B5-fisher", "sparse_str", (*budget, "--sparse_selection", "fisher"), "sparse_str-all",
               targets="all", lr_from="sparse_str-B5-all"),
        # the support-retraining ablation: the same budget run continued in stage two, with and without fixing
        Method("sparse_str-B5-all-s2", "sparse_str", budget, "sparse_str-all", targets="all", stage_two=True,
               lr_from="sparse_str-B5-all"),
        Method("sparse_str-B5-all-rt", "sparse_str", (*budget, "--sparse_retrain_support", "True"),
               "sparse_str-all", targets="all", stage_two=True, lr_from="sparse_str-B5-all"),
    ]
    methods.append(Method("sparse_str-M-element", "sparse_str",
                          ("--finetune_method", "sparse_str", "--sparse_threshold_granularity", "element",
                           "--sparse_targets", "all", *sparse_flags), "sparse_str-all", lambda_tau=1.0, targets="all",
                          lr_from=THRESHOLD_DEFAULTS))
    # the defaults with δ started at 0.5, the value the decay of its score pulls it to (s = 0): no threshold ramp,
    # so no pruning phase; an entry changes the model once its latent ΔW passes 0.5
    methods.append(Method("sparse_str-M-noramp", "sparse_str",
                          ("--finetune_method", "sparse_str", "--sparse_init_threshold", str(NO_RAMP_THRESHOLD),
                           "--sparse_targets", "all", *sparse_flags), "sparse_str-all", lambda_tau=1.0, targets="all",
                          lr_from=THRESHOLD_DEFAULTS))
    for preset, values in SPARSE_PRESETS.items():
        for targets in PRESET_TARGETS[preset]:
            name = f"sparse_str-{preset}-{targets}"
            methods.append(Method(
                name, "sparse_str",
                ("--finetune_method", "sparse_str", "--sparse_threshold_weight_decay", str(values["lambda_tau"]),
                 "--sparse_delta_eps", str(values["delta_eps"]), "--sparse_targets", targets, *sparse_flags),
                f"sparse_str-{targets}", lambda_tau=values["lambda_tau"], targets=targets,
                lr_from=None if name == THRESHOLD_DEFAULTS else THRESHOLD_DEFAULTS,
            ))
    return {m.name: m for m in methods}


METHOD_NAMES: Tuple[str, ...] = tuple(all_methods())


def select_methods(names: Sequence[str], **kwargs) -> List[Method]:
    """The named methods in report order; unknown names are refused with the valid list."""
    known = all_methods(**kwargs)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(known)}")
    return [m for name, m in known.items() if name in names]


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """What every method of a run shares.

    ``epochs`` is a fixed epoch count, or with ``patience`` the cap of a run that stops once its validation loss
    has not improved for ``patience`` epochs (MACE's ``--patience``; the saved model is the best-validation
    checkpoint). ``ema``: MACE's ``--ema`` with ``--ema_decay`` ``ema_decay`` (validation, checkpoints and the
    saved model use the averaged weights).
    """

    epochs: int
    lr: float = 0.01
    batch_size: int = 4
    dtype: str = "float64"
    device: str = "cpu"
    patience: Optional[int] = None
    ema: bool = False
    ema_decay: float = 0.99


def train_command(
    case: BenchCase, method: Method, seed: int, settings: TrainSettings, train_file: str, name: str = "model",
    valid_file: Optional[str] = None,
) -> List[str]:
    """The full ``mace_run_train`` command line of one run (without the executable).

    ``valid_file``: validation frames kept apart from the training frames (``--valid_file``); without it MACE
    splits ``case.valid_fraction`` off the training file with the run's seed.
    """
    if not method.trains:
        raise ValueError(f"{method.name} does not train")
    valid = ["--valid_file", str(valid_file)] if valid_file else ["--valid_fraction", str(case.valid_fraction)]
    epochs = settings.epochs
    stage_two: List[str] = []
    if method.stage_two:
        # stage two starts when stage one stops (patience) or at the cap, keeps stage one's lr and loss weights
        # (MACE's stage-two defaults, lr 1e-3 and energy weight 1000, would change the comparison), and gets
        # STAGE_TWO_EPOCHS more epochs, ended early by the same patience
        weights = dict(zip(case.extra_flags[::2], case.extra_flags[1::2]))
        stage_two = ["--swa", "--start_swa", str(epochs), "--swa_lr", str(settings.lr),
                     "--swa_energy_weight", weights.get("--energy_weight", "1"),
                     "--swa_forces_weight", weights.get("--forces_weight", "100")]
        epochs += STAGE_TWO_EPOCHS
    protocol = ["--error_table", "PerAtomMAE"]
    if settings.patience is not None:
        protocol += ["--patience", str(settings.patience)]
    if settings.ema:
        protocol += ["--ema", "--ema_decay", str(settings.ema_decay)]
    return [
        "--name", name, "--foundation_model", str(case.foundation), "--train_file", str(train_file), *valid,
        "--E0s", case.e0s, "--energy_key", case.energy_key, "--forces_key", case.forces_key,
        "--multiheads_finetuning", "False", "--max_num_epochs", str(epochs),
        "--lr", str(settings.lr), "--batch_size", str(settings.batch_size), "--seed", str(seed),
        "--default_dtype", settings.dtype, "--device", settings.device, "--plot", "False", *protocol,
        *case.extra_flags, *method.flags, *stage_two,
    ]
