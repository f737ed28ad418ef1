"""The cost of one training step: sparse_str against full fine-tuning (and MACE's LoRA), same model, same batch.

``mace_sparse bench-step`` (issue 2, item 6: at most 1.10x the step time and 1.2x the peak memory of full
fine-tuning) and the step-cost column of ``mace_sparse bench`` measure with this package. One job per module,
imports pointing down the list:

* :mod:`.schema` — the settings (:class:`~.schema.BenchConfig`, each with its help) and the result records,
  with their markdown and JSON forms; no torch.
* :mod:`.fixture` — MACE's default arguments, the EMT batch, the model, each method set up as
  ``mace_run_train`` sets it up.
* :mod:`.take_step` — one training step: MACE's own ``take_step``.
* :mod:`.timing` — steps of all methods timed interleaved.
* :mod:`.memory` — peak live tensor bytes of a step (CUDA counters; on CPU a replay of the profiler's
  allocation events, the one use of torch's private profiler API).
* :mod:`.breakdown` — ``--profile``: sparse_str's extra work timed piece by piece, and the operators it adds.
* :mod:`.run` — the benchmark: :func:`~.run.run_benchmark`.
* :mod:`.cost` — per-method step costs of a ``mace_sparse bench`` case (:func:`~.cost.measure_step_costs`).
* :mod:`.cli` — the ``bench-step`` command line, generated from :class:`~.schema.BenchConfig`'s fields.

Nothing is imported here, so that the command line can load :mod:`.cli` without torch.
"""
