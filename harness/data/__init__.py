"""Generators of every labelled data set (real calculators, fixed seeds); not shipped in the wheel.

The bundled sets (``emt_data``, ``organic_data``, ``inorganic_data``, ``rmd17_like``, ``rmd17_dft``,
``magnetic_oxides``, ``magnetic_dft``) write into ``mace_sparse/data/<set>/`` (read there through
:func:`mace_sparse.data.path`); the benchmark-scale ones (``organic_s``, ``inorganic_s``, ``rmd17_valid``) into
folders next to these scripts. The labellers (``_chgnet_label``, ``_xtb_sampling``) and ``_split`` are shared.
Run ``python -m harness.data.<set> [OUT_DIR]``; the labellers are pyproject's ``labels`` extra.
"""
