"""Normalisation layers with affine parameters: y = x_hat * gamma + beta, per channel (or feature).

Example i's gradients: gamma <- sum over positions of g * x_hat, beta <- sum over positions of g, with
x_hat recomputed from the saved input. BatchNorm uses its running statistics (eval mode; the engine
refuses train mode, where batch statistics couple the examples); GroupNorm, LayerNorm and RMSNorm
normalise each example on its own.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..forms import acc_dtype
from ..registry import register_rule


def _affine_sqnorms(x_hat, g, want, B, features):
    """x_hat, g viewed as (B, positions, features) -> squared norms of the per-example gamma/beta grads."""
    g = g.reshape(B, -1, features)
    out = {}
    if "weight" in want:
        out["weight"] = (g * x_hat.reshape(B, -1, features)).sum(1).square().sum(1)
    if "bias" in want:
        out["bias"] = g.sum(1).square().sum(1)
    return out


def _channels_last(t):
    """(B, C, *S) -> (B, *S, C), so channels become the feature axis."""
    return t.movedim(1, -1)


@register_rule(_BatchNorm)
def batchnorm_rule(module, x, grad_output, *, want, backend):
    dt = acc_dtype(grad_output)
    shape = (-1,) + (1,) * (x.dim() - 2)
    x_hat = (x.to(dt) - module.running_mean.to(dt).view(shape)) * torch.rsqrt(
        module.running_var.to(dt).view(shape) + module.eps)
    return _affine_sqnorms(_channels_last(x_hat), _channels_last(grad_output.to(dt)), want, x.shape[0],
                           x.shape[1])


@register_rule(nn.GroupNorm)
def groupnorm_rule(module, x, grad_output, *, want, backend):
    dt = acc_dtype(grad_output)
    x_hat = F.group_norm(x.to(dt), module.num_groups, eps=module.eps)
    return _affine_sqnorms(_channels_last(x_hat), _channels_last(grad_output.to(dt)), want, x.shape[0],
                           x.shape[1])


@register_rule(nn.LayerNorm)
def layernorm_rule(module, x, grad_output, *, want, backend):
    dt = acc_dtype(grad_output)
    x_hat = F.layer_norm(x.to(dt), module.normalized_shape, eps=module.eps)
    return _affine_sqnorms(x_hat, grad_output.to(dt), want, x.shape[0], math.prod(module.normalized_shape))


@register_rule(nn.RMSNorm)
def rmsnorm_rule(module, x, grad_output, *, want, backend):
    dt = acc_dtype(grad_output)
    x_hat = F.rms_norm(x.to(dt), module.normalized_shape, eps=module.eps)
    return _affine_sqnorms(x_hat, grad_output.to(dt), want, x.shape[0], math.prod(module.normalized_shape))
