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

Divergences (`divergence`, all at temperature T and scaled by T^2 like the KL term above; p = softmax(s/T),
q the teacher's distribution at T; their value per row is the `kl` statistic):
    "kl"          KL(q || p)                                   (the default, the formula above)
    "reverse_kl"  KL(p || q)        +inf where the teacher has probability 0 on a class the student gives mass
                                    (a -inf teacher logit): such a row's loss is +inf and its gradient NaN, as
                                    no finite direction exists; kd_loss refuses a renormalised top-k teacher
                                    with k < C, which has that zero everywhere outside its k classes
    "jsd"         beta KL(q || m) + (1 - beta) KL(p || m),  m = beta q + (1 - beta) p,  0 < beta < 1: always
                  finite (m > 0 wherever q or p is), computed from log m = logaddexp(log beta + log q,
                  log(1 - beta) + log p), a class where both are 0 adding 0.
With d(div)/dP_b = G_b for buckets b of classes, the gradient w.r.t. s_c (c in bucket b) is
T p_c (G_b - sum_b' P_b' G_b'): T (p_c - q_c) for kl, T p_c (log(p_c/q_c) - KL(p||q)) for reverse_kl,
T (1 - beta) p_c (log(p_c/m_c) - KL(p||m)) for jsd.
A top-k teacher (TopKTeacher) is a distribution over k + 1 buckets: its k classes and the rest (the "tail",
left out when k == C). "renorm": the k classes' softmax((tau/T) logprobs), the tail 0 (exactly the dense
teacher tau * logprobs at its ids, -inf elsewhere); "tail": exp(logprobs) and 1 - sum(exp(logprobs)), at
T == tau. The student is bucketed the same way (its tail: its mass outside the ids).
`normalizer` replaces the mean's count of non-ignored rows (e.g. the global count across gradient
accumulation steps or ranks).

Two independent oracles live here:
  kd_loss_ref       autograd-differentiable composition of torch ops (the test oracle for loss and gradient)
  kd_stats_ref      the per-example statistics, straight from their definitions
and one backend:
  kd_loss_fwd_torch the "torch" backend: the kernels' contract (loss rows, gradient, stats) in torch ops.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

DIVERGENCES = ("kl", "reverse_kl", "jsd")  # position = the backends' divergence code


class SparseTeacher(NamedTuple):
    """The backends' form of a TopKTeacher: (N, k) int64 ids, (N, k) logprobs, ratio = tau / T (the logprobs'
    scale at the loss temperature), tail: the teacher's tail bucket holds 1 - sum(exp(logprobs)) (else 0)."""
    ids: torch.Tensor
    logprobs: torch.Tensor
    ratio: float
    tail: bool


# Order of the rows of the (6, N) stats buffer every backend fills.
KD_STAT_NAMES = ("ce", "kl", "el2n", "grad_norm", "correct", "margin")


