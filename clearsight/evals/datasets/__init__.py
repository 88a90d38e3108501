"""Benchmark data: POPE question files and the built-in shapes world."""
