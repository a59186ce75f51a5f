"""The registry of layer rules: module type -> function giving each example's squared gradient norms.

A rule has one fixed signature:

    rule(module, x, grad_output, *, want, backend, sink, saved) -> None

`x` is the module's first positional input and `grad_output` the gradient of the summed per-example
loss w.r.t. the module's output, both batch-first (the engine guarantees it); since examples are
independent, grad_output[i] is example i's own output gradient. `want` names the module's own parameters
that require grad (the rule may skip the others); `backend` is "triton" or "torch". The rule adds each
example's squared norm of parameter `name` into `sink.buffer(name)` ((B,) accumulator: the network's one
total, or the parameter's own with per_layer=True; kernels add into it directly) or calls
`sink.add(name, value)`. `saved` is what the rule's `save(module, args, output)` (given to register_rule)
took from the forward, e.g. the statistics a normalisation layer computed, or None (a `save` with a
`kwargs` parameter also receives the call's keyword arguments). A rule for a module returning a tuple
receives the tuple of its tensor outputs' gradients. `children` names submodules whose parameters the
module's own code uses (nn.MultiheadAttention's out_proj): the rule covers them, as dotted names in `want`.
`batch_dim(module) -> int` says where the batch is in the (first) output of a module that is not batch-first
(nn.MultiheadAttention with batch_first=False); the rule then receives that gradient as it is.

A rule without a `sink` parameter (rule(module, x, grad_output, *, want, backend) -> {name: (B,) squared
norms}) is accepted too; the engine adds its values.
Lookup: the exact type first, then its MRO, so subclasses find their parent's rule.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

from kdfast.errors import InvalidArgumentError

Rule = Callable[..., dict | None]
RULES: dict[type, Rule] = {}
SAVERS: dict[Rule, Callable] = {}
CHILDREN: dict[Rule, tuple[str, ...]] = {}
BATCH_DIMS: dict[Rule, Callable] = {}


class Sink:
    """Where rules add per-example squared norms: one (B,) total, or one (B,) buffer per parameter name."""

    __slots__ = ("total", "per_param")

    def __init__(self, total: torch.Tensor | None = None, per_param: dict[str, torch.Tensor] | None = None):
        self.total, self.per_param = total, per_param

    def buffer(self, name: str) -> torch.Tensor:
        return self.total if self.per_param is None else self.per_param[name]

    def add(self, name: str, value: torch.Tensor) -> None:
        self.buffer(name).add_(value)


def register_rule(*module_types: type, overwrite: bool = False, save: Callable | None = None,
                  children: tuple[str, ...] = (), batch_dim: Callable | None = None):
    """Decorator registering a rule for one or more nn.Module subclasses.

        @register_rule(MyConv)
        def my_conv_rule(module, x, grad_output, *, want, backend, sink, saved): ...

    `save(module, args, output)`, when given, runs in the forward and its result reaches the rule as
    `saved`; `children` names submodules the rule covers; `batch_dim(module)` gives the batch dim of its output. Replacing an existing rule needs overwrite=True.
    """
    if not module_types:
        raise InvalidArgumentError("register_rule: give at least one nn.Module subclass, got none")
    for cls in module_types:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise InvalidArgumentError(f"register_rule: module types must be nn.Module subclasses, got {cls!r}")
    if save is not None and not callable(save):
        raise InvalidArgumentError(f"register_rule: save must be callable or None, got {save!r}")

    def decorate(rule: Rule) -> Rule:
        if not callable(rule):
            raise InvalidArgumentError(f"register_rule: the rule must be callable, got {rule!r}")
        taken = [cls.__name__ for cls in module_types if cls in RULES and RULES[cls] is not rule]
        if taken and not overwrite:
            raise InvalidArgumentError(f"register_rule: a rule for {', '.join(taken)} exists already; pass "
                                       "overwrite=True to replace it")
        for cls in module_types:
            RULES[cls] = rule
        if save is not None:
            SAVERS[rule] = save
        if children:
            CHILDREN[rule] = tuple(children)
        if batch_dim is not None:
            BATCH_DIMS[rule] = batch_dim
        return rule

    return decorate


def find_rule(module: nn.Module) -> Rule | None:
    """The rule of the module's exact type, else of its nearest registered base class, else None."""
    for cls in type(module).__mro__:
        rule = RULES.get(cls)
        if rule is not None:
            return rule
    return None


def takes_kwargs(save: Callable) -> bool:
    """Whether a forward-time saver wants the call's keyword arguments too."""
    try:
        return "kwargs" in inspect.signature(save).parameters
    except (TypeError, ValueError):
        return False


def takes_sink(rule: Rule) -> bool:
    """Whether the rule adds into a sink (the current signature) rather than returning a dict."""
    try:
        return "sink" in inspect.signature(rule).parameters
    except (TypeError, ValueError):
        return False
