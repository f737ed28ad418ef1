"""``mace_sparse_train``: MACE's ``mace_run_train`` with this plugin installed explicitly.

Does what ``mace_run_train`` does once the package is installed, also where the automatic start-up hook
is off (``MACE_SPARSE_DISABLE=1``) or the environment skips ``.pth`` files.
"""

from __future__ import annotations

import mace.cli.run_train as run_train  # mace before e3nn; the start-up hook, if on, installs here already

from .entry import install


def main() -> None:
    install(run_train)  # idempotent
    run_train.main()


if __name__ == "__main__":
    main()
