"""Pretraining of every foundation the project ships or benchmarks on, with the real ``mace_run_train``.

``python -m harness.pretrain NAME [...]``:

* ``organic`` / ``inorganic``: the small foundations bundled in the wheel, one fixed-epoch run
  (:mod:`harness.pretrain.bundled`);
* ``organic-s`` / ``inorganic-s``: the benchmark-scale foundations, trained in resumable chunks until converged
  (:mod:`harness.pretrain.chunked`; work directories in ``harness/foundations/``).

Both are plain MACE (the plugin off) through the runtime's one wrapper (:mod:`mace_sparse.training`), write the
model and its card into ``mace_sparse/foundations/`` and score it with :mod:`harness.pipeline.evaluate`.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from . import bundled, chunked


def main(argv: Optional[List[str]] = None) -> None:
    """Hand the command line to the module that pretrains the named foundation."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in bundled.SPECS for a in argv):
        bundled.main(argv)
    elif any(a in chunked.SPECS for a in argv):
        chunked.main(argv)
    else:
        sys.exit(f"usage: python -m harness.pretrain NAME [...]; NAME is one of "
                 f"{', '.join([*bundled.SPECS, *chunked.SPECS])}")
