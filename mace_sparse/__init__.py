"""mace-sparse: sparsity-promoting (soft-threshold, STR) fine-tuning of MACE foundation models.

The public API is imported lazily: this package's start-up hook imports ``mace_sparse._bootstrap`` in every
interpreter of the environment, and that must not pull in torch or MACE.
"""

from __future__ import annotations

import importlib  # already loaded by ``site`` before any .pth runs: free

__version__ = "0.1.0"

_EXPORTS = {
    "SparseConfig": "mace_sparse.config",
    "SparseConfigError": "mace_sparse.config",
    "TARGET_KINDS": "mace_sparse.config",
    "get_sparse_model": "mace_sparse.sparse_model",
    "merge_and_unload": "mace_sparse.sparse_model",
    "print_trainable_parameters": "mace_sparse.sparse_model",
    "trainable_parameters_line": "mace_sparse.sparse_model",
    "sparsity_stats": "mace_sparse.sparse_model",
    "is_sparse_model": "mace_sparse.sparse_model",
    "delta_parameters": "mace_sparse.sparse_model",
    "threshold_parameters": "mace_sparse.sparse_model",
    "add_threshold_group": "mace_sparse.optim",
    "sparse_param_groups": "mace_sparse.optim",
    "register_threshold_decay": "mace_sparse.optim",
    "save_delta": "mace_sparse.artifacts.delta_file",
    "load_delta": "mace_sparse.artifacts.delta_file",
    "apply_delta": "mace_sparse.artifacts.delta_file",
    "revert_delta": "mace_sparse.artifacts.delta_file",
    "foundation_of": "mace_sparse.artifacts.foundation",
    "MagneticMACECalculator": "mace_sparse.magnetism.calculator",
    "MagneticMACE": "mace_sparse.magnetism.model",
    "MagneticConfig": "mace_sparse.magnetism.config",
    "load_magnetic_model": "mace_sparse.magnetism.calculator",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mace_sparse' has no attribute {name!r}")
    if module not in ("mace_sparse.config", "mace_sparse.magnetism.config"):
        # on first use, not at import: the start-up hook imports this package in every interpreter
        import mace  # noqa: F401  (mace must be imported before e3nn)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
