"""Closed forms shared by the rules: squared Frobenius norms of per-example outer-product sums, added into a
(B,) accumulator the engine owns (one for the whole network, or one per parameter with per_layer=True).

For one example with activations A (T, Da) and output gradients G (T, Dg), the weight gradient is
W_grad = G^T A (Dg, Da), and

    ||G^T A||_F^2 = sum_{t,s} (a_t . a_s)(g_t . g_s)        (the Gram or "ghost" form)

Materialising G^T A costs T * Da * Dg per example; the Gram form costs T^2 * (Da + Dg) and never builds
the weight gradient. The cost model below picks the cheaper per layer. Both run in batched torch (CPU,
float64, or any device) or in Triton kernels that never write the per-example gradient (CUDA, or
TRITON_INTERPRET=1). Also here: `affine_sqnorms`, the per-example affine gradients of normalisation layers.
Arithmetic is float32 for 16-bit inputs and float64 for float64 inputs.

Cost model (multiply-adds per example; `prefer_gram`):
  torch   direct T * Da * Dg  vs  Gram T^2 * (Da + Dg)          (full bmm Gram matrices)
  Triton  direct T * K * r(Cin_g) * r(Cout_g)  vs  Gram (Tr^2 + Tr * 64) / 2 * (K * r(Cin_g) + r(Cout_g)),
          r(n) = n rounded up to the 16-wide dot tile, K the kernel taps, Tr = T rounded up to its 16..64
          block: the direct kernel runs one channel tile per tap, the Gram kernel only the blocks j >= i.
  Both count tensor-core work only; the GPU runner checks the choice against per-layer timings
  (bench_grad_norms' "cost_model" row).
"""
from __future__ import annotations

import torch

