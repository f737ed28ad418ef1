"""The sparse delta file: apply/revert bit for bit, refusals, the size bound, a custom loop and a real run.

Most tests make a sparse model of the tiny float64 foundation and set its latent deltas directly (a chosen
set of entries beyond the threshold δ), which gives many changed entries without training. The size bound
is also checked on a mid-size ScaleShiftMACE with realistic (small, relative) changes, whose file is dominated
by its parameters like that of a large foundation. One test trains with a plain PyTorch loop through the
Python API, one runs the real ``mace_run_train``.
"""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path
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
from mace_sparse.artifacts import value_codec
from mace_sparse.artifacts.delta_file import (
    FORMAT,
    FORMAT_VERSION,
    DeltaFileError,
    DeltaMismatchError,
    SparseDelta,
    changed_mask,
    delta_from_bytes,
    delta_to_bytes,
    diff_models,
    payload_sha256,
)
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


def stored_sizes(path):
    """(header bytes, {tensor name: (dtype, stored bytes)}) of a safetensors file, read directly."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    header.pop("__metadata__")
    return size, {k: (v["dtype"], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items()}


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
    assert meta["targets"] == ["linear", "skip_tp", "contraction", "radial", "norm", "scalar", "embedding"]
    assert meta["granularity"] == SparseConfig().granularity
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
    granularity = SparseConfig().granularity
    needle = f'"granularity":"{granularity}"'.encode()
    assert data.count(needle) == 1
    forged = f'"granularity":"{granularity[:-1]}X"'.encode()  # same length: only the hash can tell
    path.write_bytes(data.replace(needle, forged))
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


@pytest.mark.parametrize("where", ["under_a_file", "proc", "a_directory"])
def test_unwritable_output_is_refused_before_the_model_is_loaded(sparse_case, tmp_path, capsys, where):
    """``-o`` is checked first (as root, mode bits do not stop a write: a path below a file, /proc, a folder)."""
    path = sparse_case[3]
    (tmp_path / "file").write_text("a regular file\n")
    (tmp_path / "folder").mkdir()
    output, reason = {
        "under_a_file": (tmp_path / "file" / "sub" / "ft.model", f"{tmp_path / 'file'} is a file, not a directory"),
        "proc": (Path("/proc/mace_sparse_out/ft.model"), "cannot create files in /proc (No such file or directory)"),
        "a_directory": (tmp_path / "folder", "it is a directory"),
    }[where]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    # the foundation path does not exist: reaching the model load would be a different error
    rc, _, err = run_cli(["apply", "--foundation", tmp_path / "never-read.model", "--delta", path, "-o", output],
                         capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"mace_sparse apply: error: cannot write {output}: {reason}; "), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no folder, no temp file


def test_save_delta_to_an_unwritable_path_raises_one_clear_error(sparse_case, tmp_path):
    from mace_sparse.artifacts.atomic import OutputPathError

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match=r"is a file, not a directory; choose an output path in a writable"):
        save_delta(sparse_case[1], tmp_path / "file" / "d.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "ft_sparse_delta.safetensors"]


def test_foundation_file_that_is_not_a_model_is_refused_in_one_line(sparse_case, tmp_path, capsys):
    path = sparse_case[3]
    text = tmp_path / "notes.model"
    text.write_text("not a model\n")
    out_file = tmp_path / "out.model"
    rc, _, err = run_cli(["apply", "--foundation", text, "--delta", path, "-o", out_file], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"mace_sparse apply: error: {text} is not a MACE model (cannot load it: ")
    assert err.rstrip().endswith("give a .model file saved by mace_run_train (torch.save of the whole model)")
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
    # one value array (the XOR of new and old bits, compressed), never two; the index under a byte per entry
    count = sum(e.count for e in delta.entries.values())
    _, tensors = stored_sizes(tmp_path / "d.safetensors")
    assert set(tensors) == {"index", "xor.float64"} and {t[0] for t in tensors.values()} == {"U8"}
    assert tensors["xor.float64"][1] < 8 * count
    assert tensors["index"][1] < count


def build_scale_shift_mace(channels=64, max_L=1, correlation=2, num_elements=10, seed=0):
    """A float64 ScaleShiftMACE built directly (no training): two interactions, MACE's default radial and
    product settings. With correlation 2 its parameters make up ~90 % of the ``.model`` file, as in a large
    foundation (correlation 3 adds megabytes of constant U matrices and takes ~1 min to build)."""
    from e3nn import o3
    from mace import modules

    torch.manual_seed(seed)
    irreps = " + ".join(f"{channels}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(max_L + 1))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = modules.ScaleShiftMACE(
            r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=3,
            interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
            num_interactions=2, num_elements=num_elements, hidden_irreps=o3.Irreps(irreps),
            MLP_irreps=o3.Irreps("16x0e"), atomic_energies=np.zeros(num_elements), avg_num_neighbors=10.0,
            atomic_numbers=list(range(1, num_elements + 1)), correlation=correlation,
            gate=torch.nn.functional.silu, radial_MLP=[64, 64, 64], atomic_inter_scale=1.0, atomic_inter_shift=0.0,
        )
    finally:
        torch.set_default_dtype(previous)
    return model.double()


def make_realistic_sparse_model(foundation, fraction, seed=0):
    """A sparse model of ``foundation`` whose merged weights differ on ``floor(fraction * all parameters)``
    random adapted entries by a fine-tuning-sized change, ``W·1e-2·z₁ + 1e-3·z₂`` (z standard normal); the
    thresholds are set to ~1e-304 so that the merged value is W + ΔW."""
    model = get_sparse_model(copy.deepcopy(foundation), SparseConfig())
    state = foundation.state_dict()
    items = list(rp.iter_reparametrized(model))
    weights = torch.cat([state[qualified].reshape(-1) for qualified, _, _ in items])
    sizes = [state[qualified].numel() for qualified, _, _ in items]
    total = sum(p.numel() for p in foundation.parameters())
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(weights.numel(), generator=g)[: int(fraction * total)]
    change = torch.zeros(weights.numel(), dtype=torch.float64)
    change[chosen] = (weights[chosen] * 1e-2 * torch.randn(chosen.numel(), generator=g, dtype=torch.float64)
                      + 1e-3 * torch.randn(chosen.numel(), generator=g, dtype=torch.float64))
    with torch.no_grad():
        for (_, owner, name), part in zip(items, torch.split(change, sizes)):
            owner._parameters[rp.SCORE.format(name)].fill_(-700.0)
            delta = owner._parameters[rp.DELTA.format(name)]
            delta.copy_(part.view(delta.shape))
    return model


def test_file_size_bound_on_a_mid_size_model_with_realistic_changes(tmp_path):
    """The case that broke the bound with two value arrays: a model file made of float64 parameters. Five
    percent of every adapted weight changes by a realistic amount; the delta must stay within 5 % of the file."""
    foundation = build_scale_shift_mace()
    total = sum(p.numel() for p in foundation.parameters())
    sparse = make_realistic_sparse_model(foundation, 0.05, seed=1)
    merged = merge_and_unload(copy.deepcopy(sparse))
    model_file = tmp_path / "ft.model"
    torch.save(merged, model_file)
    delta_file = tmp_path / "ft_sparse_delta.safetensors"
    delta = save_delta(sparse, delta_file, merged=merged, foundation=foundation)
    assert delta.changed_entries == int(0.05 * total)  # exactly 95 % unchanged (up to rounding)
    assert 1.0 - delta.changed_entries / delta.total_entries >= 0.95
    delta_size, model_size = delta_file.stat().st_size, model_file.stat().st_size
    header, tensors = stored_sizes(delta_file)
    count = delta.changed_entries
    print(f"\n{total} parameters ({8 * total / model_size:.0%} of the model file), {count} changed: "
          f"delta {delta_size} B (header {header} B, index {tensors['index'][1] / count:.2f} B/entry, "
          f"values {tensors['xor.float64'][1] / count:.2f} B/entry), model {model_size} B, "
          f"ratio {100 * delta_size / model_size:.2f} %")
    assert 8 * total > 0.8 * model_size  # the parameters dominate the file, as in a large foundation
    assert delta_size <= 0.05 * model_size
    # relative changes of ~1e-2 leave ~50 random bits of 64 in the XOR: well under 8 B per entry stored
    assert tensors["xor.float64"][1] < 7.0 * count
    assert tensors["index"][1] < 1.0 * count
    # and the compressed file is still exact both ways
    loaded = load_delta(delta_file)
    assert state_equal(apply_delta(foundation, loaded), merged)
    assert state_equal(revert_delta(merged, loaded), foundation)


# ------------------------------------------------------------------------------------- values: XOR codec


def _special_values(dtype):
    """Values whose bits a floating-point round trip would lose: -0.0, NaN payloads, ±inf, subnormals."""
    if dtype == torch.bool:
        return torch.tensor([True, False, True, True, False])
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return torch.tensor([0, 1, info.min, info.max, 100], dtype=dtype)
    info = torch.finfo(dtype)
    base = torch.tensor([0.0, 1.0, float("inf"), -float("inf"), 0.1], dtype=dtype)
    base[4] = info.tiny / 4  # subnormal
    base = torch.cat([base, torch.tensor([-0.0, float("nan")], dtype=dtype)])
    bits = base.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[base.element_size()]).clone()
    bits[-1] |= 3  # a NaN with a payload
    return bits.view(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64,
                                   torch.int32, torch.uint8, torch.bool])
def test_xor_gives_new_from_old_and_old_from_new_bit_for_bit(dtype):
    old = _special_values(dtype)
    new = old.flip(0).clone()
    xor = value_codec.xor_bits(new, old)
    assert xor.dtype == torch.uint8 and tuple(xor.shape) == (old.numel(), old.element_size())
    for source, target in ((old, new), (new, old)):
        got = value_codec.apply_xor(source, xor)
        assert got.dtype == dtype
        assert torch.equal(value_codec.value_bytes(got), value_codec.value_bytes(target))
    # the byte-shuffle is lossless
    data = value_codec.shuffle(xor)
    assert torch.equal(value_codec.unshuffle(data, old.numel(), old.element_size()), xor)


def test_close_values_give_a_compressible_xor():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(20000, generator=g, dtype=torch.float64)
    new = old * (1 + 1e-2 * torch.randn(20000, generator=g, dtype=torch.float64))
    xor = value_codec.xor_bits(new, old)
    assert float((xor[:, 7] != 0).double().mean()) < 0.01  # sign, top exponent bits: equal unless 2^k is crossed
    codec, data = value_codec.compress(value_codec.shuffle(xor))
    assert codec in ("zlib", "lzma") and len(data) < 6.6 * 20000
    assert value_codec.decompress(codec, data, xor.numel()) == value_codec.shuffle(xor)


@pytest.mark.parametrize("codec", ["zlib", "lzma"])
def test_decompress_refuses_wrong_sizes_and_corrupted_streams(codec):
    import lzma
    import zlib

    raw = bytes(range(256)) * 40
    data = zlib.compress(raw, 9) if codec == "zlib" else lzma.compress(raw)
    assert value_codec.decompress(codec, data, len(raw)) == raw
    for size in (len(raw) - 1, len(raw) + 1, 0):
        with pytest.raises(value_codec.ValueCodecError):
            value_codec.decompress(codec, data, size)
    with pytest.raises(value_codec.ValueCodecError):
        value_codec.decompress(codec, data[: len(data) // 2], len(raw))
    with pytest.raises(value_codec.ValueCodecError):
        value_codec.decompress(codec, data + b"\0", len(raw))
    broken = bytearray(data)
    broken[len(broken) // 2] ^= 0xFF
    with pytest.raises(value_codec.ValueCodecError):
        value_codec.decompress(codec, bytes(broken), len(raw))
    with pytest.raises(value_codec.ValueCodecError, match="unknown codec"):
        value_codec.decompress("pickle", data, len(raw))


class _MixedDtypes(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(300, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(7, 40, generator=g).to(torch.float32))
        self.c = torch.nn.Parameter(torch.randn(500, generator=g).to(torch.bfloat16))
        self.d = torch.nn.Parameter(torch.randn(64, generator=g).to(torch.float16))
        self.register_buffer("n", torch.arange(10, dtype=torch.int64))
        self.register_buffer("flag", torch.tensor([True, False, True]))


def test_mixed_dtypes_apply_and_revert_through_the_file(tmp_path):
    """One XOR stream per dtype; -0.0 and NaN payloads, buffers and fully changed tensors come back exactly."""
    foundation = _MixedDtypes()
    merged = copy.deepcopy(foundation)
    with torch.no_grad():
        merged.a[::7] *= 1.001
        merged.a[3] = -0.0
        merged.b[2, ::3] += 1e-3
        merged.c[100:140] = torch.nan
        merged.d.mul_(-1)  # every entry changed ("all" index encoding)
        merged.n[4] = -5
        merged.flag[1] = True
    entries, _ = diff_models(foundation, merged)
    assert set(entries) == {"a", "b", "c", "d", "n", "flag"}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "foundation_fingerprint":
                model_fingerprint(foundation), "merged_fingerprint": model_fingerprint(merged),
                # the rest of the header every delta must carry (checked against the schema when read)
                "mace_sparse_version": "test", "mace_torch_version": "test", "torch_version": torch.__version__,
                "targets": [], "granularity": "layer", "threshold_weight_decay": 0.0, "sparse_config": {},
                "atomic_numbers": [], "layers": [], "adapted_entries": 0, "changed_adapted_entries": 0,
                "changed_entries": sum(e.count for e in entries.values() if e.parameter),
                "total_entries": sum(p.numel() for p in merged.parameters())}
    data = delta_to_bytes(SparseDelta(entries=entries, metadata=metadata))
    (tmp_path / "d.safetensors").write_bytes(data)
    _, tensors = stored_sizes(tmp_path / "d.safetensors")
    assert set(tensors) == {"index", "xor.float64", "xor.float32", "xor.bfloat16", "xor.float16", "xor.int64",
                            "xor.bool"}
    loaded = delta_from_bytes(data)

    def bits_equal(x, y):  # not torch.equal: NaN != NaN
        sx, sy = x.state_dict(), y.state_dict()
        return sx.keys() == sy.keys() and all(
            sx[k].dtype == sy[k].dtype and not bool(changed_mask(sx[k], sy[k]).any()) for k in sx
        )

    assert bits_equal(apply_delta(foundation, loaded), merged)
    assert bits_equal(revert_delta(merged, loaded), foundation)
    assert not bits_equal(foundation, merged)


def _rewrite(path, edit_tensors=None, edit_metadata=None):
    """Change a delta file's tensors or metadata and re-seal it with a matching payload hash, as a deliberate
    forgery would: the checks behind the hash must still refuse it."""
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_metadata:
        edit_metadata(metadata)
    metadata["payload_sha256"] = payload_sha256(metadata, tensors)
    path.write_bytes(save(tensors, metadata=metadata))


def _corrupt_stream(tensors):
    stream = tensors["xor.float64"]
    stream[stream.numel() // 2] ^= 0xFF


def _inflate_count(metadata):
    streams = json.loads(metadata["streams"])
    for row in streams["rows"]:
        row[3] += 1
    metadata["streams"] = json.dumps(streams)


def _extra_tensor(tensors):
    tensors["old.float64"] = torch.zeros(4, dtype=torch.float64)


@pytest.mark.parametrize("edit", [dict(edit_tensors=_corrupt_stream), dict(edit_metadata=_inflate_count),
                                  dict(edit_tensors=_extra_tensor)], ids=["stream", "count", "extra"])
def test_resealed_forgeries_are_refused(sparse_case, edit):
    path = sparse_case[3]
    _rewrite(path, **edit)
    with pytest.raises(DeltaFileError, match="inconsistent contents|does not list|claims|malformed metadata"):
        load_delta(path)


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


@pytest.mark.slow
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
