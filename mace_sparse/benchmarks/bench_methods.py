"""TEMPORARY (issue 14 merge): ``bench_cost`` imports ``Method`` from here until helper S moves ``bench_cost``
and ``step_cost`` to ``harness/stepcost/``; the methods now live in :mod:`harness.experiments.methods`. This
whole folder is excluded from the wheel (pyproject) and goes away with that move."""

from harness.experiments.methods import Method  # noqa: F401
