"""``mace_sparse bench``: the table builder on synthetic results, the method → flag mapping, one tiny real run."""

from __future__ import annotations

import json
import math

import pytest

from harness.experiments import methods as bench_methods
from harness.experiments.tasks import BenchCase
from harness.pipeline import table as bench_table


def _run(method, seed, target, source, changed, **extra):
    return {"case": "syn", "method": method, "seed": seed, "target_force_mae": target, "source_force_mae": source,
            "target_energy_mae_per_atom": 1.0, "target_energy_mae_per_config": 10.0, "changed_percent": changed,
            **extra}


def _synthetic_case(sparse_target=(38.0, 40.0, 42.0), sparse_source=11.0, sparse_changed=3.0, sparse_ms=105.0):
    runs = [_run("zero-shot", None, 80.0, 10.0, 0.0)]
    runs += [_run("full", s, t, 14.0, 99.0) for s, t in zip((0, 1, 2), (42.0, 44.0, 46.0))]
    runs += [_run("lora", s, 50.0, 12.0, 30.0) for s in (0, 1, 2)]
    runs += [_run("sparse_str-H-all", s, t, sparse_source, sparse_changed, delta_bytes=1000,
                  delta_percent_of_model=2.0) for s, t in zip((0, 1, 2), sparse_target)]
    return {
        "case": {"label": "syn", "molecules": True, "foundation": "f.model", "train_size": 50, "test_file": "t",
                 "source_test_file": "s", "e0s": "average"},
        "train_file_used": "train.xyz", "source_configs": {"used": 5, "in_file": 6},
        "runs": runs,
        "step_cost": {"full": {"median_ms": 100.0, "peak_memory_bytes": 1000},
                      "lora": {"median_ms": 80.0, "peak_memory_bytes": 800},
                      "sparse_str-all": {"median_ms": sparse_ms, "peak_memory_bytes": 1100}},
        "cost_key": {"full": "full", "lora": "lora", "sparse_str-H-all": "sparse_str-all"},
    }


def test_rows_ratios_and_mean_std():
    rows = {r["method"]: r for r in bench_table.summarize_case(_synthetic_case())}
    full, sparse = rows["full"], rows["sparse_str-H-all"]
    assert full["target_force_mae"] == pytest.approx(44.0)
    assert full["target_force_mae_std"] == pytest.approx(2.0)  # sample std of 42, 44, 46
    assert rows["zero-shot"]["target_force_mae_std"] == 0.0 and rows["zero-shot"]["seeds"] == 1
    assert sparse["target_force_ratio_to_full"] == pytest.approx(40.0 / 44.0)
    assert full["source_rise"] == pytest.approx(4.0) and sparse["source_rise"] == pytest.approx(1.0)
    assert sparse["source_rise_ratio_to_full"] == pytest.approx(0.25)
    assert sparse["step_time_ratio"] == pytest.approx(1.05) and sparse["peak_memory_ratio"] == pytest.approx(1.1)
    assert rows["lora"]["step_time_ratio"] == pytest.approx(0.8)
    assert rows["zero-shot"]["step_time_ratio"] is None
    assert sparse["unchanged_percent"] == pytest.approx(97.0)


def test_epochs_run_mean_and_ratio_to_full_in_rows_and_markdown(tmp_path, capsys):
    case = _synthetic_case()
    for run in case["runs"]:
        run["epochs_run"] = {"full": 80, "sparse_str-H-all": 240}.get(run["method"])
    rows = {r["method"]: r for r in bench_table.summarize_case(case)}
    assert rows["sparse_str-H-all"]["epochs_ratio_to_full"] == pytest.approx(3.0)
    assert rows["lora"]["epochs_run"] is None and rows["lora"]["epochs_ratio_to_full"] is None
    report = bench_table.build_report([case], _meta())
    assert "| 240 (3.00×) |" in bench_table.case_markdown(report["cases"][0])
    # a bench.json written before the column existed is re-summarised from its raw runs, not its stale rows
    for row in report["cases"][0]["rows"]:
        row.pop("epochs_run"), row.pop("epochs_ratio_to_full")
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench_table.json_ready(report), allow_nan=False))
    assert bench_table.main([str(path)]) == 0
    assert "| 240 (3.00×) |" in capsys.readouterr().out


