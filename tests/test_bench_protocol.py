"""The converged, validated benchmark protocol: validation apart from training, learning curves from MACE's
log, enforced early stopping, the lr grid chosen on validation, the figures, and the paper-recipe method."""

from __future__ import annotations

import json

import pytest

from harness.experiments import methods as bench_methods
from harness.experiments.tasks import BenchCase
from harness.pipeline import curve as bench_curve

LOG = "\n".join([
    "2026-12-01 10:00:00.000 INFO: Initial: head: Default, loss=9.0, MAE_E_per_atom= 50.0 meV, MAE_F= 300.0 meV / A",
    "2026-12-01 10:00:01.000 INFO: Epoch 0: head: Default, loss=5.0, MAE_E_per_atom= 40.0 meV, MAE_F= 200.0 meV / A,"
    " sparsity=99.50 %, mean_delta=1.0e-03",
    "2026-12-01 10:00:02.000 INFO: Epoch 1: head: Default, loss=4.0, MAE_E_per_atom= 30.0 meV, MAE_F= 150.0 meV / A,"
    " sparsity=98.00 %, mean_delta=2.0e-03",
    "2026-12-01 10:00:03.000 INFO: Epoch 2: head: Default, loss=4.5, MAE_E_per_atom= 31.0 meV, MAE_F= 140.0 meV / A,"
    " sparsity=97.00 %, mean_delta=3.0e-03",
    "2026-12-01 10:00:04.000 INFO: Stopping optimization after 1 epochs without improvement",
])


def test_curve_parsed_from_mace_log_and_best_is_lowest_loss():
    curve = bench_curve.parse_curve(LOG)
    assert [p["epoch"] for p in curve] == [0, 1, 2]  # the 'Initial' line is not an epoch
    assert curve[1] == {"epoch": 1, "loss": 4.0, "mae_f": 150.0, "mae_e_per_atom": 30.0,
                        "sparsity_percent": 98.0, "mean_delta": 2.0e-3}
    best = bench_curve.best_point(curve)
    assert best["epoch"] == 1 and best["mae_f"] == 150.0  # MACE keeps the lowest loss, not the lowest MAE_F
    assert bench_curve.stopped_early(LOG) and bench_curve.best_epoch_from_log(LOG) == 1
    rerun = LOG + "\n2026-12-01 11:00:00.000 INFO: Epoch 1: head: Default, loss=3.0, MAE_F= 120.0 meV / A"
    assert bench_curve.parse_curve(rerun)[1]["mae_f"] == 120.0  # a restarted epoch: the later line wins


def _case(**kw):
    return BenchCase(task="t", label="t/x", foundation="f.model", train_file="train.xyz", test_file="test.xyz",
                     source_test_file="src.xyz", e0s="average", **kw)


def test_protocol_flags_reach_mace_parser():
    from mace.tools import build_default_arg_parser

    from mace_sparse.integration.arguments import add_sparse_arguments

    settings = bench_methods.TrainSettings(epochs=400, patience=15, ema=True)
    full = bench_methods.all_methods()["full"]
    args = add_sparse_arguments(build_default_arg_parser()).parse_args(
        bench_methods.train_command(_case(), full, 0, settings, "train.xyz", valid_file="valid.xyz"))
    assert args.valid_file == "valid.xyz" and args.patience == 15 and args.ema and args.ema_decay == 0.99
    assert args.max_num_epochs == 400 and args.error_table == "PerAtomMAE"
    no_valid = bench_methods.train_command(_case(), full, 0, bench_methods.TrainSettings(epochs=2), "train.xyz")
    assert "--valid_file" not in no_valid and "--valid_fraction" in no_valid and "--patience" not in no_valid
    paper = bench_methods.all_methods()["paper-recipe"]
    parsed = add_sparse_arguments(build_default_arg_parser()).parse_args(
        bench_methods.train_command(_case(), paper, 0, settings, "x"))
    assert "".join(parsed.sparse_targets) == "linear,skip_tp" and parsed.sparse_delta_init_std == 0.01
    assert parsed.sparse_straight_through is False and parsed.sparse_init_threshold == 1e-4
    assert parsed.sparse_delta_eps == 0.0 and parsed.sparse_delta_lr_factor == 1.0


