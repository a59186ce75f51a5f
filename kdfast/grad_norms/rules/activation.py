"""nn.PReLU: y = max(0, x) + a * min(0, x), so example b's gradient of a (one per channel of dim 1, or one
shared) is the sum over its positions of g * min(0, x): a channel sum like the normalisation layers'."""
from __future__ import annotations

from torch import nn

from ..forms import acc_dtype, channel_sums
from ..registry import register_rule


@register_rule(nn.PReLU)
def prelu_rule(module, x, grad_output, *, want, backend):
    if "weight" not in want:
        return {}
    B, C = x.shape[0], module.num_parameters
    negative = x.to(acc_dtype(grad_output)).clamp(max=0).reshape(B, C, -1)
    zeros = negative.new_zeros(()).expand(B, C)
    sgx, _ = channel_sums(negative, grad_output.reshape(B, C, -1), zeros, zeros + 1, backend)
    return {"weight": sgx.square().sum(1)}
