"""Interpreter start-up hook (run from ``mace_sparse.pth``): activate the plugin when MACE's trainer loads.

Kept tiny on purpose: it runs in every Python process of the environment, so it imports nothing beyond
``os``/``sys`` and the off switch (:mod:`mace_sparse.integration.state`, a leaf that imports only ``os``), and
only puts a finder on ``sys.meta_path``. The finder reacts to exactly one module, ``mace.cli.run_train``; when
that module has executed it installs the entry patches (:func:`mace_sparse.integration.entry.install`) and
removes itself. ``MACE_SPARSE_DISABLE=1`` turns it off.
"""

import sys

from mace_sparse.integration.state import disabled

_TARGET = "mace.cli.run_train"


class _PatchingLoader:
    """Delegates to the real loader, then installs the plugin into the freshly executed module."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            # here, not at start-up: the integration imports torch and MACE (seconds), needed only from now on
            from mace_sparse.integration.entry import install

            install(module)
        except Exception as exc:  # never break mace_run_train because the plugin failed to load
            sys.stderr.write(f"mace-sparse: plugin not activated ({type(exc).__name__}: {exc})\n")

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _RunTrainFinder:
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            import importlib.util  # only once mace.cli.run_train is being imported: not in every interpreter

            spec = importlib.util.find_spec(fullname)
        except Exception:
            return None
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader)
        return spec


def install_import_hook() -> None:
    if disabled() or _TARGET in sys.modules:
        return
    if not any(isinstance(f, _RunTrainFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _RunTrainFinder())


install_import_hook()
