"""Distillation as partial variance reduction (the KD-variance-reduction paper): its unbiased variant and its
diagnostics.

With T = 1 and logits linear in the parameters (a softmax regression), the KD step on a batch ξ has the
gradient (Prop. 1, Eq. 5; the paper's λ is kdfast's alpha)

    ∇f_ξ(x) − α ∇f_ξ(θ)          x: student, θ: teacher of the same parameter space, f: cross-entropy

so its expectation is ∇f(x) − α∇f(θ): biased. Eq. 16 adds back α∇f(θ), the teacher's full-data gradient,
computed once (`teacher_gradient`) — SVRG with a frozen snapshot:

    kd = KDSetup(teacher=teacher, alpha=a, temperature=1.0, correction=teacher_gradient(teacher, data))
    distill_step(student, x, y, opt, kd)

The corrected step is then exactly unbiased for ∇f(x) for such models; for any architecture and any T it is
exactly unbiased at x = θ (the KD term's gradient vanishes there and the CE term's bias is −α∇f_ξ(θ)), and
approximately so nearby (the paper's App. B.3).

`teacher_report` estimates the quantities of Eqs. 14–15 from mini-batch gradients: the teacher's signal-to-
noise β(θ), the correlation ρ of student and teacher stochastic gradients, the optimal weight λ* and the
predicted shrinkage N(λ*)/N(0) of SGD's noise neighbourhood. The paper evaluates them at the optimum x*; the
report puts the given student in its place (exact when the student is converged).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kdfast.errors import InvalidArgumentError
from kdfast.runtime.checks import finite, int_at_least, one_of, positive_int, require
from kdfast.losses.kd_loss import kd_loss
from kdfast.runtime.devices import resolve_device

CORRECTIONS = ("unbiased",)
REPORT_METHODS = ("minibatch", "exact")


# ------------------------------------------------------------------------------------------ helpers
def _params(model):
    """(name, parameter) of the trainable parameters; a DistributedDataParallel wrapper's prefix dropped."""
    inner = getattr(model, "module", model)
    return [(n, p) for n, p in inner.named_parameters() if p.requires_grad]


def check_same_parameter_space(student, teacher, where: str = "correction") -> None:
    """Raises unless student and teacher have the same trainable parameters (names and shapes, in order):
    Eq. 16 adds the teacher's gradient to the student's, which only means something in one parameter space."""
    s, t = _params(student), _params(teacher)
    if len(s) != len(t):
        raise InvalidArgumentError(
            f"{where}: the unbiased correction (Eq. 16) needs a teacher with the student's parameter space "
            f"(self-distillation); the student has {len(s)} parameter tensors, the teacher {len(t)}. Use "
            "correction=None for a teacher of another architecture")
    for (ns, ps), (nt, pt) in zip(s, t):
        if ns != nt or ps.shape != pt.shape:
            raise InvalidArgumentError(
                f"{where}: the unbiased correction (Eq. 16) needs a teacher with the student's parameter space "
                f"(self-distillation); student parameter {ns} {tuple(ps.shape)} vs teacher {nt} "
                f"{tuple(pt.shape)}. Use correction=None for a teacher of another architecture")


