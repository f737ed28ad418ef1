"""The labelled data sets bundled with the package (extxyz files and their README cards), by path.

``emt`` (ASE's EMT Cu/Ni/Al bulk cells and surface slabs: the quick start), ``rmd17_like`` (GFN1-xTB MD of
four molecules), ``magnetic_oxides`` (CHGNet-labelled TM-oxide cells with moments), ``organic`` and
``inorganic`` (the source data of the bundled foundations). Only the files ship; the scripts that made them
(real calculators, fixed seeds) are in the repository's ``harness/data/``. Importing this module is free::

    from mace_sparse import data
    train = data.path("rmd17_like", "aspirin_train.xyz")
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

#: The bundled sets, each a folder next to this file.
SETS = ("emt", "rmd17_like", "magnetic_oxides", "organic", "inorganic")
DATA_DIR = Path(__file__).resolve().parent


def path(name: str, file: Optional[str] = None) -> Path:
    """The folder of bundled set ``name`` (one of :data:`SETS`), or its file ``file``; a missing file is named."""
    if name not in SETS:
        raise ValueError(f"unknown bundled data set {name!r}; valid names: {', '.join(SETS)}")
    folder = DATA_DIR / name
    if file is None:
        return folder
    target = folder / file
    if not target.is_file():
        known = ", ".join(sorted(p.name for p in folder.glob("*.xyz")))
        raise FileNotFoundError(f"{target} is not a file of the bundled set {name!r} (its files: {known})")
    return target
