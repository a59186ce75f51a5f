"""Oracle for per-example gradient norms: torch.func vmap(grad) over the whole model, in plain PyTorch.

Materialises every example's full gradient (memory B x parameters); slow and exact, float64-capable.
The losses are written out here independently of kdfast.kd_loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap


def _example_loss(output, target, loss, alpha, temperature, teacher):
    if callable(loss):
        return loss(output, target).sum()
    C = output.shape[-1]
    ce = F.cross_entropy(output.reshape(-1, C), target.reshape(-1), reduction="sum")
    if loss == "ce":
        return ce
    log_p = F.log_softmax(output.reshape(-1, C) / temperature, dim=-1)
    q = F.softmax(teacher.reshape(-1, C) / temperature, dim=-1)
    kl = torch.where(q > 0, q * (torch.log(q) - log_p), torch.zeros_like(q)).sum()
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl


def per_example_grad_norms_ref(model, inputs, targets, *, loss="ce", alpha=0.5, temperature=4.0,
                               teacher_logits=None):
    """(norms (B,), {parameter name: (B,) squared norms}) by vmap(grad) of each example's own loss."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def one_example(p, x, y, t):
        output = functional_call(model, ({**p, **frozen}, buffers), (x.unsqueeze(0),))
        return _example_loss(output, y.unsqueeze(0), loss, alpha, temperature,
                             None if t is None else t.unsqueeze(0))

    teacher_dim = None if teacher_logits is None else 0
    grads = vmap(grad(one_example), in_dims=(None, 0, 0, teacher_dim))(params, inputs, targets, teacher_logits)
    sq = {n: g.flatten(1).square().sum(1) for n, g in grads.items()}
    total = torch.stack(list(sq.values())).sum(0) if sq else inputs.new_zeros(inputs.shape[0])
    return total.sqrt(), sq
