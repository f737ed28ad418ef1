"""``mace_sparse predict``: write a magnetic model's predictions into an extxyz file (like ``mace_eval_configs``).

    mace_sparse predict --model ft_magnetic.model --configs structures.xyz -o predicted.xyz

Each frame gets ``<prefix>energy`` (info), ``<prefix>forces`` and ``<prefix>magmoms`` (arrays) and, for
periodic cells, ``<prefix>stress`` (info, Voigt order as ASE). The output appears only when every frame is done.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from ..artifacts.atomic import atomic_path


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help="energies, forces, stress and magnetic moments of a <name>_magnetic.model -> extxyz",
        description="Evaluate a model with a magnetic-moment head on every frame of an extxyz file.",
    )
    parser.add_argument("--model", required=True, help="<name>_magnetic.model written by a --magmom_weight run")
    parser.add_argument("--configs", required=True, help="input structures (any format ASE reads; extxyz keeps labels)")
    parser.add_argument("-o", "--output", required=True, help="extxyz file to write")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--default_dtype", choices=["float64", "float32"], default=None,
                        help="evaluation precision (default: the model's own)")
    parser.add_argument("--info_prefix", default="MACE_", help="prefix of the written keys (default: MACE_)")
    return parser


def run(args: argparse.Namespace) -> int:
    # ASE, torch and MACE here, not at module level: ``mace_sparse --help`` imports every subcommand module
    import ase.io

    from ..magnetism.calculator import MagneticMACECalculator

    logging.basicConfig(level=logging.INFO, format="%(asctime)s.%(msecs)03d %(levelname)s: %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")
    calc = MagneticMACECalculator(args.model, device=args.device, default_dtype=args.default_dtype)
    frames = ase.io.read(args.configs, index=":")
    prefix = args.info_prefix
    start = time.perf_counter()
    for index, atoms in enumerate(frames):
        calc.calculate(atoms, ["energy", "forces", "magmoms"])
        results = calc.results
        atoms.calc = None
        atoms.info[prefix + "energy"] = results["energy"]
        atoms.arrays[prefix + "forces"] = results["forces"]
        atoms.arrays[prefix + "magmoms"] = results["magmoms"]
        if "stress" in results:
            atoms.info[prefix + "stress"] = results["stress"]
        if (index + 1) % 50 == 0 or index + 1 == len(frames):
            logging.info(f"Evaluated {index + 1}/{len(frames)} configurations ({time.perf_counter() - start:.1f} s)")
    with atomic_path(args.output) as tmp:
        ase.io.write(tmp, frames, format="extxyz")
    sys.stderr.write(f"mace_sparse predict: wrote {len(frames)} configurations to {args.output}\n")
    return 0
