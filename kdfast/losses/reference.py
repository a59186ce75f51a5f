"""Reference implementations of the fused KD loss.

Per row i (student logits s, teacher logits t, label y, weight w, temperature T, KD weight alpha):
    ce_i = -log softmax(s_i)[y_i]
    kl_i = sum_c q_ic (log q_ic - log p_ic),  q = softmax(t_i / T),  p = softmax(s_i / T)  (q_ic = 0 adds 0)
    l_i  = w_i * ((1 - alpha) * ce_i + alpha * T^2 * kl_i)
and, in closed form,
    d l_i / d s_i = w_i * ((1 - alpha) * (softmax(s_i) - onehot(y_i)) + alpha * T * (p_i - q_i)).
Rows whose label is ignore_index contribute 0 (loss, gradient and every statistic). alpha may be any finite
number (outside [0, 1] the op asks for extrapolate=True); a weight of exactly 0 or 1 drops the other term.

Non-finite logits (the semantics every backend follows):
  * -inf is a legal logit, an impossible class: p_c = 0 (q_c = 0 for the teacher, adding 0 to the KL).
    A student -inf where the label or a teacher-supported class sits gives an infinite loss with a finite
    gradient.
  * A student row with NaN or +inf, or with no finite logit: softmax is undefined, so its loss, gradient and
    statistics are NaN, except `correct`, which is 0.
  * A teacher row with NaN or +inf, or with no finite logit: its kl is NaN, and so are the row's loss,
    gradient and grad_norm unless alpha == 0 (which never reads the teacher for them).

Two independent oracles live here:
  kd_loss_ref       autograd-differentiable composition of torch ops (the test oracle for loss and gradient)
  kd_stats_ref      the per-example statistics, straight from their definitions
and one backend:
  kd_loss_fwd_torch the "torch" backend: the kernels' contract (loss rows, gradient, stats) in torch ops.
"""
from __future__ import annotations

import torch

# Order of the rows of the (6, N) stats buffer every backend fills.
KD_STAT_NAMES = ("ce", "kl", "el2n", "grad_norm", "correct", "margin")


