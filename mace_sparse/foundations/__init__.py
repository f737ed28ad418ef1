"""Small MACE foundations bundled with the package, for machines that cannot download MACE-MP or MACE-OFF.

``organic`` (H, C, N, O; GFN2-xTB labels) and ``inorganic`` (Al, Cu, Ni, Fe, Co, Mn, O; CHGNet labels), and the
benchmark-scale ``organic-s`` and ``inorganic-s`` (≥ 150k parameters), were pretrained with the real
``mace_run_train`` by the repository's ``python -m harness.pretrain NAME``; each has a card ``<name>.md`` with
its data, command and measured errors. Write ``--foundation_model mace_sparse:organic``
and pass the string through :func:`resolve` to get the file. Importing this module does not import torch.
"""

from __future__ import annotations

from pathlib import Path

NAMES = ("organic", "inorganic")
#: Benchmark-scale foundations (MACE-OFF23-small / MACE-MP-0-small shapes), pretrained by the repository's harness
#: (``python -m harness.pretrain NAME``); their files land here once pretraining has converged.
BENCHMARK_SCALE = ("organic-s", "inorganic-s")
PREFIX = "mace_sparse:"
_HERE = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """The bundled ``.model`` file of foundation ``name`` (one of :data:`NAMES`)."""
    if name not in NAMES + BENCHMARK_SCALE:
        raise ValueError(f"unknown bundled foundation {name!r}; valid names: {', '.join(NAMES + BENCHMARK_SCALE)}")
    file = _HERE / f"{name}.model"
    if not file.is_file():
        raise FileNotFoundError(
            f"bundled foundation {name!r} is missing ({file}); rebuild it with 'python -m harness.pretrain {name}' "
            "from a checkout of the repository, or reinstall mace-sparse"
        )
    return file


def resolve(spec: str) -> str:
    """Turn ``"mace_sparse:<name>"`` into the bundled file's path; return any other string unchanged."""
    if isinstance(spec, str) and spec.startswith(PREFIX):
        return str(path(spec[len(PREFIX):]))
    return spec
