"""From scores to a subset: selection (`prune`), importance sampling, external score files and keep files."""
