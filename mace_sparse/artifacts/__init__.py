"""Artifacts of a sparse fine-tune: the delta file, its fingerprint checks, the sparsity report and plots.

Each module has one job (``fingerprint``: identify a model state; ``foundation``: the plain foundation of a
sparse model; ``layout``: per-layer/path/element counts; ``report`` and ``plots``: read the numbers back). The
delta file is built in layers: ``delta_types`` (the delta in memory); ``index_codec``, ``value_codec``,
``delta_schema`` and ``delta_format`` (the file: codecs, container and header, reading and writing);
``delta_diff`` (model → delta); ``delta_transfer`` (apply and revert, one operation in two directions);
``delta_file`` re-exports their public names. Nothing is imported here so that ``mace_sparse report`` can read
a delta file without importing MACE.
"""
