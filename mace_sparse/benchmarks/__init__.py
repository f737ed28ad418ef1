"""Benchmarks of mace-sparse (run from the ``mace_sparse`` command line, never as timed tests).

Timing assertions in a test suite are flaky on shared CI machines, so speed and memory claims live here as
commands that print their measurements; the tests only check that the benchmark runs and is well-formed.

* :mod:`mace_sparse.benchmarks.step_cost` — ``mace_sparse bench-step``: the cost of one training step with
  sparse_str against full fine-tuning (and MACE's LoRA) on the same model and batch.
* ``mace_sparse bench`` — the side-by-side fine-tuning benchmark, one job per module:
  :mod:`~mace_sparse.benchmarks.bench_tasks` (foundation + data of each case),
  :mod:`~mace_sparse.benchmarks.bench_methods` (method → ``mace_run_train`` flags),
  :mod:`~mace_sparse.benchmarks.bench_train` (one ``mace_run_train`` run),
  :mod:`~mace_sparse.benchmarks.bench_eval` (errors and changed parameters),
  :mod:`~mace_sparse.benchmarks.bench_cost` (step time and memory per method),
  :mod:`~mace_sparse.benchmarks.bench_runner` (all runs of all cases) and
  :mod:`~mace_sparse.benchmarks.bench_table` (means, ratios, checks, ``bench.md``).
"""
