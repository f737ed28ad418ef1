"""Moving a model across a delta: foundation → fine-tuned (``apply``) or fine-tuned → foundation (``revert``).

The file stores ``x = bits(new) ^ bits(old)`` (:mod:`.delta_format`), so both directions are the same XOR and
differ only in which end the given model must be and which end the result must reach. :func:`transfer` is
that one operation, with the checks written once: the given model's fingerprint before anything is decoded
or changed, decoding bounded by its tensors, every tensor checked before any is touched, the result's
fingerprint after. Only ``apply`` may first replay how MACE derived the trained model from the user's
foundation file (:mod:`.derivation`): ``revert`` starts from the run's own ``.model``, which needs none.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Dict, Optional, Union

import torch

from .atomic import PathLike
from .delta_format import DeltaHeader, decode_delta, read_delta_header
from .delta_types import SparseDelta
from .derivation import describe, replay_derivation
from .fingerprint import model_fingerprint

#: ``direction`` of :func:`transfer`: foundation → merged model, and back.
APPLY, REVERT = +1, -1

DeltaLike = Union[SparseDelta, DeltaHeader, PathLike]


class DeltaMismatchError(ValueError):
    """The delta is intact but belongs to another model than the one it is applied to."""


@dataclasses.dataclass(frozen=True)
class _Direction:
    """What one direction needs: the fingerprints at both ends and how to name the given model in a refusal."""

    start: str  # the DeltaInfo property (and metadata key) of the fingerprint the given model must have
    end: str  # ... and of the one the result must have
    role: str
    hint: str
    replays_derivation: bool


_DIRECTIONS: Dict[int, _Direction] = {
    APPLY: _Direction(
        "foundation_fingerprint", "merged_fingerprint", "foundation",
        "give the foundation the run started from (`mace_sparse revert` rebuilds it from the fine-tuned model)",
        replays_derivation=True,
    ),
    REVERT: _Direction(
        "merged_fingerprint", "foundation_fingerprint", "fine-tuned model",
        "give the .model file written by the same run as this delta",
        replays_derivation=False,
    ),
}


def _check_fingerprint(model: torch.nn.Module, expected: str, role: str, hint: str) -> None:
    got = model_fingerprint(model)
    if got != expected:
        raise DeltaMismatchError(
            f"this delta was made for a different {role} (fingerprint {expected[:12]}…, "
            f"given model {got[:12]}…); {hint}"
        )


def _replayed_derivation(model: torch.nn.Module, delta: Union[SparseDelta, DeltaHeader]) -> Optional[torch.nn.Module]:
    """The model the run trained, rebuilt from the user's foundation file when ``model`` is that file.

    ``None`` when ``model`` already is the derived model, or is not the recorded source (then the usual refusal
    follows). A replay that does not reproduce the recorded model bit for bit is refused here.
    """
    derivation = delta.metadata.get("derivation")
    if not derivation:
        return None
    fingerprint = model_fingerprint(model)
    if fingerprint == delta.foundation_fingerprint or fingerprint != derivation.get("source_fingerprint"):
        return None
    derived = replay_derivation(model, derivation)
    if model_fingerprint(derived) != delta.foundation_fingerprint:
        raise DeltaMismatchError(
            f"replaying how MACE derived the trained model ({describe(derivation)}) did not reproduce it; "
            "give the derived model instead (`mace_sparse revert` rebuilds it from the fine-tuned model)"
        )
    return derived


@torch.no_grad()
def _flip_values(model: torch.nn.Module, delta: SparseDelta) -> None:
    """XOR the changed entries of ``model`` in place: foundation → merged model, or merged model → foundation.

    Every tensor is checked before any is changed, so a mismatch leaves the model as it was.
    """
    state = model.state_dict(keep_vars=True)
    for name, entry in delta.entries.items():
        tensor = state.get(name)
        if tensor is None or tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise DeltaMismatchError(f"the model has no tensor {name} of shape {entry.shape} and dtype {entry.dtype}")
    for name, entry in delta.entries.items():
        target = state[name].detach()
        flat = target.reshape(-1).clone()
        index = entry.indices.to(flat.device)
        flat[index] = entry.other_values(flat[index]).to(flat.device)
        target.copy_(flat.view(target.shape))


def transfer(model: torch.nn.Module, delta: DeltaLike, direction: int, inplace: bool = False) -> torch.nn.Module:
    """The model at the other end of ``delta`` from ``model``, bit for bit (``direction``: APPLY or REVERT).

    Refuses (:class:`DeltaMismatchError`) a model that is not the delta's start, before changing anything (and,
    for a file or header, before decompressing anything), and re-checks the result. Returns a new model unless
    ``inplace`` (a replayed derivation is a new model already, and is changed in place).
    """
    way = _DIRECTIONS.get(direction)
    if way is None:
        raise ValueError(f"direction must be APPLY (+1) or REVERT (-1), got {direction!r}")
    header = delta if isinstance(delta, (SparseDelta, DeltaHeader)) else read_delta_header(delta)
    derived = _replayed_derivation(model, header) if way.replays_derivation else None
    if derived is not None:
        model, inplace = derived, True  # a new model already: changed in place
    _check_fingerprint(model, getattr(header, way.start), way.role, way.hint)
    decoded = header if isinstance(header, SparseDelta) else decode_delta(header, model)
    result = model if inplace else copy.deepcopy(model)
    _flip_values(result, decoded)  # apply: new = old ^ x; revert: old = new ^ x
    _check_fingerprint(result, getattr(decoded, way.end), "result", "the delta file is inconsistent")
    return result


def apply_delta(foundation_model: torch.nn.Module, delta: DeltaLike, inplace: bool = False) -> torch.nn.Module:
    """The fine-tuned (merged) model, rebuilt from its foundation and the delta, bit for bit.

    Refuses (:class:`DeltaMismatchError`) a model that is not the delta's foundation, before changing anything
    (and, for a file or header, before decompressing anything). Returns a new model unless ``inplace``.
    """
    return transfer(foundation_model, delta, APPLY, inplace)


def revert_delta(model: torch.nn.Module, delta: DeltaLike, inplace: bool = False) -> torch.nn.Module:
    """The foundation, recovered from the fine-tuned (merged) model and the delta, bit for bit.

    Refuses (:class:`DeltaMismatchError`) a model that is not the delta's merged model. Returns a new model
    unless ``inplace``.
    """
    return transfer(model, delta, REVERT, inplace)
