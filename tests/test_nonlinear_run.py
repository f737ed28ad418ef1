"""The issue's first symptom, end to end: ``mace_run_train --finetune-method sparse_str`` on a foundation built
with MACE's non-linear interaction block (the block of mh-0/mh-1) adapts all of it, and says so.

The foundation is the mh twin (foundation_twins.py) on the EMT elements, saved as a ``.model`` file and passed
to the unchanged console script.
"""

from __future__ import annotations

import re

import mace  # noqa: F401  (before e3nn)
import pytest
import torch

from conftest import COMMON_ARGS, run_mace_train
from foundation_twins import NONLIN, Twin, build_twin

EMT_TWIN = Twin("mh-emt", NONLIN, NONLIN, "0e+1o", r_max=4.0, pair_repulsion=True, distance_transform="Agnesi",
                elements=(13, 28, 29))


@pytest.mark.slow
def test_run_on_a_nonlinear_block_foundation_adapts_and_changes_every_kind(emt_data, tmp_path):
    import ase.io

    foundation = build_twin(EMT_TWIN)
    with torch.no_grad():  # as in a pretrained mh foundation; MACE's initial beta = 0 gives density_fn no gradient
        for interaction in foundation.interactions:
            interaction.beta.fill_(0.5)
    torch.save(foundation, tmp_path / "twin.model")
    ase.io.write(tmp_path / "small.xyz", ase.io.read(emt_data["slab_train"], ":12"), format="extxyz")
    run_mace_train(
        ["--name", "ft", "--foundation_model", "twin.model", "--train_file", "small.xyz", "--valid_fraction", "0.2",
         "--E0s", "average", "--seed", "1", "--lr", "0.01", "--multiheads_finetuning", "False", "--plot", "False",
         "--skip_evaluate_heads", "Default", "--finetune-method", "sparse_str", "--max_num_epochs", "2",
         *COMMON_ARGS],
        cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1"},
    )
    log = next(p for p in (tmp_path / "logs").glob("*.log") if not p.name.endswith("_debug.log")).read_text()
    share = re.findall(r"INFO: (sparse_str adapts .*)$", log, flags=re.M)
    assert len(share) == 1 and share[0].startswith("sparse_str adapts 100.0% of the")
    for kind in ("linear", "contraction", "radial", "norm", "scalar"):
        assert re.search(rf"\b{kind} \d+\.\d% \(", share[0]), kind
    frozen = re.findall(r"WARNING: (sparse_str leaves frozen: .*)$", log, flags=re.M)
    # only what MACE itself never optimises (load_foundations_elements turns bessel_weights into a Parameter)
    assert frozen == [
        "sparse_str leaves frozen: radial_embedding.bessel_fn.bessel_weights (4 entries: MACE never optimises it, "
        "so it is not trainable in a MACE fine-tune either)"
    ]
    trained = torch.load(tmp_path / "ft.model", map_location="cpu", weights_only=False)
    before, after = dict(foundation.named_parameters()), dict(trained.named_parameters())
    assert set(after) - set(before) == {"radial_embedding.bessel_fn.bessel_weights"}  # MACE's loading, not ours
    changed = {n for n in before if not torch.equal(before[n].detach(), after[n].detach())}
    # the parameters that were frozen without a word before: radial MLP Linear + LayerNorm, density_fn, alpha/beta
    for pattern in (r"conv_tp_weights\.net\.0\.weight", r"conv_tp_weights\.net\.1\.", r"density_fn\.net\.",
                    r"\.alpha$", r"\.beta$"):
        assert any(re.search(pattern, n) for n in changed), pattern
