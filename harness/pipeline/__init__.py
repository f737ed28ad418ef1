"""The one pipeline every experiment runs through, one job per module.

* :mod:`~harness.pipeline.train`: one fine-tune (over the runtime's ``mace_sparse.training.run_mace_train``):
  early stopping, reuse of finished runs, learning curve;
* :mod:`~harness.pipeline.curve`: learning curves and the stop line, read from MACE's log;
* :mod:`~harness.pipeline.splits`: what a case trains, validates and is tested on;
* :mod:`~harness.pipeline.evaluate`: the one evaluator (errors, changed parameters);
* :mod:`~harness.pipeline.runner`: every method × seed of every case, evaluated (bench, calibrate and the
  magnetic benchmark are experiments of it);
* :mod:`~harness.pipeline.table` and :mod:`~harness.pipeline.plots`: the benchmark's report.
"""
