"""Benchmarks of imagegen-queue on the real stack: ``python -m bench <scenario>`` (see bench/README.md)."""
