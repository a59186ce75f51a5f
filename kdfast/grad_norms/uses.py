"""Parameters used by module code directly, outside any rule: class tokens (expanded and concatenated),
positional embeddings (added), layer scales (multiplied), relative position bias tables (gathered, then added
to attention logits), weights a parent passes to F.linear, and every use of a tied parameter.

During the forward a TorchFunctionMode watches every op. A tensor computed from such parameters alone (a
gather of the bias table, its permuted view, `class_token.expand(...)` for one example) is "derived". The op
where a derived tensor meets the batch is a *use*: its output is batch-led (leading dim B * k, example b
owning rows b*k .. b*k + k - 1, as torch's window and head reshapes keep them), so example b's gradient of
the derived inputs is the vector-Jacobian product of the op alone on example b's rows: torch.func vmaps that
over the examples (the op's other batched inputs split the same way), at about the cost of the op's own
backward. The derived tensors' own graph then carries the (B, ...) gradients back to the parameters
(`autograd.grad(..., is_grads_batched=True)`); per parameter they add up over all its uses, so cross terms
between uses (tied weights) are exact, and the squared norms are taken once the backward is done.
A weight used once, directly as F.linear's weight or bias, skips the (B, out, in) gradient: its norm comes
from the Gram / materialised forms of nn.Linear's rule.
A use whose output is not batch-led, or whose batched inputs do not share its leading dim, mixes examples:
recorded as unsupported (the engine names its module in one error, or falls back to torch.func for it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import vjp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from kdfast.grad_norms.forms import CHUNK_ELEMENTS, acc_dtype, bias_sqnorm, weight_sqnorm

# The graph bookkeeping ops the engine itself calls inside the forward: never uses.
_IGNORED = {torch.Tensor.register_hook, torch.Tensor.requires_grad_, torch.Tensor.detach}
# Ops that give parameter-derived tensors a batch dim (a class token expanded to B rows); a gather never does,
# even where its row count happens to be a multiple of B.
_SPREADERS = {torch.Tensor.expand, torch.Tensor.expand_as, torch.Tensor.repeat, torch.Tensor.broadcast_to,
              torch.broadcast_to, torch.Tensor.tile, torch.tile}


class Use:
    """One op where derived tensors met the batch."""

    __slots__ = ("func", "leaves", "spec", "derived", "batched", "params", "k", "linear")

    def __init__(self, func, leaves, spec, derived, batched, params, k):
        self.func, self.leaves, self.spec, self.k = func, leaves, spec, k
        self.derived, self.batched, self.params = derived, batched, params  # leaf positions; param ids
        self.linear = (func is F.linear and batched == [0]
                       and all(isinstance(leaves[i], torch.nn.Parameter) for i in derived))


class UseTracker(TorchFunctionMode):
    """Watches one forward: derived tensors, uses, uses that mix examples, and how often each parameter was used.

    params: {id: parameter} trainable parameters of the model; covered: ids whose module is running its own
    rule-covered forward now (the rule sees those uses); buffers: ids of the model's buffers (constants).
    """

    def __init__(self, params, buffers, batch_size, on_use):
        super().__init__()
        self.params, self.buffers, self.B, self.on_use = params, buffers, batch_size, on_use
        self.covered: dict[int, int] = {}
        self.origin: dict[int, tuple[torch.Tensor, frozenset]] = {}   # derived tensor id -> (tensor, params)
        self.bad: dict[int, str] = {}                                  # parameter id -> what went wrong
        self.count: dict[int, int] = {}                                # parameter id -> uses in this forward

    def _sources(self, t):
        i = id(t)
        if i in self.origin:
            return self.origin[i][1]
        if i in self.params and i not in self.covered:
            return frozenset((i,))
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _IGNORED or not torch.is_grad_enabled():
            return out
        leaves, spec = tree_flatten((args, kwargs))
        srcs, derived = frozenset(), []
        for pos, t in enumerate(leaves):
            if isinstance(t, torch.Tensor):
                s = self._sources(t)
                if s:
                    srcs |= s
                    derived.append(pos)
        if not srcs:
            return out
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        lead = out.shape[0] if isinstance(out, torch.Tensor) and out.dim() > 0 else None
        batched = [pos for pos, t in enumerate(leaves)
                   if isinstance(t, torch.Tensor) and pos not in derived and t.dim() > 0 and id(t) not in self.buffers
                   and (t.requires_grad or (lead is not None and t.shape[0] == lead and lead % self.B == 0))]
        if not batched:
            # derived from parameters alone, unless this op spreads them over the batch (expand to B * k rows)
            spread = (func in _SPREADERS and lead is not None and lead % self.B == 0 and
                      all(leaves[p].dim() == 0 or leaves[p].shape[0] != lead for p in derived))
            if not spread:
                for o in outs:
                    if o.is_floating_point() and o.requires_grad:
                        self.origin[id(o)] = (o, srcs)
                return out
        if (lead is None or lead % self.B or not out.requires_grad or len(outs) != 1
                or any(leaves[p].shape[0] != lead for p in batched)):
            name = getattr(func, "__name__", str(func))
            for s in srcs:
                self.bad.setdefault(s, f"{name} mixes the examples of the batch (output "
                                       f"{tuple(outs[0].shape) if outs else None})")
            return out
        for s in srcs:
            self.count[s] = self.count.get(s, 0) + 1
        use = Use(func, leaves, spec, derived, batched, srcs, lead // self.B)
        self.on_use(use, out)
        return out


def per_example_derived_grads(use: Use, grad_output: torch.Tensor, B: int) -> list[torch.Tensor]:
    """[(B, *d.shape)] example b's gradient of each derived input d of the use (derived inputs detached)."""
    k, leaves = use.k, use.leaves
    dt = acc_dtype(grad_output)
    primals = tuple(leaves[p].detach().to(dt) for p in use.derived)
    g = grad_output.to(dt).reshape(B, k, *grad_output.shape[1:])

    def rebuild(ds, bs):
        filled = list(leaves)
        for p, d in zip(use.derived, ds):
            filled[p] = d
        for p, b in zip(use.batched, bs):
            filled[p] = b
        args, kwargs = tree_unflatten(filled, use.spec)
        return use.func(*args, **kwargs)

    if use.batched:
        bs = tuple(leaves[p].detach().to(dt).reshape(B, k, *leaves[p].shape[1:]) if leaves[p].is_floating_point()
                   else leaves[p].reshape(B, k, *leaves[p].shape[1:]) for p in use.batched)

        def one(b, gb):
            _, pull = vjp(lambda *ds: rebuild(ds, b), *primals)
            return pull(gb)

        return list(vmap(one)(bs, g))
    # spread over the batch from parameters alone (expand to B rows): example b's rows of the cotangent only
    rows = grad_output.shape[0]
    owner = torch.arange(rows, device=g.device) // k

    def masked(b):
        keep = (owner == b).to(dt).reshape(rows, *([1] * (grad_output.dim() - 1)))
        _, pull = vjp(lambda *ds: rebuild(ds, ()), *primals)
        return pull(grad_output.to(dt) * keep)

    step = max(1, CHUNK_ELEMENTS // max(1, grad_output.numel()))
    return list(vmap(masked, chunk_size=step)(torch.arange(B, device=g.device)))


def linear_use_sqnorms(use: Use, grad_output: torch.Tensor, B: int, backend: str, buffer) -> None:
    """F.linear(x, W, b) with W, b parameters used once: their squared norms by nn.Linear's forms, added into
    buffer(id(parameter))."""
    args, kwargs = tree_unflatten(use.leaves, use.spec)
    bound = dict(zip(("input", "weight", "bias"), args), **kwargs)
    x, weight, bias = bound["input"], bound["weight"], bound.get("bias")
    g = grad_output.reshape(B, -1, grad_output.shape[-1])
    if id(weight) in use.params:
        weight_sqnorm(x.reshape(B, -1, x.shape[-1]), g, backend, buffer(id(weight)))
    if bias is not None and id(bias) in use.params:
        bias_sqnorm(g.transpose(1, 2), buffer(id(bias)), backend)


def chain_to_params(use: Use, grads, params) -> dict[int, torch.Tensor]:
    """{param id: (B, *p.shape)} from the derived inputs' per-example gradients, through their own graph."""
    out: dict[int, torch.Tensor] = {}
    through, through_grads = [], []
    for p, gd in zip(use.derived, grads):
        t = use.leaves[p]
        if id(t) in params:
            out[id(t)] = out.get(id(t), 0) + gd
        else:
            through.append(t)
            through_grads.append(gd.to(t.dtype))
    if through:
        ids = sorted(use.params)
        got = torch.autograd.grad(through, [params[i] for i in ids], through_grads, retain_graph=True,
                                  allow_unused=True, is_grads_batched=True)
        for i, gp in zip(ids, got):
            if gp is not None:
                out[i] = out.get(i, 0) + gp
    return out

