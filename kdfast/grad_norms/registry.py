"""The registry of layer rules: module type -> function giving each example's squared gradient norms.

A rule has one fixed signature:

    rule(module, x, grad_output, *, want, backend) -> {local parameter name: (B,) squared norms}

`x` is the module's first positional input and `grad_output` the gradient of the summed per-example
loss w.r.t. the module's output, both batch-first (the engine guarantees it); since examples are
independent, grad_output[i] is example i's own output gradient. `want` names the module's own parameters
that require grad (the rule may skip the others); `backend` is "triton" or "torch".
Lookup: the exact type first, then its MRO, so subclasses find their parent's rule.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import InvalidArgumentError

Rule = Callable[..., dict]
RULES: dict[type, Rule] = {}


def register_rule(*module_types: type, overwrite: bool = False):
    """Decorator registering a rule for one or more nn.Module subclasses.

        @register_rule(MyConv)
        def my_conv_rule(module, x, grad_output, *, want, backend): ...

    Replacing an existing rule needs overwrite=True.
    """
    if not module_types:
        raise InvalidArgumentError("register_rule: give at least one nn.Module subclass, got none")
    for cls in module_types:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise InvalidArgumentError(f"register_rule: module types must be nn.Module subclasses, got {cls!r}")

    def decorate(rule: Rule) -> Rule:
        if not callable(rule):
            raise InvalidArgumentError(f"register_rule: the rule must be callable, got {rule!r}")
        taken = [cls.__name__ for cls in module_types if cls in RULES and RULES[cls] is not rule]
        if taken and not overwrite:
            raise InvalidArgumentError(f"register_rule: a rule for {', '.join(taken)} exists already; pass "
                                       "overwrite=True to replace it")
        for cls in module_types:
            RULES[cls] = rule
        return rule

    return decorate


def find_rule(module: nn.Module) -> Rule | None:
    """The rule of the module's exact type, else of its nearest registered base class, else None."""
    for cls in type(module).__mro__:
        rule = RULES.get(cls)
        if rule is not None:
            return rule
    return None
