"""Benchmarks: `python -m bench.run [--quick]` appends rows to bench/results.jsonl and writes RESULTS.md."""
