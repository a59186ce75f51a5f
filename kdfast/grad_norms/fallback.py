"""The opt-in fallback for a module without a rule: torch.func per-example gradients of that module only.

Given the module's saved inputs and its output gradient, each example's parameter gradient is the
vector-Jacobian product of the module alone (vmap over the batch of vjp), so the cost stays local to the
module; the rest of the network still goes through the rules.
"""
from __future__ import annotations

import logging

import torch
from torch.func import functional_call, vjp, vmap

log = logging.getLogger("kdfast.grad_norms")
_LOGGED: set[type] = set()


def log_fallback_once(module) -> None:
    if type(module) not in _LOGGED:
        _LOGGED.add(type(module))
        log.warning("per_example_grad_norms: no rule for %s; using the torch.func fallback for it (slower; "
                    "register a rule with kdfast.grad_norms.register_rule to speed it up)", type(module).__name__)


def fallback_sqnorms(module, args, kwargs, grad_output, slots, want) -> dict[str, torch.Tensor]:
    """{name: (B,) squared norm} of the module's parameters named in `want` (dotted names), by torch.func."""
    return {n: g.flatten(1).square().sum(1) for n, g in per_example_grads(module, args, kwargs, grad_output, slots,
                                                                         want).items()}


def per_example_grads(module, args, kwargs, grad_output, slots, want) -> dict[str, torch.Tensor]:
    """{name: (B, *shape)} each example's gradient of the module's parameters named in `want`, by torch.func.

    grad_output: the output's gradient, or with `slots` (positions of the tensor outputs of a module
    returning a tuple) the tuple of their gradients. Tensor arguments whose first dimension has B rows are
    split per example; the others are shared.
    """
    grads = (grad_output,) if slots is None else tuple(grad_output)
    B = grads[0].shape[0]
    params = {n: p.detach() for n, p in module.named_parameters() if n in want}
    keys = tuple(kwargs)
    inputs = tuple(args) + tuple(kwargs[k] for k in keys)
    batched = tuple(isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == B for a in inputs)

    def outputs(p, lifted):
        out = functional_call(module, p, lifted[:len(args)], dict(zip(keys, lifted[len(args):])))
        return out if slots is None else tuple(out[i] for i in slots)

    def one_example(example_inputs, example_grads):
        lifted = tuple(a.unsqueeze(0) if b else a for a, b in zip(example_inputs, batched))
        _, pullback = vjp(lambda p: outputs(p, lifted), params)
        cotangent = tuple(g.unsqueeze(0) for g in example_grads)
        (param_grads,) = pullback(cotangent[0] if slots is None else cotangent)
        return param_grads

    in_dims = (tuple(0 if b else None for b in batched), 0)
    return vmap(one_example, in_dims=in_dims)(inputs, grads)
