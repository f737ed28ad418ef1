"""The bundled foundations: files present and small, loadable as MACE models, names resolved, and accurate on
their own held-out source test split (force MAE bounds taken from the cards, with margin)."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
import torch

import mace  # noqa: F401  (before e3nn)
from mace_sparse import foundations
from harness.pipeline.evaluate import errors

ELEMENTS = {"organic": {1, 6, 7, 8}, "inorganic": {13, 29, 28, 26, 27, 25, 8}}
DATA = {name: foundations._HERE.parent / "data" / name / "test.xyz" for name in foundations.NAMES}
#: Force MAE (meV/Å) on the 3 test configurations with the largest forces (all rattled cells) must stay below
#: these. Measured: full test split 95.2 (organic) and 57.4 (inorganic) in the cards; these 3 configurations 169
#: and 223, against mean |F| of 2048 and 1206. The bounds leave room for platform round-off but fail for a
#: broken or wrongly bundled model.
FORCE_MAE_BOUND = {"organic": 300.0, "inorganic": 400.0}


@pytest.mark.parametrize("name", foundations.NAMES)
def test_bundled_file_is_a_small_mace_model_with_its_elements(name):
    path = foundations.path(name)
    assert path.is_file() and path.stat().st_size <= 2_000_000
    model = torch.load(path, map_location="cpu", weights_only=False)
    assert type(model).__name__ in {"MACE", "ScaleShiftMACE"}
    assert {int(z) for z in model.atomic_numbers} == ELEMENTS[name]
    assert (path.with_suffix(".md")).is_file()


def test_resolve_maps_prefixed_names_and_passes_other_strings_through():
    assert foundations.resolve("mace_sparse:organic") == str(foundations.path("organic"))
    assert foundations.resolve("mace_sparse:inorganic") == str(foundations.path("inorganic"))
    assert foundations.resolve("small") == "small"
    assert foundations.resolve("/some/where/model.model") == "/some/where/model.model"


def test_unknown_name_is_a_one_line_value_error_naming_the_valid_ones():
    with pytest.raises(ValueError, match="organic, inorganic") as info:
        foundations.resolve("mace_sparse:nope")
    assert "\n" not in str(info.value) and "'nope'" in str(info.value)
    with pytest.raises(ValueError):
        foundations.path("medium")


def test_missing_file_is_reported_with_the_rebuild_command(monkeypatch, tmp_path):
    monkeypatch.setattr(foundations, "_HERE", tmp_path)
    with pytest.raises(FileNotFoundError, match="pretrain organic"):
        foundations.path("organic")


def _hardest(frames, n):
    """The ``n`` frames with the largest mean |F|: near-equilibrium cells would make the zero-force check trivial."""
    return sorted(frames, key=lambda a: -float(np.abs(a.arrays["REF_forces"]).mean()))[:n]


@pytest.mark.parametrize("name", foundations.NAMES)
def test_zero_shot_force_error_on_own_test_split(name):
    frames = _hardest(ase.io.read(DATA[name], ":"), 3)
    result = errors(str(foundations.path(name)), frames)
    assert result["forces_mae_mev_per_A"] < FORCE_MAE_BOUND[name]
    # and far better than predicting zero forces (the labels' mean |F| on these frames)
    zero_force_mae = 1000 * np.mean(np.concatenate([np.abs(a.arrays["REF_forces"]).ravel() for a in frames]))
    assert result["forces_mae_mev_per_A"] < 0.5 * zero_force_mae


def test_mace_run_train_resolves_bundled_names(tmp_path):
    """``--foundation_model mace_sparse:<name>`` reaches MACE as the bundled file; a wrong name is one line."""
    from types import SimpleNamespace

    from mace_sparse.integration.validation import resolve_bundled_foundation

    args = SimpleNamespace(foundation_model="mace_sparse:inorganic")
    resolve_bundled_foundation(args)
    assert args.foundation_model == str(foundations.path("inorganic"))
    args = SimpleNamespace(foundation_model="small")  # MACE's own names pass through untouched
    resolve_bundled_foundation(args)
    assert args.foundation_model == "small"
    with pytest.raises(SystemExit, match="--foundation_model: unknown bundled foundation 'metals'; valid names: organic, inorganic"):
        resolve_bundled_foundation(SimpleNamespace(foundation_model="mace_sparse:metals"))


@pytest.mark.parametrize("name", foundations.BENCHMARK_SCALE)
def test_benchmark_scale_names_resolve_or_say_how_to_build_them(name):
    if (foundations._HERE / f"{name}.model").is_file():
        assert foundations.resolve(f"mace_sparse:{name}").endswith(f"{name}.model")
    else:
        with pytest.raises(FileNotFoundError, match=f"python -m harness.pretrain {name}"):
            foundations.resolve(f"mace_sparse:{name}")


@pytest.mark.parametrize("name", foundations.BENCHMARK_SCALE)
def test_bundled_benchmark_scale_foundation_is_real_scale_and_converged(name):
    """Once bundled, a benchmark-scale foundation is a real MACE of ≥ 150k parameters whose card says converged
    and names the count it has (the pretraining copies it only after the convergence test passed)."""
    if not (foundations._HERE / f"{name}.model").is_file():
        pytest.skip(f"{name} is still pretraining (python -m harness.pretrain {name})")
    from mace_sparse.mace_io import load_trusted_model

    model = load_trusted_model(foundations.path(name))
    count = sum(p.numel() for p in model.parameters())
    assert count >= 150_000 and type(model).__name__ == "ScaleShiftMACE"
    card = (foundations._HERE / f"{name}.md").read_text()
    assert "| status | converged |" in card and f"| parameters | {count} |" in card
