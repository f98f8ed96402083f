"""Benchmark scripts (run them directly; they are not tests). See each script's docstring."""
