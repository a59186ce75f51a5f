"""Command lines: `kdfast score|prune|distill|env` and the `kdfast-score`, `kdfast-prune`, `kdfast-distill` scripts."""