def test_epochs_run_counts_stage_two_epochs_trained_not_their_numbers(tmp_path, capsys):
    """MACE numbers stage-two epochs from --max_num_epochs: 3 epochs, then 2 in stage two, logged 0-2, 400-401."""
    from harness.pipeline.curve import epochs_trained, parse_curve

    log = "\n".join(f"INFO: Epoch {e}: loss=0.1, MAE_F= 5.0 meV / A" for e in (0, 1, 2, 400, 401))
    curve = parse_curve(log)
    assert epochs_trained(curve) == 5 and epochs_trained([]) is None
    # the table CLI recounts a bench.json written with the old count (last epoch + 1 = 402)
    case = _synthetic_case()
    for run in case["runs"]:
        run["curve"], run["epochs_run"] = ((curve, 402) if run["method"] == "sparse_str-H-all"
                                           else ([{"epoch": e, "mae_f": 1.0} for e in range(4)], 4))
    report = bench_table.build_report([case], _meta())
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench_table.json_ready(report), allow_nan=False))
    assert bench_table.main([str(path)]) == 0
    assert "| 5 (1.25×) |" in capsys.readouterr().out


def test_checks_pass_and_fail():
    good = bench_table.checks_for(bench_table.summarize_case(_synthetic_case()))
    assert [c["method"] for c in good] == ["sparse_str-H-all"]
    # 40 ≤ 0.95·44 = 41.8, 40 ≤ 0.9·50 = 45, 97% unchanged, rise 1 ≤ 0.5·4, 1.05 ≤ 1.1, 1.1 ≤ 1.2
    assert all(good[0][key] is True for key, _ in bench_table.CHECKS)
    bad = bench_table.checks_for(bench_table.summarize_case(
        _synthetic_case(sparse_target=(43.0, 43.0, 43.0), sparse_source=13.0, sparse_changed=6.0, sparse_ms=120.0)))
    assert bad[0]["force_vs_full"] is False and bad[0]["force_vs_lora"] is True  # 43 > 41.8; 43 ≤ 45
    assert bad[0]["unchanged"] is False and bad[0]["forgetting"] is False and bad[0]["step_time"] is False
    assert bad[0]["peak_memory"] is True


def _meta():
    return {"date": "d", "command": "mace_sparse bench", "mode": "full", "covers": "c", "epochs": 1, "lr": 0.01,
            "batch_size": 4, "seeds": [0, 1, 2], "dtype": "float64", "lora_rank": 4, "lora_alpha": 1.0,
            "freeze": 5, "wall_s": 60.0, "sparse_presets": bench_methods.SPARSE_PRESETS}


def test_missing_lora_gives_no_verdict_and_markdown_marks():
    case = _synthetic_case()
    case["runs"] = [r for r in case["runs"] if r["method"] != "lora"]
    report = bench_table.build_report([case], {**_meta(), "mode": "quick"})
    assert report["cases"][0]["checks"][0]["force_vs_lora"] is None
    text = bench_table.markdown(report)
    assert "40.0 ± 2.0" in text and "meV/molecule" in text and "✓" in text and "| – |" in text
    report["cases"][0]["runs"][0]["source_force_mae"] = float("nan")
    assert json.loads(json.dumps(bench_table.json_ready(report), allow_nan=False))["cases"][0]["runs"][0][
        "source_force_mae"] is None


def test_summary_over_cases_means_ratios_and_counts_targets_met(tmp_path, capsys):
    good = _synthetic_case()
    bad = _synthetic_case(sparse_target=(43.0, 43.0, 43.0), sparse_source=13.0, sparse_changed=6.0, sparse_ms=120.0)
    bad["case"] = dict(bad["case"], label="syn2")
    report = bench_table.build_report([good, bad], _meta())
    text = bench_table.summary_markdown(report)
    assert "### Summary over the 2 cases" in text
    sparse = next(line for line in text.splitlines() if line.startswith("| sparse_str-H-all | 0."))
    # F × full: 40/44 and 43/44 → mean 0.94 (0.91–0.98); changed 3 and 6 % → 4.50 (3.00–6.00)
    assert "0.94 (0.91–0.98)" in sparse and "4.50 (3.00–6.00)" in sparse
    assert "| sparse_str-H-all | 1/2 | 2/2 | 1/2 | 1/2 | 1/2 | 2/2 |" in text
    assert bench_table.summary_markdown(bench_table.build_report([good], _meta())) == ""  # one case: no summary
    # bench.md is re-rendered from a run's JSON by the module's command line, summary included
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench_table.json_ready(report), allow_nan=False))
    assert bench_table.main([str(path)]) == 0
    assert capsys.readouterr().out == bench_table.markdown(json.loads(path.read_text()))
    assert "Summary over the 2 cases" in bench_table.markdown(json.loads(path.read_text()))


