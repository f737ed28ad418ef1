"""The threshold scores' optimizer group: its lr, the decoupled λ_τ decay, and MACE's lr schedulers / SWALR.

Param groups are built the way ``mace_run_train`` builds them: MACE's own ``get_params_options`` /
``get_optimizer`` / ``LRScheduler`` / ``get_swa`` with the patches of ``seams.sparse_run_patches`` active.
"""

from __future__ import annotations

import copy

import mace  # noqa: F401  (before e3nn)
import pytest
import torch

from mace_sparse import optim
from mace_sparse.config import SparseConfig, SparseConfigError
from mace_sparse.integration.arguments import add_sparse_arguments, sparse_config_from_args
from mace_sparse.integration.seams import sparse_run_patches
from mace_sparse.sparse_model import delta_parameters, get_sparse_model, threshold_parameters

MACE_GROUPS = ["embedding", "interactions_decay", "interactions_no_decay", "products", "readouts"]


pytestmark = pytest.mark.usefixtures("fast_deterministic_torch")


def parse_args(*extra):
    from mace.tools.arg_parser import build_default_arg_parser

    parser = add_sparse_arguments(build_default_arg_parser())
    return parser.parse_args(["--name", "t", "--train_file", "unused.xyz", "--finetune_method", "sparse_str", *extra])


@pytest.fixture(scope="module")
def run_train():
    import mace.cli.run_train as module

    return module


def sparse_setup(run_train, foundation, *extra, scheduler_args=()):
    """(args, model, optimizer, lr_scheduler) exactly as mace_run_train builds them for a sparse run."""
    from mace.tools.scripts_utils import LRScheduler

    args = parse_args(*extra, *scheduler_args)
    config = sparse_config_from_args(args)
    with sparse_run_patches(run_train, args, config):
        model = get_sparse_model(foundation, config)
        options = run_train.get_params_options(args, model)
        optimizer = run_train.get_optimizer(args, options)
        scheduler = LRScheduler(optimizer, args)
    return args, model, optimizer, scheduler


def group(optimizer, name):
    found = [g for g in optimizer.param_groups if g.get("name") == name]
    assert len(found) == 1, [g.get("name") for g in optimizer.param_groups]
    return found[0]


#: The latent deltas train at this multiple of --lr by default; the thresholds at --sparse_threshold_lr.
FACTOR = SparseConfig().delta_lr_factor


def lr_ratio(optimizer):
    """Threshold lr over the run's lr (the delta groups run at FACTOR × the run's lr)."""
    return group(optimizer, optim.GROUP_NAME)["lr"] / (group(optimizer, "readouts")["lr"] / FACTOR)


# ------------------------------------------------------------------------------------------- the groups


