"""Hessian spectral norms: per-example closed forms, batched Hessian- and GGN-vector products, and
batched Lanczos / power iteration over many mini-batches at once."""
from kdfast.hessian.closed_forms import softmax_ce_lipschitz, softmax_hessian_lambda_max, squared_loss_lipschitz

__all__ = ["softmax_ce_lipschitz", "softmax_hessian_lambda_max", "squared_loss_lipschitz"]
