"""From the raw results of ``mace_sparse bench`` to the table: means ± std, ratios to full fine-tuning, checks.

Pure functions on JSON-ready dicts (no torch), so the logic is tested on synthetic results. Every number of
``bench.md`` is computed here from the run's records; nothing is typed in.

The checks are the targets of the issue, applied to every sparse_str row of a case:

* target force MAE ≤ 0.95 × full fine-tuning's and ≤ 0.90 × LoRA's, with ≥ 95% of the parameters unchanged;
* forgetting (rise of the source-domain force MAE over the zero-shot foundation) ≤ 0.5 × full's rise;
* training step time ≤ 1.10 × and peak memory ≤ 1.2 × full fine-tuning's.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from harness.stepcost.schema import PEAK_MEMORY_LIMIT, STEP_TIME_LIMIT  # the limits bench-step checks too
from .curve import epochs_trained

FORCE_VS_FULL = 0.95
FORCE_VS_LORA = 0.90
MIN_UNCHANGED_PERCENT = 95.0
FORGETTING_VS_FULL = 0.5

#: (key, label) of the checks, in column order.
CHECKS: Tuple[Tuple[str, str], ...] = (
    ("force_vs_full", f"F ≤ {FORCE_VS_FULL}× full"),
    ("force_vs_lora", f"F ≤ {FORCE_VS_LORA}× LoRA"),
    ("unchanged", f"≥ {MIN_UNCHANGED_PERCENT:.0f}% unchanged"),
    ("forgetting", f"rise ≤ {FORGETTING_VS_FULL}× full's"),
    ("step_time", f"step ≤ {STEP_TIME_LIMIT}× full"),
    ("peak_memory", f"memory ≤ {PEAK_MEMORY_LIMIT}× full"),
)

_AVERAGED = (
    "target_force_mae", "target_energy_mae_per_atom", "target_energy_mae_per_config", "source_force_mae",
    "changed_percent", "delta_bytes", "delta_percent_of_model", "epoch_s_from_log", "target_magmom_mae",
    "epochs_run",
)


def mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (0 for one value) of the values that are not None."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
        return None
    return a / b


def summarize_case(case_result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per method of a case: means ± std over seeds and the ratios to full fine-tuning."""
    runs = case_result["runs"]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    rows: List[Dict[str, Any]] = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        row: Dict[str, Any] = {"case": case_result["case"]["label"], "method": method, "seeds": len(mine)}
        for key in _AVERAGED:
            row[key], row[key + "_std"] = mean_std([r.get(key) for r in mine])
        row["unchanged_percent"] = None if row["changed_percent"] is None else 100.0 - row["changed_percent"]
        rows.append(row)
    by_method = {row["method"]: row for row in rows}
    zero = by_method.get("zero-shot")
    full = by_method.get("full")
    costs = case_result.get("step_cost", {})
    cost_key = case_result.get("cost_key", {})
    full_cost = costs.get("full")
    zero_source = zero["source_force_mae"] if zero else None
    full_rise = (full["source_force_mae"] - zero_source) if full and zero_source is not None else None
    for row in rows:
        row["source_rise"] = (row["source_force_mae"] - zero_source) if zero_source is not None else None
        row["source_rise_ratio_to_full"] = _ratio(row["source_rise"], full_rise) if (full_rise or 0) > 0 else None
        row["target_force_ratio_to_full"] = _ratio(row["target_force_mae"], full["target_force_mae"]) if full else None
        # how long a user waits: epochs until early stopping ended the run (load-independent, unlike wall time)
        row["epochs_ratio_to_full"] = _ratio(row["epochs_run"], full["epochs_run"]) if full else None
        cost = costs.get(cost_key.get(row["method"], ""))
        row["step_ms"] = cost["median_ms"] if cost else None
        row["peak_memory_bytes"] = cost["peak_memory_bytes"] if cost else None
        row["step_time_ratio"] = _ratio(row["step_ms"], full_cost["median_ms"]) if cost and full_cost else None
        row["step_cpu_time_ratio"] = (_ratio(cost.get("median_cpu_ms"), full_cost.get("median_cpu_ms"))
                                      if cost and full_cost else None)
        # cross-check only (JSON): the runs' own epoch times, taken sequentially on a machine whose load drifts
        row["epoch_time_ratio_from_log"] = (_ratio(row["epoch_s_from_log"], full["epoch_s_from_log"])
                                            if full else None)
        row["peak_memory_ratio"] = (_ratio(row["peak_memory_bytes"], full_cost["peak_memory_bytes"])
                                    if cost and full_cost and row["peak_memory_bytes"] is not None else None)
    return rows


