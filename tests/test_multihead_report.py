"""The report counts changes per readout head of a multihead model (mh-* twins, foundation_twins.py).

MACE's readouts of an n-head model output one column per head (``n×0e``), and their hidden layers are masked
per head in blocks of the MLP width (``mask_head``); a change made only to one head's entries must show up under
that head alone.
"""

from __future__ import annotations

import copy
import re

import mace  # noqa: F401  (before e3nn)
import pytest
import torch

from foundation_twins import TWINS, build_twin
from mace_sparse import SparseConfig, get_sparse_model
from mace_sparse.artifacts.delta_file import build_delta, load_delta, save_delta
from mace_sparse.artifacts.report import format_report, report_data

MH0 = next(t for t in TWINS if t.name == "mh-0")
SINGLE = next(t for t in TWINS if t.name == "mp0-medium")


def test_changes_in_one_heads_readout_columns_are_counted_for_that_head_only(tmp_path):
    model = build_twin(MH0)
    heads = list(model.heads)
    assert len(heads) == 2
    sparse = get_sparse_model(copy.deepcopy(model), SparseConfig())
    first = sparse.readouts[0].linear  # LinearReadoutBlock: hidden 0e → 2x0e, weight (mul_in, heads)
    mul_in = first.weight_foundation.numel() // len(heads)
    last = sparse.readouts[1].linear_2  # NonLinearBiasReadoutBlock: (2·MLP)x0e → 2x0e, plus a bias per head
    mlp = last.weight_foundation.numel() // len(heads) // len(heads)
    with torch.no_grad():
        first.weight_delta.view(mul_in, len(heads))[:, 1] = 0.5  # head 1 column
        last.weight_delta.view(len(heads) * mlp, len(heads))[:3, 0] = 0.5  # three entries of head 0's column
        last.bias_delta[1] = 0.5
    save_delta(sparse, tmp_path / "mh_sparse_delta.safetensors")
    data = report_data(load_delta(tmp_path / "mh_sparse_delta.safetensors"))  # through the file
    assert data == report_data(build_delta(sparse))
    per_layer = {(h["layer"], h["head"]): h["changed"] for h in data["heads_per_layer"]}
    assert per_layer[("readouts.0.linear.weight", heads[0])] == 0
    assert per_layer[("readouts.0.linear.weight", heads[1])] == mul_in
    assert per_layer[("readouts.1.linear_2.weight", heads[0])] == 3
    assert per_layer[("readouts.1.linear_2.weight", heads[1])] == 0
    assert per_layer[("readouts.1.linear_2.bias", heads[1])] == 1
    totals = {h["head"]: h for h in data["heads"]}
    assert totals[heads[0]]["changed"] == 3 and totals[heads[1]]["changed"] == mul_in + 1
    readout_sizes = sum(p.numel() for n, p in model.named_parameters() if n.startswith("readouts."))
    assert sum(h["size"] for h in data["heads"]) == readout_sizes  # every readout entry belongs to one head
    text = format_report(data)
    assert "Changed entries per readout head" in text
    total = totals[heads[1]]
    assert re.search(rf"\| all readouts +\| {heads[1]} +\| +{total['size']:,} \| +{total['changed']:,} \|", text)


@pytest.mark.parametrize("twin", [SINGLE], ids=lambda t: t.name)
def test_single_head_models_have_no_head_table(twin):
    sparse = get_sparse_model(build_twin(twin), SparseConfig())
    with torch.no_grad():
        sparse.readouts[0].linear.weight_delta.fill_(0.5)
    data = report_data(build_delta(sparse))
    assert data["heads_per_layer"] == [] and data["heads"] == []
    assert "readout head" not in format_report(data)
