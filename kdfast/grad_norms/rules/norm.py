"""Normalisation layers with affine parameters: y = x_hat * gamma + beta, per channel (or feature).

Example b's gradients: gamma[c] <- sum over positions of g * x_hat, beta[c] <- sum over positions of g.
With x_hat = (x - mean) * rstd and (mean, rstd) per (example, channel group), both squared norms come from
one read of x and g (forms.affine_sqnorms; one Triton kernel on the GPU), x_hat never stored:
  - BatchNorm: the running statistics (eval mode; the engine refuses train mode, where batch statistics
    couple the examples), rstd formed inside the kernel;
  - GroupNorm: the mean and rstd its forward computed, taken from the autograd graph (recomputed only where
    the forward did not go through native_group_norm);
  - LayerNorm / RMSNorm: statistics per position over the trailing features, so x_hat is formed first
    (by torch) and summed over positions. A subclass normalising over the channels of a (B, C, ...) input
    (LayerNorm2d: permute, layer_norm, permute back) overrides forward and gets the features at dim 1: its
    input and output gradient are moved to channels-last first.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from kdfast.errors import UnsupportedModuleError
from kdfast.grad_norms.forms import acc_dtype, affine_sqnorms, trailing_channels
from kdfast.grad_norms.registry import register_rule


def _buffers(sink, want):
    return (sink.buffer("weight") if "weight" in want else None, sink.buffer("bias") if "bias" in want else None)


@register_rule(_BatchNorm)
def batchnorm_rule(module, x, grad_output, *, want, backend, sink, saved=None):
    B, C = x.shape[:2]
    out_w, out_b = _buffers(sink, want)
    affine_sqnorms(x.reshape(B, C, -1), grad_output.reshape(B, C, -1), module.running_mean.expand(B, C),
                   module.running_var.expand(B, C), stats="var", eps=module.eps, out_w=out_w, out_b=out_b,
                   backend=backend)


def _groupnorm_stats(module, args, output):
    """(mean, rstd) (B, G) that native_group_norm saved for its backward, or None."""
    node = getattr(output, "grad_fn", None)
    if node is not None and type(node).__name__ == "NativeGroupNormBackward0":
        return node._saved_result1, node._saved_result2
    return None


@register_rule(nn.GroupNorm, save=_groupnorm_stats)
def groupnorm_rule(module, x, grad_output, *, want, backend, sink, saved=None):
    B, C, G = x.shape[0], x.shape[1], module.num_groups
    if saved is None:
        var, mean = torch.var_mean(x.reshape(B, G, -1).to(acc_dtype(grad_output)), dim=2, unbiased=False)
        saved = mean, torch.rsqrt(var + module.eps)
    out_w, out_b = _buffers(sink, want)
    affine_sqnorms(x.reshape(B, C, -1), grad_output.reshape(B, C, -1), *saved, stats="rstd", out_w=out_w,
                   out_b=out_b, backend=backend)


def _trailing_norm(module, x_hat, grad_output, want, backend, sink):
    F_ = math.prod(module.normalized_shape)
    out_w, out_b = _buffers(sink, want)
    affine_sqnorms(trailing_channels(x_hat, F_), trailing_channels(grad_output, F_), stats=None, out_w=out_w,
                   out_b=out_b, backend=backend)


def _channels_last(module, x, grad_output):
    """(x, grad_output) with the normalised features trailing: as given, or dim 1 moved last (LayerNorm2d)."""
    shape = tuple(module.normalized_shape)
    base = nn.LayerNorm if isinstance(module, nn.LayerNorm) else nn.RMSNorm
    if len(shape) == 1 and x.dim() > 2 and x.shape[1] == shape[0] and type(module).forward is not base.forward:
        return x.movedim(1, -1), grad_output.movedim(1, -1)
    if tuple(x.shape[x.dim() - len(shape):]) == shape:
        return x, grad_output
    raise UnsupportedModuleError(f"per_example_grad_norms: {type(module).__name__} with normalized_shape {shape} got "
                                 f"an input of shape {tuple(x.shape)}: expected the features trailing or at dim 1")


@register_rule(nn.LayerNorm)
def layernorm_rule(module, x, grad_output, *, want, backend, sink, saved=None):
    x, grad_output = _channels_last(module, x, grad_output)
    x_hat = F.layer_norm(x.to(acc_dtype(grad_output)), module.normalized_shape, eps=module.eps)
    _trailing_norm(module, x_hat, grad_output, want, backend, sink)


@register_rule(nn.RMSNorm)
def rmsnorm_rule(module, x, grad_output, *, want, backend, sink, saved=None):
    x, grad_output = _channels_last(module, x, grad_output)
    x_hat = F.rms_norm(x.to(acc_dtype(grad_output)), module.normalized_shape, eps=module.eps)
    _trailing_norm(module, x_hat, grad_output, want, backend, sink)
