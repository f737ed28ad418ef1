"""Generators of the benchmark-scale source data sets (labelled with real calculators, fixed seeds)."""
