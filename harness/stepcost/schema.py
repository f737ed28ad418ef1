"""What ``mace_sparse bench-step`` is asked to measure and what it reports: the settings and the result records.

One declaration per setting: every field of :class:`BenchConfig` is a :func:`mace_sparse.flags.setting` (its
default, help, and where the flag differs from ``--field-name``, its flag, parser and choices); the command
line (:mod:`harness.stepcost.cli`) is generated from these fields, so a default is written here and nowhere else.

The records render themselves as the markdown table the command prints and the JSON ``--json`` writes, so
the two outputs cannot disagree. This module imports neither torch nor MACE (listing the ``mace_sparse``
subcommands imports it through the CLI and must stay fast).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np

from harness.data.emt_data import MAX_CELL_ATOMS
from mace_sparse.config import GRANULARITIES
from mace_sparse.flags import setting

#: Methods in the order they are reported; ``full`` is the reference of every ratio.
METHODS: Tuple[str, ...] = ("full", "sparse_str", "lora")
REFERENCE = "full"
#: Issue 2, item 6: sparse_str step time and peak memory relative to full fine-tuning.
STEP_TIME_LIMIT = 1.10
PEAK_MEMORY_LIMIT = 1.20
DTYPES: Tuple[str, ...] = ("float32", "float64")
#: the default radial MLP (the command line writes it as MACE writes ``--radial_MLP``: ``[64,64,64]``)
RADIAL_MLP: Tuple[int, ...] = (64, 64, 64)


def parse_int_list(text: str) -> Tuple[int, ...]:
    """``[64,64,64]`` or ``64,64,64`` (MACE writes ``--radial_MLP`` the first way)."""
    items = [t.strip() for t in text.strip().strip("[]").split(",") if t.strip()]
    try:
        return tuple(int(t) for t in items)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a list of integers like [64,64,64], got {text!r}") from None


def parse_names(text: str) -> Tuple[str, ...]:
    """A comma list of names (``full,sparse_str``)."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


