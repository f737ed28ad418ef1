"""The step-cost benchmark runs end to end on a tiny model and reports well-formed numbers.

No timing assertions: how fast a step is belongs to the benchmark's output, not to the test suite (a test
that asserts 1.10x would fail on any busy CI machine). The memory accounting, which is deterministic, is
checked on allocations of known size.
"""

from __future__ import annotations

import json
import math

import pytest

import mace  # noqa: F401  (before e3nn)
import torch

from harness.stepcost import fixture, memory, schema
from harness.stepcost.run import run_benchmark
from harness.stepcost.schema import BenchConfig


def _positive_finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def tiny_result():
    cfg = BenchConfig(
        channels=8, max_L=1, correlation=2, num_interactions=1, radial_mlp=(16, 16), r_max=4.0, batch_size=1, atoms=4,
        rounds=2, steps=1, warmup=1, memory_steps=1, profile=True, profile_steps=1, threads=1,
    )
    return run_benchmark(cfg)


def test_result_structure_and_ratios(tiny_result):
    result = tiny_result
    assert list(result.methods) == ["full", "sparse_str", "lora"]
    full = result.methods["full"]
    assert full.time_ratio == pytest.approx(1.0) and full.memory_ratio == pytest.approx(1.0)
    for m in result.methods.values():
        assert len(m.step_ms) == len(m.cpu_ms) == 2 and all(_positive_finite(t) for t in m.step_ms + m.cpu_ms)
        assert _positive_finite(m.median_ms) and _positive_finite(m.median_cpu_ms)
        assert _positive_finite(m.time_ratio) and _positive_finite(m.memory_ratio)
        assert _positive_finite(m.cpu_time_ratio) and _positive_finite(m.paired_ratio)
        assert isinstance(m.peak_memory_bytes, int) and m.peak_memory_bytes > 0
        assert len(m.round_ratios) == 2 and all(_positive_finite(r) for r in m.round_ratios)
        assert m.trainable_params > 0
    assert _positive_finite(result.step_time_ratio) and _positive_finite(result.peak_memory_ratio)
    assert result.step_time_ratio == result.methods["sparse_str"].time_ratio
    assert isinstance(result.step_time_pass, bool) and isinstance(result.peak_memory_pass, bool)
    # LoRA trains far fewer tensors entries than full fine-tuning; sparse_str trains ΔW plus the scores
    assert result.methods["lora"].trainable_params < full.trainable_params < result.methods["sparse_str"].trainable_params


def test_markdown_and_json(tiny_result, tmp_path):
    text = tiny_result.markdown()
    for needle in ("| full |", "| sparse_str |", "| lora |", "step_time_ratio", "peak_memory_ratio"):
        assert needle in text
    assert ("PASS" in text) or ("MISS" in text)
    path = schema.write_json(tiny_result, tmp_path / "bench.json")
    data = json.loads(path.read_text())
    assert data["step_time_limit"] == 1.10 and data["peak_memory_limit"] == 1.20
    assert set(data["methods"]) == {"full", "sparse_str", "lora"}
    assert data["step_time_ratio"] == pytest.approx(tiny_result.step_time_ratio)
    assert data["methods"]["sparse_str"]["peak_memory_mb"] > 0
    assert data["step_time_ratio_paired"] > 0 and data["step_cpu_time_ratio"] > 0


def test_profile_breakdown(tiny_result):
    """``--profile`` times sparse_str's pieces and names its own operators (no timing assertion)."""
    breakdown = tiny_result.breakdown
    assert breakdown["adapted_tensors"] > 0 and breakdown["hooked_modules"] > 0
    assert all(math.isfinite(v) and v >= 0 for v in breakdown.values())
    assert 0 < len(tiny_result.op_diff) <= 15
    assert all(math.isfinite(row["extra_ms"]) for row in tiny_result.op_diff)
    assert "sparse_str extra work" in tiny_result.markdown()


def test_peak_live_bytes_counts_known_allocations():
    """Replay of the profiler's allocation events: 1 MiB held + 2 MiB freed inside the step + 0.5 MiB kept."""
    mib = 2**20
    keep = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        keep.append(torch.empty(mib, dtype=torch.uint8))
        with torch.profiler.record_function(memory.MEASURED_STEP):
            scratch = torch.empty(2 * mib, dtype=torch.uint8)
            del scratch
            keep.append(torch.empty(mib // 2, dtype=torch.uint8))
    peak = memory.peak_live_bytes_from_profile(prof)
    assert 3 * mib <= peak < 3 * mib + 64 * 1024


def test_emt_structures_have_the_requested_size():
    atoms = fixture.emt_structures(2, 6, seed=3)
    assert [len(a) for a in atoms] == [6, 6]
    assert all("REF_energy" in a.info and a.arrays["REF_forces"].shape == (6, 3) for a in atoms)


def test_cli_parses_and_rejects_bad_settings():
    import argparse

    from harness.stepcost.cli import config_from_args
    from mace_sparse.cli import bench_step

    parser = argparse.ArgumentParser()
    bench_step.add_parser(parser.add_subparsers(dest="command"), "bench-step")
    args = parser.parse_args(["bench-step", "--radial-mlp", "[32,32]", "--channels", "16", "--json", "x.json",
                              "--model", "m.model", "--interactions", "3", "--methods", "full, lora", "--no-memory"])
    assert args.radial_mlp == (32, 32) and args.channels == 16 and args.json == "x.json"
    assert config_from_args(args) == BenchConfig(radial_mlp=(32, 32), channels=16, model_path="m.model",
                                                 num_interactions=3, methods=("full", "lora"), measure_memory=False)
    # the command line's defaults are the library's defaults, every one of them
    assert config_from_args(parser.parse_args(["bench-step"])) == BenchConfig()
    with pytest.raises(ValueError, match="--dtype"):
        BenchConfig(dtype="float16").validate()
    with pytest.raises(ValueError, match="unknown method"):
        BenchConfig(methods=("full", "dora")).validate()
    with pytest.raises(ValueError, match="--atoms 4097 is too large"):
        BenchConfig(atoms=4097).validate()

