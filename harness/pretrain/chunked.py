"""Pretrain the benchmark-scale foundations ``organic-s`` and ``inorganic-s`` to convergence, resumably.

``python -m harness.pretrain organic-s|inorganic-s [--chunk-epochs 5] [--max-epochs 300] [--hours H]``
(:mod:`harness.pretrain` dispatches the benchmark-scale names here)

Plain ``mace_run_train`` (the mace_sparse start-up hook is off, ``MACE_SPARSE_DISABLE=1``) in a persistent work
directory ``harness/foundations/<name>/``, always with ``--restart_latest``: the run goes in chunks of
``--chunk-epochs`` epochs, each chunk resuming from MACE's latest checkpoint, and after every chunk the
convergence test is applied to the validation curve logged so far. Kill it at any time and run the same command
again: it continues from the last checkpoint (MACE writes one whenever the validation loss improves, with the
EMA weights, optimizer and scheduler state). ``--hours`` stops cleanly after the chunk that crosses the budget.

The learning rate follows MACE's ReduceLROnPlateau within a chunk and a step schedule between chunks
(``lr_steps`` of :data:`SPECS`): at the first chunk boundary at or after each step's epoch the learning rate
stored in the checkpoint to resume from is lowered to the step's value (never raised; Adam's moments are kept).
MACE's plateau test alone never fired here: with a relative threshold of 1e-4 every noisy new best resets it, and
the runs sat at lr 0.01 for 55+ epochs while still improving about 1 % per epoch. The steps were placed so that
pretraining ends within the CPU time left (first set to 0.003/0.001/0.0003 eight epochs apart, then compressed to
four or five epochs apart on 2026-12-01 so that the benchmark can start); the convergence test below is applied
unchanged.

Converged means: the best validation force MAE improved by less than :data:`CONVERGED_GAIN` (2 %) over the last
:data:`TAIL` (20 %) of the epochs run, after at least :data:`MIN_EPOCHS`. When it is, the EMA model of the best
epoch is copied to ``mace_sparse/foundations/<name>.model`` and the card ``<name>.md`` (data, command, wall
time, parameter count, source test errors, learning curve and its PNG) is written. ``--card-only`` rewrites the
card from the work directory (also before convergence, marked as such).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from harness.pipeline.curve import latest_checkpoint_epoch, parse_curve, run_log
from mace_sparse.training import run_mace_train

ROOT = Path(__file__).resolve().parent.parent.parent
DATA = ROOT / "harness" / "data"
WORK = ROOT / "harness" / "foundations"
BUNDLE = ROOT / "mace_sparse" / "foundations"
SEED = 1
CONVERGED_GAIN = 0.02
TAIL = 0.2
MIN_EPOCHS = 30

#: Shapes of real foundations, cut to what 2 CPU cores can pretrain: organic-s is the MACE-OFF23-small shape
#: (96x0e, max_L 0, correlation 3, 2 interactions, radial MLP [64,64,64], r_max 4.5 Å, max_ell 3); inorganic-s a
#: MACE-MP-0-small-like shape (64x0e instead of 128x0e, r_max 5 Å instead of 6: the neighbour count of dense
#: oxides sets the cost). Both ScaleShiftMACE with MACE's default residual interaction blocks.
SPECS: Dict[str, Dict] = {
    "organic-s": {
        "data": DATA / "organic_s",
        "generator": "python -m harness.data.organic_s",
        "labeler": "GFN2-xTB (tblite 0.8, neutral closed shell)",
        "elements": "H, C, N, O",
        "stand_in_for": "MACE-OFF23-small",
        "arch": ["--num_channels", "96", "--max_L", "0", "--max_ell", "3", "--r_max", "4.5",
                 "--num_radial_basis", "8", "--radial_MLP", "[64,64,64]"],
        "loss": ["--loss", "weighted", "--energy_weight", "1", "--forces_weight", "10"],
        "note": "Trained on energies and forces of molecules (no periodic cells, no stress).",
        "lr_steps": [(59, 0.003), (63, 0.001), (67, 0.0003)],
    },
    "inorganic-s": {
        "data": DATA / "inorganic_s",
        "generator": "python -m harness.data.inorganic_s",
        "labeler": "CHGNet 0.3.0 (chgnet 0.4.2 wheel), a surrogate of Materials Project PBE/PBE+U",
        "elements": "Al, Cu, Ni, Fe, Co, Mn, O",
        "stand_in_for": "MACE-MP-0-small",
        "arch": ["--num_channels", "64", "--max_L", "0", "--max_ell", "3", "--r_max", "5.0",
                 "--num_radial_basis", "10", "--radial_MLP", "[64,64,64]"],
        "loss": ["--loss", "stress", "--stress_key", "REF_stress", "--energy_weight", "1", "--forces_weight", "10",
                 "--stress_weight", "100"],
        "note": "Trained on energies, forces and stress; CHGNet's moments (`REF_magmoms`) are not trained on.",
        "lr_steps": [(28, 0.003), (33, 0.001), (38, 0.0003)],
    },
}

COMMON = [
    "--model", "MACE", "--num_interactions", "2", "--correlation", "3",
    "--energy_key", "REF_energy", "--forces_key", "REF_forces", "--E0s", "average", "--default_dtype", "float32",
    "--device", "cpu", "--batch_size", "8", "--valid_batch_size", "32", "--valid_fraction", "0.1", "--lr", "0.01",
    "--scheduler", "ReduceLROnPlateau", "--lr_factor", "0.6", "--scheduler_patience", "4",
    "--ema", "--ema_decay", "0.99", "--error_table", "PerAtomMAE", "--plot", "False", "--seed", str(SEED),
    "--restart_latest",
]


def command(name: str, max_epochs: int) -> List[str]:
    """The ``mace_run_train`` command of one chunk (run inside the work directory)."""
    spec = SPECS[name]
    return ["mace_run_train", "--name", name, "--train_file", str(spec["data"] / "train.xyz"),
            "--max_num_epochs", str(max_epochs), *COMMON, *spec["arch"], *spec["loss"]]


def curve(work: Path) -> List[Tuple[int, float]]:
    """(epoch, validation force MAE in meV/Å) over every chunk; a re-run epoch keeps its latest value.

    MACE's own log (appended by every chunk, flushed per line) when there is one; else the console log.
    """
    console = work / "command.log"
    text = run_log(work) or (console.read_text(errors="replace") if console.is_file() else "")
    return [(int(p["epoch"]), p["mae_f"]) for p in parse_curve(text) if "mae_f" in p]


def convergence(points: List[Tuple[int, float]]) -> Dict:
    """The test of the module docstring on the best-so-far curve; returns its numbers and the verdict."""
    if not points:
        return {"epochs": 0, "converged": False, "tail_gain": None}
    epochs = points[-1][0] + 1
    cut = int(round((1 - TAIL) * epochs))
    best_before = min((v for e, v in points if e < cut), default=float("inf"))
    best_all = min(v for _, v in points)
    gain = (best_before - best_all) / best_before if best_before < float("inf") else 1.0
    return {"epochs": epochs, "best_mae_f": best_all, "best_before_tail": best_before, "tail_gain": gain,
            "converged": epochs >= MIN_EPOCHS and gain < CONVERGED_GAIN}


def scheduled_lr(done: int, steps: List[Tuple[int, float]]) -> Optional[float]:
    """The learning rate the step schedule asks for once ``done`` epochs are logged (None before the first step)."""
    reached = [lr for epoch, lr in sorted(steps) if done >= epoch]
    return reached[-1] if reached else None


def chunk_end(done: int, chunk: int, max_epochs: int, steps: List[Tuple[int, float]]) -> int:
    """``--max_num_epochs`` of the next chunk: it stops at the next schedule step so the step lands on time."""
    ahead = [epoch for epoch, _ in steps if epoch > done]
    return min([done + chunk, max_epochs, *ahead])


def lower_lr(checkpoint: Path, lr: float) -> Optional[float]:
    """Lower the learning rate stored in a MACE checkpoint to ``lr`` (in place, atomically); return the old one.

    Every optimizer group and the scheduler's ``_last_lr`` get ``min(current, lr)``, so a reduction MACE's own
    plateau scheduler already made is kept; the plateau counters restart, the moments of Adam are untouched.
    Returns None (and writes nothing) when nothing was above ``lr``.
    """
    import torch  # only when a step is due

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)  # our own checkpoint, not user input
    groups = state["optimizer"]["param_groups"]
    old = max(g["lr"] for g in groups)
    if old <= lr:
        return None
    for group in groups:
        group["lr"] = min(group["lr"], lr)
    scheduler = state.get("lr_scheduler") or {}
    if "_last_lr" in scheduler:
        scheduler["_last_lr"] = [g["lr"] for g in groups]
    for counter in ("num_bad_epochs", "cooldown_counter"):
        if counter in scheduler:
            scheduler[counter] = 0
    tmp = checkpoint.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(checkpoint)
    return old


def latest_checkpoint(work: Path) -> Optional[Path]:
    """The checkpoint ``--restart_latest`` resumes from (:func:`harness.pipeline.curve.latest_checkpoint_epoch`)."""
    epoch = latest_checkpoint_epoch(work)
    return None if epoch is None else next((work / "checkpoints").glob(f"*_epoch-{epoch}.pt"))


def apply_schedule(work: Path, done: int, steps: List[Tuple[int, float]]) -> None:
    """Lower the resumed checkpoint's lr to the schedule's value and record it in ``lr_schedule.log``."""
    lr = scheduled_lr(done, steps)
    checkpoint = latest_checkpoint(work)
    if lr is None or checkpoint is None:
        return
    old = lower_lr(checkpoint, lr)
    if old is not None:
        line = f"after {done} epochs: lr {old:g} -> {lr:g} in {checkpoint.name}"
        with (work / "lr_schedule.log").open("a") as log:
            log.write(line + "\n")
        print(line, flush=True)


def _converged_now(line: str, work: Path, settle_s: float = 20.0) -> bool:
    """On an epoch line: has the curve converged? If so, wait ``settle_s`` so that MACE finishes writing that
    epoch's checkpoint (it saves right after logging) before the chunk is stopped."""
    if "INFO: Epoch" not in line or not convergence(curve(work))["converged"]:
        return False
    time.sleep(settle_s)
    return True


