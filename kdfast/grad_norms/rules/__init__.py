"""Layer rules, one file per layer family; importing this package registers every one of them."""
from kdfast.grad_norms.rules import activation, attention, conv, embedding, linear, norm  # noqa: F401  (imported for their registrations)
