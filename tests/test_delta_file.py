"""The sparse delta file: apply/revert bit for bit, refusals, the size bound, a custom loop and a real run.

Most tests make a sparse model of the tiny float64 foundation and set its latent deltas directly (a chosen
set of entries beyond the threshold δ), which gives many changed entries without training. One test trains
with a plain PyTorch loop through the Python API, one runs the real ``mace_run_train``.
"""

from __future__ import annotations

import copy
import json
import subprocess

import mace  # noqa: F401  (before e3nn)
import numpy as np
import pytest
import torch

from conftest import batch_of, run_mace_train
from mace_sparse import (
    SparseConfig,
    apply_delta,
    foundation_of,
    get_sparse_model,
    load_delta,
    merge_and_unload,
    revert_delta,
    save_delta,
)
from mace_sparse import reparametrization as rp
from mace_sparse.artifacts.delta_file import DeltaFileError, DeltaMismatchError, changed_mask
from mace_sparse.artifacts.fingerprint import model_fingerprint
from mace_sparse.artifacts.index_codec import decode_indices, encode_indices
from mace_sparse.cli import main as cli_main

# ------------------------------------------------------------------------------------------------ helpers


def make_sparse_model(foundation, fraction, seed=0, config=None):
    """A sparse model of a copy of ``foundation`` whose effective change is non-zero on exactly
    ``floor(fraction * all parameters)`` adapted entries, chosen at random over all adapted weights."""
    model = get_sparse_model(copy.deepcopy(foundation), config or SparseConfig())
    total = sum(p.numel() for p in foundation.parameters())
    deltas = [owner._parameters[rp.DELTA.format(name)] for _, owner, name in rp.iter_reparametrized(model)]
    sizes = [d.numel() for d in deltas]
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(sum(sizes), generator=g)[: int(fraction * total)]
    flat = torch.zeros(sum(sizes), dtype=torch.float64)
    signs = torch.where(torch.rand(chosen.numel(), generator=g) < 0.5, -1.0, 1.0).double()
    flat[chosen] = signs * (0.01 + 0.05 * torch.rand(chosen.numel(), generator=g, dtype=torch.float64))
    with torch.no_grad():
        for d, part in zip(deltas, torch.split(flat, sizes)):
            d.copy_(part.view(d.shape))
    return model


