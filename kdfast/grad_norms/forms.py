"""Closed forms shared by the rules: squared Frobenius norms of per-example outer-product sums.

For one example with activations A (T, Da) and output gradients G (T, Dg), the weight gradient is
W_grad = G^T A (Dg, Da), and

    ||G^T A||_F^2 = sum_{t,s} (a_t . a_s)(g_t . g_s)        (the Gram or "ghost" form)

Materialising G^T A costs T * Da * Dg per example; the Gram form costs T^2 * (Da + Dg) and never builds
the weight gradient. `prefer_gram` picks the cheaper. Both run in batched torch (CPU, float64, or any
device) or in Triton kernels that never write the per-example gradient (CUDA, or TRITON_INTERPRET=1).
Also here: `channel_sums`, the per-example affine gradients of normalisation layers.
Arithmetic is float32 for 16-bit inputs and float64 for float64 inputs.
"""
from __future__ import annotations

import torch

# Elements of temporaries (per-example gradients or Gram matrices) a torch chunk may hold at once:
# 2^25 floats = 128 MiB in fp32, small next to the activations of the models this runs on.
CHUNK_ELEMENTS = 1 << 25


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def prefer_gram(T: int, da: int, dg: int) -> bool:
    """True when the Gram form (T^2 (da + dg)) costs less than materialising G^T A (T da dg)."""
    return T * (da + dg) < da * dg


def chunks(n: int, per_item: int):
    """(starts, step): batch slices whose temporaries of `per_item` elements each fit CHUNK_ELEMENTS."""
    step = max(1, CHUNK_ELEMENTS // max(1, per_item))
    return range(0, n, step), step


def gram_sqnorm(a: torch.Tensor, g: torch.Tensor, backend: str) -> torch.Tensor:
    """(N,) ||g_n^T a_n||_F^2 by the Gram form, for a (N, T, Da), g (N, T, Dg); clamped at 0."""
    N, T = a.shape[:2]
    if backend == "triton":
        from ..kernels.grad_norms import gram_sqnorm as launch
        return launch(a, g).clamp_(min=0)
    dt = acc_dtype(a)
    out = torch.empty(N, dtype=dt, device=a.device)
    starts, step = chunks(N, 2 * T * T)
    for s in starts:
        ac, gc = a[s:s + step].to(dt), g[s:s + step].to(dt)
        out[s:s + step] = (torch.bmm(ac, ac.transpose(1, 2)) * torch.bmm(gc, gc.transpose(1, 2))).sum((1, 2))
    return out.clamp_(min=0)


def outer_sqnorm(a: torch.Tensor, g: torch.Tensor, backend: str) -> torch.Tensor:
    """(N,) ||g_n^T a_n||_F^2 by materialising g_n^T a_n (torch, in chunks) or in-register (Triton)."""
    N, T, da = a.shape
    dg = g.shape[2]
    if backend == "triton":
        from ..kernels.grad_norms import conv_wgrad_sqnorm
        # A linear map over T positions is a 1x1 convolution: (N, Da, 1, 1, T) -> (N, Dg, 1, 1, T).
        x5 = a.transpose(1, 2)[:, :, None, None, :]
        g5 = g.transpose(1, 2)[:, :, None, None, :]
        return conv_wgrad_sqnorm(x5, g5, kernel_size=(1, 1, 1), stride=(1, 1, 1), padding=(0, 0, 0),
                                 dilation=(1, 1, 1), groups=1)
    dt = acc_dtype(a)
    out = torch.empty(N, dtype=dt, device=a.device)
    starts, step = chunks(N, da * dg)
    for s in starts:
        w = torch.bmm(g[s:s + step].to(dt).transpose(1, 2), a[s:s + step].to(dt))
        out[s:s + step] = w.square().sum((1, 2))
    return out


def weight_sqnorm(a: torch.Tensor, g: torch.Tensor, backend: str) -> torch.Tensor:
    """(N,) ||g_n^T a_n||_F^2 by whichever form costs less for this shape."""
    T, da, dg = a.shape[1], a.shape[2], g.shape[2]
    if T == 1:
        dt = acc_dtype(a)
        return a[:, 0].to(dt).square().sum(1) * g[:, 0].to(dt).square().sum(1)
    return gram_sqnorm(a, g, backend) if prefer_gram(T, da, dg) else outer_sqnorm(a, g, backend)


def channel_sums(x: torch.Tensor, g: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, backend: str):
    """((N, C) sum_l g (x - mean) rstd, (N, C) sum_l g) for x, g (N, C, L) and mean, rstd (N, C):
    a normalisation layer's per-example gamma and beta gradients."""
    if backend == "triton":
        from ..kernels.grad_norms import channel_sums as launch
        return launch(x, g, mean, rstd)
    dt = torch.promote_types(acc_dtype(x), acc_dtype(g))
    gd = g.to(dt)
    x_hat = (x.to(dt) - mean.to(dt).unsqueeze(2)) * rstd.to(dt).unsqueeze(2)
    return (gd * x_hat).sum(2), gd.sum(2)
