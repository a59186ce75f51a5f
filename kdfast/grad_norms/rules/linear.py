"""nn.Linear: weight gradient sum_t g_t a_t^T over the positions t of one example, bias sum_t g_t.

2-D input: ||a||^2 ||g||^2 (one outer product) and ||g||^2, both in one pass (one kernel on the GPU).
With sequence dims (B, *, d): the Gram form or the materialised product, whichever costs less for the
shape (see forms.weight_sqnorm).
"""
from __future__ import annotations

from torch import nn

from kdfast.grad_norms.forms import bias_sqnorm, rank_one_sqnorms, weight_sqnorm
from kdfast.grad_norms.registry import register_rule


@register_rule(nn.Linear)
def linear_rule(module, x, grad_output, *, want, backend, sink, saved=None):
    B = grad_output.shape[0]
    a = x.reshape(B, -1, x.shape[-1])
    g = grad_output.reshape(B, -1, grad_output.shape[-1])
    out_w = sink.buffer("weight") if "weight" in want else None
    out_b = sink.buffer("bias") if "bias" in want else None
    if a.shape[1] == 1:  # one position: weight and bias from one pass
        rank_one_sqnorms(a[:, 0], g[:, 0], backend, out_w=out_w, out_b=out_b)
        return
    if out_w is not None:
        weight_sqnorm(a, g, backend, out_w)
    if out_b is not None:
        bias_sqnorm(g.transpose(1, 2), out_b, backend)
