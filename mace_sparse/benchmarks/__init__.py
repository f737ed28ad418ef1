"""Benchmarks of mace-sparse (run from the ``mace_sparse`` command line, never as timed tests).

Timing assertions in a test suite are flaky on shared CI machines, so speed and memory claims live here as
commands that print their measurements; the tests only check that the benchmark runs and is well-formed.

* :mod:`mace_sparse.benchmarks.step_cost` — ``mace_sparse bench-step``: the cost of one training step with
  sparse_str against full fine-tuning (and MACE's LoRA) on the same model and batch.
"""
