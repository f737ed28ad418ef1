"""The MACE I/O module: its dtype context restores the dtype even on an exception, and the run's file names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mace_sparse.mace_io import default_dtype, output_paths


def test_default_dtype_is_restored_on_exception():
    before = torch.get_default_dtype()
    other = torch.float64 if before is torch.float32 else torch.float32
    with pytest.raises(RuntimeError, match="inside"):
        with default_dtype(other):
            assert torch.get_default_dtype() is other
            raise RuntimeError("inside")
    assert torch.get_default_dtype() is before
    with default_dtype("float64"):
        assert torch.get_default_dtype() is torch.float64
    assert torch.get_default_dtype() is before


def test_output_paths():
    paths = output_paths("runs", "ft")
    assert paths.delta == Path("runs/ft_sparse_delta.safetensors")
    assert paths.sparsity == Path("runs/ft_sparsity.json")
    assert paths.magnetic == Path("runs/ft_magnetic.model")
