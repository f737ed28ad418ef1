"""Artifacts of a sparse fine-tune: the delta file, its fingerprint checks, the sparsity report and plots.

Each module has one job (``fingerprint``: identify a model state; ``index_codec``: compact changed-entry
indices; ``foundation``: the plain foundation of a sparse model; ``layout``: per-layer/path/element counts;
``delta_file``: save/load/apply/revert; ``report`` and ``plots``: read the numbers back). Nothing is
imported here so that ``mace_sparse report`` can read a delta file without importing MACE.
"""
