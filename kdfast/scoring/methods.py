"""The scoring methods: one registry entry each, higher score = harder example for every one of them.

Kinds:
  forward    one forward pass + the fused loss's per-example stats (+ the head's input norm): el2n, grand-last,
             loss, margin, liprune-last. Nothing of size N x C is kept; per batch, only liprune-last builds
             the (B, C) probabilities (its eigenvalue needs them).
  gradient   one forward and backward per batch through a GradNormPlan per model (kdfast.grad_norms): grand.
  training   measured while training (kdfast.ForgettingTracker): forgetting.
  batch      fixed mini-batches scored as wholes (kdfast.scoring.liprune.liprune_batch_scores): liprune.
  random     seeded uniform noise, the baseline every pruning paper compares with: random.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kdfast.errors import InvalidArgumentError


@dataclass(frozen=True)
class Method:
    name: str
    kind: str
    summary: str
    # forward kind: fn(logits, stats, feat_sqnorm or None, head_has_bias) -> (B,) float32
    fn: Callable | None = None
    needs_features: bool = False


def _el2n(logits, stats, feat_sqnorm, bias):
    return stats["el2n"]


def _loss(logits, stats, feat_sqnorm, bias):
    return stats["ce"]


def _margin(logits, stats, feat_sqnorm, bias):
    return -stats["margin"]


def _grand_last(logits, stats, feat_sqnorm, bias):
    # d CE / d W = (p - e_y) h^T and d CE / d b = p - e_y, so the norm over (W, b) is ||p - e_y|| sqrt(||h||^2 + 1).
    return stats["el2n"] * (feat_sqnorm + float(bias)).sqrt()


def _liprune_last(logits, stats, feat_sqnorm, bias):
    from kdfast.hessian.closed_forms import softmax_ce_lipschitz
    probs = torch.softmax(logits.float(), dim=-1)
    # softmax_ce_lipschitz multiplies by ||h||^2 + 1 (a head with bias); without a bias the factor is ||h||^2.
    return softmax_ce_lipschitz(probs, feat_sqnorm + float(bias) - 1.0)


_METHODS = [
    Method("el2n", "forward", "||softmax(f(x)) - onehot(y)||_2 (Paul et al. 2021)", _el2n),
    Method("grand-last", "forward", "exact norm of the cross-entropy gradient w.r.t. the last linear layer's "
           "weight and bias: ||p - e_y|| * sqrt(||h||^2 + 1)", _grand_last, needs_features=True),
    Method("grand", "gradient", "exact norm of the per-example cross-entropy gradient w.r.t. all trainable "
           "parameters (GraNd, Paul et al. 2021)"),
    Method("forgetting", "training", "correct -> incorrect transitions over training presentations (Toneva "
           "et al. 2019); never learned = +inf"),
    Method("loss", "forward", "cross-entropy -log p_y", _loss),
    Method("margin", "forward", "largest other logit minus the true-class logit (the negated margin)", _margin),
    Method("random", "random", "seeded uniform noise in [0, 1) (the baseline)"),
    Method("liprune-last", "forward", "Hessian spectral norm of the cross-entropy w.r.t. the last linear layer: "
           "lambda_max(diag(p) - p p^T) * (||h||^2 + 1) (LiPrune's closed form)", _liprune_last,
           needs_features=True),
    Method("liprune", "batch", "Hessian spectral norm of each fixed mini-batch's loss over all parameters "
           "(LiPrune); every example carries its batch's score"),
]
METHODS = {m.name: m for m in _METHODS}
METHOD_NAMES = tuple(METHODS)


def get_method(name, where: str = "score") -> Method:
    key = str(name).lower() if isinstance(name, str) else name
    if key not in METHODS:
        raise InvalidArgumentError(f"{where}: method must be one of {', '.join(METHOD_NAMES)}, got {name!r}")
    return METHODS[key]
