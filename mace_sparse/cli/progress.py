"""Progress lines of the long ``mace_sparse`` commands, in the form MACE users read in ``mace_run_train`` logs.

``mace_run_train`` logs ``2026-01-01 12:00:00.123 INFO: Epoch 3: ...`` through :mod:`logging`; the long
commands (``quickstart``; ``calibrate`` and ``bench-step``, whose work lives in the checkout's ``harness/``) log
the same way on stderr, so a run that takes minutes shows where it is and when it got there, while stdout stays
reserved for the command's result.
"""

from __future__ import annotations

import logging
import sys

#: MACE's own format (``mace.tools.utils.setup_logger``), so both tools' lines look alike and sort together.
MACE_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s: %(message)s"
MACE_DATEFMT = "%Y-%m-%d %H:%M:%S"


class _ProgressHandler(logging.StreamHandler):
    """Marks the handler this module installed, so that setting up twice does not print every line twice."""


def setup_progress_logging(level: int = logging.INFO) -> None:
    """Send INFO lines of the root logger to stderr in MACE's format (idempotent)."""
    root = logging.getLogger()
    if not any(isinstance(h, _ProgressHandler) for h in root.handlers):
        handler = _ProgressHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(MACE_FORMAT, datefmt=MACE_DATEFMT))
        root.addHandler(handler)
    root.setLevel(min(root.level, level) if root.level != logging.NOTSET else level)
