"""The harness's commands: ``bench``, ``calibrate`` and ``bench-magnetic``, each ``add_parser`` + ``run`` as the
runtime's ``mace_sparse.cli`` expects. The runtime reaches them through thin shims
(``mace_sparse/cli/{bench,calibrate,bench_magnetic}.py``) that need a checkout of the repository.
"""
