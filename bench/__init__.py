"""Benchmarks: run by hand (`make bench`) or in a bench job, never as timed assertions in tests."""
