"""Hessian spectral norms: per-example closed forms, batched Hessian- and GGN-vector products, and
batched Lanczos / power iteration over many mini-batches at once."""
from kdfast.hessian.closed_forms import softmax_ce_lipschitz, softmax_hessian_lambda_max, squared_loss_lipschitz
from kdfast.hessian.hvp import BatchedHVP, hvp
from kdfast.hessian.spectral import SpectralInfo, spectral_norms

__all__ = ["BatchedHVP", "SpectralInfo", "hvp", "softmax_ce_lipschitz", "softmax_hessian_lambda_max",
           "spectral_norms", "squared_loss_lipschitz"]
