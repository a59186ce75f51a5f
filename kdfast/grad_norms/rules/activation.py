"""nn.PReLU: y = max(0, x) + a * min(0, x), so example b's gradient of a (one per channel of dim 1, or one
shared) is the sum over its positions of g * min(0, x): a channel sum like the normalisation layers'."""
from __future__ import annotations

from torch import nn

from kdfast.grad_norms.forms import affine_sqnorms
from kdfast.grad_norms.registry import register_rule


@register_rule(nn.PReLU)
def prelu_rule(module, x, grad_output, *, want, backend, sink, saved=None):
    if "weight" in want:
        B, C = x.shape[0], module.num_parameters
        affine_sqnorms(x.reshape(B, C, -1), grad_output.reshape(B, C, -1), stats=None, neg_part=True,
                       out_w=sink.buffer("weight"), backend=backend)