def _xlog_ratio(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a (log a - log b) per entry, 0 where a == 0; differentiable (the masked entries' inputs are replaced
    before the arithmetic, so no 0 * inf reaches the backward)."""
    zero = log_a == float("-inf")
    log_a = torch.where(zero, torch.zeros_like(log_a), log_a)
    log_b = torch.where(zero, torch.zeros_like(log_b), log_b)
    return torch.where(zero, torch.zeros_like(log_a), log_a.exp() * (log_a - log_b))


def divergence_rows_ref(log_q: torch.Tensor, log_p: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """The divergence of teacher q from student p over the last dimension, from log-probabilities (definitions
    in the module docstring); differentiable w.r.t. log_p."""
    if divergence == "kl":
        return _xlog_ratio(log_q, log_p).sum(-1)
    if divergence == "reverse_kl":
        return _xlog_ratio(log_p, log_q).sum(-1)
    both_zero = (log_q == float("-inf")) & (log_p == float("-inf"))  # m = 0: masked by _xlog_ratio anyway
    a = torch.where(both_zero, torch.zeros_like(log_q), log_q + math.log(beta))
    b = torch.where(both_zero, torch.zeros_like(log_p), log_p + math.log1p(-beta))
    log_m = torch.logaddexp(a, b)
    return beta * _xlog_ratio(log_q, log_m).sum(-1) + (1 - beta) * _xlog_ratio(log_p, log_m).sum(-1)


def _is_topk(teacher) -> bool:
    return hasattr(teacher, "indices") and hasattr(teacher, "missing")


def _divergence_ref(s: torch.Tensor, teacher, temperature: float, divergence: str, beta: float, dtype):
    """Per row divergence of the student logits s (N, C) from a dense or top-k teacher, the oracle's way: a
    renormalised top-k teacher as its dense logits (tau * logprobs at the ids, -inf elsewhere), a tail one
    as k + 1 buckets with the student's tail summed over the classes outside the ids."""
    N, C = s.shape
    log_p = torch.log_softmax(s / temperature, dim=-1)
    if not _is_topk(teacher):
        t = teacher.reshape(-1, C).to(dtype)
        return divergence_rows_ref(torch.log_softmax(t / temperature, dim=-1), log_p, divergence, beta)
    k = teacher.k
    ids = teacher.indices.reshape(-1, k).long()
    lp = teacher.logprobs.reshape(-1, k).to(dtype)
    if teacher.missing == "renorm":
        t = torch.full((N, C), float("-inf"), dtype=dtype).scatter(1, ids, teacher.temperature * lp)
        return divergence_rows_ref(torch.log_softmax(t / temperature, dim=-1), log_p, divergence, beta)
    log_q, log_pb = lp, log_p.gather(1, ids)
    if k < C:
        outside = torch.ones((N, C), dtype=dtype).scatter(1, ids, 0.0)
        q_tail = (1 - lp.exp().sum(-1)).clamp(min=0)
        p_tail = (log_p.exp() * outside).sum(-1)
        log_q = torch.cat([log_q, q_tail.log()[:, None]], 1)
        log_pb = torch.cat([log_pb, p_tail.log()[:, None]], 1)
    return divergence_rows_ref(log_q, log_pb, divergence, beta)


def undefined_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows (last dim) whose softmax is undefined: a NaN or +inf logit, or no finite one."""
    return ~(x < float("inf")).all(-1) | (x == float("-inf")).all(-1)


def _ce_rows(s: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    safe = torch.where(valid, target, torch.zeros_like(target))
    return -torch.log_softmax(s, dim=-1).gather(-1, safe[:, None]).squeeze(-1)


def kd_loss_ref(student_logits, teacher_logits, target, *, alpha=0.5, temperature=4.0, reduction="mean",
                ignore_index=-100, weight=None, dtype=torch.float64, divergence="kl", beta=0.5, normalizer=None):
    """The KD loss as a composition of torch ops in `dtype`; differentiable w.r.t. student_logits.
    teacher_logits: dense (..., C) logits or a TopKTeacher."""
    C = student_logits.shape[-1]
    s = student_logits.reshape(-1, C).to(dtype)
    y = target.reshape(-1)
    valid = y != ignore_index
    rows = torch.zeros(s.shape[0], dtype=dtype, device=s.device)
    if alpha != 1:
        rows = rows + (1 - alpha) * _ce_rows(s, y, valid)
    if alpha != 0:
        rows = rows + alpha * temperature ** 2 * _divergence_ref(s, teacher_logits, temperature, divergence, beta,
                                                                 dtype)
    if weight is not None:
        rows = rows * weight.reshape(-1).to(dtype)
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(target.shape)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (valid.sum().clamp(min=1) if normalizer is None else normalizer)


def kd_stats_ref(student_logits, teacher_logits, target, *, alpha=0.5, temperature=4.0, ignore_index=-100,
                 weight=None, dtype=torch.float64, divergence="kl", beta=0.5) -> dict[str, torch.Tensor]:
    """Per-example statistics from their definitions (kl: the chosen divergence); grad_norm through autograd
    of the unreduced loss."""
    C = student_logits.shape[-1]
    s = student_logits.reshape(-1, C).to(dtype).detach().requires_grad_(True)
    y = target.reshape(-1)
    valid = y != ignore_index
    safe = torch.where(valid, y, torch.zeros_like(y))
    t = teacher_logits
    if t is not None and not _is_topk(t):
        t = t.reshape(-1, C).to(dtype)
    rows = kd_loss_ref(s, t, y, alpha=alpha, temperature=temperature, reduction="none",
                       ignore_index=ignore_index, weight=weight, dtype=dtype, divergence=divergence, beta=beta)
    (grad,) = torch.autograd.grad(rows.sum(), s)
    s = s.detach()
    onehot = torch.nn.functional.one_hot(safe, C).to(dtype)
    others = torch.where(onehot.bool(), torch.full_like(s, float("-inf")), s)
    margin = s.gather(-1, safe[:, None]).squeeze(-1) - others.amax(-1)
    margin = torch.where(undefined_rows(s), torch.full_like(margin, float("nan")), margin)
    kl = (_divergence_ref(s, t, temperature, divergence, beta, dtype) if t is not None
          else torch.full_like(margin, float("nan")))
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
                      reduction: int, need_grad: bool, return_stats: bool, grad_out=None, divergence: int = 0,
                      beta: float = 0.5, normalizer: float | None = None):
    """The "torch" backend of the kernels' forward contract.

    student (N, C), teacher (N, C), a SparseTeacher or None, target (N,) int64, weight (N,) fp32 or None;
    reduction 0 (none), 1 (sum) or 2 (mean); divergence: the position in DIVERGENCES; normalizer: the mean's
    divisor instead of the count of rows not ignored. Returns the loss (rows (N,) fp32 for none, else 0-d
    fp32), the gradient scale * d l_i / d s_i in the student's dtype (scale = 1 / n for mean, n = normalizer or
    max(1, rows not ignored), else 1) or None, and the (6, N) fp32 stats (or None). grad_out, when given,
    receives the gradient (it may be `student` itself: the in-place mode). A row whose label is neither
    ignore_index nor in [0, C) gets NaN loss and stats, never a wild read; non-finite logits follow the module
    docstring. Arithmetic in fp32 (fp64 for fp64 inputs).
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
        kl, g_kd = _divergence_and_grad(log_p, teacher, temperature, divergence, beta, cdt)
        if alpha != 0:  # alpha == 0 never reads the teacher for the loss or the gradient
            g = g + (alpha * temperature) * g_kd
    ce_term = torch.zeros_like(ce) if alpha == 1 else (1 - alpha) * ce
    kl_term = torch.zeros_like(ce) if alpha == 0 else alpha * temperature ** 2 * kl
    rows = ce_term + kl_term
    w = valid.to(cdt) if weight is None else torch.where(valid, weight.to(cdt), torch.zeros_like(ce))
    rows = torch.where(valid, torch.where(in_range, rows * w, nan), torch.zeros_like(rows))
    g = g * w[:, None]
    # an undefined student row is NaN everywhere (log_softmax of +inf may not say so by itself)
    g = torch.where(s_bad[:, None], float("nan"), g)
    rows = torch.where(s_bad & valid, nan, rows)
    n = valid.sum().clamp(min=1).to(cdt) if normalizer is None else normalizer
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