def state_equal(a, b):
    """Same keys, and every tensor equal with torch.equal and bitwise (so -0.0 != 0.0)."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    return all(
        torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype and not bool(changed_mask(sa[k], sb[k]).any())
        for k in sa
    )


def bitwise_changed(foundation, merged):
    """Direct count: state-dict name -> number of entries whose bits differ."""
    sf, sm = foundation.state_dict(), merged.state_dict()
    out = {}
    for k in sf:
        a = sf[k].reshape(-1).contiguous()
        b = sm[k].reshape(-1).contiguous()
        if a.numel() == 0:
            continue
        n = int((a.view(torch.uint8).view(-1, a.element_size()) != b.view(torch.uint8).view(-1, a.element_size()))
                .any(1).sum())
        if n:
            out[k] = n
    return out


@pytest.fixture(scope="module")
def base_case(tiny_foundation, tmp_path_factory):
    """Built once per module: (foundation, sparse model, merged model, delta bytes) at 6 % changed."""
    foundation = torch.load(tiny_foundation, map_location="cpu", weights_only=False).double()
    sparse = make_sparse_model(foundation, 0.06)
    merged = merge_and_unload(copy.deepcopy(sparse))
    path = tmp_path_factory.mktemp("delta") / "ft_sparse_delta.safetensors"
    save_delta(sparse, path)
    return foundation, sparse, merged, path.read_bytes()


@pytest.fixture()
def sparse_case(base_case, tmp_path):
    """Fresh copies for one test: (foundation, sparse model, merged model, path of its own delta file)."""
    foundation, sparse, merged, data = base_case
    path = tmp_path / "ft_sparse_delta.safetensors"
    path.write_bytes(data)
    return copy.deepcopy(foundation), copy.deepcopy(sparse), copy.deepcopy(merged), path


def run_cli(argv, capsys):
    rc = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------------------- apply and revert


def test_apply_rebuilds_merged_model_bit_for_bit(sparse_case):
    foundation, _, merged, path = sparse_case
    before = copy.deepcopy(foundation)
    delta = load_delta(path)
    rebuilt = apply_delta(foundation, delta)
    assert state_equal(rebuilt, merged)
    assert state_equal(foundation, before)  # not in place by default
    # the delta holds exactly the entries whose bits differ, nothing else
    expected = bitwise_changed(foundation, merged)
    assert {name: e.count for name, e in delta.entries.items()} == expected
    assert delta.changed_entries == sum(expected.values())
    assert delta.total_entries == sum(p.numel() for p in merged.parameters())


def test_revert_recovers_foundation_bit_for_bit(sparse_case):
    foundation, sparse, merged, path = sparse_case
    reverted = revert_delta(merged, path)
    assert state_equal(reverted, foundation)
    assert state_equal(foundation_of(sparse), foundation)
    # and round trip again
    assert state_equal(apply_delta(reverted, path), merged)


def test_negative_zero_and_absorbed_changes_are_exact(foundation_model, tmp_path):
    """W + 0 turns -0.0 into +0.0 and a tiny change can round away: the delta follows the bits, not S(ΔW, δ)."""
    foundation = copy.deepcopy(foundation_model)
    weight = foundation.interactions[0].linear.weight
    with torch.no_grad():
        weight[0] = -0.0
        weight[1] = 1.0
    sparse = get_sparse_model(copy.deepcopy(foundation), SparseConfig(init_threshold=1e-3))
    with torch.no_grad():
        d = sparse.interactions[0].linear.weight_delta
        d[1] = 1e-3 + 1e-20  # effective change 1e-20: 1.0 + 1e-20 == 1.0 in float64
        d[2] = 0.5
    merged = merge_and_unload(copy.deepcopy(sparse))
    assert torch.signbit(foundation.interactions[0].linear.weight[0]) and not torch.signbit(
        merged.interactions[0].linear.weight[0]
    )
    save_delta(sparse, tmp_path / "d.safetensors")
    delta = load_delta(tmp_path / "d.safetensors")
    entry = delta.entries["interactions.0.linear.weight"]
    assert entry.indices.tolist() == [0, 2]  # -0.0 -> 0.0 changed; 1.0 + 1e-20 unchanged
    assert state_equal(apply_delta(foundation, delta), merged)
    assert state_equal(revert_delta(merged, delta), foundation)


def test_metadata_records_versions_fingerprints_and_thresholds(sparse_case, foundation_model):
    import mace_sparse

    _, sparse, _, path = sparse_case
    with torch.no_grad():  # distinct final δ per path, checked below
        for _, owner, name in rp.iter_reparametrized(sparse):
            score = owner._parameters[rp.SCORE.format(name)]
            score.copy_(torch.logit(torch.linspace(1e-3, 2e-3, score.numel(), dtype=torch.float64)))
    merged = merge_and_unload(copy.deepcopy(sparse))
    delta = save_delta(sparse, path)
    meta = load_delta(path).metadata
    assert meta["mace_sparse_version"] == mace_sparse.__version__
    assert meta["mace_torch_version"] == "0.3.16"
    assert meta["foundation_fingerprint"] == model_fingerprint(foundation_model)
    assert meta["merged_fingerprint"] == model_fingerprint(merged)
    assert meta["targets"] == ["linear", "skip_tp", "contraction", "radial"]
    assert meta["granularity"] == "path"
    assert meta["threshold_weight_decay"] == SparseConfig().threshold_weight_decay
    for record, (_, owner, name) in zip(meta["layers"], rp.iter_reparametrized(sparse)):
        expected = torch.sigmoid(owner._parameters[rp.SCORE.format(name)]).tolist()
        if len(expected) == 1:
            expected = expected * len(record["path_labels"])
        assert record["path_threshold"] == pytest.approx(expected, rel=1e-6)
    assert delta.metadata["layers"] == meta["layers"]


# ------------------------------------------------------------------------------------------ index codec


@pytest.mark.parametrize(
    "indices, numel, encoding, nbytes",
    [
        (np.arange(100), 100, "all", 0),
        (np.arange(0, 1000, 2), 1000, "bitmask", 125),  # dense: 1000 bits
        (np.array([3, 10, 200, 455]), 1000, "gap_u8", 4),
        (np.array([5, 700, 60000]), 100000, "gap_u16", 6),
        (np.array([1, 90000, 5000000]), 10_000_000, "gap_u32", 12),
    ],
)
def test_index_codec_picks_smallest_encoding_and_round_trips(indices, numel, encoding, nbytes):
    name, data = encode_indices(indices, numel)
    assert (name, len(data)) == (encoding, nbytes)
    assert np.array_equal(decode_indices(name, data, numel, len(indices)), indices)


# -------------------------------------------------------------------------------------------- refusals


def test_wrong_foundation_is_refused(sparse_case, tmp_path, capsys):
    foundation, _, _, path = sparse_case
    other = copy.deepcopy(foundation)
    with torch.no_grad():
        other.readouts[0].linear.weight[0] += 1e-12
    with pytest.raises(DeltaMismatchError, match="made for a different foundation"):
        apply_delta(other, path)

    model_file = tmp_path / "other.model"
    torch.save(other, model_file)
    out_file = tmp_path / "out.model"
    rc, _, err = run_cli(["apply", "--foundation", model_file, "--delta", path, "-o", out_file], capsys)
    assert rc == 2
    assert err.count("\n") == 1
    assert err.startswith("mace_sparse apply: error: this delta was made for a different foundation")
    assert not out_file.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.model")]  # no temp file left


def test_revert_refuses_a_model_that_is_not_the_fine_tuned_one(sparse_case):
    foundation, _, _, path = sparse_case
    with pytest.raises(DeltaMismatchError, match="made for a different fine-tuned model"):
        revert_delta(foundation, path)


def _flip_byte(path, position):
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_values_are_refused(sparse_case, tmp_path, capsys):
    foundation, _, _, path = sparse_case
    _flip_byte(path, path.stat().st_size - 3)  # inside the last value array
    with pytest.raises(DeltaFileError, match="failed its integrity check"):
        load_delta(path)
    model_file = tmp_path / "foundation.model"
    torch.save(foundation, model_file)
    out_file = tmp_path / "out.model"
    rc, _, err = run_cli(["apply", "--foundation", model_file, "--delta", path, "-o", out_file], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "failed its integrity check (payload sha256 mismatch)" in err
    assert not out_file.exists()


def test_tampered_metadata_is_refused(sparse_case):
    path = sparse_case[3]
    data = path.read_bytes()
    needle = b'"granularity":"path"'
    assert data.count(needle) == 1
    path.write_bytes(data.replace(needle, b'"granularity":"layr"'))
    with pytest.raises(DeltaFileError, match="failed its integrity check"):
        load_delta(path)


@pytest.mark.parametrize("keep", [4, 200, "half", "minus_one"])
def test_truncated_file_is_refused(sparse_case, keep, tmp_path, capsys):
    path = sparse_case[3]
    data = path.read_bytes()
    size = {"half": len(data) // 2, "minus_one": len(data) - 1}.get(keep, keep)
    path.write_bytes(data[:size])
    with pytest.raises(DeltaFileError, match="truncated|corrupted"):
        load_delta(path)
    out_file = tmp_path / "out.model"
    rc, _, err = run_cli(["revert", "--model", tmp_path / "missing-is-never-read.model", "--delta", path,
                          "-o", out_file], capsys)
    assert rc == 2 and err.count("\n") == 1 and "truncated" in err
    assert not out_file.exists()


# ---------------------------------------------------------------------------------------------- file size


def test_file_size_at_95_percent_sparsity_is_within_5_percent_of_the_model(foundation_model, tmp_path):
    foundation = copy.deepcopy(foundation_model)
    sparse = make_sparse_model(foundation, 0.05, seed=3)
    merged = merge_and_unload(copy.deepcopy(sparse))
    model_file = tmp_path / "ft.model"
    torch.save(merged, model_file)
    delta = save_delta(sparse, tmp_path / "d.safetensors")
    sparsity = 1.0 - delta.changed_entries / delta.total_entries
    assert sparsity >= 0.95
    delta_size, model_size = (tmp_path / "d.safetensors").stat().st_size, model_file.stat().st_size
    print(f"\nsparsity {100 * sparsity:.2f} %: delta {delta_size} B, model {model_size} B, "
          f"ratio {100 * delta_size / model_size:.2f} %")
    assert delta_size <= 0.05 * model_size
    # the values cost what they must (two arrays of float64) and the index less than a byte per entry
    values = {name: e.count for name, e in delta.entries.items()}
    assert delta_size < 16 * sum(values.values()) + 2 * sum(values.values()) + 12_000


# -------------------------------------------------------------------------- custom PyTorch training loop


def test_custom_training_loop_through_the_python_api(foundation_model, slab_atoms, tmp_path):
    foundation = copy.deepcopy(foundation_model)
    model = get_sparse_model(copy.deepcopy(foundation), SparseConfig(targets=("linear", "contraction")))
    batch = batch_of(slab_atoms[:2], model)
    batch = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        out = model(dict(batch), training=True, compute_force=True)
        loss = ((out["energy"] - batch["energy"]) ** 2).mean() + ((out["forces"] - batch["forces"]) ** 2).mean()
        loss.backward()
        optimizer.step()
    save_delta(model, tmp_path / "loop.safetensors")  # peft style: save the adapter, then merge
    merged = merge_and_unload(model)
    delta = load_delta(tmp_path / "loop.safetensors")
    assert 0 < delta.changed_entries < delta.total_entries
    assert all(r["kind"] in ("linear", "contraction") for r in delta.layers)
    rebuilt = apply_delta(foundation, delta)
    assert state_equal(rebuilt, merged)
    merged.eval()
    rebuilt.eval()
    e1 = merged(dict(batch), training=False, compute_force=False)["energy"]
    e2 = rebuilt(dict(batch), training=False, compute_force=False)["energy"]
    assert torch.equal(e1, e2)


# ------------------------------------------------------------------------------------ real mace_run_train


def test_mace_run_train_writes_delta_and_sparsity_json(tiny_foundation, slab_atoms, tmp_path):
    import ase.io

    ase.io.write(tmp_path / "slabs.xyz", slab_atoms[:8])  # 6 train + 2 valid: the run is about the files
    run_mace_train(
        [
            "--name", "ft", "--foundation_model", tiny_foundation, "--train_file", tmp_path / "slabs.xyz",
            "--valid_fraction", "0.25", "--energy_key", "REF_energy", "--forces_key", "REF_forces",
            "--E0s", "foundation", "--batch_size", "4", "--max_num_epochs", "2", "--default_dtype", "float64",
            "--device", "cpu", "--seed", "1", "--lr", "0.01", "--finetune-method", "sparse_str",
            "--multiheads_finetuning", "False", "--swa", "--start_swa", "1",
        ],
        cwd=tmp_path,
    )
    for stem in ("ft", "ft_stagetwo"):
        assert (tmp_path / f"{stem}.model").is_file()
        assert (tmp_path / f"{stem}_sparse_delta.safetensors").is_file()
        assert (tmp_path / f"{stem}_sparsity.json").is_file()

    # mace_sparse apply (the console script) rebuilds ft.model from the foundation file bit for bit
    proc = subprocess.run(
        ["mace_sparse", "apply", "--foundation", str(tiny_foundation), "--delta", "ft_sparse_delta.safetensors",
         "-o", "rebuilt.model"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    ft = torch.load(tmp_path / "ft.model", map_location="cpu", weights_only=False)
    rebuilt = torch.load(tmp_path / "rebuilt.model", map_location="cpu", weights_only=False)
    assert state_equal(rebuilt, ft)

    # stage two: its own delta, same foundation
    foundation = torch.load(tiny_foundation, map_location="cpu", weights_only=False)
    stagetwo = torch.load(tmp_path / "ft_stagetwo.model", map_location="cpu", weights_only=False)
    assert state_equal(apply_delta(foundation, tmp_path / "ft_stagetwo_sparse_delta.safetensors"), stagetwo)

    # the sparsity numbers equal a direct count between ft.model and its foundation
    report = json.loads((tmp_path / "ft_sparsity.json").read_text())
    changed = bitwise_changed(foundation, ft)
    assert report["changed_entries"] == sum(changed.values())
    assert report["total_entries"] == sum(p.numel() for p in ft.parameters())
    assert report["sparsity_over_all_parameters"] == pytest.approx(
        1 - sum(changed.values()) / sum(p.numel() for p in ft.parameters())
    )
    assert {l["name"]: l["changed"] for l in report["layers"] if l["changed"]} == changed
