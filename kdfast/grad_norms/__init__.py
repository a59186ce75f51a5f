"""Per-example gradient norms of whole networks: one forward, one activation-only backward, a rule per layer.

    norms = per_example_grad_norms(model, inputs, targets, loss="ce")   # (B,) exact ||grad l_i||
    with GradNormPlan(model) as plan: norms = plan(inputs, targets)      # hooks installed once, many calls
    check(model)                                                         # modules without a rule
    @register_rule(MyLayer) def my_rule(module, x, grad_output, *, want, backend, sink, saved): ...
"""
from kdfast.grad_norms.engine import GradNormPlan, check, per_example_grad_norms
from kdfast.grad_norms.registry import register_rule

__all__ = ["GradNormPlan", "check", "per_example_grad_norms", "register_rule"]
