"""The STR reparameterisation: soft-threshold math, step 0 == foundation, what trains, merging, target selection.

Everything runs in-process on the tiny float64 foundation (``foundation_model`` fixture) and EMT slabs.
"""

from __future__ import annotations

import copy
import re

import mace  # noqa: F401  (before e3nn)
import pytest
import torch

from conftest import batch_of, double_batch
from mace_sparse import SparseConfig, get_sparse_model, merge_and_unload, print_trainable_parameters
from mace_sparse import reparametrization as rp
from mace_sparse.config import TARGET_KINDS
from mace_sparse.sparse_model import delta_parameters, is_sparse_model, sparsity_stats, threshold_parameters

# Which foundation parameters each target kind must select, written from MACE's module names (independently
# of the walker's isinstance logic): the tiny foundation has each of these kinds at least twice. The kinds it
# lacks (norm, scalar, embedding: non-linear blocks, --embedding_specs) are tested on the foundation twins
# (tests/test_foundation_twins.py).
EXPECTED_NAME_PATTERNS = {
    "linear": r"(^|\.)linear(_up|_1|_2)?\.weight$",
    "skip_tp": r"\.skip_tp\.weight$",
    "contraction": r"\.symmetric_contractions\.contractions\.\d+\.(weights_max|weights\.\d+)$",
    "radial": r"\.conv_tp_weights\.layer\d+\.weight$",
}
FOUNDATION_KINDS = tuple(EXPECTED_NAME_PATTERNS)


pytestmark = pytest.mark.usefixtures("fast_deterministic_torch")


# ------------------------------------------------------------------------------------------------ helpers




def energy_forces(model, batch, training=False):
    model.train(training)
    out = model(dict(batch), training=training, compute_force=True)
    return out["energy"].detach().clone(), out["forces"].detach().clone()


