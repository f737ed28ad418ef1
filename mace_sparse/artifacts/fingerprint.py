"""A content fingerprint of a model state: which exact foundation a delta belongs to.

A delta only reproduces the fine-tuned model bit for bit on the very foundation it was computed from, so
the delta file records a sha256 over every state-dict entry (name, dtype, shape and raw bytes, in sorted
name order) of that foundation and of the merged model. ``apply``/``revert`` compare it before writing
anything, and again on the result, so a mismatch can never produce a silently different model.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor, for any dtype (bf16 and bool included, unlike ``.numpy()``)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def update_with_tensor(digest: "hashlib._Hash", name: str, tensor: torch.Tensor) -> None:
    """Feed one named tensor into a running sha256, with a header so that no two layouts collide."""
    header = f"{name}\0{str(tensor.dtype).replace('torch.', '')}\0{tuple(tensor.shape)}\0{tensor.numel()}\0"
    digest.update(header.encode("utf-8"))
    digest.update(tensor_bytes(tensor))


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) over all entries of a state dict, in sorted name order."""
    digest = hashlib.sha256(b"mace-sparse state fingerprint v1\0")
    for name in sorted(state):
        update_with_tensor(digest, name, state[name])
    return digest.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """:func:`state_fingerprint` of ``model.state_dict()`` (parameters and buffers)."""
    return state_fingerprint(model.state_dict())