def test_pool_split_keeps_validation_apart(tmp_path, emt_data):
    import ase.io

    from harness.pipeline.splits import split_files

    pool = ase.io.read(emt_data["slab_train"], ":")
    case = BenchCase(task="t", label="t/x", foundation=emt_data["slab_train"], train_file=emt_data["slab_train"],
                     test_file=emt_data["slab_test"], source_test_file=emt_data["bulk_test"], valid_size=5,
                     train_size=10)
    train, valid = split_files(case, tmp_path)
    tr, va = ase.io.read(train, ":"), ase.io.read(valid, ":")
    assert len(tr) == 10 and len(va) == 5
    assert all((a.positions == b.positions).all() for a, b in zip(tr, pool[:10]))
    assert all((a.positions == b.positions).all() for a, b in zip(va, pool[-5:]))
    too_many = BenchCase(**{**case.__dict__, "train_size": len(pool)})
    with pytest.raises(ValueError, match="too few"):
        split_files(too_many, tmp_path)


def test_grid_runs_from_its_middle_out():
    from harness.pipeline.runner import center_out

    assert center_out((0.003, 0.01, 0.03)) == [0.01, 0.003, 0.03]
    assert center_out((1.0, 2.0, 3.0, 4.0)) == [3.0, 2.0, 4.0, 1.0]
    assert center_out((0.01,)) == [0.01] and center_out(()) == []


def test_finished_only_keeps_the_runs_that_finished_with_the_same_arguments(tmp_path):
    from harness.pipeline.runner import BenchOptions, _finished_only, _plan

    options = BenchOptions(methods=bench_methods.select_methods(["full", "sparse_str-H-all"]), seeds=[0, 1],
                           settings=bench_methods.TrainSettings(epochs=5, patience=2), out=tmp_path)
    jobs = _plan(_case(), options, tmp_path / "train.xyz", tmp_path, reference=True)
    assert sorted(j.method.name for j in jobs if j.method.kind == "reference") == ["reference-lr0"] * 2
    done = {("full", 0), ("sparse_str-H-all", 1)}
    for job in jobs:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        if (job.method.name, job.seed) in done:
            (job.run_dir / "model.model").write_text("m")
            (job.run_dir / "bench_run.json").write_text(json.dumps({"args": job.args, "wall_s": 1.0}))
    stale = next(j for j in jobs if (j.method.name, j.seed) == ("full", 1))
    (stale.run_dir / "model.model").write_text("m")  # finished, but with other arguments
    (stale.run_dir / "bench_run.json").write_text(json.dumps({"args": [*stale.args, "--lr", "9"], "wall_s": 1.0}))
    kept = sorted((j.method.name, j.seed) for j in _finished_only(jobs))
    assert kept == [("full", 0), ("reference-lr0", 0), ("reference-lr0", 1), ("sparse_str-H-all", 1)]


