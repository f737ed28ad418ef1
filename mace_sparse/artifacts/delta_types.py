"""A delta in memory: the changed entries of each tensor and the metadata that describes them.

Every layer of the delta file works on these types and on nothing of the others: :mod:`.delta_diff` makes a
:class:`SparseDelta` from two models, :mod:`.delta_format` writes it to bytes and reads it back (first as a
checked :class:`~.delta_format.DeltaHeader`, which answers the same :class:`DeltaInfo` figures before anything
is decompressed) and :mod:`.delta_transfer` moves a model across it. Keeping them in a module of their own
lets the diff and the transfer be read without the file format, and the format without MACE's models.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Tuple

import torch

from .value_codec import apply_xor


@dataclasses.dataclass
class DeltaEntry:
    """The changed entries of one state-dict tensor.

    Attributes:
        name: state-dict name (``interactions.0.linear.weight``).
        shape: full shape of the tensor.
        dtype: its dtype.
        indices: sorted flat indices (int64) of the changed entries.
        xor: ``bits(new) ^ bits(old)`` at ``indices`` as a ``(count, element width)`` uint8 tensor, where
            ``new`` is the merged (fine-tuned) value and ``old`` the foundation's; see :meth:`other_values`.
        parameter: whether the tensor is a parameter (counted in the sparsity figures) or a buffer.
    """

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    indices: torch.Tensor
    xor: torch.Tensor
    parameter: bool = True

    @property
    def count(self) -> int:
        return int(self.indices.numel())

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def other_values(self, values: torch.Tensor) -> torch.Tensor:
        """The values at ``indices`` on the other side of the delta, bit for bit (CPU, 1-D, ``dtype``).

        Given the foundation's values at ``indices`` it returns the merged model's, and given the merged
        model's it returns the foundation's (XOR is its own inverse).
        """
        if values.dtype != self.dtype:
            raise ValueError(f"{self.name}: values of dtype {values.dtype}, the delta holds {self.dtype}")
        return apply_xor(values, self.xor)

    def across(self, tensor: torch.Tensor) -> torch.Tensor:
        """:meth:`other_values` of the whole tensor ``tensor`` (of either side) at ``indices``."""
        return self.other_values(tensor.detach().to("cpu").reshape(-1)[self.indices])

    def new_values(self, foundation_tensor: torch.Tensor) -> torch.Tensor:
        """The merged model's values at ``indices``, from the whole foundation tensor."""
        return self.across(foundation_tensor)

    def old_values(self, merged_tensor: torch.Tensor) -> torch.Tensor:
        """The foundation's values at ``indices``, from the whole merged-model tensor."""
        return self.across(merged_tensor)


class DeltaInfo:
    """The figures every delta (header only, or decoded) answers from its metadata."""

    metadata: Dict[str, Any]

    @property
    def foundation_fingerprint(self) -> str:
        return str(self.metadata["foundation_fingerprint"])

    @property
    def merged_fingerprint(self) -> str:
        return str(self.metadata["merged_fingerprint"])

    @property
    def layers(self) -> List[dict]:
        return list(self.metadata.get("layers", []))

    @property
    def changed_entries(self) -> int:
        return int(self.metadata["changed_entries"])

    @property
    def total_entries(self) -> int:
        return int(self.metadata["total_entries"])


@dataclasses.dataclass
class SparseDelta(DeltaInfo):
    """A loaded (or freshly built) delta: changed entries per tensor plus decoded metadata."""

    entries: Dict[str, DeltaEntry]
    metadata: Dict[str, Any]
