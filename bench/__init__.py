"""Benchmarks: `python -m bench.run [--budget-s S]` appends rows to runs/bench/results.jsonl (`--record`: the tracked
bench/results/results.jsonl) as they are measured and writes RESULTS.md beside them."""
