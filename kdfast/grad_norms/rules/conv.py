"""nn.Conv1d/2d/3d with stride, padding (any mode), dilation, groups and bias.

Per example and group, the weight gradient is G^T U: G (P, Cout/groups) the output gradient over the P
output positions, U (P, Cin/groups * prod(kernel)) the unfolded (im2col) input. Its squared norm comes
from one of two forms (forms.prefer_gram's cost model picks per layer):
  - direct: Triton accumulates G^T U tile by tile as an implicit GEMM (the unfolded input is never
    built, G^T U never written); torch computes G^T U for a chunk of examples with one grouped
    weight-gradient convolution (examples as groups), then its squared norm; for depthwise convolutions
    (one input channel per group) one forward convolution with the examples folded into the channels and
    the output gradient as the kernel (no unfolded input); for other grouped convolutions one batched
    product per (example, group) on the unfolded input.
  - Gram: sum_{p,q} (u_p . u_q)(g_p . g_q); cheap where few output positions meet many weights (the deep
    layers of a CNN). Triton reads the windows straight from the input (zero padding as masked loads, any
    layout); torch builds the unfolded input of a chunk of examples.
Bias: ||sum_p g_p||^2.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdfast.errors import UnsupportedModuleError
from kdfast.grad_norms.forms import acc_dtype, bias_sqnorm, chunks, gram_sqnorm, prefer_gram
from kdfast.grad_norms.registry import register_rule


def explicit_padding(module, x: torch.Tensor):
    """(input padded where the module pads asymmetrically or not with zeros, symmetric zero padding left)."""
    n = len(module.kernel_size)
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0,) * n
    if module.padding == "valid":
        return x, (0,) * n
    if module.padding == "same":
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if all(t % 2 == 0 for t in total):  # symmetric: the kernels pad by masking
            return x, tuple(t // 2 for t in total)
        pairs = [(t // 2, t - t // 2) for t in total]
        return F.pad(x, [p for pair in reversed(pairs) for p in pair]), (0,) * n
    return x, tuple(module.padding)


def unfold(x: torch.Tensor, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """(b, C, *S) -> (b, C, *O, *K): every kernel window of every output position (a strided view)."""
    x = F.pad(x, [p for pad in reversed(padding) for p in (pad, pad)])
    for i, (k, s, d) in enumerate(zip(kernel_size, stride, dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]
    return x


def _unfolded_chunks(x, g, kernel_size, stride, padding, dilation, groups):
    """(start, u (b * groups, P, Cin/groups * taps), g (b * groups, Cout/groups, P)) per chunk of examples."""
    B, Cin = x.shape[:2]
    Cout, P, n = g.shape[1], math.prod(g.shape[2:]), len(kernel_size)
    kg = Cin // groups * math.prod(kernel_size)
    starts, step = chunks(B, Cin * math.prod(kernel_size) * P)
    for s in starts:
        windows = unfold(x[s:s + step], kernel_size, stride, padding, dilation)   # (b, Cin, *O, *K)
        b = windows.shape[0]
        order = (0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n))                 # (b, *O, Cin, *K)
        u = windows.permute(order).reshape(b, P, groups, kg).transpose(1, 2).reshape(b * groups, P, kg)
        yield s, u, g[s:s + step].reshape(b * groups, Cout // groups, P)


def _gram_torch(x, g, kernel_size, stride, padding, dilation, groups, out):
    for s, u, gc in _unfolded_chunks(x, g, kernel_size, stride, padding, dilation, groups):
        out[s:s + gc.shape[0] // groups] += gram_sqnorm(u, gc.transpose(1, 2), "torch").view(-1, groups).sum(1)


def _grouped_torch(x, g, kernel_size, stride, padding, dilation, groups, out):
    """Grouped (depthwise) convolutions: each (example, group) gradient G_g U_g as one batched product; a
    weight-gradient convolution with B * groups groups runs far slower on the CPU."""
    dt = acc_dtype(x)
    for s, u, gc in _unfolded_chunks(x, g, kernel_size, stride, padding, dilation, groups):
        per_group = torch.bmm(gc.to(dt), u.to(dt)).square().sum((1, 2))
        out[s:s + gc.shape[0] // groups] += per_group.view(-1, groups).sum(1)


def _depthwise_torch(x, g, kernel_size, stride, padding, dilation, out):
    """One input channel per group: example b's gradient of tap k is sum_p g[b, o, p] x[b, c, p * stride +
    k * dilation - padding] (c = o's input channel), a convolution of the input with the output gradient as
    kernel, stride and dilation swapped. Examples and channels folded into B * Cout groups make it one
    depthwise forward convolution (far faster on the CPU than the unfolded input or a weight-gradient
    convolution with B * groups groups); it may yield positions past the kernel: cut."""
    B, Cin, Cout, n = x.shape[0], x.shape[1], g.shape[1], len(kernel_size)
    dt = acc_dtype(x)
    taps = torch.convolution(x.to(dt).reshape(1, B * Cin, *x.shape[2:]),
                             g.to(dt).reshape(B * Cout, 1, *g.shape[2:]), None, list(dilation), list(padding),
                             list(stride), False, [0] * n, B * Cin)
    taps = taps[(0, slice(None), *(slice(k) for k in kernel_size))]
    out += taps.reshape(B, -1).square().sum(1)


def _direct_torch(x, g, kernel_size, stride, padding, dilation, groups, out):
    B, Cin = x.shape[:2]
    Cout, n = g.shape[1], len(kernel_size)
    dt = acc_dtype(x)
    starts, step = chunks(B, Cout * Cin // groups * math.prod(kernel_size))
    for s in starts:
        xc, gc = x[s:s + step].to(dt), g[s:s + step].to(dt)
        b = xc.shape[0]
        # Examples as extra groups: one weight-gradient convolution yields every example's own gradient.
        shape = (b * Cout, Cin // groups, *kernel_size)
        _, per_example_grad, _ = torch.ops.aten.convolution_backward(
            gc.reshape(1, b * Cout, *gc.shape[2:]), xc.reshape(1, b * Cin, *xc.shape[2:]),
            torch.empty((), dtype=dt, device=x.device).expand(shape), None, list(stride), list(padding),
            list(dilation), False, [0] * n, b * groups, [False, True, False])
        out[s:s + step] += per_example_grad.reshape(b, -1).square().sum(1)


def _triton(form, x, g, kernel_size, stride, padding, dilation, groups, out):
    from kdfast.grad_norms import triton as kernels
    launch = kernels.conv_gram_sqnorm if form == "gram" else kernels.conv_wgrad_sqnorm
    launch(x, g, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups, out=out)


def conv_weight_sqnorm(x, g, kernel_size, stride, padding, dilation, groups, backend, out):
    """out (B,) += squared norms of each example's convolution weight gradient."""
    Cin, Cout, P, taps = x.shape[1], g.shape[1], math.prod(g.shape[2:]), math.prod(kernel_size)
    gram = prefer_gram(P, Cin // groups * taps, Cout // groups, taps=taps, backend=backend)
    if backend == "triton":
        _triton("gram" if gram else "direct", x, g, kernel_size, stride, padding, dilation, groups, out)
    elif gram:
        _gram_torch(x, g, kernel_size, stride, padding, dilation, groups, out)
    elif groups == Cin:
        _depthwise_torch(x, g, kernel_size, stride, padding, dilation, out)
    elif groups > 1:
        _grouped_torch(x, g, kernel_size, stride, padding, dilation, groups, out)
    else:
        _direct_torch(x, g, kernel_size, stride, padding, dilation, groups, out)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_rule(module, x, grad_output, *, want, backend, sink, saved=None):
    n = len(module.kernel_size)
    if x.dim() != n + 2:
        raise UnsupportedModuleError(f"per_example_grad_norms: {type(module).__name__} needs a batched "
                                     f"{n + 2}-D input (B, C, ...), got shape {tuple(x.shape)}")
    if "weight" in want:
        xp, padding = explicit_padding(module, x)
        conv_weight_sqnorm(xp, grad_output, module.kernel_size, module.stride, padding, module.dilation,
                           module.groups, backend, sink.buffer("weight"))
    if "bias" in want:
        bias_sqnorm(grad_output.reshape(grad_output.shape[0], grad_output.shape[1], -1), sink.buffer("bias"),
                    backend)