def test_lr_chosen_per_method_on_validation(tmp_path):
    from harness.pipeline.runner import BenchOptions, _tuning_plan
    from harness.pipeline.tuning import select_lrs
    from harness.pipeline.train import TrainOutput

    options = BenchOptions(methods=bench_methods.select_methods(["full", "sparse_str-H-all"]), seeds=[0, 1],
                           settings=bench_methods.TrainSettings(epochs=5, patience=2), out=tmp_path,
                           lr_grid=(0.003, 0.01))
    jobs = _tuning_plan(_case(), options, tmp_path / "train.xyz", tmp_path, tmp_path / "valid.xyz")
    assert [j.lr for j in jobs] == [0.01, 0.01, 0.003, 0.003]  # the middle of the grid first
    assert sorted((j.method.name, j.lr, j.seed) for j in jobs) == [
        ("full", 0.003, 0), ("full", 0.01, 0), ("sparse_str-H-all", 0.003, 0), ("sparse_str-H-all", 0.01, 0)]
    assert all(j.args[j.args.index("--valid_file") + 1] == str(tmp_path / "valid.xyz") for j in jobs)
    scores = {("full", 0.003): 50.0, ("full", 0.01): 40.0, ("sparse_str-H-all", 0.003): 30.0,
              ("sparse_str-H-all", 0.01): 35.0}
    for job in jobs:
        curve = [{"epoch": 0, "loss": 2.0, "mae_f": 99.0}, {"epoch": 1, "loss": 1.0,
                                                             "mae_f": scores[(job.method.name, job.lr)]}]
        job.output = TrainOutput(run_dir=tmp_path, model=tmp_path / "m", returncode=0, wall_s=1.0, epoch_s=None,
                                 curve=curve)
    chosen, table = select_lrs(jobs)
    assert chosen == {"full": 0.01, "sparse_str-H-all": 0.003}
    assert table["full"] == {"0.003": 50.0, "0.01": 40.0}


