"""Benchmarks of pf_lightning against SciPy ARPACK, PyHessian and hessian-eigenthings (see BENCHMARKS.md)."""
