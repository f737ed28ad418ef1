"""What each case of an experiment trains, validates and is tested on, cut from its files.

The training file is cut to the case's size and its validation frames kept apart (:func:`split_files`); the
test sets keep only the frames made of the training elements, because MACE's fine-tuning drops every other
element from the model (:func:`scored_test_sets`; see :mod:`harness.pipeline.evaluate`). The files scored
are kept next to the runs, so that every number can be re-checked.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Set, Tuple

from harness.experiments.tasks import BenchCase

from . import evaluate as bench_eval
from .train import write_subset

LOG = logging.getLogger("mace_sparse.bench")


def split_files(case: BenchCase, case_dir: Path) -> Tuple[Path, Optional[Path]]:
    """The training file of the case (its first N frames) and its validation file, kept apart.

    ``valid_size`` V takes the last V frames of the training pool, the training frames come from the front; a
    pool too small for both is refused. Otherwise ``valid_file`` (or None: MACE's ``--valid_fraction``).
    """
    if not case.valid_size:
        return write_subset(case.train_file, case.train_size, case_dir / "train.xyz"), case.valid_file
    frames = bench_eval.read_frames(case.train_file)
    n = case.train_size if case.train_size is not None else len(frames) - case.valid_size
    if n < 1 or n + case.valid_size > len(frames):
        raise ValueError(f"{case.label}: {case.train_file} has {len(frames)} frames, too few for {n} training and "
                         f"{case.valid_size} validation frames")
    return (bench_eval.write_frames(frames[:n], case_dir / "train.xyz"),
            bench_eval.write_frames(frames[-case.valid_size:], case_dir / "valid.xyz"))


def scored_test_sets(case: BenchCase, case_dir: Path,
                     elements: Set[int]) -> Tuple[Path, Optional[Path], Dict[str, Any]]:
    """The target and source test files scored (only frames of the training elements) and their counts."""
    target_frames = bench_eval.read_frames(case.test_file)
    target_kept = bench_eval.read_frames(case.test_file, elements)
    target = Path(case.test_file)
    if len(target_kept) < len(target_frames):
        # a fine-tuned model knows only the training elements (see evaluate); score every method on the rest
        LOG.warning("%s: %d target test configs hold elements absent from the training data and are left out",
                    case.label, len(target_frames) - len(target_kept))
        target = bench_eval.write_frames(target_kept, case_dir / "target_test_subset.xyz")
    target_counts = {"used": len(target_kept), "in_file": len(target_frames), "file": str(target)}
    if case.source_test_file is None:
        LOG.info("%s: %d target test configs (no source test set)", case.label, len(target_kept))
        return target, None, {"target_configs": target_counts}
    source_all = len(bench_eval.read_frames(case.source_test_file))
    source = bench_eval.write_frames(bench_eval.read_frames(case.source_test_file, elements),
                                     case_dir / "source_test_subset.xyz")
    n_source = len(bench_eval.read_frames(source))
    LOG.info("%s: %d target test configs, %d of %d source test configs made of the training elements",
             case.label, len(target_kept), n_source, source_all)
    counts = {"source_configs": {"used": n_source, "in_file": source_all, "subset_file": str(source)},
              "target_configs": target_counts}
    return target, source, counts
