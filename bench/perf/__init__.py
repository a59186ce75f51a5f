"""Timed benchmarks: each module emits rows through bench.run."""
