"""nn.MultiheadAttention: packed in_proj_weight / in_proj_bias or separate q/k/v weights, out_proj, bias_k /
bias_v, add_zero_attn, key_padding_mask and attn_mask (bool or additive), batch_first either way.

Every weight is a Linear map over the sequence, so each example's weight gradient is G^T X with X the
projection's input and G its output's gradient, and its squared norm comes from the Gram / materialised
forms of nn.Linear (forms.weight_sqnorm chooses by shape):
  in_proj  X = query / key / value, G = the gradients of the projected Q, K, V (stacked when the three
           inputs are one tensor: one product against the packed weight)
  out_proj X = the heads' concatenated output O, G = the module's output gradient.
Q, K, V and O are internal, so the rule recomputes the projections and the attention from the saved inputs
(activations only: the parameters are constants here) and takes one backward through the attention for
dQ, dK, dV: about the attention's own forward and backward again, no weight-gradient product. Where the
attention weights are not an output, the recomputation is the fused F.scaled_dot_product_attention (one op
forward, one backward, as in the module's own forward); with packed self-attention one projection yields the
packed (B, T, 3E) gradient that the packed weight's norm needs.
Dropout on the attention weights (train mode with dropout > 0) draws fresh noise, which no recomputation
matches: refused; scoring runs in eval mode.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from kdfast.errors import UnsupportedModuleError
from kdfast.grad_norms.forms import acc_dtype, bias_sqnorm, weight_sqnorm
from kdfast.grad_norms.registry import register_rule

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _mha_inputs(module, args, output, *, kwargs):
    """The call's arguments by name (query, key, value, masks, need_weights, average_attn_weights)."""
    if module.training and module.dropout > 0:
        raise UnsupportedModuleError(
            f"per_example_grad_norms: nn.MultiheadAttention with dropout={module.dropout} in train mode draws "
            "random attention masks no rule can replay; call model.eval()")
    bound = _SIGNATURE.bind(module, *args, **kwargs)
    bound.apply_defaults()
    if bound.arguments["query"].dim() != 3:
        raise UnsupportedModuleError("per_example_grad_norms: nn.MultiheadAttention needs batched 3-D inputs, got "
                                     f"query of shape {tuple(bound.arguments['query'].shape)}")
    return bound.arguments


