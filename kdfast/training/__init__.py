"""Training: `fit` and its checkpoints, `self_distill` chains."""
