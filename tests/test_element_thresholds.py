"""``--sparse_threshold_granularity element``: one δ per chemical element for element-indexed weights.

On the MP-0-medium architecture twin (random weights, O and Fe; foundation_twins.py) and the mh-0 twin
(element-agnostic products, element embeddings). The expected element of every entry is written here from
MACE's and e3nn's layouts (contraction ``[element, coupling, channel]``, skip-TP path blocks
``(mul_in1, num_elements, mul_out)``, one-hot rows of the node embedding), not taken from
``mace_sparse.layouts.element_index``.
"""

from __future__ import annotations

import copy
import json
import struct

import mace  # noqa: F401  (before e3nn)
import pytest
import torch

from foundation_twins import TWINS, build_twin, twin_batch, twin_structures
from mace_sparse import SparseConfig, get_sparse_model, merge_and_unload, save_delta
from mace_sparse import reparametrization as rp
from mace_sparse.artifacts.delta_file import (
    DeltaFileError, apply_delta, changed_mask, delta_to_bytes, load_delta, revert_delta,
)
from mace_sparse.artifacts.delta_schema import ELEMENT_LAYER_COLUMNS, LAYER_COLUMNS
from mace_sparse.artifacts.report import format_report, report_data
from mace_sparse.config import GRANULARITIES, TARGET_KINDS

pytestmark = pytest.mark.usefixtures("fast_deterministic_torch")

MP0 = next(t for t in TWINS if t.name == "mp0-medium")
MH0 = next(t for t in TWINS if t.name == "mh-0")
ELEMENT = SparseConfig(targets=TARGET_KINDS, granularity="element")
O, FE = 0, 1  # positions in the twin's atomic_numbers (8, 26)


def expected_elements(model: torch.nn.Module) -> dict:
    """{qualified weight name: element of every entry} for the element-indexed weights, from MACE's layouts."""
    from e3nn import o3
    from mace.modules.symmetric_contraction import Contraction

    n = int(model.atomic_numbers.numel())
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, Contraction):
            weights = [("weights_max", module.weights_max)]
            weights += [(f"weights.{i}", w) for i, w in enumerate(module.weights)]
            for name, w in weights:
                if w.requires_grad and w.numel() and w.shape[0] == n:
                    out[f"{prefix}.{name}"] = torch.arange(n).view(-1, 1, 1).expand(w.shape)
        elif isinstance(module, o3.TensorProduct) and module.internal_weights and module.irreps_in2.dim == n:
            blocks = []
            for ins in (i for i in module.instructions if i.has_weight):
                mul1, elements, mul_out = ins.path_shape
                assert elements == n
                blocks.append(torch.arange(n).view(1, n, 1).expand(mul1, n, mul_out).reshape(-1))
            out[f"{prefix}.weight"] = torch.cat(blocks)
        elif isinstance(module, o3.Linear) and module.irreps_in.dim == n and module.irreps_in.lmax == 0 \
                and len(module.irreps_in) == 1:
            rows = module.weight.numel() // n  # one path 0e -> 0e: weight is (num_elements, mul_out), flat
            out[f"{prefix}.weight"] = torch.arange(n).view(n, 1).expand(n, rows).reshape(-1)
    return out


def predict(model, batch):
    model.eval()
    out = model(dict(batch), training=False, compute_force=True)
    return {k: out[k].detach() for k in ("energy", "forces")}


@pytest.fixture(scope="module")
def mp0():
    return build_twin(MP0)


@pytest.fixture(scope="module")
def element_sparse(mp0):
    return get_sparse_model(copy.deepcopy(mp0), ELEMENT)


def test_element_is_a_granularity_choice():
    assert GRANULARITIES == ("layer", "path", "element")


def test_element_indexed_weights_get_one_threshold_per_element(mp0, element_sparse):
    expected = expected_elements(mp0)
    assert {q.rsplit(".", 2)[0].split(".")[0] for q in expected} >= {"node_embedding", "products", "interactions"}
    seen = set()
    for qualified, owner, name in rp.iter_reparametrized(element_sparse):
        score = owner._parameters[rp.SCORE.format(name)]
        segments = owner._buffers.get(rp.SEGMENTS.format(name))
        if qualified in expected:
            seen.add(qualified)
            assert score.shape == (2,), qualified
            assert segments is not None and segments.shape == owner._buffers[rp.FOUNDATION.format(name)].shape
            assert torch.equal(segments.reshape(-1), expected[qualified].reshape(-1)), qualified
        else:  # every other weight: one δ for the tensor
            assert score.shape == (1,) and segments is None, qualified
    assert seen == set(expected)
    assert any(".symmetric_contractions." in q for q in seen) and any("skip_tp" in q for q in seen)


def test_agnostic_products_fall_back_to_one_threshold_but_element_embeddings_do_not():
    model = build_twin(MH0)
    sparse = get_sparse_model(copy.deepcopy(model), ELEMENT)
    scores = {q: owner._parameters[rp.SCORE.format(n)].shape for q, owner, n in rp.iter_reparametrized(sparse)}
    contraction = [q for q in scores if ".symmetric_contractions." in q]
    assert contraction and all(scores[q] == (1,) for q in contraction)  # shared across elements: no element axis
    assert scores["interactions.0.source_embedding.weight"] == (2,)
    assert scores["node_embedding.linear.weight"] == (2,)


