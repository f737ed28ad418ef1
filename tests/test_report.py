"""The interpretability report: its numbers equal a direct count from the two state dicts.

The direct counts below are written from MACE's and e3nn's own layouts (instruction ``path_shape``s, the
contraction's element axis, the one-hot input of the node embedding), not from the report code.
"""

from __future__ import annotations

import copy
import json

import mace  # noqa: F401  (before e3nn)
import pytest
import torch

from mace_sparse import SparseConfig, get_sparse_model, merge_and_unload, save_delta
from mace_sparse import reparametrization as rp
from mace_sparse.artifacts.delta_file import load_delta
from mace_sparse.artifacts.report import format_report, report_data, sparsity_json
from mace_sparse.artifacts.run_outputs import write_run_artifacts
from mace_sparse.cli import main as cli_main
from mace_sparse.config import TARGET_KINDS
from mace_sparse.model_walker import find_targets

SYMBOLS = ["Al", "Ni", "Cu"]  # atomic numbers 13, 28, 29 of the EMT data


def make_sparse_model(foundation, fraction, seed=0, config=None):
    """Sparse copy of ``foundation`` with a random ``fraction`` of adapted entries beyond δ."""
    model = get_sparse_model(copy.deepcopy(foundation), config or SparseConfig())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, owner, name in rp.iter_reparametrized(model):
            d = owner._parameters[rp.DELTA.format(name)]
            mask = torch.rand(d.shape, generator=g) < fraction
            d.copy_(torch.where(mask, 0.02 + 0.05 * torch.rand(d.shape, generator=g, dtype=d.dtype), 0.0))
    return model


def changed(a, b):
    """Bitwise change mask of two tensors (same shape)."""
    x, y = a.detach().contiguous().reshape(-1), b.detach().contiguous().reshape(-1)
    size = x.element_size()
    return (x.view(torch.uint8).view(-1, size) != y.view(torch.uint8).view(-1, size)).any(1).view(a.shape)


@pytest.fixture(scope="module")
def case(tiny_foundation, tmp_path_factory):
    foundation = torch.load(tiny_foundation, map_location="cpu", weights_only=False).double()
    sparse = make_sparse_model(foundation, 0.15)
    with torch.no_grad():  # a different final δ per path so the report's δ column is checked for real
        for _, owner, name in rp.iter_reparametrized(sparse):
            s = owner._parameters[rp.SCORE.format(name)]
            s.copy_(torch.logit(torch.linspace(1e-3, 3e-3, s.numel(), dtype=torch.float64)))
    merged = merge_and_unload(copy.deepcopy(sparse))
    path = tmp_path_factory.mktemp("report") / "ft_sparse_delta.safetensors"
    save_delta(sparse, path)
    model_file = path.parent / "foundation.model"
    torch.save(foundation, model_file)
    return foundation, sparse, merged, path, model_file


def test_per_layer_counts_equal_direct_count(case):
    foundation, _, merged, path, _ = case
    data = report_data(load_delta(path))
    fp, mp = dict(foundation.named_parameters()), dict(merged.named_parameters())
    direct_total = sum(p.numel() for p in merged.parameters())
    direct_changed = sum(int(changed(fp[n], mp[n]).sum()) for n in fp)
    assert data["total_entries"] == direct_total
    assert data["changed_entries"] == direct_changed
    assert data["sparsity_over_all_parameters"] == pytest.approx(1 - direct_changed / direct_total)
    adapted = [t.qualified_name for t in find_targets(foundation, TARGET_KINDS)]
    assert [l["name"] for l in data["layers"]] == adapted
    for layer in data["layers"]:
        assert layer["size"] == fp[layer["name"]].numel()
        assert layer["changed"] == int(changed(fp[layer["name"]], mp[layer["name"]]).sum())
        assert layer["percent_changed"] == pytest.approx(100 * layer["changed"] / layer["size"])
    adapted_size = sum(fp[n].numel() for n in adapted)
    adapted_changed = sum(int(changed(fp[n], mp[n]).sum()) for n in adapted)
    assert data["sparsity_over_adapted_layers"] == pytest.approx(1 - adapted_changed / adapted_size)


def test_per_path_counts_and_thresholds(case):
    foundation, sparse, merged, path, _ = case
    data = report_data(load_delta(path))
    fp, mp = dict(foundation.named_parameters()), dict(merged.named_parameters())
    scores = {q: torch.sigmoid(o._parameters[rp.SCORE.format(n)]) for q, o, n in rp.iter_reparametrized(sparse)}
    rows = {(p["layer"], p["path"]): p for p in data["paths"]}
    for target in find_targets(foundation, TARGET_KINDS):
        mask = changed(fp[target.qualified_name], mp[target.qualified_name])
        for i, label in enumerate(target.path_labels):
            row = rows[(target.qualified_name, i)]
            in_path = target.path_index == i
            assert row["label"] == label
            assert row["size"] == int(in_path.sum())
            assert row["changed"] == int((mask & in_path).sum())
            delta = scores[target.qualified_name]
            expected = delta[i] if delta.numel() > 1 else delta[0]
            assert row["threshold"] == pytest.approx(float(expected), rel=1e-6)
    assert len(rows) == sum(len(t.path_labels) for t in find_targets(foundation, TARGET_KINDS))


