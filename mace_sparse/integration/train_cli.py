"""``mace_sparse_train``: MACE's ``mace_run_train`` with this plugin installed explicitly.

Does what ``mace_run_train`` does once the package is installed, also where the automatic start-up hook
is off (``MACE_SPARSE_DISABLE=1``) or the environment skips ``.pth`` files.
"""

from __future__ import annotations


def main() -> None:
    import mace  # noqa: F401
    import mace.cli.run_train as run_train

    from .mace_patches import install

    install(run_train)
    run_train.main()


if __name__ == "__main__":
    main()