def _examples(data, indices):
    """(inputs, targets, n) accessors over `data`: an (inputs, targets) tensor pair or a map-style dataset
    yielding (input, label[, ...]), restricted to `indices` when given."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x_all, y_all = data
        if x_all.shape[0] != y_all.shape[0]:
            raise InvalidArgumentError(f"data: inputs hold {x_all.shape[0]} examples but targets {y_all.shape[0]}")
        size = x_all.shape[0]

        def fetch(idx):
            return x_all[idx], y_all[idx]
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        size = len(data)

        def fetch(idx):
            items = [data[int(i)] for i in idx]
            return torch.stack([torch.as_tensor(it[0]) for it in items]), \
                torch.as_tensor([int(it[1]) for it in items], dtype=torch.int64)
    else:
        raise InvalidArgumentError(f"data must be an (inputs, targets) pair of tensors or a map-style dataset of "
                                   f"(input, label), got {type(data).__name__}")
    idx = torch.arange(size) if indices is None else torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
    if idx.numel() == 0:
        raise InvalidArgumentError("data: no examples to compute gradients on")
    if int(idx.min()) < 0 or int(idx.max()) >= size:
        raise InvalidArgumentError(f"indices must lie in [0, {size}), got values in [{int(idx.min())}, "
                                   f"{int(idx.max())}]")
    return fetch, idx


def _batch_grad(model, params, x, y, *, reduction="mean"):
    """Gradient of the batch's cross-entropy (mean, or sum) w.r.t. `params`, as one flat vector. The mean
    divides the sum afterwards, in the parameters' dtype (kd_loss's 1/B is a float32 scalar)."""
    loss = kd_loss(model(x), None, y, alpha=0.0, reduction="sum")
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])
    return (flat / y.shape[0], loss.detach() / y.shape[0]) if reduction == "mean" else (flat, loss.detach())


@torch.no_grad()
def _unflatten(flat, params):
    out, at = [], 0
    for p in params:
        out.append(flat[at:at + p.numel()].view_as(p).clone())
        at += p.numel()
    return out


def _eval_mode(model):
    was = model.training
    model.eval()
    return was


# ------------------------------------------------------------------------------- the correction (Eq. 16)
@dataclass(frozen=True)
class TeacherGradient:
    """The teacher's full-data cross-entropy gradient ∇f(θ) (one tensor per trainable parameter) and loss."""
    names: tuple
    grads: tuple
    loss: float
    num_examples: int

    def check(self, student, where: str = "distill_step") -> None:
        params = _params(student)
        if len(params) != len(self.grads) or any(
                n != m or p.shape != g.shape for (n, p), m, g in zip(params, self.names, self.grads)):
            first = next(((n, tuple(p.shape), m, tuple(g.shape)) for (n, p), m, g in
                          zip(params, self.names, self.grads) if n != m or p.shape != g.shape), None)
            detail = (f"student parameter {first[0]} {first[1]} vs teacher {first[2]} {first[3]}" if first else
                      f"the student has {len(params)} parameter tensors, the teacher gradient {len(self.grads)}")
            raise InvalidArgumentError(
                f"{where}: correction holds the gradient of a teacher with another parameter space ({detail}); the "
                "unbiased correction (Eq. 16) needs self-distillation (same architecture). Use correction=None")

    def to(self, device) -> "TeacherGradient":
        """The same gradient on `device` (once, so no step copies it)."""
        return TeacherGradient(self.names, tuple(g.to(device) for g in self.grads), self.loss, self.num_examples)

    def apply(self, student, alpha: float) -> None:
        """Adds alpha·∇f(θ) to the student's .grad (after backward, before the optimizer step)."""
        for (_, p), g in zip(_params(student), self.grads):
            g = g.to(device=p.device, dtype=p.dtype)
            if p.grad is None:
                p.grad = alpha * g
            else:
                p.grad.add_(g, alpha=alpha)


def teacher_gradient(teacher, data, *, indices=None, batch_size=256, device=None) -> TeacherGradient:
    """∇f(θ) = (1/n) Σ_i ∇_θ CE(teacher(x_i), y_i) over `data` (or its `indices`), teacher in eval mode.

    data: an (inputs, targets) tensor pair or a map-style dataset of (input, label). Computed once per run
    and reused by every step (`KDSetup(correction=...)` in `distill_step` and `fit`).
    """
    require("teacher_gradient", positive_int("batch_size", batch_size))
    fetch, idx = _examples(data, indices)
    device = resolve_device([teacher], device)
    named = _params(teacher)
    params = [p for _, p in named]
    was = _eval_mode(teacher)
    total = None
    loss_sum = 0.0
    try:
        for start in range(0, idx.numel(), batch_size):
            x, y = fetch(idx[start:start + batch_size])
            g, loss = _batch_grad(teacher, params, x.to(device), y.to(device), reduction="sum")
            total = g if total is None else total + g
            loss_sum += float(loss)
    finally:
        teacher.train(was)
    n = idx.numel()
    return TeacherGradient(names=tuple(n_ for n_, _ in named), grads=tuple(_unflatten(total / n, params)),
                           loss=loss_sum / n, num_examples=n)


def resolve_correction(correction, student, teacher, data, *, indices=None, batch_size=256, device=None,
                       where="fit"):
    """None, "unbiased" (compute the teacher's full-data gradient now) or a TeacherGradient -> TeacherGradient
    | None, after checking that the teacher shares the student's parameter space. The value and the teacher's
    presence were checked when the KDSetup was made."""
    if correction is None:
        return None
    if isinstance(correction, TeacherGradient):
        correction.check(student, where)
        return correction.to(resolve_device([student], device))
    check_same_parameter_space(student, teacher, where)
    return teacher_gradient(teacher, data, indices=indices, batch_size=batch_size, device=device)