@pytest.mark.parametrize(
    "extra, expected_lr",
    [(("--lr", "0.02"), 0.02), (("--lr", "0.02", "--sparse_threshold_lr", "0.003"), 0.003)],
    ids=["default-lr", "own-lr"],
)
def test_thresholds_have_their_own_group(run_train, foundation_model, extra, expected_lr):
    original_params_options = run_train.get_params_options
    args, model, optimizer, _ = sparse_setup(
        run_train, foundation_model, *extra, "--sparse_threshold_weight_decay", "0.7"
    )
    assert run_train.get_params_options is original_params_options  # the run patch is gone again

    names = [g.get("name") for g in optimizer.param_groups]
    assert names == MACE_GROUPS + [optim.GROUP_NAME]
    thr = group(optimizer, optim.GROUP_NAME)
    assert thr["lr"] == expected_lr
    assert thr["weight_decay"] == 0.0  # Adam's coupled L2 off: the decay is decoupled
    assert thr[optim.DECAY_KEY] == 0.7
    assert [id(p) for p in thr["params"]] == [id(p) for p in threshold_parameters(model)]
    for g in optimizer.param_groups:
        if g is not thr:
            assert g["lr"] == pytest.approx(FACTOR * args.lr, rel=1e-15)
            assert g[optim.DELTA_GROUP_KEY] is True
            assert optim.DECAY_KEY not in g

    # every ΔW is in exactly one MACE group; no score and no frozen tensor outside the threshold group
    in_groups = [id(p) for g in optimizer.param_groups if g is not thr for p in g["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in delta_parameters(model))
    assert all(p.requires_grad for g in optimizer.param_groups for p in g["params"])
    # the decoupled decay is attached to MACE's optimizer as one step pre-hook (its effect: tests below)
    assert len(optimizer._optimizer_step_pre_hooks) == 1
    optim.register_threshold_decay(optimizer)  # idempotent
    assert len(optimizer._optimizer_step_pre_hooks) == 1


@pytest.mark.parametrize("factor", [1.0, 3.0, 10.0])
def test_delta_groups_train_at_factor_times_lr(run_train, foundation_model, factor):
    """--sparse_delta_lr_factor sets every ΔW group's lr; the thresholds keep --lr (or their own flag)."""
    args, model, optimizer, _ = sparse_setup(
        run_train, foundation_model, "--lr", "0.02", "--sparse_delta_lr_factor", str(factor))
    assert sparse_config_from_args(args).delta_lr_factor == factor
    deltas = [g for g in optimizer.param_groups if g.get(optim.DELTA_GROUP_KEY)]
    assert [g["name"] for g in deltas] == MACE_GROUPS
    assert all(g["lr"] == pytest.approx(0.02 * factor, rel=1e-15) for g in deltas)
    assert group(optimizer, optim.GROUP_NAME)["lr"] == 0.02
    # one Adam step from ΔW = 0 with a constant gradient moves every entry by the same amount, set by its group's lr
    optimizer.zero_grad(set_to_none=True)
    sum(d.sum() for d in delta_parameters(model)).backward()
    optimizer.step()
    moved = torch.cat([d.detach().flatten().abs() for d in delta_parameters(model)])
    # gradient-scaled update (κ = 1): |g| = RMS = 1 → Adam's step is lr·1/(1 + κ) = lr/2
    assert torch.allclose(moved, torch.full_like(moved, 0.02 * factor / 2), rtol=1e-6)


def test_delta_lr_factor_must_be_positive():
    with pytest.raises(SparseConfigError, match="--sparse_delta_lr_factor must be > 0"):
        SparseConfig(delta_lr_factor=0.0)


def test_add_threshold_group_moves_scores_out_of_existing_groups(foundation_model):
    model = get_sparse_model(foundation_model)
    everything = [{"name": "all", "params": list(model.parameters()), "lr": 1.0}]
    groups = optim.add_threshold_group(everything, model, lr=0.5, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["all", optim.GROUP_NAME]
    scores = {id(p) for p in threshold_parameters(model)}
    assert not scores & {id(p) for p in groups[0]["params"]}
    assert {id(p) for p in groups[1]["params"]} == scores
    assert everything[0]["params"] == list(model.parameters())  # the caller's groups are not mutated


# ------------------------------------------------------------------------------------- decoupled decay


@pytest.mark.parametrize("grad", ["none", "zero"])
def test_decoupled_decay_is_exactly_lr_lambda_s(run_train, foundation_model, grad):
    """A loss that does not depend on the scores: one step moves s by exactly −lr·λ·s (Adam adds nothing)."""
    lr_thr, lam = 0.05, 0.7
    _, model, optimizer, _ = sparse_setup(
        run_train, foundation_model, "--sparse_threshold_lr", str(lr_thr), "--sparse_threshold_weight_decay", str(lam)
    )
    scores = threshold_parameters(model)
    with torch.no_grad():  # scores of different signs and sizes
        for i, s in enumerate(scores):
            s.copy_(torch.linspace(-6.0, 3.0, s.numel(), dtype=s.dtype) + 0.1 * i)
    before = [s.detach().clone() for s in scores]

    optimizer.zero_grad(set_to_none=True)
    loss = sum(((d - 0.01) ** 2).sum() for d in delta_parameters(model))
    loss.backward()
    if grad == "zero":
        for s in scores:
            s.grad = torch.zeros_like(s)
    assert all((s.grad is None) == (grad == "none") for s in scores)
    optimizer.step()

    for s, s0 in zip(scores, before):
        assert torch.equal(s.detach(), s0 * (1.0 - lr_thr * lam))
        torch.testing.assert_close(s.detach() - s0, -lr_thr * lam * s0, rtol=1e-12, atol=1e-15)
    # the deltas took an ordinary Adam step (no decay of theirs)
    assert all(torch.count_nonzero(d) == d.numel() for d in delta_parameters(model))


def test_decay_is_applied_before_the_adam_update(run_train, foundation_model, slab_atoms):
    """With real gradients on the scores: s_new = Adam(s·(1 − lr·λ), g), identical to a hand-made reference."""
    from conftest import batch_of

    lr_thr, lam = 0.02, 0.5
    extra = ("--sparse_threshold_lr", str(lr_thr), "--sparse_threshold_weight_decay", str(lam))
    _, model, optimizer, _ = sparse_setup(run_train, copy.deepcopy(foundation_model), *extra)
    _, ref_model, ref_opt, _ = sparse_setup(run_train, copy.deepcopy(foundation_model), *extra)
    for g in ref_opt.param_groups:  # reference: the same optimizer and hook with λ_τ = 0, decay applied by hand
        if optim.DECAY_KEY in g:
            g[optim.DECAY_KEY] = 0.0

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        batch = batch_of(slab_atoms[:2], model)
    finally:
        torch.set_default_dtype(previous)

    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        out = model(dict(batch), training=True, compute_force=True)
        (((out["energy"] - batch["energy"]) ** 2).mean() + ((out["forces"] - batch["forces"]) ** 2).mean()).backward()
        for a, b in zip(model.parameters(), ref_model.parameters()):  # the same gradients for the reference
            b.grad = None if a.grad is None else a.grad.clone()
        if step == 1:  # ΔW = 0 at step 0 gives δ no gradient; after one step most |ΔW| > δ
            assert sum(int(torch.count_nonzero(s.grad)) for s in threshold_parameters(model)) > 0
        with torch.no_grad():
            for s in threshold_parameters(ref_model):
                s.mul_(1.0 - lr_thr * lam)
        optimizer.step()
        ref_opt.step()
        for a, b in zip(model.parameters(), ref_model.parameters()):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- lr schedulers


def test_ratio_survives_exponential_lr(run_train, foundation_model):
    _, _, optimizer, scheduler = sparse_setup(
        run_train, foundation_model, "--lr", "0.01", "--sparse_threshold_lr", "0.004",
        scheduler_args=("--scheduler", "ExponentialLR", "--lr_scheduler_gamma", "0.8"),
    )
    assert lr_ratio(optimizer) == pytest.approx(0.4, rel=1e-12)
    for _ in range(5):
        optimizer.step()
        scheduler.step(metrics=1.0, epoch=None)
    assert group(optimizer, "readouts")["lr"] == pytest.approx(FACTOR * 0.01 * 0.8**5, rel=1e-12)
    assert group(optimizer, optim.GROUP_NAME)["lr"] == pytest.approx(0.004 * 0.8**5, rel=1e-12)
    assert lr_ratio(optimizer) == pytest.approx(0.4, rel=1e-12)


def test_ratio_survives_reduce_lr_on_plateau(run_train, foundation_model):
    _, _, optimizer, scheduler = sparse_setup(
        run_train, foundation_model, "--lr", "0.01", "--sparse_threshold_lr", "0.03",
        scheduler_args=("--scheduler", "ReduceLROnPlateau", "--lr_factor", "0.5", "--scheduler_patience", "0"),
    )
    assert lr_ratio(optimizer) == pytest.approx(3.0, rel=1e-12)
    for loss in (1.0, 2.0, 3.0, 4.0):  # never improves: one reduction per step after the first
        scheduler.step(metrics=loss)
    assert group(optimizer, "readouts")["lr"] == pytest.approx(FACTOR * 0.01 * 0.5**3, rel=1e-12)
    assert lr_ratio(optimizer) == pytest.approx(3.0, rel=1e-12)


@pytest.mark.parametrize("scheduler", ["ReduceLROnPlateau", "ExponentialLR"])
def test_swalr_keeps_ratio_through_mace_get_swa(run_train, foundation_model, scheduler):
    """Stage two: MACE's get_swa (patched for the run) gives the threshold group swa_lr·(lr_τ/lr)."""
    extra = ("--lr", "0.01", "--sparse_threshold_lr", "0.002", "--swa", "--start_swa", "2",
             "--max_num_epochs", "4", "--swa_lr", "0.001")
    args = parse_args(*extra, "--scheduler", scheduler)
    config = sparse_config_from_args(args)
    from mace.tools.scripts_utils import LRScheduler

    with sparse_run_patches(run_train, args, config):
        model = get_sparse_model(foundation_model, config)
        optimizer = run_train.get_optimizer(args, run_train.get_params_options(args, model))
        LRScheduler(optimizer, args)
        swa, swas = run_train.get_swa(args, model, optimizer, [False], False)
    assert swas == [False, True]
    thr, other = group(optimizer, optim.GROUP_NAME), group(optimizer, "readouts")
    assert other["swa_lr"] == pytest.approx(0.001 * FACTOR, rel=1e-12)  # the deltas keep their factor too
    assert thr["swa_lr"] == pytest.approx(0.001 * 0.2, rel=1e-12)
    # MACE steps SWALR once per stage-two epoch (anneal_epochs=1): afterwards every group sits at its swa_lr
    for _ in range(3):
        optimizer.step()
        swa.scheduler.step()
    assert other["lr"] == pytest.approx(0.001 * FACTOR, rel=1e-12)
    assert thr["lr"] == pytest.approx(0.0002, rel=1e-12)
    assert lr_ratio(optimizer) == pytest.approx(0.2, rel=1e-12)


def test_keep_threshold_lr_ratio_in_swa_directly():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam(
        [{"name": "model", "params": [a], "lr": 0.01}, {"name": optim.GROUP_NAME, "params": [b], "lr": 0.05}]
    )
    swalr = torch.optim.swa_utils.SWALR(opt, swa_lr=0.002, anneal_epochs=1, anneal_strategy="linear")
    optim.keep_threshold_lr_ratio_in_swa(opt, base_lr=0.01)
    assert opt.param_groups[0]["swa_lr"] == pytest.approx(0.002)
    assert opt.param_groups[1]["swa_lr"] == pytest.approx(0.01)
    for _ in range(2):
        opt.step()
        swalr.step()
    assert opt.param_groups[1]["lr"] / opt.param_groups[0]["lr"] == pytest.approx(5.0, rel=1e-12)
