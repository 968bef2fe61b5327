"""Micro-benchmarks of the suite's own machinery, each runnable as ``python -m hpcnoise.benchmarks.NAME``."""