def _additive(mask, dtype):
    """A bool mask (True: not allowed) as -inf / 0, a float mask as it is."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def _merged_mask(attn_mask, key_padding_mask, B, heads, T, extra, dtype):
    """(B or 1, heads or 1, T, S) additive mask, padded with `extra` allowed key columns (bias_k, zero key)."""
    attn, pad = _additive(attn_mask, dtype), _additive(key_padding_mask, dtype)
    if attn is not None:
        attn = F.pad(attn, (0, extra))
        attn = attn.view(B, heads, T, -1) if attn.dim() == 3 else attn.view(1, 1, T, -1)
    if pad is not None:
        pad = F.pad(pad, (0, extra)).view(B, 1, 1, -1)
        attn = pad if attn is None else attn + pad
    return attn


def _leaf(t):
    return t.detach().requires_grad_()


def _attention_grads(module, a, g_out, g_weights, dt):
    """(inputs q, k, v batch-first, [dQ, dK, dV] (one packed (B, T, 3E) gradient for self-attention with the
    packed weight), [d bias_k, d bias_v] or None, O), by recomputation."""
    q, k, v = a["query"], a["key"], a["value"]
    packed = module._qkv_same_embed_dim and q is k and k is v
    if not module.batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    q, k, v = (t.detach().to(dt) for t in (q, k, v))
    B, T, E = q.shape
    heads, d = module.num_heads, module.head_dim
    bias = None if module.in_proj_bias is None else module.in_proj_bias.detach().to(dt)
    if packed:  # one projection, one gradient: no concatenation of dQ, dK, dV afterwards
        leaves = [_leaf(F.linear(q, module.in_proj_weight.detach().to(dt), bias))]
        projected = list(leaves[0].chunk(3, -1))
    else:
        if module._qkv_same_embed_dim:
            weights = module.in_proj_weight.detach().to(dt).chunk(3)
        else:
            weights = tuple(w.detach().to(dt) for w in (module.q_proj_weight, module.k_proj_weight,
                                                        module.v_proj_weight))
        biases = (None,) * 3 if bias is None else bias.chunk(3)
        leaves = [_leaf(F.linear(x, w, b)) for x, w, b in zip((q, k, v), weights, biases)]
        projected = list(leaves)
    keys, values = projected[1], projected[2]
    extra, bias_rows = 0, None
    if module.bias_k is not None:  # one more key and value: the biases, one copy per example
        bias_rows = [_leaf(b.detach().to(dt).reshape(1, 1, E).expand(B, 1, E)) for b in (module.bias_k, module.bias_v)]
        keys, values = torch.cat([keys, bias_rows[0]], 1), torch.cat([values, bias_rows[1]], 1)
        extra += 1
    if module.add_zero_attn:
        zeros = keys.new_zeros(B, 1, E)
        keys, values = torch.cat([keys, zeros], 1), torch.cat([values, zeros], 1)
        extra += 1
    mask = _merged_mask(a["attn_mask"], a["key_padding_mask"], B, heads, T, extra, dt)
    Qh = projected[0].view(B, T, heads, d).transpose(1, 2)
    Kh = keys.view(B, -1, heads, d).transpose(1, 2)
    Vh = values.view(B, -1, heads, d).transpose(1, 2)
    outputs, cotangents = [], [g_out @ module.out_proj.weight.detach().to(dt)]
    if g_weights is None:  # the fused attention: one forward and one backward op, as the module's own
        heads_out = F.scaled_dot_product_attention(Qh, Kh, Vh, attn_mask=mask)
    else:  # the attention weights are an output too: they need the explicit softmax
        scores = Qh @ Kh.transpose(-2, -1) * d ** -0.5
        probs = torch.softmax(scores if mask is None else scores + mask, dim=-1)
        heads_out = probs @ Vh
        outputs.append(probs.mean(1) if a["average_attn_weights"] else probs)
        cotangents.append(g_weights.to(dt))
    O = heads_out.transpose(1, 2).reshape(B, T, E)
    outputs.insert(0, O)
    leaves += bias_rows or []
    grads = torch.autograd.grad(outputs, leaves, cotangents, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    n = 1 if packed else 3
    return (q, k, v), grads[:n], grads[n:] or None, O.detach()


@register_rule(nn.MultiheadAttention, save=_mha_inputs, children=("out_proj",),
               batch_dim=lambda module: 0 if module.batch_first else 1)
def multihead_attention_rule(module, x, grad_output, *, want, backend, sink, saved):
    a = saved
    g_out = grad_output[0]
    g_weights = grad_output[1] if len(grad_output) > 1 else None
    if not module.batch_first:  # the attention weights are batch-first in both layouts
        g_out = g_out.transpose(0, 1)
    dt = acc_dtype(g_out)
    g_out = g_out.to(dt)
    with torch.enable_grad():
        inputs, projected, bias_grads, O = _attention_grads(module, a, g_out, g_weights, dt)
    if "in_proj_weight" in want:
        for xi, gi in zip(inputs, projected):  # self-attention: one product against the packed weight
            weight_sqnorm(xi, gi, backend, sink.buffer("in_proj_weight"))
    for name, xi, gi in zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), inputs, projected):
        if name in want:
            weight_sqnorm(xi, gi, backend, sink.buffer(name))
    if "in_proj_bias" in want:
        for gi in projected:
            bias_sqnorm(gi.transpose(1, 2), sink.buffer("in_proj_bias"), backend)
    for name, gi in zip(("bias_k", "bias_v"), bias_grads or ()):
        if name in want:
            sink.add(name, gi.square().sum((1, 2)))
    if "out_proj.weight" in want:
        weight_sqnorm(O, g_out, backend, sink.buffer("out_proj.weight"))
    if "out_proj.bias" in want:
        bias_sqnorm(g_out.transpose(1, 2), sink.buffer("out_proj.bias"), backend)
