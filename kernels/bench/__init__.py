"""Microbenchmarks for kernels/: `python -m kernels.bench` (see __main__.py)."""
