"""Benchmarks: run as ``python -m benchmarks.<name>``; each prints a table and can write JSON."""
