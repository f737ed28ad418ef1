"""What is left of the old benchmarks package: ``step_cost`` and ``bench_cost`` (``mace_sparse bench-step`` and
the benchmark's step-cost part), on their way to the repository's ``harness/stepcost/``. Excluded from the
wheel; everything else moved to ``harness/`` (pipeline, experiments, data generators, results).
"""
