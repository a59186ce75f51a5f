"""Per-example scores of a data set: `score(model, data, method)`, higher = harder, in dataset order.

Methods (case-insensitive; see kdfast.scoring.methods for the definitions):
    el2n          ||softmax(f(x)) - onehot(y)||_2                          (Paul et al. 2021)
    grand-last    ||p - e_y|| * sqrt(||h||^2 + 1), exact last-layer gradient norm (h: the head's input)
    grand         exact gradient norm over all trainable parameters         (Paul et al. 2021)
    forgetting    correct -> incorrect transitions during training          (Toneva et al. 2019)
    loss          cross-entropy
    margin        largest other logit minus the true-class logit
    random        seeded uniform noise
    liprune-last  lambda_max(diag(p) - p p^T) * (||h||^2 + 1)              (LiPrune's closed form)
    liprune       each fixed mini-batch's Hessian spectral norm            (LiPrune, per batch)

Scoring runs every model in eval mode: BatchNorm uses its running statistics and dropout is off.

The names below come from kdfast/scoring/api.py, imported on first use: the score folders' reader
(kdfast.scoring.folder) serves kdfast-prune without importing torch.
"""
from __future__ import annotations

import importlib

__all__ = ["score", "ForgettingTracker", "METHODS", "METHOD_NAMES", "Method", "get_method", "BatchScorer",
           "score_batches", "index_batches", "random_scores", "PRECISIONS"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'kdfast.scoring' has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module("kdfast.scoring.api"), name)
    return value


def __dir__():
    return __all__
