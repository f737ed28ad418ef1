"""Labelled example data made from real calculators, and the scripts that make it (fixed seeds)."""