def _divergence_and_grad(log_p, teacher, temperature, divergence, beta, cdt):
    """Per row divergence (N,) and its gradient w.r.t. s / T (N, C) (T^2 div's w.r.t. s is T times it), in
    closed form over buckets (a dense teacher: one class per bucket; a SparseTeacher: its ids, then the tail)."""
    N, C = log_p.shape
    p = log_p.exp()
    if not isinstance(teacher, SparseTeacher):
        log_q = torch.log_softmax(teacher.to(cdt) / temperature, -1)
        div, coef = _bucket_terms(log_q, log_p, divergence, beta)
        return div, _bucket_grad(p, log_q.exp(), coef, divergence, div)
    ids, k = teacher.ids, teacher.ids.shape[1]
    lp = teacher.logprobs.to(cdt)
    log_q = lp if teacher.tail else torch.log_softmax(teacher.ratio * lp, -1)
    log_pb = log_p.gather(1, ids)
    if k < C:  # the tail bucket: the teacher's missing mass (0 when renormalised), the student's outside the ids
        q_tail = (-torch.expm1(torch.logsumexp(lp, -1))).clamp(min=0) if teacher.tail else torch.zeros_like(lp[:, 0])
        log_q = torch.cat([log_q, q_tail.log()[:, None]], 1)
        log_pb = torch.cat([log_pb, torch.logsumexp(log_p.scatter(1, ids, float("-inf")), -1)[:, None]], 1)
    div, coef = _bucket_terms(log_q, log_pb, divergence, beta)
    # outside the ids every class has the tail bucket's coefficient; the ids get their own
    g = torch.zeros_like(p)
    if k < C:
        if divergence == 0:  # kl: 1 - Q_tail / P_tail (no class has mass there when P_tail == 0)
            p_tail = log_pb[:, k:].exp()
            g = p * (1 - torch.where(p_tail > 0, log_q[:, k:].exp() / p_tail, 0.0))
        else:
            g = torch.where(p > 0, p * coef[:, k:], 0.0)
    g = g.scatter(1, ids, _bucket_grad(p.gather(1, ids), log_q[:, :k].exp(), None if coef is None else coef[:, :k],
                                       divergence, div))
    if divergence == 1:
        g = torch.where((div == float("inf"))[:, None], float("nan"), g)
    return div, g


def _bucket_terms(log_q, log_p, divergence, beta):
    """(divergence (N,), coefficient per bucket (N, B)): for non-kl divergences the gradient w.r.t. a student
    logit in bucket b is T p_c coef_b, coef_b = G_b - sum_b' P_b' G_b' (G = d div / d P)."""
    if divergence == 0:
        return divergence_rows_ref(log_q, log_p, "kl", beta), None
    p = log_p.exp()
    if divergence == 1:
        h = log_p - log_q
        div = torch.where(p > 0, p * h, 0.0).sum(-1)
        return div, h - div[:, None]
    both_zero = (log_q == float("-inf")) & (log_p == float("-inf"))
    log_m = torch.where(both_zero, float("-inf"), torch.logaddexp(log_q + math.log(beta), log_p + math.log1p(-beta)))
    h = (1 - beta) * (log_p - log_m)
    d_p = torch.where(p > 0, p * h, 0.0).sum(-1)
    q = log_q.exp()
    return beta * torch.where(q > 0, q * (log_q - log_m), 0.0).sum(-1) + d_p, h - d_p[:, None]


def _bucket_grad(p, q, coef, divergence, div):
    """d div / d (s / T) at singleton buckets: p - q for kl, p coef otherwise (0 where p == 0; NaN on a
    reverse_kl row whose divergence is infinite: no finite direction)."""
    if divergence == 0:
        return p - q
    g = torch.where(p > 0, p * coef, 0.0)
    if divergence == 1:
        g = torch.where((div == float("inf"))[:, None], float("nan"), g)
    return g