def test_step_zero_is_the_foundation_exactly(mp0, element_sparse):
    batch = twin_batch(mp0, MP0, twin_structures(MP0))
    before, after = predict(copy.deepcopy(mp0), batch), predict(element_sparse, batch)
    for key in ("energy", "forces"):
        assert torch.equal(before[key], after[key]), key
    for qualified, owner, name in rp.iter_reparametrized(element_sparse):
        assert torch.equal(owner.__dict__[name], owner._buffers[rp.FOUNDATION.format(name)]), qualified


def raised_oxygen_threshold(mp0):
    """Element granularity with ΔW = 0.3 on every element-indexed weight, δ(O) = 0.5 and δ(Fe) = 1e-3."""
    sparse = get_sparse_model(copy.deepcopy(mp0), ELEMENT)
    expected = expected_elements(mp0)
    with torch.no_grad():
        for qualified, owner, name in rp.iter_reparametrized(sparse):
            if qualified in expected:
                owner._parameters[rp.DELTA.format(name)].fill_(0.3)
                score = owner._parameters[rp.SCORE.format(name)]
                score[O], score[FE] = 0.0, rp.score_for_threshold(1e-3)  # sigmoid(0) = 0.5 > 0.3
    return sparse, expected


def test_raising_one_elements_threshold_freezes_that_element_only(mp0):
    sparse, expected = raised_oxygen_threshold(mp0)
    for qualified, owner, name in rp.iter_reparametrized(sparse):
        if qualified not in expected:
            continue
        change = rp.effective_delta(owner, name).reshape(-1)
        element = expected[qualified].reshape(-1)
        assert torch.count_nonzero(change[element == O]) == 0, qualified
        fe = change[element == FE]
        assert fe.numel() > 0 and torch.equal(fe, torch.full_like(fe, 0.3 - 1e-3)), qualified
    # the model: a structure of O only predicts exactly what the foundation predicts, one with Fe does not
    structures = twin_structures(MP0)
    only_o = structures[0].copy()
    only_o.numbers[:] = 8
    oxygen = twin_batch(mp0, MP0, [only_o])
    mixed = twin_batch(mp0, MP0, structures)
    merged = merge_and_unload(copy.deepcopy(sparse))
    for model in (sparse, merged):
        ref, new = predict(copy.deepcopy(mp0), oxygen), predict(model, oxygen)
        assert torch.equal(new["energy"], ref["energy"]) and torch.equal(new["forces"], ref["forces"])
        ref, new = predict(copy.deepcopy(mp0), mixed), predict(model, mixed)
        assert float((new["energy"] - ref["energy"]).abs().max()) > 1e-6


def test_each_elements_threshold_gets_the_gradient_of_its_own_entries(mp0):
    """δ(O) holds every O entry in the dead zone (|ΔW| = 0.3 < 0.5): its exact gradient is 0; δ(Fe)'s is not."""
    sparse, expected = raised_oxygen_threshold(mp0)
    out = sparse(dict(twin_batch(mp0, MP0, twin_structures(MP0))), training=True, compute_force=True)
    ((out["energy"] ** 2).sum() + (out["forces"] ** 2).sum()).backward()
    for qualified, owner, name in rp.iter_reparametrized(sparse):
        grad = owner._parameters[rp.SCORE.format(name)].grad
        if qualified in expected:
            assert grad.shape == (2,) and grad[O] == 0 and grad[FE] != 0, (qualified, grad)


def test_merge_and_unload_leaves_plain_mace(mp0):
    sparse, expected = raised_oxygen_threshold(mp0)
    changes = {q: rp.effective_delta(owner, n).clone() for q, owner, n in rp.iter_reparametrized(sparse)}
    merged = merge_and_unload(sparse)
    plain = mp0.state_dict()
    state = merged.state_dict()
    assert state.keys() == plain.keys()
    assert not any(k.endswith(("_threshold_segments", "_foundation", "_delta", "_threshold_score")) for k in state)
    assert {n for n, _ in merged.named_buffers()} == {n for n, _ in mp0.named_buffers()}
    assert not list(rp.iter_reparametrized(merged))
    for qualified, change in changes.items():
        assert torch.equal(state[qualified], plain[qualified] + change), qualified
        assert bool(changed_mask(state[qualified], plain[qualified]).any()) == (qualified in expected)
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in merged.modules()]
    assert hooks == [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in mp0.modules()]
    assert not any(k.startswith("_sparse_str") for m in merged.modules() for k in m.__dict__)