def _case():
    return BenchCase(task="t", label="t/x", foundation="f.model", train_file="train.xyz", test_file="test.xyz",
                     source_test_file="src.xyz", e0s="average")


def test_lora_and_freeze_flags_accepted_by_mace_parser():
    from mace.tools import build_default_arg_parser

    settings = bench_methods.TrainSettings(epochs=3, lr=0.005, batch_size=2)
    methods = bench_methods.all_methods(freeze=6, lora_rank=8, lora_alpha=2.0)
    lora = build_default_arg_parser().parse_args(
        bench_methods.train_command(_case(), methods["lora"], 7, settings, "train.xyz"))
    assert lora.lora is True and lora.lora_rank == 8 and lora.lora_alpha == 2.0
    assert lora.multiheads_finetuning is False and lora.seed == 7 and lora.max_num_epochs == 3
    assert lora.lr == 0.005 and lora.batch_size == 2 and lora.E0s == "average"
    assert lora.foundation_model == str(_case().foundation)
    freeze = build_default_arg_parser().parse_args(
        bench_methods.train_command(_case(), methods["freeze"], 0, settings, "train.xyz"))
    assert freeze.freeze == 6 and not freeze.lora


def test_sparse_flags_accepted_with_the_plugin():
    from mace.tools import build_default_arg_parser

    from mace_sparse.integration.arguments import add_sparse_arguments

    parser = add_sparse_arguments(build_default_arg_parser())  # adds the magnetic flags too
    settings = bench_methods.TrainSettings(epochs=1)
    methods = bench_methods.all_methods()
    assert set(methods) == set(bench_methods.METHOD_NAMES) and len(methods) == 17
    for name in ("full", "sparse_str-L-linear", "sparse_str-M-all", "sparse_str-H-all", "paper-recipe",
                 "sparse_str-B5-all", "sparse_str-M-noramp"):
        args = parser.parse_args(bench_methods.train_command(_case(), methods[name], 0, settings, "train.xyz"))
        assert args.finetune_method == methods[name].kind
    args = parser.parse_args(bench_methods.train_command(_case(), methods["sparse_str-M-noramp"], 0, settings, "x"))
    assert args.sparse_init_threshold == bench_methods.NO_RAMP_THRESHOLD == 0.5
    args = parser.parse_args(bench_methods.train_command(_case(), methods["sparse_str-L-linear"], 0, settings, "x"))
    assert args.sparse_threshold_weight_decay == bench_methods.SPARSE_PRESETS["L"]["lambda_tau"]
    assert args.sparse_delta_eps == bench_methods.SPARSE_PRESETS["L"]["delta_eps"]
    assert "linear" in str(args.sparse_targets)
    args = parser.parse_args(bench_methods.train_command(_case(), methods["sparse_str-H-all"], 0, settings, "x"))
    assert (args.sparse_threshold_weight_decay, args.sparse_delta_eps) == (2.0, 3.0)
    args = parser.parse_args(bench_methods.train_command(_case(), methods["sparse_str-B5-all"], 0, settings, "x"))
    assert (args.sparse_budget, args.sparse_threshold_scale, args.sparse_threshold_weight_decay) == (
        0.05, "relative", None)
    args = parser.parse_args(bench_methods.train_command(_case(), methods["sparse_str-B5-fisher"], 0, settings, "x"))
    assert (args.sparse_budget, args.sparse_selection, args.sparse_threshold_scale) == (0.05, "fisher", "relative")
    args = parser.parse_args(bench_methods.train_command(_case(), methods["sparse_str-M-element"], 0, settings, "x"))
    assert (args.sparse_threshold_granularity, args.sparse_threshold_weight_decay) == ("element", None)
    with pytest.raises(ValueError):
        bench_methods.train_command(_case(), methods["zero-shot"], 0, settings, "x")
    with pytest.raises(ValueError, match="unknown method"):
        bench_methods.select_methods(["nope"])


def test_sparse_flags_override_the_presets_of_sparse_methods_only():
    from mace.tools import build_default_arg_parser

    from mace_sparse.integration.arguments import add_sparse_arguments

    extra = bench_methods.parse_sparse_flags("--sparse_delta_lr_factor 1 --sparse-delta-eps=0.5")
    methods = bench_methods.all_methods(sparse_flags=extra)
    assert methods["full"].flags == bench_methods.all_methods()["full"].flags
    assert methods["lora"].flags == bench_methods.all_methods()["lora"].flags
    parser = add_sparse_arguments(build_default_arg_parser())
    settings = bench_methods.TrainSettings(epochs=1)
    args = parser.parse_args(bench_methods.train_command(_case(), methods["sparse_str-H-all"], 0, settings, "x"))
    assert (args.sparse_delta_lr_factor, args.sparse_delta_eps) == (1.0, 0.5)  # the later flag wins
    assert args.sparse_threshold_weight_decay == bench_methods.SPARSE_PRESETS["H"]["lambda_tau"]


