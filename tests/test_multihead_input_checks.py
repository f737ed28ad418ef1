"""Bad multihead input stops a sparse_str run with one line before anything is written.

MACE 0.3.16 without these checks: a ``--foundation_head`` the file lacks is ``ValueError: Head ... not found in
model`` (traceback, after the log directory exists) or silently ignored on a one-head file; ``--pt_train_file``
with an element the foundation lacks crashes inside ``load_foundations_elements`` after data loading.
"""

from __future__ import annotations

import mace  # noqa: F401  (before e3nn)
import pytest
import torch

from foundation_twins import NONLIN, Twin, build_twin
from test_input_checks import PREFIX, bad_data, base_args, refused_in_process, run_train_module  # noqa: F401

TWO_HEADS = Twin("mh-emt-two-heads", NONLIN, NONLIN, "0e+1o", r_max=4.0, elements=(13, 28, 29),
                 heads=("omat_pbe", "spice_wB97M"))


@pytest.fixture(scope="module")
def two_head_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("two_heads") / "two_heads.model"
    torch.save(build_twin(TWO_HEADS), path)
    return path


def test_foundation_head_the_file_lacks(run_train_module, two_head_file, emt_data, tmp_path, monkeypatch):
    args = base_args(two_head_file, emt_data["slab_train"]) + ["--foundation_head", "omat_r2scan"]
    line = refused_in_process(run_train_module, monkeypatch, tmp_path / "work", args)
    assert line == PREFIX + (
        f"--foundation_head 'omat_r2scan' is not a head of {two_head_file} (it has omat_pbe, spice_wB97M); "
        "give one of those"
    )


def test_pt_train_file_with_an_element_the_foundation_lacks(run_train_module, two_head_file, emt_data, bad_data,
                                                            tmp_path, monkeypatch):
    args = base_args(two_head_file, emt_data["slab_train"]) + [
        "--foundation_head", "omat_pbe", "--pt_train_file", bad_data["with_O"]]
    line = refused_in_process(run_train_module, monkeypatch, tmp_path / "work", args)
    assert line.startswith(PREFIX + "the training data contain O, which the foundation model does not know")
    assert f"first O in {bad_data['with_O']}, configuration 3" in line
