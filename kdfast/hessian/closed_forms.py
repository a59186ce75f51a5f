"""Per-example Lipschitz constants of the loss gradient in closed form (LiPrune, Sec. 3).

The Lipschitz constant of the gradient of a twice-differentiable loss is the spectral norm of its
Hessian. For two models it has a closed form, cheap enough to score every example of a data set:

- squared loss 1/2 ||W x + b - y||^2 on a linear model: the Hessian w.r.t. (W, b) is I ⊗ x̃ x̃ᵀ with
  x̃ = [x; 1], so L = ||x||^2 + 1 (||x||^2 without a bias);
- softmax cross-entropy w.r.t. a linear head (W, b) on features h: the Hessian is
  (diag(p) - p pᵀ) ⊗ h̃ h̃ᵀ with h̃ = [h; 1], so L = λ_max(diag(p) - p pᵀ) · (||h||^2 + 1).

λ_max(diag(p) - p pᵀ) is found exactly and in bulk from the secular equation of the rank-one
downdate, never by a dense eigensolver per example (see `softmax_hessian_lambda_max`).
"""
from __future__ import annotations

import torch

from kdfast.errors import InvalidArgumentError

# The rational iteration settles in under 8 steps on every case in the tests; bisection fallback halves
# the bracket, so 64 float64 halvings bound the worst case, and checks every 4 steps keep syncs rare.
_MAX_SOLVER_STEPS = 64
_STEPS_PER_CHECK = 4


