"""sparse_str on an architecture twin of every foundation family MACE 0.3.16 names (table: foundation_twins.py).

For every twin: all of what MACE would train is adapted; step 0 is the twin bit for bit; the merged model is
plain MACE (same classes, state-dict keys and shapes, a pickle without this package); E(3) equivariance of
energy, forces and stress holds after nonzero ΔW in every adapted tensor; the delta file round-trips.
"""

from __future__ import annotations

import copy
import io

import mace  # noqa: F401  (before e3nn)
import numpy as np
import pytest
import torch

from conftest import random_orthogonal
from foundation_twins import TWINS, build_twin, twin_batch, twin_structures
from mace_sparse import SparseConfig, get_sparse_model, merge_and_unload
from mace_sparse import reparametrization as rp
from mace_sparse.artifacts.delta_file import apply_delta, changed_mask, load_delta, revert_delta, save_delta
from mace_sparse.config import TARGET_KINDS
from mace_sparse.coverage import coverage_of
from mace_sparse.mace_groups import mace_optimised_parameters

REL = 1e-10

pytestmark = pytest.mark.usefixtures("fast_deterministic_torch")


def predict(model, batch):
    model.eval()
    out = model(dict(batch), training=False, compute_force=True, compute_stress=True)
    return {k: out[k].detach() for k in ("energy", "forces", "stress")}


def perturb_every_delta(sparse, seed=7):
    """Nonzero ΔW on a random half of the entries (at least one) of every adapted tensor, well past δ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for qualified, owner, name in rp.iter_reparametrized(sparse):
            delta = owner._parameters[rp.DELTA.format(name)]
            mask = torch.rand(delta.shape, generator=g) < 0.5
            mask.view(-1)[0] = True
            values = torch.randn(delta.shape, generator=g, dtype=delta.dtype) * 0.05
            delta.copy_(torch.where(mask, values + 0.01 * torch.sign(values), 0.0))
            assert torch.count_nonzero(rp.effective_delta(owner, name)) > 0, qualified


@pytest.fixture(scope="module", params=TWINS, ids=[t.name for t in TWINS])
def case(request, fast_deterministic_torch):
    twin = request.param
    model = build_twin(twin)
    sparse = get_sparse_model(copy.deepcopy(model), SparseConfig(targets=TARGET_KINDS, granularity="path"))
    step0 = predict(sparse, twin_batch(model, twin, twin_structures(twin)))
    perturb_every_delta(sparse)
    merged = merge_and_unload(copy.deepcopy(sparse))
    return {"twin": twin, "model": model, "sparse": sparse, "merged": merged, "step0": step0,
            "structures": twin_structures(twin)}


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and not bool(changed_mask(sa[k], sb[k]).any())
        for k in sa
    )


def module_classes(model):
    # fx GraphModules get a fresh class per instance (and per deepcopy): compare classes by name
    return [(n, f"{type(m).__module__}.{type(m).__qualname__}") for n, m in model.named_modules()]


def assert_rel(a, b, rel=REL):
    err, scale = float((a - b).abs().max()), float(b.abs().max())
    assert err <= rel * max(scale, 1e-12), f"max deviation {err:.3e} vs scale {scale:.3e}"


def test_all_means_every_parameter_mace_would_train(case):
    model, sparse = case["model"], case["sparse"]
    names = [n for n, _ in model.named_parameters()]
    optimised = mace_optimised_parameters(model)
    assert optimised is not None and sorted(optimised) == sorted(names)  # a random build: MACE trains them all
    coverage = coverage_of(model, TARGET_KINDS)
    assert coverage.frozen == [] and coverage.frozen_line() is None
    assert coverage.adapted_total == coverage.trainable == sum(p.numel() for p in model.parameters())
    assert coverage.share_line().startswith(f"sparse_str adapts 100.0% of the {coverage.trainable:,} parameters")
    assert sorted(q for q, _, _ in rp.iter_reparametrized(sparse)) == sorted(names)
    # only latent deltas and threshold scores train
    trainable = [n for n, p in sparse.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("_delta", "_threshold_score")) for n in trainable)


def test_step0_is_the_twin_bit_for_bit(case):
    reference = predict(case["model"], twin_batch(case["model"], case["twin"], case["structures"]))
    for key, value in case["step0"].items():
        assert torch.equal(value, reference[key]), key


def test_merged_model_is_plain_mace_and_equals_the_training_model(case):
    model, sparse, merged, twin = case["model"], case["sparse"], case["merged"], case["twin"]
    assert type(merged) is type(model)
    assert module_classes(merged) == module_classes(model)
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert list(merged.state_dict()) == list(model.state_dict())
    buffer = io.BytesIO()
    torch.save(merged, buffer)
    assert b"mace_sparse" not in buffer.getvalue()  # loads where the plugin is not installed
    loaded = torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=False)
    batch = twin_batch(model, twin, case["structures"])
    out_sparse, out_loaded, out_model = predict(sparse, batch), predict(loaded, batch), predict(model, batch)
    for key in out_sparse:
        assert_rel(out_loaded[key], out_sparse[key], 1e-12)
    assert float((out_loaded["energy"] - out_model["energy"]).abs().max()) > 1e-8  # the deltas changed it


@pytest.mark.parametrize("which", ["sparse", "merged"])
def test_e3_equivariance_of_energy_forces_stress(case, which):
    model, twin = case[which], case["twin"]
    q = random_orthogonal(-1, seed=3)  # a rotation times a reflection
    shift = np.array([0.731, -1.234, 2.5])
    moved = []
    for atoms in case["structures"]:
        a = atoms.copy()
        a.set_cell(np.asarray(a.cell) @ q.T, scale_atoms=False)
        a.positions = a.positions @ q.T + shift
        moved.append(a)
    out = predict(model, twin_batch(model, twin, case["structures"]))
    out_moved = predict(model, twin_batch(model, twin, moved))
    qt = torch.as_tensor(q)
    assert_rel(out_moved["energy"], out["energy"])
    assert_rel(out_moved["forces"], out["forces"] @ qt.T)
    assert_rel(out_moved["stress"], qt @ out["stress"] @ qt.T)
    assert float((out_moved["forces"] - out["forces"]).abs().max()) > 1e-3 * float(out["forces"].abs().max())


def test_delta_apply_and_revert_round_trip(case, tmp_path):
    model, sparse, merged = case["model"], case["sparse"], case["merged"]
    path = tmp_path / "twin_sparse_delta.safetensors"
    save_delta(sparse, path)
    delta = load_delta(path)
    assert state_equal(apply_delta(model, delta), merged)
    assert state_equal(revert_delta(merged, delta), model)
    kinds = {layer["kind"] for layer in delta.layers}
    assert kinds == {t for t in TARGET_KINDS if t in kinds} and "unknown" not in kinds