def _direct_element_counts(foundation, merged):
    """(layer, element index) -> (size, changed), from MACE/e3nn layouts."""
    fp, mp = dict(foundation.named_parameters()), dict(merged.named_parameters())
    n_el = len(foundation.atomic_numbers)
    out = {}
    # node embedding: o3.Linear from num_elements x 0e; the flat weight is (mul_in = elements, mul_out)
    name = "node_embedding.linear.weight"
    mask = changed(fp[name], mp[name]).view(n_el, -1)
    for e in range(n_el):
        out[(name, e)] = (mask[e].numel(), int(mask[e].sum()))
    # skip tensor products: blocks (mul_in1, num_elements, mul_out), one per weighted instruction
    for i, block in enumerate(foundation.interactions):
        name = f"interactions.{i}.skip_tp.weight"
        mask = changed(fp[name], mp[name])
        offset, sizes, counts = 0, [0] * n_el, [0] * n_el
        for ins in block.skip_tp.instructions:
            numel = int(torch.Size(ins.path_shape).numel())
            part = mask[offset : offset + numel].view(ins.path_shape)
            offset += numel
            for e in range(n_el):
                sizes[e] += part[:, e, :].numel()
                counts[e] += int(part[:, e, :].sum())
        for e in range(n_el):
            out[(name, e)] = (sizes[e], counts[e])
    # symmetric contractions: axis 0 is the element
    for name in fp:
        if ".symmetric_contractions.contractions." in name:
            mask = changed(fp[name], mp[name])
            for e in range(n_el):
                out[(name, e)] = (mask[e].numel(), int(mask[e].sum()))
    return out


def test_per_element_counts_equal_direct_count(case):
    foundation, _, merged, path, _ = case
    data = report_data(load_delta(path))
    assert data["element_symbols"] == SYMBOLS
    got = {(r["layer"], SYMBOLS.index(r["element"])): (r["size"], r["changed"]) for r in data["elements_per_layer"]}
    direct = _direct_element_counts(foundation, merged)
    assert got == direct
    for e, row in enumerate(data["elements"]):
        assert row["changed"] == sum(c for (_, el), (_, c) in direct.items() if el == e)
        assert row["size"] == sum(s for (_, el), (s, _) in direct.items() if el == e)


def test_cli_json_prints_only_json(case, capsys):
    foundation, _, merged, path, _ = case
    assert cli_main(["report", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)  # nothing but JSON on stdout
    assert data["changed_entries"] == report_data(load_delta(path))["changed_entries"]
    assert data["total_entries"] == sum(p.numel() for p in merged.parameters())
    assert {"layers", "paths", "elements", "sparsity_over_all_parameters", "sparsity_over_adapted_layers"} <= set(data)


def test_cli_text_tables(case, capsys):
    path = case[3]
    assert cli_main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    data = report_data(load_delta(path))
    assert out.strip() == format_report(data).strip()
    assert "Changed parameters per layer" in out and "Changed entries per irrep path" in out
    assert "Changed entries per chemical element" in out
    first = data["layers"][0]
    assert f"| {first['name']}" in out and f"{first['changed']:,}" in out
    assert f"changed parameters: {data['changed_entries']:,} of {data['total_entries']:,}" in out


def test_cli_with_foundation_adds_relative_change_and_refuses_another(case, tmp_path, capsys):
    foundation, _, merged, path, model_file = case
    assert cli_main(["report", str(path), "--foundation", str(model_file), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    fp, mp = dict(foundation.named_parameters()), dict(merged.named_parameters())
    for layer in data["layers"]:
        w, w2 = fp[layer["name"]].double(), mp[layer["name"]].double()
        assert layer["relative_change"] == pytest.approx(float((w2 - w).norm() / w.norm()), rel=1e-9)
    other = copy.deepcopy(foundation)
    with torch.no_grad():
        other.readouts[0].linear.weight.mul_(2.0)
    other_file = tmp_path / "other.model"
    torch.save(other, other_file)
    assert cli_main(["report", str(path), "--foundation", str(other_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was not made from" in err


def test_cli_plots(case, tmp_path, capsys):
    path = case[3]
    assert cli_main(["report", str(path), "--plot", str(tmp_path / "plots")]) == 0
    capsys.readouterr()
    for name in ("layers.png", "paths.png", "elements.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_run_artifacts_json_matches_report(case, tmp_path):
    _, sparse, merged, path, _ = case
    delta_path, json_path = write_run_artifacts(sparse, copy.deepcopy(merged), tmp_path, "ft")
    assert delta_path.name == "ft_sparse_delta.safetensors" and json_path.name == "ft_sparsity.json"
    written = json.loads(json_path.read_text())
    assert written == json.loads(sparsity_json(load_delta(path)))
    assert written == report_data(load_delta(delta_path))


def test_layer_granularity_reports_one_threshold_per_layer(case, tmp_path):
    foundation = case[0]
    sparse = make_sparse_model(foundation, 0.1, config=SparseConfig(granularity="layer", init_threshold=2e-3))
    save_delta(sparse, tmp_path / "d.safetensors")
    data = report_data(load_delta(tmp_path / "d.safetensors"))
    assert data["granularity"] == "layer"
    assert all(p["threshold"] == pytest.approx(2e-3, rel=1e-6) for p in data["paths"])
    assert all(l["threshold_granularity"] == "layer" for l in data["layers"])
