"""Integration with MACE's ``mace_run_train``: flags, patches and the explicit console script."""
