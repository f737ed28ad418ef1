"""Delta files from others (issue 15, items 4, 10–14): every bad file is refused in one line, in bounded memory,
with nothing written; identical deltas are identical bytes; the CLI takes ``mace_sparse:<name>`` models.

Crafted files are made the way an attacker would: a genuine delta's header is edited and the payload hash
re-sealed, so only the schema and size checks behind the hash stand between the file and the allocator.
"""

from __future__ import annotations

import copy
import json
import lzma
import os
import pickle
import resource
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import mace  # noqa: F401  (before e3nn)
import pytest
import torch

from mace_sparse import SparseConfig, get_sparse_model, merge_and_unload, save_delta
from mace_sparse import reparametrization as rp
from mace_sparse.artifacts.delta_file import (
    DeltaFileError,
    delta_to_bytes,
    load_delta,
    read_delta_header,
)
from mace_sparse.artifacts.delta_schema import container_bytes, read_container
from mace_sparse.cli import main as cli_main

REPO = Path(__file__).resolve().parent.parent
CLI = "from mace_sparse.cli import main; raise SystemExit(main())"


def sparse_of(foundation, fraction=0.05, seed=0):
    """A sparse model of ``foundation`` with ``fraction`` of its adapted entries moved past δ."""
    model = get_sparse_model(copy.deepcopy(foundation), SparseConfig())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, owner, name in rp.iter_reparametrized(model):
            delta = owner._parameters[rp.DELTA.format(name)]
            chosen = torch.rand(delta.shape, generator=g) < fraction
            delta.copy_(torch.where(chosen, torch.full_like(delta, 0.05), torch.zeros_like(delta)))
    return model


@pytest.fixture(scope="module")
def genuine(tiny_foundation, tmp_path_factory):
    """(foundation .model path, merged model, delta path) of a sparse change of the tiny foundation."""
    work = tmp_path_factory.mktemp("genuine")
    foundation = torch.load(tiny_foundation, map_location="cpu", weights_only=False).double()
    sparse = sparse_of(foundation)
    merged = merge_and_unload(copy.deepcopy(sparse))
    save_delta(sparse, work / "ft_sparse_delta.safetensors")
    torch.save(foundation, work / "foundation.model")
    torch.save(merged, work / "ft.model")
    return work / "foundation.model", work / "ft.model", work / "ft_sparse_delta.safetensors"


def parts(path):
    """(metadata, {tensor: stored bytes}) of a delta file."""
    data = Path(path).read_bytes()
    with open(path, "rb") as handle:
        raw, stored = read_container(handle, len(data), str(path))
    return dict(raw), {name: data[offset : offset + size] for name, (offset, size) in stored.items()}


def reseal(path, metadata, tensors):
    """Write a forged delta whose payload hash matches its (edited) contents, as a deliberate forger would."""
    from mace_sparse.artifacts.delta_file import payload_sha256

    as_tensors = {k: torch.frombuffer(bytearray(v), dtype=torch.uint8) if v else torch.zeros(0, dtype=torch.uint8)
                  for k, v in tensors.items()}
    metadata = dict(metadata)
    metadata["payload_sha256"] = payload_sha256(metadata, as_tensors)
    Path(path).write_bytes(container_bytes(tensors, metadata))
    return path


def run_cli(argv, capsys):
    rc = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def listing(directory):
    return sorted(p.name for p in Path(directory).iterdir())


def assert_refused_everywhere(genuine, forged, tmp_path, capsys, fragment):
    """apply, revert and report all exit 2 with one line containing ``fragment``; no file appears."""
    foundation, merged, _ = genuine
    out = tmp_path / "out.model"
    before = listing(tmp_path)
    for argv in (["apply", "--foundation", foundation, "--delta", forged, "-o", out],
                 ["revert", "--model", merged, "--delta", forged, "-o", out],
                 ["report", forged]):
        rc, stdout, err = run_cli(argv, capsys)
        assert rc == 2, (argv[0], stdout, err)
        assert err.count("\n") == 1 and err.startswith(f"mace_sparse {argv[0]}: error: "), err
        assert fragment in err, err
        assert stdout == ""
        assert listing(tmp_path) == before  # no -o, no temp file


