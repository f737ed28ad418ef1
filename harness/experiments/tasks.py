"""Tasks of the experiments: which foundation is fine-tuned on which data and tested where.

A task is a list of *cases*; a case is one fine-tuning problem: a foundation, a training file (optionally only
its first N frames), a held-out test file of the target domain and a test file of the foundation's own
(source) domain, on which forgetting is measured. Everything is a path, so other data or another foundation
plug in without code (``mace_sparse bench --task custom --foundation ... --train-file ...``).

The real tasks point at the bundled foundations (:mod:`mace_sparse.foundations`) and the bundled data sets
(:mod:`mace_sparse.data`, made by :mod:`harness.data`). Until those exist the ``standin`` task gives the harness something real to
run: a small foundation pretrained here on the bundled EMT bulk cells, fine-tuned on EMT surface slabs.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from mace_sparse import foundations
from mace_sparse.data import DATA_DIR
from mace_sparse.training import log_tail, run_mace_train

#: Molecules of the rMD17-like set (``harness.data.rmd17_like.MOLECULES``) and the train sizes of the issue.
RMD17_MOLECULES: Tuple[str, ...] = ("aspirin", "benzene", "malonaldehyde", "paracetamol")
RMD17_SIZES: Tuple[int, ...] = (50, 200)
#: Loss weights the bundled foundations were pretrained with (``harness.pretrain``); fine-tuning
#: keeps them, rather than MACE's default 1:100, so that energies are fitted too.
FOUNDATION_LOSS_FLAGS: Tuple[str, ...] = ("--energy_weight", "1", "--forces_weight", "10")


@dataclasses.dataclass(frozen=True)
class BenchCase:
    """One fine-tuning problem, identical for every method.

    Attributes:
        task: name of the task it belongs to; ``label``: unique, human-readable (``rmd17/aspirin/N=50``).
        foundation: the ``.model`` every method starts from.
        train_file: extxyz training data; ``train_size``: use only its first N frames (``None``: all). The
            rMD17-like files are written in a seeded random order, so the first N frames are a random subset.
        test_file: held-out target-domain test set; ``source_test_file``: test set of the foundation's domain
            (None: no forgetting measured, as in the magnetic-head experiment).
        molecules: the configurations are one molecule each, so energy errors are also given per molecule.
        e0s: MACE's ``--E0s``. ``foundation`` keeps the foundation's atomic energies; ``average`` refits them
            to the training data, needed when the target labels come from another level of theory (another
            energy zero) than the foundation's.
        valid_fraction: MACE's ``--valid_fraction`` (the validation split is drawn with the run's seed), used
            only when the case has neither ``valid_file`` nor ``valid_size``.
        valid_file: validation frames of the target domain apart from the training pool and the test set
            (``--valid_file``). ``valid_size``: instead, the last V frames of ``train_file`` validate (the
            training frames are taken from the front, so the two never overlap).
        extra_flags: further ``mace_run_train`` flags of the task (e.g. ``--magmom_weight``).
    """

    task: str
    label: str
    foundation: Path
    train_file: Path
    test_file: Path
    source_test_file: Optional[Path] = None
    train_size: Optional[int] = None
    molecules: bool = False
    e0s: str = "foundation"
    valid_fraction: float = 0.1
    energy_key: str = "REF_energy"
    forces_key: str = "REF_forces"
    extra_flags: Tuple[str, ...] = ()
    valid_file: Optional[Path] = None
    valid_size: Optional[int] = None

    def __post_init__(self) -> None:
        # absolute paths: every run executes in its own directory
        for what in ("foundation", "train_file", "test_file", "source_test_file", "valid_file"):
            if getattr(self, what) is not None:
                object.__setattr__(self, what, Path(getattr(self, what)).expanduser().resolve())

    def check_files(self) -> None:
        """Fail early, with the file that is missing, rather than minutes into a run."""
        for what in ("foundation", "train_file", "test_file", "source_test_file", "valid_file"):
            path = getattr(self, what)
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{self.label}: {what} {path} does not exist")


@dataclasses.dataclass(frozen=True)
class BenchTask:
    name: str
    description: str
    cases: Tuple[BenchCase, ...]


def bundled_foundation(name: str) -> Path:
    """``mace_sparse.foundations.path(name)``."""
    return Path(foundations.path(name))


#: Validation frames of the rMD17-like cases (``python -m harness.data.rmd17_valid``), made in the repository's
#: harness: an independent trajectory per molecule under the training pool's protocol.
RMD17_VALID_DIR = Path(__file__).resolve().parent.parent / "data" / "rmd17_valid"
HARNESS_DATA_DIR = RMD17_VALID_DIR.parent
#: Molecules and sizes of the benchmark-scale ``rmd17-s`` task (aspirin and one cheaper molecule).
RMD17_S_MOLECULES: Tuple[str, ...] = ("aspirin", "malonaldehyde")
#: Cells of the TM-oxide training pool (150) that validate the inorganic cases; the first 120 train.
OXIDE_VALID_SIZE = 30


def _rmd17_valid(data_dir: Path, molecule: str) -> Optional[Path]:
    for folder in (data_dir, RMD17_VALID_DIR):
        path = Path(folder) / f"{molecule}_valid.xyz"
        if path.is_file():
            return path
    return None


def rmd17_task(
    foundation: Optional[Path] = None,
    data_dir: Optional[Path] = None,
    source_test_file: Optional[Path] = None,
    molecules: Sequence[str] = RMD17_MOLECULES,
    sizes: Sequence[int] = RMD17_SIZES,
    scale: str = "",
) -> BenchTask:
    """Organic foundation (GFN2-xTB) fine-tuned on rMD17-like GFN1-xTB MD of single molecules.

    The labels come from another level of theory, hence ``--E0s average`` (MACE's least-squares fit of the
    atomic energies to the training set); forgetting is measured on the organic foundation's own test set.
    ``scale="-s"`` is the benchmark-scale task ``rmd17-s`` on ``organic-s`` (source test set from the harness).
    Validation frames come from ``<molecule>_valid.xyz`` (in ``data_dir`` or :data:`RMD17_VALID_DIR`); a
    molecule without one falls back to MACE's ``--valid_fraction`` split of the training frames.
    """
    name = f"rmd17{scale}"
    foundation = Path(foundation) if foundation else bundled_foundation(f"organic{scale}")
    data_dir = Path(data_dir) if data_dir else DATA_DIR / "rmd17_like"
    default_source = HARNESS_DATA_DIR / "organic_s" / "test.xyz" if scale else DATA_DIR / "organic" / "test.xyz"
    source = Path(source_test_file) if source_test_file else default_source
    cases = tuple(
        BenchCase(
            task=name, label=f"{name}/{mol}/N={n}", foundation=foundation,
            train_file=data_dir / f"{mol}_train.xyz", test_file=data_dir / f"{mol}_test.xyz",
            source_test_file=source, train_size=n, molecules=True, e0s="average", extra_flags=FOUNDATION_LOSS_FLAGS,
            valid_file=_rmd17_valid(data_dir, mol),
        )
        for mol in molecules
        for n in sizes
    )
    return BenchTask(name, f"organic{scale} foundation → rMD17-like molecules (GFN1-xTB MD)", cases)


def inorganic_task(
    foundation: Optional[Path] = None,
    data_dir: Optional[Path] = None,
    source_test_file: Optional[Path] = None,
    scale: str = "",
) -> BenchTask:
    """Inorganic foundation fine-tuned on distorted, mixed-cation TM-oxide cells it describes badly.

    Same labeller (CHGNet) as the foundation's data, so the foundation's atomic energies stay (``--E0s
    foundation``); energies and forces only (the magnetic moments are the ``magnetic`` task). The last
    :data:`OXIDE_VALID_SIZE` cells of the training pool validate; the others train. ``scale="-s"``: the
    benchmark-scale task ``inorganic-s`` on ``inorganic-s``.
    """
    name = f"inorganic{scale}"
    foundation = Path(foundation) if foundation else bundled_foundation(name)
    data_dir = Path(data_dir) if data_dir else DATA_DIR / "magnetic_oxides"
    default_source = HARNESS_DATA_DIR / "inorganic_s" / "test.xyz" if scale else DATA_DIR / "inorganic" / "test.xyz"
    source = Path(source_test_file) if source_test_file else default_source
    case = BenchCase(
        task=name, label=f"{name}/tm-oxides", foundation=foundation,
        train_file=data_dir / "train.xyz", test_file=data_dir / "test.xyz", source_test_file=source,
        extra_flags=FOUNDATION_LOSS_FLAGS, valid_size=OXIDE_VALID_SIZE,
    )
    return BenchTask(name, f"{name} foundation → distorted mixed TM oxides (CHGNet)", (case,))


def magnetic_task(
    foundation: Optional[Path] = None,
    data_dir: Optional[Path] = None,
    source_test_file: Optional[Path] = None,
    magmom_weight: float = 10.0,
) -> BenchTask:
    """The ``inorganic`` case with the magnetic-moment head trained too (``--magmom_weight``, 10 as in
    ``mace_sparse bench-magnetic``). The moment MAE is scored on the run's ``_magnetic.model``; the step cost
    is measured without the head (it is the same small head for every method)."""
    base = inorganic_task(foundation, data_dir, source_test_file).cases[0]
    case = dataclasses.replace(
        base, task="magnetic", label="magnetic/tm-oxides",
        extra_flags=(*base.extra_flags, "--magmom_weight", str(magmom_weight), "--magmoms_key", "REF_magmoms"),
    )
    return BenchTask("magnetic", "inorganic foundation → TM oxides with magnetic moments", (case,))


def custom_task(
    foundation: Path, train_file: Path, test_file: Path, source_test_file: Path,
    train_size: Optional[int] = None, molecules: bool = False, e0s: str = "foundation",
) -> BenchTask:
    """Any foundation and data given on the command line."""
    case = BenchCase(
        task="custom", label=f"custom/{Path(train_file).stem}" + (f"/N={train_size}" if train_size else ""),
        foundation=Path(foundation), train_file=Path(train_file), test_file=Path(test_file),
        source_test_file=Path(source_test_file), train_size=train_size, molecules=molecules, e0s=e0s,
    )
    return BenchTask("custom", "user-given foundation and data", (case,))


# ------------------------------------------------------------------------------------------- stand-in task

#: The stand-in foundation: same recipe as ``mace_sparse quickstart`` but smaller, so quick mode stays quick.
STANDIN_FOUNDATION_FLAGS: Tuple[str, ...] = (
    "--model", "MACE", "--num_channels", "16", "--max_L", "1", "--r_max", "4.0", "--num_radial_basis", "8",
    "--radial_MLP", "[32,32]", "--correlation", "2", "--E0s", "average", "--max_num_epochs", "15",
    "--energy_key", "REF_energy", "--forces_key", "REF_forces", "--default_dtype", "float64",
    "--device", "cpu", "--batch_size", "4", "--seed", "1", "--lr", "0.01", "--plot", "False",
)


def pretrain_standin_foundation(work_dir: Path, epochs: Optional[int] = None,
                                flags: Sequence[str] = STANDIN_FOUNDATION_FLAGS) -> Path:
    """Pretrain (once; reused if present) a small MACE on the bundled EMT bulk cells with plain ``mace_run_train``.

    ``flags``: the recipe (default :data:`STANDIN_FOUNDATION_FLAGS`; ``calibrate`` uses the quick start's),
    ``epochs`` replacing its ``--max_num_epochs``.
    """
    work_dir = Path(work_dir)
    model = work_dir / "foundation.model"
    if model.is_file():
        return model
    logging.getLogger("mace_sparse.bench").info(
        "pretraining the stand-in foundation on EMT bulk cells in %s (once; reused by later runs)", work_dir)
    flags = list(flags)
    if epochs is not None:
        flags[flags.index("--max_num_epochs") + 1] = str(epochs)
    args = ["--name", "foundation", "--train_file", str(DATA_DIR / "emt" / "bulk_train.xyz"),
            "--valid_fraction", "0.15", *flags]
    run = run_mace_train(args, work_dir, plugin=False)
    if run.returncode != 0 or not model.is_file():
        raise RuntimeError(f"pretraining the stand-in foundation failed; last lines of {run.log}:\n"
                           + log_tail(run.log))
    logging.getLogger("mace_sparse.bench").info("stand-in foundation ready after %.0f s", run.wall_s)
    return model


def standin_task(foundation: Path, data_dir: Optional[Path] = None,
                 source_test_file: Optional[Path] = None) -> BenchTask:
    """EMT bulk-trained foundation fine-tuned on EMT surface slabs; forgetting measured on bulk cells."""
    data_dir = Path(data_dir) if data_dir else DATA_DIR / "emt"
    case = BenchCase(
        task="standin", label="standin/emt-slabs", foundation=Path(foundation),
        train_file=data_dir / "slab_train.xyz", test_file=data_dir / "slab_test.xyz",
        source_test_file=Path(source_test_file) if source_test_file else data_dir / "bulk_test.xyz",
        valid_fraction=0.2,
    )
    return BenchTask("standin", "EMT bulk foundation → EMT surface slabs (stand-in)", (case,))


TASK_NAMES: Tuple[str, ...] = ("standin", "rmd17", "inorganic", "magnetic", "rmd17-s", "inorganic-s")


def build_task(name: str, foundation: Optional[Path], work_dir: Path, data_dir: Optional[Path] = None,
               source_test_file: Optional[Path] = None) -> BenchTask:
    """The task ``name``. ``foundation``, ``data_dir`` and ``source_test_file`` override its defaults (None: keep);
    ``work_dir`` holds the pretrained stand-in foundation."""
    builders: Dict[str, Callable[[], BenchTask]] = {
        "standin": lambda: standin_task(
            foundation or pretrain_standin_foundation(work_dir / "standin_foundation"), data_dir, source_test_file),
        "rmd17": lambda: rmd17_task(foundation, data_dir, source_test_file),
        "inorganic": lambda: inorganic_task(foundation, data_dir, source_test_file),
        "magnetic": lambda: magnetic_task(foundation, data_dir, source_test_file),
        "rmd17-s": lambda: rmd17_task(foundation, data_dir, source_test_file, RMD17_S_MOLECULES, scale="-s"),
        "inorganic-s": lambda: inorganic_task(foundation, data_dir, source_test_file, scale="-s"),
    }
    if name not in builders:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASK_NAMES)} (or give --train-file)")
    return builders[name]()


def select_cases(task: BenchTask, only: Optional[Sequence[str]]) -> List[BenchCase]:
    """The task's cases whose label contains one of ``only`` (all if ``only`` is empty)."""
    if not only:
        return list(task.cases)
    return [c for c in task.cases if any(part in c.label for part in only)]
