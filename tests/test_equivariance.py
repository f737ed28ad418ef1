"""E(3) equivariance and permutation symmetry survive sparse fine-tuning, before and after merging.

The sparse model is trained a few Adam steps and then given large deltas by hand in every target kind, so
every adapted weight really differs from the foundation when the symmetries are checked.
"""

from __future__ import annotations

import copy

import mace  # noqa: F401  (before e3nn)
import numpy as np
import pytest
import torch

from conftest import double_batch, random_orthogonal
from mace_sparse import SparseConfig, get_sparse_model, merge_and_unload
from mace_sparse import reparametrization as rp
from mace_sparse.sparse_model import sparsity_stats

REL = 1e-10


pytestmark = pytest.mark.usefixtures("fast_deterministic_torch")




def predict(model, atoms_list):
    model.eval()
    out = model(double_batch(atoms_list, model), training=False, compute_force=True)
    return out["energy"].detach(), out["forces"].detach()


def assert_rel(a, b, rel=REL):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    err = float((a - b).abs().max())
    scale = float(b.abs().max())
    assert err <= rel * scale, f"max deviation {err:.3e} vs scale {scale:.3e}"


@pytest.fixture(scope="module")
def models(tiny_foundation, emt_data):
    """(foundation, trained sparse model, merged copy) with nonzero effective deltas in every target kind."""
    import ase.io

    foundation = torch.load(tiny_foundation, map_location="cpu", weights_only=False).double()
    sparse = get_sparse_model(copy.deepcopy(foundation), SparseConfig(granularity="path"))
    atoms = ase.io.read(emt_data["slab_train"], ":2")
    batch = double_batch(atoms, sparse)
    sparse.train()
    opt = torch.optim.Adam([p for p in sparse.parameters() if p.requires_grad], lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        out = sparse(dict(batch), training=True, compute_force=True)
        loss = ((out["energy"] - batch["energy"]) ** 2).mean() + ((out["forces"] - batch["forces"]) ** 2).mean()
        loss.backward()
        opt.step()
    # on top of training: large deltas on a random half of the entries of every adapted weight
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, owner, name in rp.iter_reparametrized(sparse):
            delta = owner._parameters[rp.DELTA.format(name)]
            mask = torch.rand(delta.shape, generator=g) < 0.5
            delta.add_(torch.where(mask, torch.randn(delta.shape, generator=g, dtype=delta.dtype) * 0.05, 0.0))
    # every kind has changed entries; and some entries are still exactly unchanged (sparse)
    for qualified, owner, name in rp.iter_reparametrized(sparse):
        assert torch.count_nonzero(rp.effective_delta(owner, name)) > 0, qualified
    stats = sparsity_stats(sparse)
    assert 0 < stats.changed_entries < stats.adapted_entries
    merged = merge_and_unload(copy.deepcopy(sparse))
    return {"foundation": foundation, "training": sparse, "merged": merged}


@pytest.fixture(scope="module")
def structures(emt_data):
    """Two slabs and a bulk cell (periodic, different elements)."""
    import ase.io

    slabs = ase.io.read(emt_data["slab_test"], ":2")
    bulk = ase.io.read(emt_data["bulk_test"], ":1")
    return slabs + bulk


def transformed(atoms_list, fn):
    out = []
    for atoms in atoms_list:
        a = atoms.copy()
        fn(a)
        out.append(a)
    return out


def test_trained_model_differs_from_foundation(models, structures):
    e_f, _ = predict(models["foundation"], structures)
    e_t, f_t = predict(models["training"], structures)
    e_m, f_m = predict(models["merged"], structures)
    assert float((e_t - e_f).abs().max()) > 1e-6  # the symmetry checks below are not on the foundation
    assert_rel(e_m, e_t, 1e-12)
    assert_rel(f_m, f_t, 1e-12)


@pytest.mark.parametrize("which", ["training", "merged"])
@pytest.mark.parametrize("det", [1, -1], ids=["rotation", "reflection"])
def test_rotation_and_reflection(models, structures, which, det):
    model = models[which]
    q = random_orthogonal(det, seed=11 + det)

    def rotate(a):
        a.set_cell(np.asarray(a.cell) @ q.T, scale_atoms=False)
        a.positions = a.positions @ q.T

    e, f = predict(model, structures)
    e_rot, f_rot = predict(model, transformed(structures, rotate))
    assert_rel(e_rot, e)
    assert_rel(f_rot, f @ torch.as_tensor(q.T))
    # the check is not vacuous: the forces are not invariant
    assert float((f_rot - f).abs().max()) > 1e-3 * float(f.abs().max())


@pytest.mark.parametrize("which", ["training", "merged"])
def test_translation(models, structures, which):
    model = models[which]
    shift = np.array([0.731, -1.234, 2.5])

    def translate(a):
        a.positions = a.positions + shift

    e, f = predict(model, structures)
    e_t, f_t = predict(model, transformed(structures, translate))
    assert_rel(e_t, e)
    assert_rel(f_t, f)


@pytest.mark.parametrize("which", ["training", "merged"])
def test_permutation_of_atoms(models, structures, which):
    model = models[which]
    rng = np.random.default_rng(5)
    perms = [rng.permutation(len(a)) for a in structures]
    permuted = [a[p] for a, p in zip(structures, perms)]
    for a, p in zip(permuted, perms):
        assert not np.array_equal(p, np.arange(len(p)))
        assert a.info.get("REF_energy") is not None

    e, f = predict(model, structures)
    e_p, f_p = predict(model, permuted)
    assert_rel(e_p, e)
    # forces follow their atoms: F_perm[i] = F[perm[i]] within each structure
    offsets = np.cumsum([0] + [len(a) for a in structures])
    index = torch.as_tensor(np.concatenate([o + p for o, p in zip(offsets[:-1], perms)]))
    assert_rel(f_p, f[index])
