"""Micro-benchmarks of the suite's own machinery: what each measures and how (their command lines,
``hpcnoise bench NAME``, are in hpcnoise.cli.bench)."""
