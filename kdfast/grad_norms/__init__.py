"""Per-example gradient norms of whole networks: one forward, one activation-only backward, a rule per layer.

    norms = per_example_grad_norms(model, inputs, targets, loss="ce")   # (B,) exact ||grad l_i||
    check(model)                                                         # modules without a rule
    @register_rule(MyLayer) def my_rule(module, x, grad_output, *, want, backend): ...
"""
from .engine import check, per_example_grad_norms
from .registry import register_rule

__all__ = ["check", "per_example_grad_norms", "register_rule"]