@pytest.fixture(scope="module")
def element_delta(mp0, tmp_path_factory):
    sparse, expected = raised_oxygen_threshold(mp0)
    with torch.no_grad():  # a distinct δ per element, so that the file is seen to keep them apart
        for qualified, owner, name in rp.iter_reparametrized(sparse):
            if qualified in expected:
                owner._parameters[rp.SCORE.format(name)].copy_(torch.logit(torch.tensor([0.4, 2e-3]).double()))
    merged = merge_and_unload(copy.deepcopy(sparse))
    path = tmp_path_factory.mktemp("element") / "ft_sparse_delta.safetensors"
    save_delta(sparse, path)
    return sparse, expected, merged, path


def test_delta_file_records_per_element_thresholds(mp0, element_delta):
    sparse, expected, merged, path = element_delta
    delta = load_delta(path)  # validates the whole header
    meta = delta.metadata
    assert meta["granularity"] == "element" and meta["sparse_config"]["granularity"] == "element"
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    layers = json.loads(json.loads(data[8: 8 + size])["__metadata__"]["layers"])
    assert layers["columns"] == list(ELEMENT_LAYER_COLUMNS)
    records = {r["name"]: r for r in meta["layers"]}
    assert set(records) == {q for q, _, _ in rp.iter_reparametrized(sparse)}
    for qualified, record in records.items():
        if qualified in expected:
            assert record["threshold_granularity"] == "element", qualified
            assert record["element_threshold"] == pytest.approx([0.4, 2e-3], rel=1e-6)
            # every path spans both elements equally: its δ is the mean of the two
            assert record["path_threshold"] == pytest.approx([0.201] * len(record["path_labels"]), rel=1e-6)
            assert record["element_changed"] == [0, record["element_size"][FE]]  # ΔW 0.3 passes δ(Fe) only
        else:
            assert record["threshold_granularity"] == "layer" and "element_threshold" not in record, qualified
    assert torch.equal(torch.tensor([r["changed"] for r in records.values() if r["name"] not in expected]),
                       torch.zeros(len(records) - len(expected), dtype=torch.long))
    # the file still applies and reverts bit for bit
    applied = apply_delta(copy.deepcopy(mp0), delta)
    assert all(torch.equal(a, b) for a, b in zip(applied.state_dict().values(), merged.state_dict().values()))
    reverted = revert_delta(merged, delta)
    assert all(torch.equal(a, b) for a, b in zip(reverted.state_dict().values(), mp0.state_dict().values()))


def test_report_shows_the_per_element_thresholds(element_delta):
    _, expected, _, path = element_delta
    data = report_data(load_delta(path))
    rows = [e for e in data["elements_per_layer"] if e["layer"] in expected]
    assert len(rows) == 2 * len(expected)
    assert all(e["threshold"] == pytest.approx(0.4 if e["element"] == "O" else 2e-3, rel=1e-6) for e in rows)
    text = format_report(data)
    assert "| layer " in text and "4.000e-01" in text and "2.000e-03" in text
    assert "the path's delta is the mean over its entries" in text
    element_table = text.split("Changed entries per chemical element")[1]
    assert element_table.splitlines()[2].split("|")[-2].strip() == "delta"


def test_layer_and_path_files_keep_the_old_layer_columns(mp0, tmp_path):
    for granularity in ("layer", "path"):
        sparse = get_sparse_model(copy.deepcopy(mp0), SparseConfig(granularity=granularity))
        path = tmp_path / f"{granularity}.safetensors"
        save_delta(sparse, path)
        data = path.read_bytes()
        (size,) = struct.unpack("<Q", data[:8])
        layers = json.loads(json.loads(data[8: 8 + size])["__metadata__"]["layers"])
        assert layers["columns"] == list(LAYER_COLUMNS)
        assert {r["threshold_granularity"] for r in load_delta(path).metadata["layers"]} <= {"layer", "path"}
        text = format_report(report_data(load_delta(path)))
        assert "mean over its entries" not in text


def _forged(delta, edit):
    forged = copy.deepcopy(delta)
    record = next(r for r in forged.metadata["layers"] if r["threshold_granularity"] == "element")
    edit(record)
    return delta_to_bytes(forged)  # re-sealed with a matching payload hash: only the schema can refuse it


@pytest.mark.parametrize("edit, fragment", [
    (lambda r: r.pop("element_threshold"), "element_threshold is given exactly when"),
    (lambda r: r.update(element_threshold=[0.1]), "element_threshold must be 2 finite numbers"),
    (lambda r: r.update(element_threshold=[0.1, float("nan")]), "element_threshold must be 2 finite numbers"),
    (lambda r: r.update(threshold_granularity="atom"), "threshold_granularity must be one of"),
    (lambda r: r.update(threshold_granularity="path"), "element_threshold is given exactly when"),
    (lambda r: (r.pop("element_size"), r.pop("element_changed")), "without per-element counts"),
], ids=["missing", "short", "nan", "unknown", "path-with-element-deltas", "no-element-counts"])
def test_malformed_element_thresholds_are_refused(element_delta, tmp_path, edit, fragment):
    path = tmp_path / "forged.safetensors"
    path.write_bytes(_forged(load_delta(element_delta[3]), edit))
    with pytest.raises(DeltaFileError, match=fragment):
        load_delta(path)