# ------------------------------------------------------------------------- the diagnostic (Eqs. 14-15)
def _per_example_grads(model, x, y):
    """(B, d) per-example cross-entropy gradients by torch.func (the exact report's building block)."""
    from torch.func import functional_call, grad, vmap
    named = _params(model)
    names = [n for n, _ in named]
    inner = getattr(model, "module", model)
    frozen = {n: b for n, b in inner.named_buffers()}
    frozen.update({n: p for n, p in inner.named_parameters() if not p.requires_grad})

    def loss_one(values, xi, yi):
        out = functional_call(inner, {**frozen, **dict(zip(names, values))}, (xi[None],))
        return torch.nn.functional.cross_entropy(out, yi[None])

    gs = vmap(grad(loss_one), in_dims=(None, 0, 0))([p.detach() for _, p in named], x, y)
    return torch.cat([g.reshape(g.shape[0], -1) for g in gs], dim=1)


def _batch_moment(full, per_example_mean, n, batch_size):
    """E<U, V> over uniform batches of B distinct examples, U and V the batch means of per-example vectors u_i,
    v_i (population n): <ū, v̄> + (n - B) / (B (n - 1)) · (mean_i <u_i, v_i> - <ū, v̄>)."""
    shrink = (n - batch_size) / (batch_size * (n - 1)) if n > 1 else 0.0
    return full + shrink * (per_example_mean - full)


def _exact_moments(student, teacher, fetch, idx, batch_size, device):
    """Exact E over uniform batches of B distinct examples of <G_ξ(x), G_ξ(θ)>, ||G_ξ(x)||², ||G_ξ(θ)||², from
    per-example gradients (torch.func)."""
    n = idx.numel()
    sums = {"ss": 0.0, "tt": 0.0, "st": 0.0}
    mean_s = mean_t = None
    for start in range(0, n, 256):
        x, y = fetch(idx[start:start + 256])
        x, y = x.to(device), y.to(device)
        gs, gt = _per_example_grads(student, x, y), _per_example_grads(teacher, x, y)
        sums["ss"] += float((gs * gs).sum())
        sums["tt"] += float((gt * gt).sum())
        sums["st"] += float((gs * gt).sum())
        mean_s = gs.sum(0) if mean_s is None else mean_s + gs.sum(0)
        mean_t = gt.sum(0) if mean_t is None else mean_t + gt.sum(0)
    mean_s, mean_t = mean_s / n, mean_t / n
    full = {"ss": float(mean_s @ mean_s), "tt": float(mean_t @ mean_t), "st": float(mean_s @ mean_t)}
    return {k: _batch_moment(full[k], sums[k] / n, n, batch_size) for k in sums}


def _sq_moment(model, fetch, idx, batch_size, full_sq, device):
    """Exact E||G_ξ||² over uniform batches of B distinct examples from the per-example gradient norms of
    kdfast's engine (one forward and backward per chunk, any model it has rules for) and ||∇f||²."""
    from kdfast.grad_norms import per_example_grad_norms
    total = 0.0
    for start in range(0, idx.numel(), 256):
        x, y = fetch(idx[start:start + 256])
        norms = per_example_grad_norms(model, x.to(device), y.to(device), loss="ce", on_missing="fallback")
        total += float(norms.double().square().sum())
    return _batch_moment(full_sq, total / idx.numel(), idx.numel(), batch_size)


def _cross_moment(student, teacher, fetch, idx, batch_size, num_batches, seed, device):
    """E<G_ξ(x), G_ξ(θ)> by Monte Carlo over `num_batches` uniform batches of B distinct examples, and its
    standard error (the one moment per-example norms cannot give)."""
    ps = [p for _, p in _params(student)]
    pt = [p for _, p in _params(teacher)]
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_batches):
        pick = idx[torch.randperm(idx.numel(), generator=gen)[:batch_size]]
        x, y = fetch(pick)
        x, y = x.to(device), y.to(device)
        gs, _ = _batch_grad(student, ps, x, y)
        gt, _ = _batch_grad(teacher, pt, x, y)
        rows.append(float(gs @ gt))
    table = torch.tensor(rows, dtype=torch.float64)
    return float(table.mean()), float(table.std()) / math.sqrt(num_batches)


def _full_sqnorm(model, fetch, idx, device):
    params = [p for _, p in _params(model)]
    total, loss_sum = None, 0.0
    for start in range(0, idx.numel(), 256):
        x, y = fetch(idx[start:start + 256])
        g, loss = _batch_grad(model, params, x.to(device), y.to(device), reduction="sum")
        total = g if total is None else total + g
        loss_sum += float(loss)
    g = total / idx.numel()
    return float(g @ g), loss_sum / idx.numel()


