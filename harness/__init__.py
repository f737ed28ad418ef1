"""Research harness of mace-sparse: data generators, pretraining of the benchmark foundations, benchmarks.

Lives at the repository root and is not shipped in the wheel: users get the method and its MACE integration,
contributors run the harness from a checkout (``python -m harness.<module>``).
"""