def test_figures_written(tmp_path):
    from harness.pipeline.plots import write_plots

    curve = bench_curve.parse_curve(LOG)
    runs = [{"method": "zero-shot", "changed_percent": 0.0, "target_force_mae": 90.0}]
    for method, changed, force in (("full", 99.0, 40.0), ("lora", 60.0, 45.0), ("sparse_str-H-all", 3.0, 44.0),
                                   ("sparse_str-L-all", 30.0, 41.0)):
        runs.append({"method": method, "changed_percent": changed, "target_force_mae": force, "curve": curve,
                     "best_epoch": 1})
    paths = write_plots([{"case": {"label": "rmd17-s/aspirin/N=50"}, "runs": runs}], tmp_path)
    assert [p.name for p in paths] == ["bench_rmd17-s__aspirin__N=50_curves.png",
                                       "bench_rmd17-s__aspirin__N=50_tradeoff.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_benchmark_scale_tasks_point_at_their_foundations_and_validation(tmp_path):
    from harness.experiments.tasks import RMD17_VALID_DIR, build_task

    rmd = build_task("rmd17-s", tmp_path / "organic-s.model", tmp_path)
    assert [c.label for c in rmd.cases] == ["rmd17-s/aspirin/N=50", "rmd17-s/aspirin/N=200",
                                           "rmd17-s/malonaldehyde/N=50", "rmd17-s/malonaldehyde/N=200"]
    assert rmd.cases[0].valid_file == RMD17_VALID_DIR / "aspirin_valid.xyz"
    assert rmd.cases[0].source_test_file.parts[-3:] == ("data", "organic_s", "test.xyz")
    oxides = build_task("inorganic-s", tmp_path / "inorganic-s.model", tmp_path).cases[0]
    assert oxides.valid_size == 30 and oxides.train_size is None
    assert oxides.source_test_file.parts[-2:] == ("inorganic_s", "test.xyz")


def test_rmd17_validation_frames_are_new_frames_of_the_same_molecule():
    import ase.io
    import numpy as np

    from harness.experiments.tasks import DATA_DIR, RMD17_VALID_DIR

    for mol in ("aspirin", "malonaldehyde"):
        valid = ase.io.read(RMD17_VALID_DIR / f"{mol}_valid.xyz", ":")
        pool = ase.io.read(DATA_DIR / "rmd17_like" / f"{mol}_train.xyz", ":")
        pool += ase.io.read(DATA_DIR / "rmd17_like" / f"{mol}_test.xyz", ":")
        assert len(valid) == 50 and valid[0].get_chemical_formula() == pool[0].get_chemical_formula()
        seen = {np.round(a.positions, 5).tobytes() for a in pool}
        assert not any(np.round(a.positions, 5).tobytes() in seen for a in valid)


@pytest.mark.slow
def test_early_stop_ends_the_run_and_keeps_the_best_checkpoint(tmp_path, tiny_foundation, emt_data):
    """lr 0: the validation loss never improves after epoch 0, so patience 2 ends the run at epoch 2 of 50."""
    from harness.pipeline.train import run_training

    case = BenchCase(task="t", label="t/x", foundation=tiny_foundation, train_file=emt_data["slab_train"],
                     test_file=emt_data["slab_test"], source_test_file=emt_data["bulk_test"], valid_fraction=0.2)
    settings = bench_methods.TrainSettings(epochs=50, lr=0.0, patience=2)
    args = bench_methods.train_command(case, bench_methods.all_methods()["full"], 0, settings,
                                       str(emt_data["slab_train"]))
    out = run_training(args, tmp_path / "run", patience=2)
    assert out.ok and out.stopped_early
    epochs = [p["epoch"] for p in out.curve]
    assert epochs[0] == 0 and max(epochs) <= 4, epochs  # stopped at patience, far from the cap of 50
    assert json.loads((tmp_path / "run" / "bench_run.json").read_text())["stopped_early"] is True


@pytest.mark.slow
def test_bench_with_lr_grid_early_stop_and_ema_end_to_end(tmp_path, tiny_foundation, emt_data):
    """Two methods × two grid lrs on seed 0, the chosen lr for seed 1, early stopping, EMA: through the CLI."""
    from mace_sparse.cli import main

    out = tmp_path / "bench"
    code = main(["bench", "--foundation", str(tiny_foundation), "--train-file", str(emt_data["slab_train"]),
                 "--test-file", str(emt_data["slab_test"]), "--source-test-file", str(emt_data["bulk_test"]),
                 "--methods", "full", "sparse_str-H-all", "--epochs", "6", "--patience", "2", "--ema",
                 "--lr-grid", "0.002", "0.02", "--seeds", "0", "1", "--cost-rounds", "2", "--no-memory",
                 "--out", str(out)])
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["meta"]["lr_grid"] == [0.002, 0.02] and report["meta"]["patience"] == 2 and report["meta"]["ema"]
    case = report["cases"][0]
    table = case["lr_selection"]
    assert set(table) == {"full", "sparse_str-H-all"} and all(set(v) == {"0.002", "0.02"} for v in table.values())
    runs = [r for r in case["runs"] if r["method"] != "zero-shot"]
    assert sorted((r["method"], r["seed"]) for r in runs) == [("full", 0), ("full", 1), ("sparse_str-H-all", 0),
                                                            ("sparse_str-H-all", 1)]
    for run in runs:
        chosen = min((v, float(k)) for k, v in table[run["method"]].items())[1]
        assert run["lr"] == chosen  # every seed at the lr picked on validation
        assert run["curve"] and all("mae_f" in p for p in run["curve"]) and run["epochs_run"] <= 6
        if run["method"].startswith("sparse_str"):
            assert all("sparsity_percent" in p and "mean_delta" in p for p in run["curve"])
    md = (out / "bench.md").read_text()
    assert "Learning-rate selection" in md and "chosen on validation force MAE" in md
    assert len(list(out.glob("bench_*_curves.png"))) == 1 and len(list(out.glob("bench_*_tradeoff.png"))) == 1

    # --finished-only: the table of what had finished, with nothing trained again. Un-finish sparse_str's
    # lr-0.02 tuning run and every seed-1 sparse_str run (as if the benchmark had been cut off there).
    runs_dir = next((out / "runs").iterdir())
    for run_dir in runs_dir.glob("sparse_str-H-all_*"):
        if "_lr0.02_" in run_dir.name or run_dir.name.endswith("_seed1"):
            (run_dir / "bench_run.json").unlink()
    code = main(["bench", "--foundation", str(tiny_foundation), "--train-file", str(emt_data["slab_train"]),
                 "--test-file", str(emt_data["slab_test"]), "--source-test-file", str(emt_data["bulk_test"]),
                 "--methods", "full", "sparse_str-H-all", "--epochs", "6", "--patience", "2", "--ema",
                 "--lr-grid", "0.002", "0.02", "--seeds", "0", "1", "--cost-rounds", "2", "--no-memory",
                 "--out", str(out), "--finished-only"])
    assert code == 0
    partial = json.loads((out / "bench.json").read_text())
    assert "--finished-only" in partial["meta"]["partial"]
    case = partial["cases"][0]
    assert case["lr_selection"]["sparse_str-H-all"] == {"0.002": table["sparse_str-H-all"]["0.002"]}
    assert case["lr_selection"]["full"] == table["full"]
    kept = sorted((r["method"], r["seed"], r["lr"]) for r in case["runs"] if r["method"] != "zero-shot")
    full_lr = min((v, float(k)) for k, v in table["full"].items())[1]
    assert kept == [("full", 0, full_lr), ("full", 1, full_lr), ("sparse_str-H-all", 0, 0.002)]
    assert not any((d / "bench_run.json").exists() for d in runs_dir.glob("sparse_str-H-all_*")
                   if "_lr0.02_" in d.name or d.name.endswith("_seed1"))  # none of them was trained again
    assert "1" in case["reference"]  # seed 1's step-0 model from the one-epoch lr-0 run
    assert "Partial" in (out / "bench.md").read_text()


def test_watcher_waits_for_the_final_stop_and_finds_the_checkpoint_to_finish_from(tmp_path):
    from harness.pipeline.train import _final_stop, latest_checkpoint_epoch

    marker = bench_curve.STOP_LINE.encode()
    stage = b"x INFO: Stopping optimization after 3 epochs without improvement and starting Stage Two\n"
    assert not _final_stop(stage, marker)
    assert not _final_stop(b"x INFO: Stopping optimization after 3 epochs without impro", marker)  # still written
    assert _final_stop(stage + b"y INFO: Stopping optimization after 3 epochs without improvement\n", marker)
    assert latest_checkpoint_epoch(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    for name in ("m_run-0_epoch-4.pt", "m_run-0_epoch-12.pt"):
        (tmp_path / "checkpoints" / name).write_bytes(b"")
    assert latest_checkpoint_epoch(tmp_path) == 12
    (tmp_path / "checkpoints" / "m_run-0_epoch-9_swa.pt").write_bytes(b"")
    assert latest_checkpoint_epoch(tmp_path) == 9  # MACE's --restart_latest loads a stage-two checkpoint first


def test_stage_two_methods_continue_with_stage_one_settings():
    from mace.tools import build_default_arg_parser

    from mace_sparse.integration.arguments import add_sparse_arguments

    parser = add_sparse_arguments(build_default_arg_parser())
    case = _case(extra_flags=("--energy_weight", "1", "--forces_weight", "10"))
    settings = bench_methods.TrainSettings(epochs=100, lr=0.003, patience=15)
    methods = bench_methods.all_methods()
    rt = parser.parse_args(bench_methods.train_command(case, methods["sparse_str-B5-all-rt"], 0, settings, "x"))
    assert rt.swa and rt.start_swa == 100 and rt.max_num_epochs == 100 + bench_methods.STAGE_TWO_EPOCHS
    assert (rt.swa_lr, rt.swa_energy_weight, rt.swa_forces_weight) == (0.003, 1.0, 10.0)
    assert rt.sparse_retrain_support is True and rt.sparse_budget == 0.05
    s2 = parser.parse_args(bench_methods.train_command(case, methods["sparse_str-B5-all-s2"], 0, settings, "x"))
    assert s2.swa and s2.sparse_retrain_support is False
    plain = parser.parse_args(bench_methods.train_command(case, methods["sparse_str-B5-all"], 0, settings, "x"))
    assert not plain.swa and plain.max_num_epochs == 100


@pytest.mark.slow
def test_retrain_method_stops_in_stage_two_and_scores_the_stage_two_model(tmp_path, tiny_foundation, emt_data):
    """Stage one stops at patience, MACE jumps to stage two (the support is fixed), which stops at patience too;
    the stage-two model and delta are what the run returns."""
    from harness.pipeline.train import run_training

    case = BenchCase(task="t", label="t/x", foundation=tiny_foundation, train_file=emt_data["slab_train"],
                     test_file=emt_data["slab_test"], source_test_file=emt_data["bulk_test"], valid_fraction=0.2)
    settings = bench_methods.TrainSettings(epochs=4, lr=0.0, patience=1)
    method = bench_methods.all_methods()["sparse_str-B5-all-rt"]
    args = bench_methods.train_command(case, method, 0, settings, str(emt_data["slab_train"]))
    out = run_training(args, tmp_path / "run", patience=1, stage_two=True)
    assert out.ok and out.stopped_early and out.model.name == "model_stagetwo.model"
    assert out.delta is not None and out.delta.name == "model_stagetwo_sparse_delta.safetensors"
    log = bench_curve.run_log(tmp_path / "run")
    assert "starting Stage Two" in log and "support fixed" in log
    assert max(p["epoch"] for p in out.curve) < 4 + bench_methods.STAGE_TWO_EPOCHS


def test_secondary_methods_borrow_their_kinds_lr_and_run_fewer_seeds(tmp_path):
    """Mode full's design: only the tuned methods get the lr grid and every seed; the others take the lr chosen
    for their kind (else full's) and run the first seed(s) only; count_runs counts exactly what is planned."""
    from harness.pipeline.runner import BenchOptions, _plan, _tuning_plan, count_runs
    from harness.pipeline.tuning import borrowed_lrs

    names = ["zero-shot", "full", "lora", "lora-r16", "freeze", "sparse_str-B5-all", "sparse_str-B5-fisher"]
    options = BenchOptions(methods=bench_methods.select_methods(names), seeds=[0, 1, 2],
                           settings=bench_methods.TrainSettings(epochs=5, patience=2), out=tmp_path,
                           lr_grid=(0.003, 0.01, 0.03), tuned=("full", "lora", "sparse_str-B5-all"),
                           secondary_seeds=1)
    tuning = _tuning_plan(_case(), options, tmp_path / "train.xyz", tmp_path, tmp_path / "valid.xyz")
    assert sorted({j.method.name for j in tuning}) == ["full", "lora", "sparse_str-B5-all"]
    assert len(tuning) == 9 and {j.seed for j in tuning} == {0}
    chosen = {"full": 0.01, "lora": 0.03, "sparse_str-B5-all": 0.003}
    lenders = borrowed_lrs(options.methods, chosen, fallback=0.01)
    assert lenders == {"lora-r16": "lora", "freeze": "full", "sparse_str-B5-fisher": "sparse_str-B5-all"}
    assert (chosen["lora-r16"], chosen["freeze"], chosen["sparse_str-B5-fisher"]) == (0.03, 0.01, 0.003)
    jobs = _plan(_case(), options, tmp_path / "train.xyz", tmp_path, tmp_path / "valid.xyz", chosen)
    seeds = {}
    for job in jobs:
        seeds.setdefault(job.method.name, []).append(job.seed)
        assert job.args[job.args.index("--lr") + 1] == str(chosen[job.method.name])
    assert seeds == {"full": [0, 1, 2], "lora": [0, 1, 2], "sparse_str-B5-all": [0, 1, 2], "lora-r16": [0],
                     "freeze": [0], "sparse_str-B5-fisher": [0]}
    # 12 main runs + 9 tuning runs (the seed-0 main runs of the tuned methods reuse their tuning run)
    assert count_runs([_case()], options) == len(jobs) + len(tuning)
    assert borrowed_lrs(bench_methods.select_methods(["sparse_str-H-all"]), {}, fallback=0.01) == {
        "sparse_str-H-all": "grid"}


def test_variants_borrow_the_lr_of_the_method_they_vary_not_the_first_of_their_kind():
    """B5-all comes first among the sparse_str methods but a λ_τ variant must not take its lr (malonaldehyde:
    B5-all chose 0.003, where the λ_τ defaults stall); the budget variants take B5-all's; a borrower never lends."""
    from harness.pipeline.tuning import borrowed_lrs

    names = ["full", "paper-recipe", "sparse_str-B5-all", "sparse_str-B5-fisher", "sparse_str-B5-all-rt",
             "sparse_str-M-element", "sparse_str-M-noramp", "sparse_str-M-all", "sparse_str-H-all"]
    methods = bench_methods.select_methods(names)
    chosen = {"full": 0.003, "sparse_str-B5-all": 0.003, "sparse_str-M-all": 0.01}
    lenders = borrowed_lrs(methods, chosen, fallback=0.01)
    assert lenders == {"paper-recipe": "sparse_str-M-all", "sparse_str-B5-fisher": "sparse_str-B5-all",
                       "sparse_str-B5-all-rt": "sparse_str-B5-all", "sparse_str-M-element": "sparse_str-M-all",
                       "sparse_str-M-noramp": "sparse_str-M-all", "sparse_str-H-all": "sparse_str-M-all"}
    assert chosen["sparse_str-H-all"] == chosen["sparse_str-M-noramp"] == 0.01
    assert chosen["sparse_str-B5-fisher"] == 0.003
    # the variant's own base not run: the first tuned method of its kind, then full's, never another borrower
    only_b5 = {"full": 0.03, "sparse_str-B5-all": 0.003}
    assert borrowed_lrs(methods, only_b5, fallback=0.01)["sparse_str-H-all"] == "sparse_str-B5-all"
    no_sparse = {"full": 0.03}
    assert set(borrowed_lrs(methods, no_sparse, fallback=0.01).values()) == {"full"}
    # the no-ramp variant is the defaults with δ started at the fixed point of the scores' decay, sigmoid(0)
    flags = next(m.flags for m in methods if m.name == "sparse_str-M-noramp")
    assert dict(zip(flags[::2], flags[1::2]))["--sparse_init_threshold"] == "0.5"


def test_plan_lists_the_full_modes_design_without_training(capsys, tmp_path):
    from mace_sparse.cli import main

    code = main(["bench", "--plan", "--tasks", "rmd17", "--cases", "aspirin/N=50", "--out", str(tmp_path / "b")])
    assert code == 0
    text = capsys.readouterr().out
    assert "  tuning, seed 0, lr [0.003, 0.01, 0.03]: full, lora, sparse_str-B5-all, sparse_str-M-all" in text
    assert "  full: seeds [0, 1, 2]\n" in text and "  sparse_str-B5-fisher: seeds [0] (lr borrowed)\n" in text
    # 4 tuned × 3 lr + 4 tuned × 3 seeds + 6 secondary × 1 seed
    assert text.rstrip().endswith("finished runs are reused)") and "\n30 mace_run_train runs in all" in text
    assert not (tmp_path / "b").exists()  # nothing written, nothing trained
    # a --methods subset keeps the design: the secondary method named borrows its kind's lr and runs seed 0 ...
    assert main(["bench", "--plan", "--tasks", "rmd17", "--cases", "aspirin/N=50", "--out", str(tmp_path / "b"),
                 "--methods", "full", "sparse_str-B5-all", "sparse_str-B5-fisher"]) == 0
    text = capsys.readouterr().out
    assert "  tuning, seed 0, lr [0.003, 0.01, 0.03]: full, sparse_str-B5-all\n" in text
    assert "  sparse_str-B5-fisher: seeds [0] (lr borrowed)\n" in text
    # ... and an explicit --lr-grid tunes every method named alike, on every seed
    assert main(["bench", "--plan", "--tasks", "rmd17", "--cases", "aspirin/N=50", "--out", str(tmp_path / "b"),
                 "--methods", "full", "sparse_str-B5-fisher", "--lr-grid", "0.003", "0.01"]) == 0
    text = capsys.readouterr().out
    assert "  tuning, seed 0, lr [0.003, 0.01]: full, sparse_str-B5-fisher\n" in text
    assert "  sparse_str-B5-fisher: seeds [0, 1, 2]\n" in text


def test_bench_records_the_commit_it_ran_from():
    import subprocess

    from harness.cli.bench import source_commit

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert head and source_commit().split()[0] == head
