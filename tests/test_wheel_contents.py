"""The wheel holds the runtime only: the method, the MACE integration, artifacts, magnetism, the user CLI, the
bundled foundations and data; the research harness (benchmarks, data generators, pretraining, results) stays in
the repository. Built offline from this checkout (hatchling, no build isolation: about a second)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: modules a user runs (each must ship)
RUNTIME = [
    "mace_sparse/__init__.py", "mace_sparse/_bootstrap.py", "mace_sparse/config.py", "mace_sparse/sparse_model.py",
    "mace_sparse/reparametrization.py", "mace_sparse/optim.py", "mace_sparse/training.py", "mace_sparse/mace_io.py",
    "mace_sparse/data/__init__.py", "mace_sparse/foundations/__init__.py",
    "mace_sparse/cli/__init__.py", "mace_sparse/cli/apply.py", "mace_sparse/cli/revert.py",
    "mace_sparse/cli/report.py", "mace_sparse/cli/predict.py", "mace_sparse/cli/quickstart.py",
    "mace_sparse/cli/harness_shim.py", "mace_sparse/cli/bench.py", "mace_sparse/cli/calibrate.py",
    "mace_sparse/cli/bench_magnetic.py", "mace_sparse/cli/bench_step.py", "mace_sparse.pth",
]
#: bundled files: the foundations (model + card) and the data the quick start and the tutorials read
BUNDLED = [
    *(f"mace_sparse/foundations/{name}.{ext}" for name in ("organic", "inorganic") for ext in ("model", "md")),
    *(f"mace_sparse/data/emt/{part}.xyz" for part in ("bulk_train", "bulk_test", "slab_train", "slab_test")),
    "mace_sparse/data/rmd17_like/aspirin_train.xyz", "mace_sparse/data/rmd17_like/README.md",
    "mace_sparse/data/magnetic_oxides/train.xyz", "mace_sparse/data/magnetic_oxides/test.xyz",
]
#: words that name harness code: none of them may appear in a shipped module's path
HARNESS = ("bench_runner", "bench_table", "bench_train", "bench_tasks", "bench_methods", "bench_eval",
           "calibration", "evaluation", "pretrain", "emt_data", "organic_data", "inorganic_data", "rmd17_dft",
           "magnetic_dft", "_xtb_sampling", "_chgnet_label", "_split", "step_cost", "bench_cost")


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> list:
    pytest.importorskip("hatchling", reason="the build backend (pip install hatchling) builds the wheel offline")
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = out.glob("mace_sparse-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_runtime_modules_and_bundled_files_ship(wheel_files):
    missing = [f for f in RUNTIME + BUNDLED if f not in wheel_files]
    assert not missing, missing


def test_no_harness_in_the_wheel(wheel_files):
    top = {f.split("/")[0] for f in wheel_files}
    assert "harness" not in top and "tests" not in top and "tutorials" not in top, sorted(top)
    assert not [f for f in wheel_files if f.startswith(("mace_sparse/benchmarks/", "mace_sparse/results"))]
    modules = [f for f in wheel_files if f.endswith(".py")]
    harness_like = [f for f in modules if any(word in Path(f).stem for word in HARNESS)]
    assert not harness_like, harness_like
    # the data folder ships files and one accessor, no generator
    assert [f for f in modules if f.startswith("mace_sparse/data/")] == ["mace_sparse/data/__init__.py"]
    assert not [f for f in wheel_files if f.endswith((".json", ".png")) and "/results" in f]


def test_harness_commands_without_the_harness_exit_2_with_the_fix(tmp_path):
    """The shims of bench / calibrate / bench-magnetic / bench-step in an interpreter that cannot import
    ``harness``."""
    code = ("import sys; sys.modules['harness'] = None\n"  # what an installed wheel sees: no harness package
            "from mace_sparse.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    for command in (["bench", "--quick", "--out", str(tmp_path)], ["calibrate"], ["bench-magnetic", "--quick"],
                    ["bench-step", "--rounds", "3"]):
        proc = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 2, (command, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"mace_sparse {command[0]}: error: needs a checkout")
        assert "pip install -e ." in lines[0]
    listing = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert listing.returncode == 0 and "bench-magnetic" in listing.stdout and "needs a checkout" in listing.stdout