def _at_most(value: Optional[float], limit: Optional[float]) -> Optional[bool]:
    if value is None or limit is None or not math.isfinite(value) or not math.isfinite(limit):
        return None
    return value <= limit


def checks_for(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The issue's targets for every sparse_str row (True/False, None where a needed method was not run)."""
    by_method = {row["method"]: row for row in rows}
    full, lora = by_method.get("full"), by_method.get("lora")
    out = []
    for row in rows:
        if not row["method"].startswith("sparse_str"):
            continue
        f = row["target_force_mae"]
        result = {
            "force_vs_full": _at_most(f, FORCE_VS_FULL * full["target_force_mae"]) if full else None,
            "force_vs_lora": _at_most(f, FORCE_VS_LORA * lora["target_force_mae"]) if lora else None,
            "unchanged": _at_most(MIN_UNCHANGED_PERCENT, row["unchanged_percent"]),
            # literal rule "rise ≤ 0.5 × full's rise" (also meaningful when full's rise is negative)
            "forgetting": (_at_most(row["source_rise"], FORGETTING_VS_FULL * full["source_rise"])
                           if full and full["source_rise"] is not None else None),
            "step_time": _at_most(row["step_time_ratio"], STEP_TIME_LIMIT),
            "peak_memory": _at_most(row["peak_memory_ratio"], PEAK_MEMORY_LIMIT),
        }
        out.append({"case": row["case"], "method": row["method"], **result})
    return out


def build_report(case_results: Sequence[Dict[str, Any]], meta: Dict[str, Any]) -> Dict[str, Any]:
    """The whole ``bench.json``: metadata, raw per-case results, summary rows and checks."""
    cases = []
    for result in case_results:
        rows = summarize_case(result)
        cases.append({**result, "rows": rows, "checks": checks_for(rows)})
    return {"meta": meta, "cases": cases}


def json_ready(value: Any) -> Any:
    """``value`` with NaN/inf replaced by None and paths by strings: bench.json stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------------------------------------- markdown


_REPO = Path(__file__).resolve().parents[2]


def _display(path: Any) -> str:
    """A path as the reader of bench.md wants it: relative to the source tree when it lies inside it."""
    p = Path(str(path))
    try:
        return str(p.resolve().relative_to(_REPO))
    except ValueError:
        return str(p)


def _fmt(value: Optional[float], spec: str = ".1f") -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, spec)


def _pm(row: Dict[str, Any], key: str, spec: str = ".1f") -> str:
    if row.get(key) is None:
        return "–"
    std = row.get(key + "_std")
    return _fmt(row[key], spec) + ("" if not std else f" ± {_fmt(std, spec)}")


def _mark(ok: Optional[bool]) -> str:
    return "–" if ok is None else ("✓" if ok else "✗")


def _delta_cell(row: Dict[str, Any]) -> str:
    if row.get("delta_bytes") is None:
        return "–"
    return f"{row['delta_bytes']:,.0f} B ({_fmt(row.get('delta_percent_of_model'))}% of .model)"


def _epochs_cell(row: Dict[str, Any]) -> str:
    if row.get("epochs_run") is None:
        return "–"
    ratio = row.get("epochs_ratio_to_full")
    return _pm(row, "epochs_run", ".0f") + ("" if ratio is None else f" ({ratio:.2f}×)")


def _target_note(case: Dict[str, Any]) -> str:
    counts = case.get("target_configs")
    if not counts or counts["used"] == counts["in_file"]:
        return ""
    return f" ({counts['used']} of {counts['in_file']} configurations, those made of the training elements)"


def case_markdown(case: Dict[str, Any]) -> str:
    """Results table and checks table of one case."""
    info = case["case"]
    molecules = bool(info.get("molecules"))
    magnetic = any(row.get("target_magmom_mae") is not None for row in case["rows"])
    head = ["method", "E MAE (meV/atom)"] + (["E MAE (meV/molecule)"] if molecules else []) + [
        "F MAE (meV/Å)", "F × full"] + (["moment MAE (μB)"] if magnetic else []) + [
        "params changed (%)", "source F MAE (meV/Å)", "forgetting rise (meV/Å)", "rise × full's", "step × full",
        "peak mem × full", "epochs run (× full)", "delta file",
    ]
    lines = [
        f"### {info['label']}",
        "",
        f"Foundation `{_display(info['foundation'])}`; train `{_display(case['train_file_used'])}`"
        + (f" (first {info['train_size']} frames)" if info.get("train_size") else "")
        + f"; target test `{_display(info['test_file'])}`{_target_note(case)}; "
        f"source test `{_display(info['source_test_file'])}` "
        f"({case['source_configs']['used']} of {case['source_configs']['in_file']} configurations, those made of "
        f"the training elements); `--E0s {info['e0s']}`; {case.get('epochs', '?')} epochs.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for row in case["rows"]:
        cells = [row["method"], _pm(row, "target_energy_mae_per_atom", ".2f")]
        if molecules:
            cells.append(_pm(row, "target_energy_mae_per_config"))
        cells += [_pm(row, "target_force_mae"), _fmt(row["target_force_ratio_to_full"], ".2f")]
        if magnetic:
            cells.append(_pm(row, "target_magmom_mae", ".3f"))
        cells += [
            _pm(row, "changed_percent", ".2f"), _pm(row, "source_force_mae"), _fmt(row["source_rise"]),
            _fmt(row["source_rise_ratio_to_full"], ".2f"), _fmt(row["step_time_ratio"], ".2f"),
            _fmt(row["peak_memory_ratio"], ".2f"), _epochs_cell(row), _delta_cell(row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if case["checks"]:
        lines += ["", "| sparse_str targets | " + " | ".join(label for _, label in CHECKS) + " |",
                  "|---|" + "|".join([":-:"] * len(CHECKS)) + "|"]
        for check in case["checks"]:
            lines.append(f"| {check['method']} | " + " | ".join(_mark(check[key]) for key, _ in CHECKS) + " |")
    return "\n".join(lines)


def _mean_range(values: Sequence[Optional[float]], spec: str) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "–"
    if len(vals) == 1:
        return _fmt(vals[0], spec)
    return f"{_fmt(statistics.fmean(vals), spec)} ({_fmt(min(vals), spec)}–{_fmt(max(vals), spec)})"


def summary_markdown(report: Dict[str, Any]) -> str:
    """Every method over all cases of a run: the means (and ranges) of the per-case ratios, and in how many
    cases each sparse_str row met each target. Empty for a run of one case (its table says it all)."""
    cases = report["cases"]
    if len(cases) < 2:
        return ""
    rows = [row for case in cases for row in case["rows"]]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    columns = (("target_force_ratio_to_full", "F × full", ".2f"), ("changed_percent", "params changed (%)", ".2f"),
               ("source_rise_ratio_to_full", "rise × full's", ".2f"), ("step_time_ratio", "step × full", ".2f"),
               ("peak_memory_ratio", "peak mem × full", ".2f"), ("epochs_ratio_to_full", "epochs × full", ".2f"))
    lines = [f"### Summary over the {len(cases)} cases", "",
             "Mean over cases of each case's mean over seeds (min–max over cases in brackets).", "",
             "| method | " + " | ".join(label for _, label, _ in columns) + " |",
             "|---|" + "|".join(["---:"] * len(columns)) + "|"]
    for method in methods:
        mine = [row for row in rows if row["method"] == method]
        lines.append(f"| {method} | " + " | ".join(_mean_range([r.get(key) for r in mine], spec)
                                                    for key, _, spec in columns) + " |")
    checks = [check for case in cases for check in case["checks"]]
    if checks:
        lines += ["", "| sparse_str targets: cases met | " + " | ".join(label for _, label in CHECKS) + " |",
                  "|---|" + "|".join([":-:"] * len(CHECKS)) + "|"]
        for method in dict.fromkeys(check["method"] for check in checks):
            mine = [check for check in checks if check["method"] == method]
            cells = []
            for key, _ in CHECKS:
                known = [check[key] for check in mine if check[key] is not None]
                cells.append(f"{sum(known)}/{len(known)}" if known else "–")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _presets_text(meta: Dict[str, Any]) -> str:
    """``L: λ_τ 0.3, κ 1.0; H: ...`` (older result files carry λ_τ only, as ``lambda_presets``)."""
    if "sparse_presets" in meta:
        presets = meta["sparse_presets"].items()
        return "; ".join(f"{name}: λ_τ {p['lambda_tau']}, κ {p['delta_eps']}" for name, p in presets)
    return "; ".join(f"{name}: λ_τ {lam}" for name, lam in meta["lambda_presets"].items())


def _protocol_text(meta: Dict[str, Any]) -> str:
    """How long runs went and how the lr was set (older JSON files have only a fixed lr)."""
    parts = []
    if meta.get("patience"):
        parts.append(f" (cap; each run stops after {meta['patience']} epochs without a better validation loss and "
                     "keeps MACE's best checkpoint)")
    if meta.get("ema"):
        parts.append(", EMA 0.99")
    grid = meta.get("lr_grid") or []
    if len(grid) > 1 and meta.get("tuned"):
        parts.append(f", lr from {grid} chosen on validation force MAE (first seed; see each case's lr table) for "
                     f"{', '.join(meta['tuned'])}; every other method takes the lr chosen for its kind (else "
                     f"full's) and runs the first {meta.get('secondary_seeds') or 'all'} seed(s)")
    elif len(grid) > 1:
        parts.append(f", lr per method from {grid} chosen on validation force MAE (first seed; see each case's "
                     "lr table)")
    else:
        parts.append(f", lr {meta.get('lr')}")
    return "".join(parts)


def markdown(report: Dict[str, Any]) -> str:
    """``bench.md``: how it was run, then one section per case."""
    meta = report["meta"]
    out = [f"**Partial: {meta['partial']}.**", ""] if meta.get("partial") else []
    out += [
        f"Measured {meta['date']} with `{meta['command']}` ({meta['mode']} mode: {meta['covers']})"
        + (f", commit {meta['commit']}." if meta.get("commit") else "."),
        "",
        f"Epochs {meta['epochs']}{_protocol_text(meta)}, batch size {meta['batch_size']}, seeds {meta['seeds']}, "
        f"{meta['dtype']}, `--multiheads_finetuning False`; sparse_str presets {_presets_text(meta)}, "
        f"LoRA rank {meta['lora_rank']} alpha {meta['lora_alpha']}, `--freeze {meta['freeze']}`. "
        "Errors are mean absolute errors on the held-out target test set (mean ± std over seeds), evaluated in "
        "float64 with the saved models. \"params changed\": parameter entries that differ bitwise from the "
        "foundation as MACE configured it at step 0. Forgetting rise: source-domain force MAE minus the "
        "zero-shot foundation's. Step time and peak memory: one training step of each method on the same "
        "model and batch, timed interleaved in this run (bench-step machinery), as ratios to full fine-tuning.",
        f"Total wall time {meta.get('wall_s', 0) / 60:.1f} min.",
    ]
    summary = summary_markdown(report)
    if summary:
        out += ["", summary]
    for case in report["cases"]:
        out += ["", case_markdown(case)]
        if case.get("lr_selection"):
            out += ["", lr_table_markdown(case["lr_selection"])]
        if case.get("lr_borrowed"):
            out += ["", "Not tuned, lr taken from (method ← tuned method): "
                    + ", ".join(f"{m} ← {lender}" for m, lender in case["lr_borrowed"].items()) + "."]
    return "\n".join(out) + "\n"


def lr_table_markdown(table: Dict[str, Dict[str, Optional[float]]]) -> str:
    """Validation force MAE (meV/Å, MACE's best checkpoint, first seed) of every method at every grid lr."""
    lrs = sorted({lr for by_lr in table.values() for lr in by_lr}, key=float)
    lines = ["Learning-rate selection (validation force MAE, meV/Å, at the best checkpoint; * = chosen):", "",
             "| method | " + " | ".join(f"lr {lr}" for lr in lrs) + " |", "|---|" + "---:|" * len(lrs)]
    for method, by_lr in table.items():
        scored = [(v, lr) for lr, v in by_lr.items() if v is not None]
        best = min(scored)[1] if scored else None
        cells = [("–" if by_lr.get(lr) is None else f"{by_lr[lr]:.1f}" + ("*" if lr == best else "")) for lr in lrs]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m harness.pipeline.table BENCH.json``: print bench.md again from a run's JSON (for
    a run made by an older version of this table)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("json", help="bench.json written by mace_sparse bench")
    args = parser.parse_args(argv)
    report = json.loads(Path(args.json).read_text())
    raw = [{k: v for k, v in case.items() if k not in ("rows", "checks")} for case in report["cases"]]
    for case in raw:  # counts older versions got wrong are recounted from the stored curves
        for run in case["runs"]:
            if run.get("curve"):
                run["epochs_run"] = epochs_trained(run["curve"])
    print(markdown(build_report(raw, report["meta"])), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
