"""nn.Linear: weight gradient sum_t g_t a_t^T over the positions t of one example, bias sum_t g_t.

2-D input: ||a||^2 ||g||^2 (one outer product). With sequence dims (B, *, d): the Gram form or the
materialised product, whichever costs less for the shape (see forms.weight_sqnorm).
"""
from __future__ import annotations

from torch import nn

from ..forms import acc_dtype, weight_sqnorm
from ..registry import register_rule


@register_rule(nn.Linear)
def linear_rule(module, x, grad_output, *, want, backend, sink, saved=None):
    B = grad_output.shape[0]
    a = x.reshape(B, -1, x.shape[-1])
    g = grad_output.reshape(B, -1, grad_output.shape[-1])
    if "weight" in want:
        weight_sqnorm(a, g, backend, sink.buffer("weight"))
    if "bias" in want:
        sink.add("bias", g.to(acc_dtype(g)).sum(1).square().sum(1))