def _check_floating(name: str, fn: str, tensor, ndim: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgumentError(f"{fn}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim != ndim:
        raise InvalidArgumentError(
            f"{fn}: {name} must have {ndim} dimension(s), got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise InvalidArgumentError(f"{fn}: {name} must be a floating tensor, got {tensor.dtype}")


def squared_loss_lipschitz(features: torch.Tensor, *, bias: bool = True) -> torch.Tensor:
    """L_i = ||x_i||^2 (+ 1 with a bias) for the squared loss 1/2 ||W x_i + b - y_i||^2.

    features: (N, D) inputs of the linear model. Returns (N,) float32.
    """
    _check_floating("features", "squared_loss_lipschitz", features, 2)
    sqnorm = features.double().square().sum(dim=1)
    return (sqnorm + 1.0 if bias else sqnorm).float()


def softmax_hessian_lambda_max(probs: torch.Tensor) -> torch.Tensor:
    """Largest eigenvalue of diag(p) - p pᵀ for every row p of `probs` (B, C); returns (B,) float64.

    diag(p) - p pᵀ is a rank-one downdate of diag(p): its eigenvalues λ ∉ {p_c} solve the secular
    equation sum_c p_c² / (p_c - λ) = 1, and by interlacing the largest one lies in [p_(2), p_(1)].
    Since p_c² / (p_c - λ) = p_c + λ p_c / (p_c - λ) and sum_c p_c = 1, that is the cancellation-free
        G(λ) = p_(1) / (p_(1) - λ) + sum_{c ≠ top} p_c / (p_c - λ) = 0,
    increasing on the bracket max(p_(2), max_c p_c(1-p_c)) <= λ <= min(p_(1), 2 max_c p_c(1-p_c))
    (diagonal entries below, Gershgorin above).

    Solver (Bunch-Nielsen-Sorensen style, in float64, float32 drifts): in μ = λ - p_(2) the top term
    is kept exact and the other terms are replaced by the one-pole rational α - β/μ matching their
    value and slope at the iterate; the model's root in (0, p_(1) - p_(2)) is the next iterate. It
    converges in a handful of steps where Newton on G crawls (G has poles on both sides); steps leaving
    the bracket fall back to bisection. Rows are renormalised to sum 1 first: a peaked softmax whose top
    probability rounded to 1.0 still gets λ_max ≈ 2 (1 - p_(1)) right. Ties p_(1) = p_(2) give p_(1).
    """
    _check_floating("probs", "softmax_hessian_lambda_max", probs, 2)
    if probs.shape[1] == 0:
        raise InvalidArgumentError("softmax_hessian_lambda_max: probs must have at least one class, got C = 0")
    p = probs.double()
    p = p / p.sum(dim=1, keepdim=True)
    if p.shape[1] == 1:  # a single class: the softmax is constant, its Hessian 0
        return torch.zeros(p.shape[0], dtype=torch.float64, device=p.device)
    top2 = p.topk(2, dim=1)
    p1, p2 = top2.values[:, :1], top2.values[:, 1:]
    top_mask = torch.zeros_like(p, dtype=torch.bool).scatter_(1, top2.indices[:, :1], True)
    # 1 - p_c, with the top class's complement summed from the others: 1 - p_(1) rounds to 0 for a
    # peaked softmax, and the Gershgorin bound built on it would cut the root off.
    rest = p.masked_fill(top_mask, 0.0).sum(dim=1, keepdim=True)
    diagonal = (p * torch.where(top_mask, rest, 1.0 - p)).amax(dim=1, keepdim=True)
    gap = p1 - p2
    lo = (torch.maximum(p2, diagonal) - p2).clamp(min=0.0)  # bracket for μ = λ - p_(2)
    hi = (torch.minimum(p1, 2.0 * diagonal) - p2).clamp(max=gap)
    hi = torch.maximum(hi, lo)  # rounding can invert a collapsed bracket
    others = p.masked_fill(top_mask, 0.0)
    shift = torch.where(top_mask, torch.zeros_like(p), p - p2)  # pole positions in μ, exact near p_(2)
    mu = 0.5 * (lo + hi)
    for step in range(_MAX_SOLVER_STEPS):
        denom = shift - mu
        ratio = others / denom  # five passes over (B, C) per step: the whole cost
        left = ratio.sum(dim=1, keepdim=True)
        slope = (ratio / denom).sum(dim=1, keepdim=True)
        g = p1 / (gap - mu) + left
        lo = torch.where(g < 0, torch.maximum(lo, mu), lo)
        hi = torch.where(g > 0, torch.minimum(hi, mu), hi)
        # left part ≈ alpha - beta / μ' (value and slope at μ); solve p1/(gap - μ') + alpha - beta/μ' = 0,
        # i.e. alpha μ'² - B μ' + beta gap = 0, whose root in (0, gap) is 2 beta gap / (B + sqrt(B² - 4 alpha beta gap)).
        beta = slope * mu.square()
        alpha = left + beta / mu
        b = p1 + alpha * gap + beta
        root = 2.0 * beta * gap / (b + (b.square() - 4.0 * alpha * beta * gap).clamp(min=0.0).sqrt())
        # At the root, g's rounding noise can move the bracket end onto μ, and the model's root an ulp past
        # it: accept roots within tolerance of the bracket (clamped), bisect on the others.
        tol = 4 * torch.finfo(torch.float64).eps * (mu + p2)
        ok = torch.isfinite(root) & (lo - tol <= root) & (root <= hi + tol)
        mu_new = torch.where(ok, torch.minimum(torch.maximum(root, lo), hi), 0.5 * (lo + hi))
        mu_new = torch.where(g == 0, mu, mu_new)  # exact root: stay
        settled = ((mu_new - mu).abs() <= tol) | (hi - lo <= tol)
        mu = mu_new
        if (step + 1) % _STEPS_PER_CHECK == 0 and bool(settled.all()):
            break
    # A collapsed bracket (ties p_(1) = p_(2), or bounds that meet) is its own answer.
    return (p2 + torch.where(hi > lo, mu, lo)).squeeze(1)


def softmax_ce_lipschitz(probs: torch.Tensor, feat_sqnorm: torch.Tensor) -> torch.Tensor:
    """L_i = λ_max(diag(p_i) - p_i p_iᵀ) · (||h_i||^2 + 1), the Hessian spectral norm of the softmax
    cross-entropy w.r.t. a linear head (weight and bias) whose input is h_i.

    probs: (B, C) softmax probabilities; feat_sqnorm: (B,) ||h_i||^2. Returns (B,) float32.
    The label does not enter: the cross-entropy Hessian depends on the prediction only.
    """
    _check_floating("probs", "softmax_ce_lipschitz", probs, 2)
    _check_floating("feat_sqnorm", "softmax_ce_lipschitz", feat_sqnorm, 1)
    if feat_sqnorm.shape[0] != probs.shape[0]:
        raise InvalidArgumentError(
            f"softmax_ce_lipschitz: feat_sqnorm must have shape ({probs.shape[0]},) to match probs "
            f"{tuple(probs.shape)}, got {tuple(feat_sqnorm.shape)}")
    lam = softmax_hessian_lambda_max(probs)
    return (lam * (feat_sqnorm.double() + 1.0)).float()
