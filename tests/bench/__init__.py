"""Benchmarks of qubes-sysdns-formula in the offline lab: `python -m tests.bench`."""