def _model_is_stale(work: Path, name: str) -> bool:
    """True when MACE's ``<name>.model`` is missing or older than the checkpoint it should come from."""
    model, checkpoint = work / f"{name}.model", latest_checkpoint(work)
    return checkpoint is not None and (not model.is_file() or model.stat().st_mtime < checkpoint.stat().st_mtime)


def finish(name: str, work: Path, env: Dict[str, str]) -> None:
    """Write ``<name>.model`` from the latest (= best) checkpoint without training: ``--restart_latest`` with
    ``--max_num_epochs`` at the checkpoint's epoch, so MACE's loop is empty and only its final evaluation and
    save run (a chunk stopped on convergence never reached them)."""
    checkpoint, epoch = latest_checkpoint(work), latest_checkpoint_epoch(work)
    base = _wall(work)
    run = run_mace_train(command(name, epoch)[1:], work, plugin=False, env_extra=env, append=True)
    (work / "wall_s.txt").write_text(f"{base + run.wall_s:.1f}\n")
    if run.returncode != 0 or _model_is_stale(work, name):
        sys.exit(f"error: writing {name}.model from {checkpoint.name} failed; see {work / 'command.log'}")


def _wall(work: Path) -> float:
    f = work / "wall_s.txt"
    return float(f.read_text()) if f.is_file() else 0.0


