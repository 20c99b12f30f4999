"""Benchmarks: each script runs a named baseline and the project's engine side by side."""