@pytest.mark.parametrize("text, match", [
    ("--sparse_delta_lr_factr 1", "'--sparse_delta_lr_factr' is not a sparse_str tuning flag"),
    ("--sparse_targets linear", "'--sparse_targets' is not a sparse_str tuning flag"),
    ("--sparse_delta_eps abc", "--sparse-flags: argument .*--sparse_delta_eps: invalid float value"),
])
def test_bad_sparse_flags_are_refused_before_any_run(text, match):
    with pytest.raises(ValueError, match=match):
        bench_methods.parse_sparse_flags(text)


@pytest.mark.slow
def test_bench_end_to_end(tmp_path, tiny_foundation, emt_data):
    """Zero-shot and one sparse_str method, one epoch, through the real mace_run_train (one subprocess: the
    sparse run's delta gives the step-0 reference, and a full step is timed in-process for the ratios)."""
    from mace_sparse.cli import main

    out = tmp_path / "bench"
    code = main(["bench", "--foundation", str(tiny_foundation), "--train-file", str(emt_data["slab_train"]),
                 "--test-file", str(emt_data["slab_test"]), "--source-test-file", str(emt_data["bulk_test"]),
                 "--methods", "zero-shot", "sparse_str-H-all", "--epochs", "1", "--seeds", "0",
                 "--cost-rounds", "2", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    assert (out / "bench.md").read_text().count("sparse_str-H-all") >= 2
    case = report["cases"][0]
    rows = {r["method"]: r for r in case["rows"]}
    assert set(rows) == {"zero-shot", "sparse_str-H-all"}
    for row in rows.values():
        for key in ("target_force_mae", "target_energy_mae_per_atom", "source_force_mae", "changed_percent",
                    "source_rise"):
            assert math.isfinite(row[key]), (row["method"], key)
    sparse = rows["sparse_str-H-all"]
    for key in ("step_time_ratio", "peak_memory_ratio", "delta_bytes", "delta_percent_of_model"):
        assert math.isfinite(sparse[key]) and sparse[key] > 0, key
    assert sparse["delta_percent_of_model"] < 100 and 0 < sparse["changed_percent"] < 100
    assert rows["zero-shot"]["changed_percent"] == 0.0
    run = next(r for r in case["runs"] if r["method"] == "sparse_str-H-all")
    assert run["changed_entries"] == run["changed_entries_sparsity_json"]  # bitwise count = the run's own count
    check = case["checks"][0]
    assert check["method"] == "sparse_str-H-all" and check["force_vs_full"] is None  # full was not run
    assert check["step_time"] in (True, False) and check["unchanged"] in (True, False)


def test_plan_adds_an_lr0_reference_only_without_sparse_runs(tmp_path):
    from harness.pipeline.runner import BenchOptions, _plan

    def plan(names):
        options = BenchOptions(methods=bench_methods.select_methods(names), seeds=[0, 1],
                               settings=bench_methods.TrainSettings(epochs=2), out=tmp_path)
        return _plan(_case(), options, tmp_path / "train.xyz", tmp_path)

    jobs = plan(["zero-shot", "full", "lora"])
    refs = [j for j in jobs if j.method.kind == "reference"]
    assert len(jobs) == 6 and [j.seed for j in refs] == [0, 1]
    args = refs[0].args
    assert args[args.index("--lr") + 1] == "0.0" and args[args.index("--max_num_epochs") + 1] == "1"
    assert not [j for j in plan(["full", "sparse_str-H-all"]) if j.method.kind == "reference"]
    assert _case().foundation.is_absolute()  # runs execute in their own directories


def test_epoch_time_from_mace_log():
    from harness.pipeline.train import median_epoch_seconds

    log = "\n".join([
        "2026-11-23 07:55:24.709 INFO: Training set 1/1",
        "2026-11-23 07:55:30.000 INFO: Epoch 0: head: Default, loss=5.7",
        "2026-11-23 07:55:31.000 INFO: Epoch 1: head: Default, loss=4.2",
        "2026-11-23 07:55:33.500 INFO: Epoch 2: head: Default, loss=3.5",
        "2026-11-23 07:55:35.000 INFO: Epoch 3: head: Default, loss=3.1",
    ])
    assert median_epoch_seconds(log) == pytest.approx(1.5)
    assert median_epoch_seconds("2026-11-23 07:55:30.000 INFO: Epoch 0: x") is None


def test_finished_run_is_reused_and_changed_arguments_rerun(tmp_path, monkeypatch):
    from harness.pipeline import train as bench_train
    from mace_sparse import training

    script = tmp_path / "fake_train"
    script.write_text("#!/bin/sh\necho run >> calls.txt\ntouch model.model\n")
    script.chmod(0o755)
    monkeypatch.setattr(training, "mace_run_train_executable", lambda: str(script))
    run_dir = tmp_path / "run"
    first = bench_train.run_training(["--seed", "0"], run_dir)
    again = bench_train.run_training(["--seed", "0"], run_dir)
    assert first.ok and not first.reused and again.ok and again.reused
    assert again.wall_s == pytest.approx(first.wall_s)
    assert bench_train.run_training(["--seed", "1"], run_dir).reused is False
    # the new arguments ran once in a fresh dir; the seed-0 run was set aside with its own call, not deleted
    assert (run_dir / "calls.txt").read_text().count("run") == 1
    assert (tmp_path / "run.superseded-1" / "calls.txt").read_text().count("run") == 1
    assert (tmp_path / "run.superseded-1" / "model.model").is_file()


def test_rmd17_cases_follow_the_expected_file_names(tmp_path):
    from harness.experiments.tasks import build_task, select_cases

    (tmp_path / "organic.model").write_bytes(b"")
    task = build_task("rmd17", tmp_path / "organic.model", tmp_path, data_dir=tmp_path / "rmd17")
    assert [c.label for c in task.cases][:2] == ["rmd17/aspirin/N=50", "rmd17/aspirin/N=200"]
    assert len(task.cases) == 8 and all(c.molecules and c.e0s == "average" for c in task.cases)
    aspirin = select_cases(task, ["aspirin/N=50"])
    assert len(aspirin) == 1 and aspirin[0].train_file == tmp_path / "rmd17" / "aspirin_train.xyz"
    assert aspirin[0].test_file.name == "aspirin_test.xyz" and aspirin[0].train_size == 50
    assert aspirin[0].source_test_file.parts[-2:] == ("organic", "test.xyz")
    with pytest.raises(FileNotFoundError, match="train_file"):
        aspirin[0].check_files()
    inorganic = build_task("inorganic", tmp_path / "inorganic.model", tmp_path).cases[0]
    assert inorganic.train_file.parts[-2:] == ("magnetic_oxides", "train.xyz") and inorganic.e0s == "foundation"
    magnetic = build_task("magnetic", tmp_path / "inorganic.model", tmp_path).cases[0]
    assert "--magmom_weight" in magnetic.extra_flags


@pytest.mark.slow
def test_calibrate_runs_every_setting_through_mace_run_train(tmp_path, tiny_foundation):
    """``mace_sparse calibrate`` is an experiment of the benchmark's runner: every setting is a real
    ``mace_run_train`` run, scored on held-out slabs and bulk cells, with sparse_str's own unchanged share."""
    from harness.experiments.calibration import DEFAULT_VARIANTS
    from mace_sparse.cli import main

    out, report_path = tmp_path / "calib", tmp_path / "calibration.json"
    code = main(["calibrate", "--foundation_model", str(tiny_foundation), "--seeds", "0", "--epochs", "1",
                 "--out", str(out), "--json", str(report_path), "--markdown", str(tmp_path / "calibration.md")])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert [row["setting"] for row in report["table"]] == [label for _, label, _ in DEFAULT_VARIANTS]
    assert math.isfinite(report["zero_shot"]["target"]) and math.isfinite(report["zero_shot"]["source"])
    runs = {r["label"]: r for r in report["runs"]}
    assert runs["full fine-tuning"]["unchanged_fraction"] is None
    assert all(0.0 < r["unchanged_fraction"] < 1.0 for label, r in runs.items() if label != "full fine-tuning")
    assert report["table"][0]["target_ratio_to_full"] == pytest.approx(1.0)
    for name, _, _ in DEFAULT_VARIANTS:  # each one a real run folder with its command line
        log = (out / "runs" / "standin__emt-slabs" / f"{name}_seed0" / "command.log").read_text()
        assert log.startswith("$ ") and "mace_run_train" in log.splitlines()[0]
    assert "| setting |" in (tmp_path / "calibration.md").read_text()
