"""Benchmarks: every figure is measured against a baseline in the same run and printed as a ratio."""