# Elements of temporaries (per-example gradients or Gram matrices) a torch chunk may hold at once:
# 2^25 floats = 128 MiB in fp32, small next to the activations of the models this runs on.
CHUNK_ELEMENTS = 1 << 25
DOT_TILE, GRAM_MAX_BLOCK = 16, 64


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _round(n: int, to: int) -> int:
    return -(-n // to) * to


def prefer_gram(T: int, da: int, dg: int, *, taps: int = 1, backend: str = "torch") -> bool:
    """True when the Gram form costs less than the direct product (see the module's cost model).
    da counts every weight column (input channels per group x taps)."""
    if backend != "triton":
        return T * (da + dg) < da * dg
    cin = _round(da // taps, DOT_TILE)
    cout = _round(dg, DOT_TILE)
    block = min(GRAM_MAX_BLOCK, max(DOT_TILE, 1 << max(0, T - 1).bit_length()))
    tr = _round(T, block)
    return (tr * tr + tr * block) / 2 * (taps * cin + cout) < T * taps * cin * cout


def chunks(n: int, per_item: int):
    """(starts, step): batch slices whose temporaries of `per_item` elements each fit CHUNK_ELEMENTS."""
    step = max(1, CHUNK_ELEMENTS // max(1, per_item))
    return range(0, n, step), step


def _sink(out, a):
    return torch.zeros(a.shape[0], dtype=acc_dtype(a), device=a.device) if out is None else out


def _lift(a):
    """(N, T, D) -> (N, D, T): a linear map over T positions is a 1-wide 1-D convolution (a view)."""
    return a.transpose(1, 2)


_UNIT = dict(kernel_size=(1,), stride=(1,), padding=(0,), dilation=(1,), groups=1)


def gram_sqnorm(a: torch.Tensor, g: torch.Tensor, backend: str, out=None) -> torch.Tensor:
    """out (N,) += ||g_n^T a_n||_F^2 by the Gram form, for a (N, T, Da), g (N, T, Dg); returns out."""
    out = _sink(out, a)
    N, T = a.shape[:2]
    if backend == "triton":
        from kdfast.grad_norms.triton import conv_gram_sqnorm
        return conv_gram_sqnorm(_lift(a), _lift(g), out=out, **_UNIT)
    dt = acc_dtype(a)
    starts, step = chunks(N, 2 * T * T)
    for s in starts:
        ac, gc = a[s:s + step].to(dt), g[s:s + step].to(dt)
        out[s:s + step] += (torch.bmm(ac, ac.transpose(1, 2)) * torch.bmm(gc, gc.transpose(1, 2))).sum((1, 2))
    return out


def outer_sqnorm(a: torch.Tensor, g: torch.Tensor, backend: str, out=None) -> torch.Tensor:
    """out (N,) += ||g_n^T a_n||_F^2 by materialising g_n^T a_n (torch, in chunks) or in-register (Triton)."""
    out = _sink(out, a)
    N, T, da = a.shape
    if backend == "triton":
        from kdfast.grad_norms.triton import conv_wgrad_sqnorm
        return conv_wgrad_sqnorm(_lift(a), _lift(g), out=out, **_UNIT)
    dt = acc_dtype(a)
    starts, step = chunks(N, da * g.shape[2])
    for s in starts:
        w = torch.bmm(g[s:s + step].to(dt).transpose(1, 2), a[s:s + step].to(dt))
        out[s:s + step] += w.square().sum((1, 2))
    return out


def weight_sqnorm(a: torch.Tensor, g: torch.Tensor, backend: str, out=None) -> torch.Tensor:
    """out (N,) += ||g_n^T a_n||_F^2 by whichever form costs less for this shape; returns out."""
    T, da, dg = a.shape[1], a.shape[2], g.shape[2]
    if T == 1:
        return rank_one_sqnorms(a[:, 0], g[:, 0], backend, out_w=_sink(out, a))
    form = gram_sqnorm if prefer_gram(T, da, dg, backend=backend) else outer_sqnorm
    return form(a, g, backend, out)


def rank_one_sqnorms(a, g, backend, *, out_w=None, out_b=None):
    """A Linear on one position per example, a (B, Da), g (B, Dg): out_w (B,) += ||a||^2 ||g||^2 (its weight
    gradient g a^T), out_b += ||g||^2 (its bias gradient); None skips one. Returns out_w."""
    if backend == "triton":
        from kdfast.grad_norms.triton import rank_one_sqnorm
        rank_one_sqnorm(a, g, out_w=out_w, out_b=out_b)
        return out_w
    dt = acc_dtype(a)
    gg = g.to(dt).square().sum(1)
    if out_b is not None:
        out_b.add_(gg)
    return None if out_w is None else out_w.add_(a.to(dt).square().sum(1) * gg)


def affine_sqnorms(x, g, mean=None, stat=None, *, stats="rstd", eps=0.0, neg_part=False, out_w=None, out_b=None,
                   backend="torch"):
    """Adds sum_c (sum_l g x_hat)^2 into out_w and sum_c (sum_l g)^2 into out_b ((B,) buffers; None skips one):
    a normalisation layer's per-example gamma and beta gradients, squared, for x, g (B, C, L).

    x_hat = (x - mean) * rstd with mean, stat (B, G) per example and channel group (G divides C; stride-0
    expands for shared statistics), stat the rstd (stats="rstd") or the variance (stats="var": rstd =
    1 / sqrt(var + eps)); stats=None takes x as x_hat; neg_part uses min(x, 0) (PReLU).
    """
    if backend == "triton":
        from kdfast.grad_norms import triton as kernels
        code = {None: kernels.STATS_NONE, "rstd": kernels.STATS_RSTD, "var": kernels.STATS_VAR}[stats]
        kernels.affine_sqnorm(x, g, mean, stat, stats=code, eps=eps, neg_part=neg_part, out_w=out_w, out_b=out_b)
        return
    B, C, L = x.shape
    dt = torch.promote_types(acc_dtype(x), acc_dtype(g))
    gd = g.to(dt)
    if out_w is not None:
        xd = x.to(dt).clamp(max=0) if neg_part else x.to(dt)
        if stats is not None:
            G = mean.shape[1]
            rstd = stat.to(dt) if stats == "rstd" else torch.rsqrt(stat.to(dt) + eps)
            xd = ((xd.reshape(B, G, C // G, L) - mean.to(dt)[:, :, None, None]) * rstd[:, :, None, None])
        out_w.add_((gd * xd.reshape(B, C, L)).sum(2).square().sum(1))
    if out_b is not None:
        out_b.add_(gd.sum(2).square().sum(1))


def bias_sqnorm(g: torch.Tensor, out: torch.Tensor, backend: str) -> None:
    """out (B,) += sum_c (sum_l g)^2 for g (B, C, L): the squared norm of each example's bias gradient."""
    affine_sqnorms(g, g, stats=None, out_b=out, backend=backend)


def trailing_channels(t: torch.Tensor, features: int) -> torch.Tensor:
    """(B, ..., *normalized_shape) -> (B, F, positions): features as channels, the rest as positions."""
    return t.reshape(t.shape[0], -1, features).transpose(1, 2)

