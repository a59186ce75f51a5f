"""Normalisation layers with affine parameters: y = x_hat * gamma + beta, per channel (or feature).

Example b's gradients: gamma[c] <- sum over positions of g * x_hat, beta[c] <- sum over positions of g.
With x_hat = (x - mean) * rstd and (mean, rstd) given per (example, channel), both sums come from one
read of x and g (forms.channel_sums; a Triton kernel on the GPU), x_hat never stored:
  - BatchNorm: the running statistics (eval mode; the engine refuses train mode, where batch statistics
    couple the examples);
  - GroupNorm: each example's statistics over its channel group;
  - LayerNorm / RMSNorm: statistics per position over the trailing features, so x_hat is formed first
    (by torch) and summed over positions with mean 0, rstd 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..forms import acc_dtype, channel_sums
from ..registry import register_rule


def _affine_sqnorms(x, g, mean, rstd, want, backend):
    """Squared norms of the per-example gamma / beta gradients; x, g (B, C, L), mean, rstd (B, C)."""
    sgx, sg = channel_sums(x, g, mean, rstd, backend)
    out = {}
    if "weight" in want:
        out["weight"] = sgx.square().sum(1)
    if "bias" in want:
        out["bias"] = sg.square().sum(1)
    return out


@register_rule(_BatchNorm)
def batchnorm_rule(module, x, grad_output, *, want, backend):
    B, C = x.shape[:2]
    dt = acc_dtype(grad_output)
    mean = module.running_mean.to(dt).expand(B, C)
    rstd = torch.rsqrt(module.running_var.to(dt) + module.eps).expand(B, C)
    return _affine_sqnorms(x.reshape(B, C, -1), grad_output.reshape(B, C, -1), mean, rstd, want, backend)


@register_rule(nn.GroupNorm)
def groupnorm_rule(module, x, grad_output, *, want, backend):
    B, C, G = x.shape[0], x.shape[1], module.num_groups
    var, mean = torch.var_mean(x.reshape(B, G, -1).to(acc_dtype(grad_output)), dim=2, unbiased=False)
    rstd = torch.rsqrt(var + module.eps)
    return _affine_sqnorms(x.reshape(B, C, -1), grad_output.reshape(B, C, -1),
                           mean.repeat_interleave(C // G, dim=1), rstd.repeat_interleave(C // G, dim=1), want,
                           backend)


def _trailing_norm_sqnorms(module, x_hat, grad_output, want, backend):
    """x_hat, grad_output (B, ..., *normalized_shape) -> features as channels, the rest as positions."""
    B, F_ = x_hat.shape[0], math.prod(module.normalized_shape)
    ones = x_hat.new_ones(()).expand(B, F_)
    return _affine_sqnorms(x_hat.reshape(B, -1, F_).transpose(1, 2), grad_output.reshape(B, -1, F_).transpose(1, 2),
                           ones * 0, ones, want, backend)


@register_rule(nn.LayerNorm)
def layernorm_rule(module, x, grad_output, *, want, backend):
    x_hat = F.layer_norm(x.to(acc_dtype(grad_output)), module.normalized_shape, eps=module.eps)
    return _trailing_norm_sqnorms(module, x_hat, grad_output, want, backend)


@register_rule(nn.RMSNorm)
def rmsnorm_rule(module, x, grad_output, *, want, backend):
    x_hat = F.rms_norm(x.to(acc_dtype(grad_output)), module.normalized_shape, eps=module.eps)
    return _trailing_norm_sqnorms(module, x_hat, grad_output, want, backend)
