"""``mace_sparse apply --foundation <the file the user passed>`` after MACE derived another model from it.

Through the unchanged ``mace_run_train``: head selection (``--foundation_head`` on a two-head foundation twin),
replay fine-tuning (``--pt_train_file``: head selection, element filtering and ``pt_head`` expansion) and naive
fine-tuning (``--multiheads_finetuning False`` with element filtering). In every mode the delta records the
derivation, ``apply`` on the user's file rebuilds the saved model bit for bit, ``revert`` gives back the exact
derived model, and a delta applied to another file is still refused in one line.
"""

from __future__ import annotations

import concurrent.futures
import json

import mace  # noqa: F401  (before e3nn)
import pytest
import torch

from conftest import COMMON_ARGS, run_mace_train
from foundation_twins import NONLIN, RES, Twin, build_twin
from mace_sparse.artifacts.delta_file import load_delta
from mace_sparse.artifacts.fingerprint import model_fingerprint
from mace_sparse.cli import main as cli_main

TWO_HEADS = Twin("mh-two-heads", NONLIN, NONLIN, "0e+1o", r_max=4.0, pair_repulsion=True,
                 distance_transform="Agnesi", elements=(8, 13, 28, 29), heads=("omat_pbe", "spice_wB97M"))
ONE_HEAD = Twin("mp-with-oxygen", RES, RES, "0e+1o", r_max=4.0, elements=(8, 13, 28, 29))

MODES = {
    "head": ("two_heads.model", ["--foundation_head", "spice_wB97M", "--multiheads_finetuning", "False"]),
    "replay": ("two_heads.model", ["--foundation_head", "omat_pbe", "--pt_train_file", "bulk.xyz",
                                   "--force_mh_ft_lr", "True"]),
    "naive": ("one_head.model", ["--multiheads_finetuning", "False"]),
}


def _save(twin, path):
    model = build_twin(twin)
    with torch.no_grad():  # distinct E0s per head and element, so head selection and filtering are visible
        e0 = model.atomic_energies_fn.atomic_energies
        e0.copy_(-torch.arange(1, e0.numel() + 1, dtype=e0.dtype).reshape(e0.shape))
    torch.save(model, path)


@pytest.fixture(scope="module")
def runs(emt_data, tmp_path_factory):
    import ase.io

    work = tmp_path_factory.mktemp("multihead")
    _save(TWO_HEADS, work / "two_heads.model")
    _save(ONE_HEAD, work / "one_head.model")
    ase.io.write(work / "small.xyz", ase.io.read(emt_data["slab_train"], ":12"), format="extxyz")
    ase.io.write(work / "bulk.xyz", ase.io.read(emt_data["bulk_train"], ":12"), format="extxyz")

    def run(mode):
        foundation, extra = MODES[mode]
        cwd = work / mode
        cwd.mkdir()
        for name in ("two_heads.model", "one_head.model", "small.xyz", "bulk.xyz"):
            (cwd / name).symlink_to(work / name)
        run_mace_train(
            ["--name", "ft", "--foundation_model", foundation, "--train_file", "small.xyz", "--valid_fraction", "0.2",
             "--E0s", "foundation", "--seed", "1", "--lr", "0.01", "--plot", "False", "--max_num_epochs", "2",
             "--finetune-method", "sparse_str", *extra, *COMMON_ARGS],
            cwd=cwd, env_extra={"OMP_NUM_THREADS": "1"},
        )
        return cwd

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(MODES, pool.map(run, MODES)))


def state_fingerprint_of(path):
    return model_fingerprint(torch.load(path, map_location="cpu", weights_only=False))


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_apply_on_the_users_file_rebuilds_the_run_and_revert_gives_the_derived_model(runs, mode, capsys):
    cwd = runs[mode]
    foundation, _ = MODES[mode]
    delta = load_delta(cwd / "ft_sparse_delta.safetensors")
    derivation = delta.metadata["derivation"]
    assert derivation["source_fingerprint"] == state_fingerprint_of(cwd / foundation)
    assert derivation["source_fingerprint"] != delta.foundation_fingerprint  # MACE did derive another model
    assert "element filtering: [8, 13, 28, 29] -> [13, 28, 29]" in derivation["steps"]
    if mode != "naive":
        assert any(step.startswith("head selection: ") for step in derivation["steps"])
    if mode == "replay":
        assert "pt_head" in derivation["heads"] and len(derivation["heads"]) == 2

    rc = cli_main(["apply", "--foundation", str(cwd / foundation), "--delta", str(cwd / "ft_sparse_delta.safetensors"),
                   "-o", str(cwd / "rebuilt.model")])
    assert rc == 0
    trained, rebuilt = (
        torch.load(cwd / n, map_location="cpu", weights_only=False) for n in ("ft.model", "rebuilt.model")
    )
    assert list(rebuilt.state_dict()) == list(trained.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), trained.state_dict().values()))
    assert model_fingerprint(rebuilt) == model_fingerprint(trained) == delta.merged_fingerprint

    rc = cli_main(["revert", "--model", str(cwd / "ft.model"), "--delta", str(cwd / "ft_sparse_delta.safetensors"),
                   "-o", str(cwd / "derived.model")])
    assert rc == 0
    assert state_fingerprint_of(cwd / "derived.model") == delta.foundation_fingerprint
    capsys.readouterr()

    other = "one_head.model" if foundation == "two_heads.model" else "two_heads.model"
    rc = cli_main(["apply", "--foundation", str(cwd / other), "--delta", str(cwd / "ft_sparse_delta.safetensors"),
                   "-o", str(cwd / "wrong.model")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "made for a different foundation" in err and err.count("\n") == 0
    assert not (cwd / "wrong.model").exists()


@pytest.mark.slow
def test_apply_one_head_of_a_replay_run_and_refuse_a_head_the_delta_lacks(runs, capsys):
    from mace.tools.scripts_utils import remove_pt_head

    cwd = runs["replay"]
    delta_file = str(cwd / "ft_sparse_delta.safetensors")
    assert load_delta(delta_file).metadata["heads"] == ["pt_head", "Default"]
    sparsity = json.loads((cwd / "ft_sparsity.json").read_text())  # the run's report: changes per head
    assert [h["head"] for h in sparsity["heads"]] == ["pt_head", "Default"]
    assert sum(h["changed"] for h in sparsity["heads"]) > 0 and sparsity["heads_per_layer"]
    rc = cli_main(["apply", "--foundation", str(cwd / "two_heads.model"), "--delta", delta_file,
                   "-o", str(cwd / "default_head.model"), "--head", "Default"])
    assert rc == 0
    single = torch.load(cwd / "default_head.model", map_location="cpu", weights_only=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        expected = remove_pt_head(torch.load(cwd / "ft.model", map_location="cpu", weights_only=False), "Default")
    finally:
        torch.set_default_dtype(previous)
    assert single.heads == ["Default"] and model_fingerprint(single) == model_fingerprint(expected)
    capsys.readouterr()
    rc = cli_main(["apply", "--foundation", str(cwd / "two_heads.model"), "--delta", delta_file,
                   "-o", str(cwd / "nope.model"), "--head", "omat_pbe"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == (
        "mace_sparse apply: error: --head 'omat_pbe' is not a head of the fine-tuned model of this delta "
        "(it has pt_head, Default); give one of those"
    )
    assert not (cwd / "nope.model").exists()
