"""The released recipe as an option (the benchmark's paper-recipe row): random ΔW start and exact gradients."""

from __future__ import annotations

import pytest
import torch

from mace_sparse import SparseConfig, get_sparse_model
from mace_sparse import reparametrization as rp
from mace_sparse.config import SparseConfigError


def _linear(seed=0, **kwargs):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(30, 20).double()
    w0 = lin.weight.detach().clone()
    rp.reparametrize(lin, "weight", init_threshold=1e-4, segments=None, num_segments=1, consumer=lin, **kwargs)
    return lin, w0


def test_random_start_moves_step0_by_the_thresholded_start():
    lin, w0 = _linear(delta_init_std=0.01)
    delta = lin.weight_delta.detach()
    assert 0.008 < float(delta.std()) < 0.012  # 600 entries of randn · 1e-2
    x = torch.randn(3, 30, dtype=torch.float64)
    expected = w0 + torch.sign(delta) * torch.relu(delta.abs() - 1e-4)
    torch.testing.assert_close(lin(x), x @ expected.T + lin.bias, rtol=0, atol=1e-14)
    zero, w0_zero = _linear()
    assert torch.count_nonzero(zero.weight_delta) == 0 and torch.equal(zero.__dict__["weight"], w0_zero)


def test_exact_gradient_has_the_dead_zone_and_ste_does_not():
    grads = {}
    for straight in (True, False):
        lin, _ = _linear(seed=1, straight_through=straight)
        with torch.no_grad():
            lin.weight_threshold_score.fill_(rp.score_for_threshold(0.01))
            lin.weight_delta.copy_(torch.linspace(-0.03, 0.03, 600, dtype=torch.float64).reshape(20, 30))
        lin(torch.randn(5, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(2))).sum().backward()
        grads[straight] = lin.weight_delta.grad.clone()
        inside = lin.weight_delta.detach().abs() <= 0.01
    assert inside.any() and (~inside).any()
    assert torch.count_nonzero(grads[False][inside]) == 0  # exact: no gradient inside |ΔW| ≤ δ
    assert torch.count_nonzero(grads[True][inside]) == int(inside.sum())  # STE: every entry keeps learning
    torch.testing.assert_close(grads[False][~inside], grads[True][~inside], rtol=0, atol=0)


def test_config_carries_the_recipe_into_the_model(foundation_model):
    config = SparseConfig(targets="linear,skip_tp", init_threshold=1e-4, delta_init_std=0.01, straight_through=False)
    model = get_sparse_model(foundation_model, config)
    owners = [m for _, m in model.named_modules() if rp.reparametrized_names(m)]
    assert owners and all(m.__dict__.get(rp.EXACT_GRAD_ATTR) for m in owners)
    assert all(torch.count_nonzero(getattr(m, rp.DELTA.format(n))) > 0 for m in owners for n in rp.reparametrized_names(m))
    assert model.__dict__["_sparse_str_config"]["straight_through"] is False


@pytest.mark.parametrize("kwargs, match", [
    ({"delta_init_std": -1.0}, "sparse_delta_init_std must be >= 0"),
    ({"straight_through": "yes"}, "sparse_straight_through must be True or False"),
])
def test_recipe_settings_checked(kwargs, match):
    with pytest.raises(SparseConfigError, match=match):
        SparseConfig(**kwargs)