def run_chunks(name: str, chunk: int, max_epochs: int, hours: Optional[float], threads: int) -> Dict:
    """Run chunks until converged, the epoch cap or the time budget; return the convergence verdict."""
    spec = SPECS[name]
    if not (spec["data"] / "train.xyz").is_file():
        sys.exit(f"error: {spec['data'] / 'train.xyz'} is missing; make it first with '{spec['generator']}'")
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    env = {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    started = time.time()
    while True:
        state = convergence(curve(work))
        done = state["epochs"]
        if state["converged"] or done >= max_epochs:
            if _model_is_stale(work, name):
                finish(name, work, env)
            return state
        if hours is not None and time.time() - started > hours * 3600:
            print(f"time budget of {hours} h used; run the same command again to continue", flush=True)
            return state
        apply_schedule(work, done, spec.get("lr_steps", []))
        cmd = command(name, chunk_end(done, chunk, max_epochs, spec.get("lr_steps", [])))
        print(f"$ {' '.join(cmd)}", flush=True)
        base, written = _wall(work), [0.0]

        def keep_wall(elapsed: float) -> None:  # the wall time is kept current, so a killed chunk still counts
            if elapsed - written[0] >= 30:
                (work / "wall_s.txt").write_text(f"{base + elapsed:.1f}\n")
                written[0] = elapsed

        run = run_mace_train(cmd[1:], work, plugin=False, env_extra=env, append=True, on_poll=keep_wall,
                             on_line=lambda line: _converged_now(line, work))
        (work / "wall_s.txt").write_text(f"{base + run.wall_s:.1f}\n")
        if run.stopped:  # converged within the chunk: stopped at once, the model is written by finish()
            print("converged during the chunk; stopped it", flush=True)
            continue
        if run.returncode != 0:
            sys.exit(f"error: mace_run_train failed ({run.returncode}); see {work / 'command.log'}")
        after = convergence(curve(work))
        print(json.dumps({k: after[k] for k in ("epochs", "best_mae_f", "tail_gain", "converged")}), flush=True)
        if after["epochs"] <= done:
            sys.exit(f"error: no epoch was added by the last chunk; see {work / 'command.log'}")


def _plot(points: List[Tuple[int, float]], out: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([e for e, _ in points], [v for _, v in points], lw=1.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation force MAE (meV/Å)")
    ax.set_yscale("log")
    ax.set_title(f"{name} pretraining (EMA weights)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def write_card(name: str, state: Dict) -> Dict:
    """Copy the latest model into the package (if converged) and write the card and its learning-curve PNG."""
    import ase.io

    from harness.pipeline.evaluate import errors  # torch and MACE: only for the card
    from mace_sparse.mace_io import load_trusted_model  # torch: only for the card

    spec, work = SPECS[name], WORK / name
    model = work / f"{name}.model"
    if state["converged"] and model.is_file():
        shutil.copyfile(model, BUNDLE / f"{name}.model")
    points = curve(work)
    _plot(points, BUNDLE / f"{name}_curve.png", name)
    bundled = BUNDLE / f"{name}.model"
    test_frames = ase.io.read(spec["data"] / "test.xyz", ":")
    source = model if model.is_file() else bundled
    # before convergence the work directory's .model is the one of the last finished chunk, older than the curve:
    # its test errors would not describe the pretraining shown, so they wait for the converged model
    test = errors(str(source), test_frames) if state["converged"] and source.is_file() else None
    n_params = (sum(p.numel() for p in load_trusted_model(source).parameters())
                if source.is_file() else None)
    n_train = len(ase.io.read(spec["data"] / "train.xyz", ":"))
    status = ("converged" if state["converged"] else "**not yet converged** (pretraining still under way; "
              "re-run the command below to continue)")
    sampled = points[:: max(1, len(points) // 12)]
    sampled += [p for p in points[-1:] if p not in sampled]
    rows = "\n".join(f"| {e} | {v:.1f} |" for e, v in sampled)
    test_row = (f"| test | {test['n_configs']} | {test['energy_mae_mev_per_atom']:.1f} | "
                f"{test['forces_mae_mev_per_A']:.1f} | {test['forces_rmse_mev_per_A']:.1f} |") if test else "| test | – | measured once converged | – | – |"
    gain = f"{100 * state['tail_gain']:.2f} %" if state.get("tail_gain") is not None else "–"
    steps = ", ".join(f"({e}, {lr:g})" for e, lr in spec.get("lr_steps", [])) or "(none)"
    log = work / "lr_schedule.log"
    schedule_log = log.read_text().strip() if log.is_file() else "(no step applied yet)"
    text = f"""# Benchmark foundation `{name}`

A {spec['stand_in_for']}-shaped MACE pretrained here with the real `mace_run_train` (mace-torch 0.3.16), for the
benchmarks (issue: a regime like the users'), not for production. Use it as `--foundation_model mace_sparse:{name}`.

| | |
|---|---|
| status | {status} |
| elements | {spec['elements']} |
| labels | {spec['labeler']} |
| source data | `{(spec['data'] / 'train.xyz').relative_to(ROOT)}` ({n_train} configs, 10 % held out by MACE for validation), made by `{spec['generator']}` |
| source test split | `{(spec['data'] / 'test.xyz').relative_to(ROOT)}` ({len(test_frames)} configs, never trained on) |
| parameters | {n_params if n_params else "– (counted from the first model a finished chunk saves)"} |
| epochs run | {state['epochs']} (best validation force MAE {state.get('best_mae_f', float('nan')):.1f} meV/Å) |
| convergence test | best validation force MAE gained {gain} over the last {int(TAIL * 100)} % of epochs (converged: < {int(CONVERGED_GAIN * 100)} %, ≥ {MIN_EPOCHS} epochs) |
| pretraining wall time | {_wall(work) / 3600:.2f} h of `mace_run_train` on 1 CPU thread of a shared 2-core machine |
| seed | {SEED} |

{spec['note']}

## Source test errors (`harness.pipeline.evaluate`, float64)

| split | configs | energy MAE (meV/atom) | force MAE (meV/Å) | force RMSE (meV/Å) |
|---|---|---|---|---|
{test_row}

## Learning curve (validation force MAE of the EMA weights, as logged by `mace_run_train`)

![curve]({name}_curve.png)

| epoch | MAE_F (meV/Å) |
|---|---|
{rows}

## Command

`python -m harness.pretrain {name}` runs, in `harness/foundations/{name}/`, chunks of

```
{' '.join(command(name, state['epochs'])).replace(str(ROOT) + '/', '')}
```

with `--max_num_epochs` raised by the chunk size each time (`MACE_SPARSE_DISABLE=1 OMP_NUM_THREADS=1`).
Learning rate: 0.01 with MACE's ReduceLROnPlateau inside each chunk, lowered between chunks by the step schedule
{steps} (epoch, lr); what was applied, from `harness/foundations/{name}/lr_schedule.log`:

```
{schedule_log}
```
"""
    (BUNDLE / f"{name}.md").write_text(text)
    summary = {"name": name, **state, "n_params": n_params, "test": test, "wall_s": _wall(work)}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(SPECS))
    parser.add_argument("--chunk-epochs", type=int, default=5, help="epochs per resumable chunk")
    parser.add_argument("--max-epochs", type=int, default=300, help="hard cap (the convergence test should stop first)")
    parser.add_argument("--hours", type=float, default=None, help="stop after the chunk that crosses this budget")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads of mace_run_train")
    parser.add_argument("--card-only", action="store_true", help="only rewrite the card from the work directory")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    state = (convergence(curve(WORK / args.name)) if args.card_only else
             run_chunks(args.name, args.chunk_epochs, args.max_epochs, args.hours, args.threads))
    print(json.dumps(write_card(args.name, state), indent=2), flush=True)


if __name__ == "__main__":
    main()