# ------------------------------------------------------------------------------ item 13: misleading messages


def test_a_pickle_or_torch_file_renamed_safetensors_is_called_not_a_safetensors_file(genuine, tmp_path, capsys):
    zipped = tmp_path / "model_renamed.safetensors"
    zipped.write_bytes(Path(genuine[0]).read_bytes())  # torch.save: a zip archive
    pickled = tmp_path / "dict_renamed.safetensors"
    pickled.write_bytes(pickle.dumps({"weights": list(range(1000))}, protocol=4))
    assert_refused_everywhere(genuine, zipped, tmp_path, capsys, "is not a safetensors file (it is a zip archive")
    assert_refused_everywhere(genuine, pickled, tmp_path, capsys, "is not a safetensors file (it is a Python pickle)")


def test_a_directory_is_called_a_directory(genuine, tmp_path, capsys):
    folder = tmp_path / "ft_sparse_delta.safetensors"
    folder.mkdir()
    assert_refused_everywhere(genuine, folder, tmp_path, capsys, f"{folder} is a directory, not a delta file")


# ------------------------------------------------------------------------------- item 12: malformed metadata


def _drop(key):
    return lambda meta: meta.pop(key)


def _set(key, value):
    return lambda meta: meta.__setitem__(key, value)


def _bad_layers(meta):
    layers = json.loads(meta["layers"])
    layers["rows"][0][3] += 1  # size no longer the product of the shape
    meta["layers"] = json.dumps(layers)


def _short_layer_row(meta):
    layers = json.loads(meta["layers"])
    layers["rows"][0] = layers["rows"][0][:-2]
    meta["layers"] = json.dumps(layers)