@dataclasses.dataclass
class BenchConfig:
    """What to benchmark (each field's ``help`` says what it is).

    The default model is foundation-like in its layers (64x0e+64x1o, correlation 3, 2 interactions, radial MLP
    [64,64,64], about 241k weights) and the default batch small (2 cells of 4 atoms, ~290 edges), so that a
    step takes ~0.25 s of CPU on one core of the 2-core development VM and the run about a minute and a half.
    A small batch is also the hard case for the ratio: sparse_str's extra work grows with the number of
    adapted weights, not with atoms or edges, so larger batches dilute it.

    ``threads`` defaults to 1 because the *ratio* is the measurement and one thread makes it reproducible:
    with a team of OpenMP threads a step's time depends on the OS scheduling the whole team at once, and on a
    shared machine one descheduled thread stalls the rest (on a 2-core VM at load 7 the same full step took
    3–21 s with 2 threads and 0.8–1.2 s with 1). MACE's small per-edge tensors gain little from intra-op
    threads anyway. Warm-up steps absorb first-call code generation, Adam's state and the allocator's growth.
    ``memory_steps`` and ``profile_steps`` have no flag (:data:`harness.stepcost.cli.GROUPS` lists the flags).
    """

    flag_hyphens: ClassVar[bool] = True  # --batch-size, as the command has always spelled its flags

    model_path: Optional[str] = setting(None, help="a saved MACE model to benchmark instead", flag="model")
    channels: int = setting(64, help="channels per irrep")
    max_L: int = setting(1, help="max ℓ of the hidden features")
    correlation: int = setting(3, help="body order of the product basis")
    num_interactions: int = setting(2, help="interaction layers", flag="interactions")
    radial_mlp: Tuple[int, ...] = setting(RADIAL_MLP, help="hidden widths of the radial MLP", parse=parse_int_list,
                                          cli_default=str(list(RADIAL_MLP)))
    r_max: float = setting(5.0, help="cutoff radius (Å)")
    dtype: str = setting("float64", help="default dtype", choices=DTYPES)
    batch_size: int = setting(2, help="configurations per batch")
    atoms: int = setting(4, help="atoms per configuration")
    rounds: int = setting(20, help="interleaved rounds (each runs every method)")
    steps: int = setting(1, help="timed steps per method per round")
    warmup: int = setting(2, help="untimed steps per method before timing")
    targets: str = setting("all", help="weight kinds to adapt (comma list of linear,skip_tp,contraction,radial,norm,"
                                       "scalar,embedding, or all)")
    granularity: str = setting("path", help="threshold granularity of sparse_str", choices=GRANULARITIES)
    device: str = setting("cpu", help="cpu or cuda")
    threads: int = setting(1, help="torch threads; 0 = every CPU this process may use")
    methods: Tuple[str, ...] = setting(METHODS, help="comma list of full, sparse_str, lora (full is always run)",
                                       parse=parse_names, cli_default=",".join(METHODS))
    lora_rank: int = setting(4, help="LoRA rank (mace_run_train --lora_rank)")
    lora_alpha: float = setting(1.0, help="LoRA alpha (mace_run_train --lora_alpha)")
    measure_memory: bool = setting(True, help="skip the peak-memory part", flag="no_memory", switch="store_false")
    memory_steps: int = setting(2, help="steps over which the memory peak is taken (after one warm-up step)")
    profile: bool = setting(False, help="also break sparse_str's extra step time down", switch="store_true")
    profile_steps: int = setting(3, help="profiled steps per method of --profile's operator table")
    seed: int = setting(0, help="seed of the structures and the model")

    def validate(self) -> None:
        """Reject settings that would make the numbers meaningless, with a one-line reason."""
        # torch only here: the CLI's parser imports this module, and listing the subcommands must stay fast
        import torch

        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be float32 or float64; got {self.dtype!r}")
        for name in ("batch_size", "atoms", "rounds", "steps", "memory_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.atoms > MAX_CELL_ATOMS:
            raise ValueError(f"--atoms {self.atoms} is too large for this benchmark (at most {MAX_CELL_ATOMS})")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0; got {self.warmup}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available")
        if self.model_path is not None and not Path(self.model_path).is_file():
            raise FileNotFoundError(f"--model: no such file: {self.model_path}")


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), without numpy arrays in the result."""
    return float(np.quantile(np.asarray(values, dtype=float), q))


@dataclasses.dataclass
class MethodResult:
    """Measurements of one method. Ratios are relative to ``full`` (``None`` until computed).

    Attributes:
        step_ms / cpu_ms: wall-clock and process-CPU time of every timed step, in time order.
        median_ms / median_cpu_ms: their medians (the headline uses the wall-clock one).
        round_ratios: per round, this method's median step over full's median step *of the same round*: a
            paired estimate, insensitive to load that drifts between rounds.
    """

    name: str
    trainable_params: int
    step_ms: List[float]
    cpu_ms: List[float]
    median_ms: float
    median_cpu_ms: float
    round_ratios: List[float] = dataclasses.field(default_factory=list)
    time_ratio: Optional[float] = None
    cpu_time_ratio: Optional[float] = None
    peak_memory_bytes: Optional[int] = None
    memory_ratio: Optional[float] = None

    @property
    def peak_memory_mb(self) -> Optional[float]:
        return None if self.peak_memory_bytes is None else self.peak_memory_bytes / 2**20

    @property
    def paired_ratio(self) -> Optional[float]:
        """Median of the per-round ratios."""
        return statistics.median(self.round_ratios) if self.round_ratios else None

    @property
    def paired_ratio_iqr(self) -> Optional[Tuple[float, float]]:
        if not self.round_ratios:
            return None
        return _quantile(self.round_ratios, 0.25), _quantile(self.round_ratios, 0.75)


@dataclasses.dataclass
class BenchResult:
    """Everything one run measured, plus the headline ratios of sparse_str against full."""

    config: Dict[str, Any]
    environment: Dict[str, Any]
    batch: Dict[str, int]
    methods: Dict[str, MethodResult]
    step_time_ratio: Optional[float]
    peak_memory_ratio: Optional[float]
    breakdown: Optional[Dict[str, float]] = None
    op_diff: Optional[List[Dict[str, Any]]] = None

    @property
    def step_time_pass(self) -> Optional[bool]:
        return None if self.step_time_ratio is None else self.step_time_ratio <= STEP_TIME_LIMIT

    @property
    def peak_memory_pass(self) -> Optional[bool]:
        return None if self.peak_memory_ratio is None else self.peak_memory_ratio <= PEAK_MEMORY_LIMIT

    def _sparse_attr(self, name: str) -> Any:
        sparse = self.methods.get("sparse_str")
        return None if sparse is None else getattr(sparse, name)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-friendly view (what ``--json`` writes)."""
        methods = {}
        for name, m in self.methods.items():
            d = dataclasses.asdict(m)
            d["peak_memory_mb"] = m.peak_memory_mb
            d["paired_ratio"] = m.paired_ratio
            d["paired_ratio_iqr"] = m.paired_ratio_iqr
            methods[name] = d
        return {
            "config": self.config,
            "environment": self.environment,
            "batch": self.batch,
            "methods": methods,
            "step_time_ratio": self.step_time_ratio,
            "step_time_ratio_paired": self._sparse_attr("paired_ratio"),
            "step_cpu_time_ratio": self._sparse_attr("cpu_time_ratio"),
            "step_time_limit": STEP_TIME_LIMIT,
            "step_time_pass": self.step_time_pass,
            "peak_memory_ratio": self.peak_memory_ratio,
            "peak_memory_limit": PEAK_MEMORY_LIMIT,
            "peak_memory_pass": self.peak_memory_pass,
            "breakdown": self.breakdown,
            "op_diff": self.op_diff,
        }

    def markdown(self) -> str:
        """The result table and the two headline ratios, as printed by ``mace_sparse bench-step``."""
        return format_markdown(self)


