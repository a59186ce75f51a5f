"""nn.Embedding: example i's gradient adds g_t to row idx_t for each of its positions t.

Squared norm = sum over distinct ids v of ||sum_{t: idx_t = v} g_t||^2. Computed by scatter-adding the
rows into one slot per (example, id) pair: the position of the key's first occurrence among the sorted
keys (fixed shapes, so no host synchronisation), so the cost is linear in B * T * d and no
(B, num_embeddings, d) gradient exists. Positions holding padding_idx get no gradient.
"""
from __future__ import annotations

import torch
from torch import nn

from kdfast.errors import UnsupportedModuleError
from kdfast.grad_norms.forms import acc_dtype
from kdfast.grad_norms.registry import register_rule


@register_rule(nn.Embedding)
def embedding_rule(module, x, grad_output, *, want, backend, sink, saved=None):
    if "weight" not in want:
        return
    if module.scale_grad_by_freq:
        raise UnsupportedModuleError("per_example_grad_norms: nn.Embedding with scale_grad_by_freq=True scales "
                                     "gradients by batch-wide id counts, which couples examples; not supported")
    B, d = grad_output.shape[0], grad_output.shape[-1]
    ids = x.reshape(B, -1)
    g = grad_output.reshape(B, -1, d).to(acc_dtype(grad_output))
    if module.padding_idx is not None:
        g = g * (ids != module.padding_idx).unsqueeze(-1).to(g.dtype)
    example = torch.arange(B, device=ids.device).unsqueeze(1).expand_as(ids)
    keys = (example * module.num_embeddings + ids).reshape(-1)
    ordered = keys.sort().values
    rows = g.new_zeros(keys.numel(), d).index_add_(0, torch.searchsorted(ordered, keys), g.reshape(-1, d))
    sink.buffer("weight").index_add_(0, ordered // module.num_embeddings, rows.square().sum(1))