MALFORMED = {
    "no-total_entries": (_drop("total_entries"), "key 'total_entries' is missing"),
    "changed_entries-abc": (_set("changed_entries", "abc"), "'changed_entries' is not valid JSON"),
    "changed_entries-string": (_set("changed_entries", '"12"'), "'changed_entries' must be an integer"),
    "no-fingerprint": (_drop("foundation_fingerprint"), "'foundation_fingerprint' must be a sha256 hex digest"),
    "layer-size": (_bad_layers, "layers row 0: size"),
    "layer-row-length": (_short_layer_row, "every row of the layers table must have 14 fields"),
    "entries-not-a-table": (_set("entries", "[1, 2]"), "the entries table must have columns"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_metadata_is_refused_in_one_line_and_nothing_is_written(genuine, tmp_path, capsys, case):
    edit, fragment = MALFORMED[case]
    metadata, tensors = parts(genuine[2])
    edit(metadata)
    forged = reseal(tmp_path / "forged.safetensors", metadata, tensors)
    with pytest.raises(DeltaFileError, match="has malformed metadata"):
        read_delta_header(forged)
    assert_refused_everywhere(genuine, forged, tmp_path, capsys, fragment)


# ------------------------------------------------------------------------------------- item 11: memory bombs


def _compressed_zeros(codec, size, fill=0):
    """``size`` bytes ``fill`` (zeros by default) compressed without ever holding them (streamed)."""
    encoder = zlib.compressobj(9) if codec == "zlib" else lzma.LZMACompressor(format=lzma.FORMAT_XZ)
    chunk, out = bytes([fill]) * (1 << 24), []
    for _ in range(size // len(chunk)):
        out.append(encoder.compress(chunk))
    return b"".join(out) + encoder.flush()


def bomb(genuine, path, codec, count, consistent, fill=0):
    """A re-sealed delta, with the real foundation's fingerprint, claiming one fully changed ``count``-entry uint8
    tensor whose stream is ``count`` compressed zeros. ``consistent``: the layers table agrees, so that the
    header passes every schema check and only the model's tensor shapes can refuse it."""
    metadata, _ = parts(genuine[2])
    name = "interactions.0.linear.weight"
    if consistent:
        metadata.update({
            "layers": json.dumps({"columns": json.loads(metadata["layers"])["columns"],
                                  "rows": [[name, "linear", [count], count, count, "layer", ["all"], [count], [count],
                                            [0.001], None, None, None, None]]}),
            "adapted_entries": str(count), "changed_adapted_entries": str(count),
        })
    metadata.update({
        "entries": json.dumps({"columns": ["name", "shape", "dtype", "encoding", "count", "parameter",
                                           "index_offset", "index_bytes", "value_offset"],
                               "rows": [[name, [count], "uint8", "all", count, True, 0, 0, 0]]}),
        "streams": json.dumps({"columns": ["tensor", "codec", "dtype", "count", "width"],
                               "rows": [["xor.uint8", codec, "uint8", count, 1]]}),
        "changed_entries": str(count), "total_entries": str(count),
    })
    return reseal(path, metadata, {"xor.uint8": _compressed_zeros(codec, count, fill)})


def peak_rss_mb(argv):
    """(exit status, stderr, peak RSS in MB) of ``mace_sparse argv`` in a fresh process."""
    measure = (
        "import resource, subprocess, sys\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stdout.write(f'{p.returncode}\\n{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\\n')\n"
        "sys.stdout.write(p.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", measure, sys.executable, "-c", CLI, *map(str, argv)],
                          capture_output=True, text=True, env=env, check=True)
    rc, rss_kb, stderr = proc.stdout.split("\n", 2)
    return int(rc), stderr, int(rss_kb) / 1024


@pytest.mark.slow
def test_memory_bombs_are_refused_in_one_line_within_bounded_memory(genuine, tmp_path):
    """The issue's bombs (2^29 entries from ~80 KB of lzma: 4.4 GB allocated before; 2^30 bytes from 1 MB of
    zlib: 2.3 GB) stay within a small margin of the RSS of the same command on a genuine delta.

    An inconsistent header is refused by the schema. A fully consistent one describes a model of that size:
    ``report`` checks its streams chunk by chunk (never held) and finds XOR zeros that change nothing, ``apply``
    refuses it at the model's tensor shapes before decompressing anything."""
    foundation, _, good = genuine
    bombs = {
        "lzma-2^29": bomb(genuine, tmp_path / "lzma.safetensors", "lzma", 1 << 29, consistent=False),
        "zlib-2^30": bomb(genuine, tmp_path / "zlib.safetensors", "zlib", 1 << 30, consistent=True),
        # every byte 0x01: a consistent header over a plausible stream, i.e. a real 2^29-entry delta
        "lzma-2^29-ones": bomb(genuine, tmp_path / "ones.safetensors", "lzma", 1 << 29, consistent=True, fill=1),
    }
    assert all(p.stat().st_size < 2 << 20 for p in bombs.values())  # small files, huge claims
    out = tmp_path / "out.model"
    baseline = {
        "report": peak_rss_mb(["report", good])[2],
        "apply": peak_rss_mb(["apply", "--foundation", foundation, "--delta", good, "-o", out])[2],
    }
    out.unlink()
    model_mb = Path(foundation).stat().st_size / 2**20
    margin = max(2 * model_mb, 64.0)  # the bound (2x the model), at least 64 MB of allocator noise
    expected = {("lzma-2^29", "report"): (2, "does not match the layers table"),
                ("lzma-2^29", "apply"): (2, "does not match the layers table"),
                ("zlib-2^30", "report"): (2, "decodes to zeros only"),  # checked chunk by chunk, never held
                ("zlib-2^30", "apply"): (2, "which the given model does not have"),
                ("lzma-2^29-ones", "report"): (0, ""),  # reported from its header; streams never held
                ("lzma-2^29-ones", "apply"): (2, "which the given model does not have")}
    for label, path in bombs.items():
        for command, argv in (("report", ["report", path]),
                              ("apply", ["apply", "--foundation", foundation, "--delta", path, "-o", out])):
            rc, stderr, rss = peak_rss_mb(argv)
            want_rc, fragment = expected[label, command]
            assert rc == want_rc, (label, command, stderr)
            if want_rc:
                lines = [line for line in stderr.splitlines() if line.strip()]
                assert len(lines) == 1 and lines[0].startswith(f"mace_sparse {command}: error: "), stderr
                assert fragment in lines[0], lines
            assert rss < baseline[command] + margin, (label, command, rss, baseline)
            assert not out.exists()


@pytest.mark.parametrize("codec,claimed", [("raw", 1 << 31), ("zlib", 1 << 31), ("lzma", 1 << 34)])
def test_a_stream_claiming_more_than_its_bytes_can_hold_is_refused_before_decompressing(genuine, tmp_path, codec,
                                                                                         claimed):
    metadata, tensors = parts(genuine[2])
    streams = json.loads(metadata["streams"])
    row = next(r for r in streams["rows"] if r[0].startswith("xor."))
    row[1], row[3] = codec, claimed // row[4]
    metadata["streams"] = json.dumps(streams)
    forged = reseal(tmp_path / "claims.safetensors", metadata, tensors)
    with pytest.raises(DeltaFileError, match="more than it can hold; refused before decompressing"):
        load_delta(forged)


# ------------------------------------------------------------------------------ item 14: deterministic bytes


def test_identical_deltas_are_identical_bytes_with_sorted_metadata(genuine):
    delta = load_delta(genuine[2])
    copies = {delta_to_bytes(copy.deepcopy(delta)) for _ in range(8)}  # safetensors' writer gave 8 orders of 8
    assert len(copies) == 1
    data = copies.pop()
    assert data == Path(genuine[2]).read_bytes()  # and the same bytes as the file written by save_delta
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    assert list(header) == ["__metadata__", *sorted(k for k in header if k != "__metadata__")]
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    from safetensors.torch import load

    assert set(load(data)) == set(header) - {"__metadata__"}  # still a valid safetensors file


# --------------------------------------------------------------------- item 4: bundled names in every command


def test_cli_model_options_accept_the_bundled_foundation_names(tmp_path, capsys):
    from mace_sparse.foundations import path as bundled_path

    foundation = torch.load(bundled_path("inorganic"), map_location="cpu", weights_only=False)
    sparse = sparse_of(foundation, fraction=0.02)
    merged = merge_and_unload(copy.deepcopy(sparse))
    delta = tmp_path / "ft_sparse_delta.safetensors"
    save_delta(sparse, delta)
    out = tmp_path / "ft.model"
    rc, _, err = run_cli(["apply", "--foundation", "mace_sparse:inorganic", "--delta", delta, "-o", out], capsys)
    assert rc == 0, err
    rebuilt = torch.load(out, map_location="cpu", weights_only=False)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), merged.state_dict().values()))
    rc, stdout, err = run_cli(["report", delta, "--foundation", "mace_sparse:inorganic", "--json"], capsys)
    assert rc == 0 and "relative_change" in stdout, err
    with pytest.raises(SystemExit) as info:  # argparse's usage error, made one line
        run_cli(["report", delta, "--foundation", "mace_sparse:nosuch"], capsys)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert "unknown bundled foundation 'nosuch'; valid names: organic, inorganic" in err


# ------------------------------------------------------------------------------------ item 10: a full disk


@pytest.mark.slow
def test_a_full_disk_during_apply_is_one_line_and_leaves_nothing(genuine, tmp_path):
    """``RLIMIT_FSIZE`` makes every write past 16 KB fail with EFBIG, as a full disk fails with ENOSPC: torch.save
    then raises ``RuntimeError ... unexpected pos`` deep in its zip writer (a double traceback before)."""
    foundation, merged, delta = genuine
    out = tmp_path / "out" / "ft.model"
    out.parent.mkdir()

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))

    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    for argv in (["apply", "--foundation", foundation, "--delta", delta, "-o", out],
                 ["revert", "--model", merged, "--delta", delta, "-o", out]):
        proc = subprocess.run([sys.executable, "-c", CLI, *map(str, argv)], capture_output=True, text=True, env=env,
                              preexec_fn=small_files)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[0].startswith(f"mace_sparse {argv[0]}: error: ") and "disk is full" in lines[0], lines
        assert listing(out.parent) == []  # no output, no temp file
