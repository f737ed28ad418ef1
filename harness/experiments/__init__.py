"""Experiments described as data: the cases (:mod:`~harness.experiments.tasks`), the methods as
``mace_run_train`` flags (:mod:`~harness.experiments.methods`), and the three experiments of the runner:
``bench`` (:mod:`~harness.experiments.bench`: its modes), ``calibrate``
(:mod:`~harness.experiments.calibration`) and ``bench-magnetic`` (:mod:`~harness.experiments.magnetic`), each
with the report it draws from the runner's records.
"""
