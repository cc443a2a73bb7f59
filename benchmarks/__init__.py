"""Benchmarks: each `python -m benchmarks.<name>` prints a markdown table and writes JSON."""