def noise_terms(student_sq, teacher_sq, cross, teacher_full_sq, lr) -> dict:
    """Eqs. 14-15 (and App. C's ρ, β) from the four moments; a = ∇f_ξ(x), b = ∇f_ξ(θ), g = ∇f(θ):

        λ* = E<a, b> / (E||b||² + ||g||²/γ)
        N(λ) = λ²||g||² + γ E||a - λ b||²,  N(λ*)/N(0) = 1 - γ E<a,b>² / (E||a||² (||g||² + γ E||b||²))
        β = ||g||² / E||b||²,  ρ = E<a, b> / (sqrt(E||a||²) sqrt(E||b||² - ||g||²))
    and N(λ*)/N(0) = 1 - ρ² (1 - β) / (1 + β/γ) (Eq. 15) holds identically."""
    lam = cross / (teacher_sq + teacher_full_sq / lr) if teacher_sq + teacher_full_sq / lr > 0 else float("nan")
    denom = student_sq * (teacher_full_sq + lr * teacher_sq)
    ratio = 1.0 - lr * cross * cross / denom if denom > 0 else float("nan")
    beta = teacher_full_sq / teacher_sq if teacher_sq > 0 else float("nan")
    noise_t = teacher_sq - teacher_full_sq
    rho = cross / math.sqrt(student_sq * noise_t) if student_sq > 0 and noise_t > 0 else float("nan")
    return {"lambda_star": lam, "noise_ratio": ratio, "beta": beta, "rho": rho}


def teacher_report(student, teacher, data, *, lr, batch_size=64, method="minibatch", num_batches=200,
                   indices=None, seed=0, device=None) -> dict:
    """Estimates Eqs. 14-15 of the KD-variance-reduction paper for a self-distillation pair.

    Args:
        student: stands in for the optimum x* of the paper (exact when converged); same parameter space as
            the teacher (the correlation is between gradients in one space).
        teacher: θ. Both run in eval mode (restored afterwards).
        data: (inputs, targets) tensors or a map-style dataset of (input, label); `indices` restricts it.
        lr: γ, the SGD step size the weight is chosen for. batch_size: B of the stochastic gradients.
        method: "minibatch" (any model: E||∇f_ξ||² of each model exactly, from kdfast's per-example gradient
            norms; the cross moment E<∇f_ξ(x), ∇f_ξ(θ)> by Monte Carlo over `num_batches` random batches of B
            distinct examples, its standard error under "stderr") or "exact" (per-example gradients by
            torch.func, then the exact expectation over all such batches; small models).

    Returns a dict: beta β(θ), rho ρ(x, θ), lambda_star λ* (Eq. 14: kdfast's alpha at T = 1), noise_ratio
    N(λ*)/N(0) (Eq. 15), the moments student_sq E||∇f_ξ(x)||², teacher_sq E||∇f_ξ(θ)||², cross
    E<∇f_ξ(x), ∇f_ξ(θ)>, teacher_full_sq ||∇f(θ)||², student_full_sq ||∇f(x)||², the full-data losses and
    the settings. NaN where a quantity is undefined (e.g. ρ when B = n leaves no noise).
    """
    require("teacher_report", finite("lr", lr, low=0.0, expected="a finite number > 0 (the SGD step size γ)"),
            positive_int("batch_size", batch_size), one_of("method", method, REPORT_METHODS),
            int_at_least("num_batches", num_batches, 2) if method == "minibatch" else None)
    check_same_parameter_space(student, teacher, "teacher_report")
    fetch, idx = _examples(data, indices)
    if batch_size > idx.numel():
        raise InvalidArgumentError(f"teacher_report: batch_size {batch_size} exceeds the {idx.numel()} examples")
    device = resolve_device([student], device)
    was_s, was_t = _eval_mode(student), _eval_mode(teacher)
    try:
        teacher_full_sq, teacher_loss = _full_sqnorm(teacher, fetch, idx, device)
        student_full_sq, student_loss = _full_sqnorm(student, fetch, idx, device)
        if method == "exact":
            moments = _exact_moments(student, teacher, fetch, idx, batch_size, device)
            stderr = None
        else:
            cross, stderr = _cross_moment(student, teacher, fetch, idx, batch_size, num_batches, seed, device)
            moments = {"ss": _sq_moment(student, fetch, idx, batch_size, student_full_sq, device),
                       "tt": _sq_moment(teacher, fetch, idx, batch_size, teacher_full_sq, device), "st": cross}
    finally:
        student.train(was_s)
        teacher.train(was_t)
    report = noise_terms(moments["ss"], moments["tt"], moments["st"], teacher_full_sq, float(lr))
    report.update(student_sq=moments["ss"], teacher_sq=moments["tt"], cross=moments["st"],
                  teacher_full_sq=teacher_full_sq, student_full_sq=student_full_sq, teacher_loss=teacher_loss,
                  student_loss=student_loss, lr=float(lr), batch_size=batch_size, method=method,
                  num_examples=int(idx.numel()), num_batches=num_batches if method == "minibatch" else None)
    if stderr is not None:
        report["stderr"] = {"cross": stderr}
    return report