def _kl_rows(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p = torch.log_softmax(s / temperature, dim=-1)
    log_q = torch.log_softmax(t / temperature, dim=-1)
    q = log_q.exp()
    # q == 0 (teacher logit -inf) contributes exactly 0, not 0 * (-inf - log p) = nan; a NaN q stays NaN.
    return torch.where(q == 0, torch.zeros_like(q), q * (log_q - log_p)).sum(-1)


def undefined_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows (last dim) whose softmax is undefined: a NaN or +inf logit, or no finite one."""
    return ~(x < float("inf")).all(-1) | (x == float("-inf")).all(-1)


def _ce_rows(s: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    safe = torch.where(valid, target, torch.zeros_like(target))
    return -torch.log_softmax(s, dim=-1).gather(-1, safe[:, None]).squeeze(-1)


def kd_loss_ref(student_logits, teacher_logits, target, *, alpha=0.5, temperature=4.0, reduction="mean",
                ignore_index=-100, weight=None, dtype=torch.float64):
    """The KD loss as a composition of torch ops in `dtype`; differentiable w.r.t. student_logits."""
    C = student_logits.shape[-1]
    s = student_logits.reshape(-1, C).to(dtype)
    y = target.reshape(-1)
    valid = y != ignore_index
    rows = torch.zeros(s.shape[0], dtype=dtype, device=s.device)
    if alpha != 1:
        rows = rows + (1 - alpha) * _ce_rows(s, y, valid)
    if alpha != 0:
        t = teacher_logits.reshape(-1, C).to(dtype)
        rows = rows + alpha * temperature ** 2 * _kl_rows(s, t, temperature)
    if weight is not None:
        rows = rows * weight.reshape(-1).to(dtype)
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(target.shape)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().clamp(min=1)


def kd_stats_ref(student_logits, teacher_logits, target, *, alpha=0.5, temperature=4.0, ignore_index=-100,
                 weight=None, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Per-example statistics from their definitions; grad_norm through autograd of the unreduced loss."""
    C = student_logits.shape[-1]
    s = student_logits.reshape(-1, C).to(dtype).detach().requires_grad_(True)
    y = target.reshape(-1)
    valid = y != ignore_index
    safe = torch.where(valid, y, torch.zeros_like(y))
    t = None if teacher_logits is None else teacher_logits.reshape(-1, C).to(dtype)
    rows = kd_loss_ref(s, t, y, alpha=alpha, temperature=temperature, reduction="none",
                       ignore_index=ignore_index, weight=weight, dtype=dtype)
    (grad,) = torch.autograd.grad(rows.sum(), s)
    s = s.detach()
    onehot = torch.nn.functional.one_hot(safe, C).to(dtype)
    others = torch.where(onehot.bool(), torch.full_like(s, float("-inf")), s)
    margin = s.gather(-1, safe[:, None]).squeeze(-1) - others.amax(-1)
    margin = torch.where(undefined_rows(s), torch.full_like(margin, float("nan")), margin)
    kl = _kl_rows(s, t, temperature) if t is not None else torch.full_like(margin, float("nan"))
    stats = {
        "ce": _ce_rows(s, y, valid),
        "kl": kl,
        "el2n": (torch.softmax(s, -1) - onehot).norm(dim=-1),
        "grad_norm": grad.norm(dim=-1),
        "correct": (margin > 0).to(dtype),
        "margin": margin,
    }
    return {k: torch.where(valid, v, torch.zeros_like(v)).to(torch.float32) for k, v in stats.items()}


def kd_loss_fwd_torch(student, teacher, target, weight, alpha: float, temperature: float, ignore_index: int,
                      reduction: int, need_grad: bool, return_stats: bool, grad_out=None):
    """The "torch" backend of the kernels' forward contract.

    student (N, C), teacher (N, C) or None, target (N,) int64, weight (N,) fp32 or None; reduction 0 (none),
    1 (sum) or 2 (mean). Returns the loss (rows (N,) fp32 for none, else 0-d fp32), the gradient
    scale * d l_i / d s_i in the student's dtype (scale = 1 / max(1, rows not ignored) for mean, else 1) or
    None, and the (6, N) fp32 stats (or None). grad_out, when given, receives the gradient (it may be
    `student` itself: the in-place mode). A row whose label is neither ignore_index nor in [0, C) gets NaN
    loss and stats, never a wild read; non-finite logits follow the module docstring.
    Arithmetic in fp32 (fp64 for fp64 inputs).
    """
    cdt = torch.float64 if student.dtype == torch.float64 else torch.float32
    N, C = student.shape
    s = student.to(cdt)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < C)
    safe = torch.where(valid & in_range, target, torch.zeros_like(target))
    onehot = torch.nn.functional.one_hot(safe, C).to(cdt)
    nan = torch.full((N,), float("nan"), dtype=cdt, device=s.device)
    s_bad = undefined_rows(s)
    log_sm = torch.log_softmax(s, -1)
    ce = -log_sm.gather(-1, safe[:, None]).squeeze(-1)
    g = (1 - alpha) * (log_sm.exp() - onehot)
    kl = nan
    if teacher is not None:
        log_p = torch.log_softmax(s / temperature, -1)
        log_q = torch.log_softmax(teacher.to(cdt) / temperature, -1)
        q = log_q.exp()
        kl = torch.where(q == 0, torch.zeros_like(q), q * (log_q - log_p)).sum(-1)
        if alpha != 0:  # alpha == 0 never reads the teacher for the loss or the gradient
            g = g + (alpha * temperature) * (log_p.exp() - q)
    ce_term = torch.zeros_like(ce) if alpha == 1 else (1 - alpha) * ce
    kl_term = torch.zeros_like(ce) if alpha == 0 else alpha * temperature ** 2 * kl
    rows = ce_term + kl_term
    w = valid.to(cdt) if weight is None else torch.where(valid, weight.to(cdt), torch.zeros_like(ce))
    rows = torch.where(valid, torch.where(in_range, rows * w, nan), torch.zeros_like(rows))
    g = g * w[:, None]
    # an undefined student row is NaN everywhere (log_softmax of +inf may not say so by itself)
    g = torch.where(s_bad[:, None], float("nan"), g)
    rows = torch.where(s_bad & valid, nan, rows)
    n = valid.sum().clamp(min=1).to(cdt)
    stats = None
    if return_stats:  # before the gradient is written: grad_out may be the student's own memory
        others = torch.where(onehot.bool(), torch.full_like(s, float("-inf")), s)
        margin = s.gather(-1, safe[:, None]).squeeze(-1) - others.amax(-1)
        el2n = (log_sm.exp() - onehot).norm(dim=-1)
        correct = (margin > 0).to(cdt)
        stats = torch.stack([ce, kl, el2n, g.norm(dim=-1), correct, margin])
        stats = torch.where(s_bad[None], nan[None], stats)
        stats[4] = torch.where(s_bad, 0.0, correct)
        stats = torch.where(in_range[None], stats, nan[None])
        stats = torch.where(valid[None], stats, torch.zeros_like(stats)).to(torch.float32)
    grad = None
    if need_grad:
        grad = g / n if reduction == 2 else g
        grad = grad.to(student.dtype) if grad_out is None else grad_out.copy_(grad)
    loss = rows if reduction == 0 else rows.sum() / n if reduction == 2 else rows.sum()
    return loss.to(torch.float32), grad, stats