def max_rel_diff(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def loss_of(model, batch):
    out = model(dict(batch), training=True, compute_force=True)
    return ((out["energy"] - batch["energy"]) ** 2).mean() + 10.0 * ((out["forces"] - batch["forces"]) ** 2).mean()


def adam_steps(model, batch, steps=3, lr=0.01):
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
    return opt


@pytest.fixture()
def batch(foundation_model, slab_atoms):
    return double_batch(slab_atoms[:3], foundation_model)


# ------------------------------------------------------------------------------------- soft-threshold math


def _probe_values(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, generator=g, dtype=dtype) * 0.01
    # exact zeros and values just inside / outside the threshold 5e-3
    extra = torch.tensor([0.0, -0.0, 4.9e-3, -4.9e-3, 5.1e-3, -5.1e-3, 1.0, -1.0], dtype=dtype)
    return torch.cat([x, extra])


def test_soft_threshold_values_are_sign_relu():
    x = _probe_values()
    delta = torch.tensor(5e-3, dtype=torch.float64)
    expected = torch.sign(x) * torch.relu(x.abs() - delta)
    assert torch.equal(rp.soft_threshold(x, delta), expected)
    assert torch.equal(rp.soft_threshold_ste(x, delta), expected)
    # entries inside the dead zone are exactly zero, outside they are shrunk by exactly δ
    inside = x.abs() <= delta
    assert torch.count_nonzero(rp.soft_threshold(x, delta)[inside]) == 0
    outside = ~inside
    assert torch.equal(rp.soft_threshold(x, delta)[outside].abs(), x[outside].abs() - delta)


def test_score_for_threshold_is_inverse_sigmoid():
    for t in (1e-6, 1e-3, 0.2, 0.5, 0.9):
        assert torch.sigmoid(torch.tensor(rp.score_for_threshold(t), dtype=torch.float64)).item() == pytest.approx(
            t, rel=1e-12
        )


@pytest.mark.parametrize("elementwise", [True, False], ids=["elementwise-delta", "shared-delta"])
def test_soft_threshold_ste_gradients(elementwise):
    x = _probe_values().requires_grad_(True)
    if elementwise:
        delta = torch.full_like(x, 5e-3).requires_grad_(True)
    else:
        delta = torch.tensor([5e-3], dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (rp.soft_threshold_ste(x, delta) * upstream).sum().backward()

    # straight-through: ΔW receives the upstream gradient unchanged, also inside the dead zone
    assert torch.equal(x.grad, upstream)
    # δ: −sign(ΔW) where |ΔW| > δ, 0 elsewhere (times the upstream gradient)
    active = (x.detach().abs() > 5e-3).to(torch.float64)
    per_entry = -torch.sign(x.detach()) * active * upstream
    if elementwise:
        assert torch.equal(delta.grad, per_entry)
        assert torch.count_nonzero(delta.grad[active == 0]) == 0
    else:
        assert delta.grad.shape == (1,)
        assert delta.grad.item() == pytest.approx(per_entry.sum().item(), rel=1e-12, abs=1e-15)

    # the plain soft threshold has the dead zone in ΔW (what the STE is there to avoid)
    x2 = x.detach().clone().requires_grad_(True)
    rp.soft_threshold(x2, torch.tensor(5e-3, dtype=torch.float64)).sum().backward()
    assert torch.equal(x2.grad, active)


def test_reparametrized_module_gradients_reach_delta_and_score():
    """A reparameterised nn.Linear: ΔW gets dL/dW' (STE), the score gets σ'(s)·Σ −sign(ΔW)·dL/dW' over |ΔW|>δ."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 4).double()
    w0 = lin.weight.detach().clone()
    rp.reparametrize(lin, "weight", init_threshold=0.05, segments=None, num_segments=1, consumer=lin)
    assert "weight" not in lin._parameters and torch.equal(lin.weight_foundation, w0)
    with torch.no_grad():
        lin.weight_delta.copy_(torch.randn(4, 5, dtype=torch.float64) * 0.08)  # some entries inside |ΔW| ≤ 0.05
    x = torch.randn(7, 5, dtype=torch.float64)
    g = torch.randn(7, 4, dtype=torch.float64)
    y = lin(x)
    delta_w = lin.weight_delta.detach()
    assert ((delta_w.abs() <= 0.05).any() and (delta_w.abs() > 0.05).any())
    expected_w = w0 + torch.sign(delta_w) * torch.relu(delta_w.abs() - 0.05)
    torch.testing.assert_close(y, x @ expected_w.T + lin.bias, rtol=0, atol=1e-14)
    (y * g).sum().backward()

    dl_dw = g.T @ x
    torch.testing.assert_close(lin.weight_delta.grad, dl_dw, rtol=1e-13, atol=1e-13)
    s = lin.weight_threshold_score.detach()
    sig = torch.sigmoid(s)
    active = delta_w.abs() > sig
    expected_score_grad = sig * (1 - sig) * (-torch.sign(delta_w) * dl_dw)[active].sum()
    torch.testing.assert_close(lin.weight_threshold_score.grad, expected_score_grad.reshape(1), rtol=1e-12, atol=1e-15)
    # the pretrained weight is a frozen buffer: no gradient anywhere but ΔW, s and the bias
    assert {n for n, p in lin.named_parameters()} == {"bias", "weight_delta", "weight_threshold_score"}
    # the effective weight left on the module after the forward is detached (no graph kept alive)
    assert not lin.__dict__["weight"].requires_grad


# ------------------------------------------------------------------------------------ the model at step 0


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_step0_equals_foundation(foundation_model, batch, training):
    reference = copy.deepcopy(foundation_model)
    e_ref, f_ref = energy_forces(reference, batch, training)
    sparse = get_sparse_model(foundation_model, SparseConfig())
    e, f = energy_forces(sparse, batch, training)
    assert max_rel_diff(e, e_ref) <= 1e-10
    assert max_rel_diff(f, f_ref) <= 1e-10
    assert f.shape == f_ref.shape == (int(batch["ptr"][-1]), 3)
    assert sparsity_stats(sparse).changed_entries == 0


def test_only_deltas_and_scores_train_and_foundation_weights_are_buffers(foundation_model):
    original = {n: p.detach().clone() for n, p in foundation_model.named_parameters()}
    init = 2e-3
    sparse = get_sparse_model(foundation_model, SparseConfig(targets=TARGET_KINDS, init_threshold=init))
    assert is_sparse_model(sparse)

    trainable = {n for n, p in sparse.named_parameters() if p.requires_grad}
    expected = {f"{n}_delta" for n in original} | {f"{n}_threshold_score" for n in original}
    assert trainable == expected
    assert {n for n, _ in sparse.named_parameters()} == expected  # nothing else is a Parameter any more

    buffers = dict(sparse.named_buffers())
    params = dict(sparse.named_parameters())
    for name, weight in original.items():
        assert f"{name}_foundation" in buffers, name
        assert not isinstance(buffers[f"{name}_foundation"], torch.nn.Parameter)
        assert torch.equal(buffers[f"{name}_foundation"], weight)
        assert torch.equal(params[f"{name}_delta"], torch.zeros_like(weight))
        score = params[f"{name}_threshold_score"]
        assert torch.allclose(torch.sigmoid(score), torch.full_like(score, init), rtol=1e-12, atol=0)
    # the state dict carries foundation + delta + score for every adapted weight, nothing under the old name
    keys = set(sparse.state_dict())
    assert not keys & set(original)
    assert len(delta_parameters(sparse)) == len(threshold_parameters(sparse)) == len(original)


def test_get_sparse_model_twice_is_refused(foundation_model):
    sparse = get_sparse_model(foundation_model)
    with pytest.raises(ValueError, match="already sparse-trainable"):
        get_sparse_model(sparse)
    plain = merge_and_unload(sparse)
    with pytest.raises(ValueError, match="not sparse-trainable"):
        merge_and_unload(plain)


# ------------------------------------------------------------------------------------------------ merging


def _class_name(obj):
    # fx GraphModules get a fresh class per instance (and per deepcopy): compare classes by name
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _module_signature(model):
    return [(name, _class_name(module)) for name, module in model.named_modules()]


def _param_signature(model):
    return [(name, tuple(p.shape), _class_name(p), p.dtype, p.requires_grad) for name, p in model.named_parameters()]


def _assert_plain_mace(model, reference):
    assert _module_signature(model) == _module_signature(reference)
    assert _param_signature(model) == _param_signature(reference)
    assert list(model.state_dict()) == list(reference.state_dict())  # no _foundation/_delta/_score left
    reference_modules = dict(reference.named_modules())
    for name, module in model.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name
        assert len(module._load_state_dict_post_hooks) == len(reference_modules[name]._load_state_dict_post_hooks)
        assert not [k for k in module.__dict__ if k.startswith("_sparse_str")], name
    assert not is_sparse_model(model)


def test_merge_after_adam_steps_equals_training_model(foundation_model, batch, tmp_path):
    reference = copy.deepcopy(foundation_model)
    sparse = get_sparse_model(foundation_model, SparseConfig())
    adam_steps(sparse, batch, steps=3, lr=0.01)
    stats = sparsity_stats(sparse)
    assert stats.changed_entries > 0  # the steps moved some entries past δ

    e_train, f_train = energy_forces(sparse, batch)
    merged = merge_and_unload(copy.deepcopy(sparse))
    e_merged, f_merged = energy_forces(merged, batch)
    assert max_rel_diff(e_merged, e_train) <= 1e-12
    assert max_rel_diff(f_merged, f_train) <= 1e-12
    # ... and it is not simply the foundation again
    e_ref, _ = energy_forces(reference, batch)
    assert max_rel_diff(e_merged, e_ref) > 1e-8

    _assert_plain_mace(merged, reference)
    # each merged weight is W + S(ΔW, δ) of the training model
    merged_params = dict(merged.named_parameters())
    for qualified, owner, name in rp.iter_reparametrized(sparse):
        expected = owner._buffers[rp.FOUNDATION.format(name)] + rp.effective_delta(owner, name)
        assert torch.equal(merged_params[qualified].detach(), expected.detach()), qualified
    # merging a copy left the training model untouched and still trainable
    assert is_sparse_model(sparse)
    e_again, _ = energy_forces(sparse, batch)
    assert torch.equal(e_again, e_train)

    # torch.save / torch.load of the merged model
    path = tmp_path / "merged.model"
    torch.save(merged, path)
    loaded = torch.load(path, map_location="cpu", weights_only=False)
    _assert_plain_mace(loaded, reference)
    e_loaded, f_loaded = energy_forces(loaded, batch)
    assert torch.equal(e_loaded, e_merged) and torch.equal(f_loaded, f_merged)


def test_deepcopy_after_forward_backward(foundation_model, batch):
    sparse = get_sparse_model(foundation_model, SparseConfig())
    opt = adam_steps(sparse, batch, steps=1)
    opt.zero_grad()
    loss_of(sparse, batch).backward()  # graph built and consumed; grads present

    clone = copy.deepcopy(sparse)
    assert is_sparse_model(clone)
    e, f = energy_forces(sparse, batch)
    e_clone, f_clone = energy_forces(clone, batch)
    assert torch.equal(e, e_clone) and torch.equal(f, f_clone)
    # independent tensors: training the clone changes neither the original's deltas nor its outputs
    before = [d.detach().clone() for d in delta_parameters(sparse)]
    for a, b in zip(delta_parameters(sparse), delta_parameters(clone)):
        assert a.data_ptr() != b.data_ptr()
    adam_steps(clone, batch, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(before, delta_parameters(sparse)))
    assert not all(torch.equal(a, b) for a, b in zip(before, delta_parameters(clone)))
    # the clone trains through its own hooks: its grads land on its own deltas
    clone.zero_grad(set_to_none=True)
    loss_of(clone, batch).backward()
    assert all(p.grad is not None for p in delta_parameters(clone))


# ------------------------------------------------------------------------------------------ target choice


def _expected_names(model, kinds):
    names = [n for n, _ in model.named_parameters()]
    out = []
    for n in names:
        if any(re.search(EXPECTED_NAME_PATTERNS[k], n) for k in kinds):
            out.append(n)
    return out


@pytest.mark.parametrize(
    "kinds", [(k,) for k in FOUNDATION_KINDS] + [TARGET_KINDS], ids=list(FOUNDATION_KINDS) + ["all"]
)
def test_targets_select_expected_parameters(foundation_model, kinds):
    all_names = [n for n, _ in foundation_model.named_parameters()]
    expected = _expected_names(foundation_model, [k for k in kinds if k in EXPECTED_NAME_PATTERNS])
    assert len(expected) >= 2
    sparse = get_sparse_model(foundation_model, SparseConfig(targets=kinds))
    selected = [q for q, _, _ in rp.iter_reparametrized(sparse)]
    assert selected == expected  # same names, module order
    # the parameters not selected stay plain Parameters, frozen
    params = dict(sparse.named_parameters())
    for name in set(all_names) - set(expected):
        assert name in params and not params[name].requires_grad, name
    if set(kinds) == set(TARGET_KINDS):
        assert selected == all_names  # every weight of the tiny foundation is adaptable


def test_target_kinds_partition_the_model(foundation_model):
    per_kind = {k: set(_expected_names(foundation_model, (k,))) for k in FOUNDATION_KINDS}
    union = set().union(*per_kind.values())
    assert sum(len(v) for v in per_kind.values()) == len(union)  # disjoint
    assert union == {n for n, _ in foundation_model.named_parameters()}


def test_granularity_layer_has_one_threshold_per_tensor(foundation_model):
    sparse = get_sparse_model(foundation_model, SparseConfig(granularity="layer"))
    for qualified, owner, name in rp.iter_reparametrized(sparse):
        assert owner._parameters[rp.SCORE.format(name)].shape == (1,), qualified
        assert rp.SEGMENTS.format(name) not in owner._buffers, qualified


def test_granularity_path_follows_irrep_paths(foundation_model):
    from e3nn import o3
    from e3nn.nn._fc import _Layer
    from mace.modules.symmetric_contraction import Contraction

    reference = copy.deepcopy(foundation_model)
    ref_modules = dict(reference.named_modules())
    sparse = get_sparse_model(foundation_model, SparseConfig(granularity="path"))
    multi_path = 0
    for qualified, owner, name in rp.iter_reparametrized(sparse):
        score = owner._parameters[rp.SCORE.format(name)]
        weight = owner._buffers[rp.FOUNDATION.format(name)]
        module_name = qualified.rsplit(".", 1)[0]
        ref_owner = ref_modules.get(module_name)
        if isinstance(ref_owner, (o3.Linear, o3.TensorProduct)):
            weighted = [ins for ins in ref_owner.instructions if getattr(ins, "has_weight", True)]
            sizes = [int(torch.Size(ins.path_shape).numel()) for ins in weighted]
            assert sum(sizes) == weight.numel()
            n_paths = len(weighted)
        elif qualified.endswith("weights_max") or ".weights." in qualified:
            assert isinstance(ref_modules[qualified.split(".weights")[0]], Contraction)
            n_paths = weight.shape[1]  # one threshold per coupling
            sizes = None
        else:
            assert isinstance(ref_owner, _Layer), qualified
            interaction = ref_modules[qualified.split(".conv_tp_weights")[0]]
            if weight.shape[1] == interaction.conv_tp.weight_numel:
                weighted = [ins for ins in interaction.conv_tp.instructions if ins.has_weight]
                n_paths = len(weighted)
            else:
                n_paths = 1  # hidden radial layers: a single path
            sizes = None
        if n_paths == 1:
            assert score.shape == (1,), qualified
            continue
        multi_path += 1
        assert score.shape == (n_paths,), qualified
        # distinct δ per path: the broadcast threshold of each entry is the δ of the path it belongs to
        with torch.no_grad():
            score.copy_(torch.linspace(-3.0, 3.0, n_paths, dtype=score.dtype))
        per_entry = rp.thresholds(owner, name)
        assert per_entry.shape == weight.shape
        if sizes is not None:  # e3nn flat layout: consecutive instruction blocks
            blocks = torch.split(per_entry, sizes)
            for i, block in enumerate(blocks):
                assert torch.all(block == torch.sigmoid(score[i])), (qualified, i)
        elif weight.dim() == 3:  # contraction: [element, coupling, channel]
            for k in range(n_paths):
                assert torch.all(per_entry[:, k, :] == torch.sigmoid(score[k])), (qualified, k)
        else:  # last radial layer: one path per output column block of the conv TP weights
            assert torch.all(per_entry == per_entry[:1])  # rows share the column layout
            assert set(per_entry[0].tolist()) == set(torch.sigmoid(score).tolist())
    assert multi_path >= 5


def test_path_threshold_zeroes_only_its_own_path(foundation_model):
    """With ΔW = 0.3 everywhere, δ_path(0) = 0.5 and the other paths' δ small: only path 0 stays unchanged."""
    sparse = get_sparse_model(foundation_model, SparseConfig(granularity="path"))
    owner = dict(sparse.named_modules())["interactions.1.linear"]
    sizes = [int(torch.Size(ins.path_shape).numel()) for ins in owner.instructions]
    assert len(sizes) > 1
    with torch.no_grad():
        owner.weight_delta.fill_(0.3)
        owner.weight_threshold_score.fill_(rp.score_for_threshold(1e-3))
        owner.weight_threshold_score[0] = 0.0  # δ = 0.5 > 0.3
    change = rp.effective_delta(owner, "weight")
    first, rest = change[: sizes[0]], change[sizes[0]:]
    assert torch.count_nonzero(first) == 0
    assert torch.allclose(rest, torch.full_like(rest, 0.3 - 1e-3), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------ report


def test_print_trainable_parameters_line(foundation_model, capsys):
    total = sum(p.numel() for p in foundation_model.parameters())
    sparse = get_sparse_model(foundation_model, SparseConfig(targets=TARGET_KINDS, granularity="layer"))
    print_trainable_parameters(sparse)
    line = capsys.readouterr().out.strip()
    match = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: (\d+\.\d{4})", line)
    assert match, line
    trainable = int(match.group(1).replace(",", ""))
    all_params = int(match.group(2).replace(",", ""))
    n_weights = len(list(rp.iter_reparametrized(sparse)))
    assert trainable == total + n_weights  # every ΔW entry plus one score per tensor (layer granularity)
    # peft's meaning: all = the base model's weights plus the adapter (ΔW and scores), so trainable <= all
    assert all_params == total + trainable
    assert trainable <= all_params and float(match.group(3)) <= 100.0
    assert match.group(3) == f"{100.0 * trainable / all_params:.4f}"
    if total >= 1000:
        assert "," in match.group(2)  # thousands separators, as peft prints them