def _fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def _verdict(ok: Optional[bool]) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def format_markdown(result: BenchResult) -> str:
    """Markdown table (one row per method) and the two headline ratios of sparse_str with PASS/MISS.

    The ratio of median wall-clock steps is the headline (as issue 2 asks). Next to it: the paired per-round
    ratio (median and interquartile range: how noisy the machine was) and the ratio of median CPU times
    (what the method costs when other processes take turns on the core).
    """
    b = result.batch
    env = result.environment
    lines = [
        f"model {b['model_params']:,} params; batch {b['configs']} configs / {b['atoms']} atoms / {b['edges']} edges; "
        f"{result.config['dtype']}; {env['device']}, {env['threads']} thread(s); "
        f"{result.config['rounds']} rounds x {result.config['steps']} steps per method, interleaved",
        "",
        "| method | trainable params | median step ms | × full | paired × full, median [IQR] | median CPU ms "
        "| × full | peak memory MB | × full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in result.methods.values():
        iqr = m.paired_ratio_iqr
        paired = f"{m.paired_ratio:.3f} [{iqr[0]:.3f}–{iqr[1]:.3f}]" if iqr else "n/a"
        lines.append(
            f"| {m.name} | {m.trainable_params:,} | {m.median_ms:.1f} | {_fmt(m.time_ratio, '.3f')} | {paired} | "
            f"{m.median_cpu_ms:.1f} | {_fmt(m.cpu_time_ratio, '.3f')} | {_fmt(m.peak_memory_mb, '.2f')} | "
            f"{_fmt(m.memory_ratio, '.3f')} |"
        )
    lines.append("")
    lines.append(
        f"step_time_ratio (sparse_str / full, median wall-clock step): {_fmt(result.step_time_ratio, '.3f')} "
        f"(limit {STEP_TIME_LIMIT:.2f}) {_verdict(result.step_time_pass)}"
    )
    lines.append(
        f"peak_memory_ratio (sparse_str / full): {_fmt(result.peak_memory_ratio, '.3f')} "
        f"(limit {PEAK_MEMORY_LIMIT:.2f}) {_verdict(result.peak_memory_pass)}"
    )
    if result.breakdown:
        bd = result.breakdown
        lines += [
            "",
            f"sparse_str extra work, timed in isolation (least CPU ms of 20 round-robin repeats; "
            f"{int(bd['adapted_tensors'])} adapted "
            f"tensors on {int(bd['hooked_modules'])} hooked modules):",
            "",
            "| piece | ms |",
            "|---|---:|",
        ]
        for key, value in bd.items():
            if key not in ("adapted_tensors", "hooked_modules"):
                lines.append(f"| {key} | {value:.2f} |")
    if result.op_diff:
        lines += [
            "",
            "operators sparse_str calls a different number of times, and the optimiser step, by extra self-CPU "
            f"time (mean of {result.config['profile_steps']} profiled steps each, ms per step):",
            "",
            "| operator | full ms | sparse_str ms | extra ms | calls full | calls sparse_str |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in result.op_diff:
            lines.append(
                f"| {row['op']} | {row['full_ms']:.2f} | {row['sparse_str_ms']:.2f} | {row['extra_ms']:+.2f} | "
                f"{row['full_calls']} | {row['sparse_str_calls']} |"
            )
    return "\n".join(lines)


def write_json(result: BenchResult, path: str | Path) -> Path:
    """Write :meth:`BenchResult.to_dict` to ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return path
