"""Triton kernels of the per-example gradient-norm engine and their launchers (CUDA, or CPU under
TRITON_INTERPRET=1). Checks and dispatch live in kdfast/grad_norms; inputs here are fp32/fp16/bf16.

1. `_conv_wgrad_sqnorm_kernel`: ||G_b||_F^2 for each example b's convolution weight gradient
       G_b[co, (ci, k)] = sum_p g_b[co, p] * x_b[ci, pos(p, k)]          (p: output position, k: tap)
   as an implicit GEMM: a program owns a (BLOCK_M output channels) x (BLOCK_N input-channel/tap) tile of
   G_b for one example and group, sums over output positions in BLOCK_P steps with the im2col addresses
   computed in-register (zero padding as masked loads), squares the finished tile and adds its sum to
   out[b]. Neither the unfolded input nor G_b is ever written. 1-D and 2-D convolutions arrive lifted to
   3-D with unit leading dims; a Linear over T positions is the 1x1x1 case.
2. `_gram_sqnorm_kernel`: sum_{t,s} (a_t . a_s)(g_t . g_s) = ||g^T a||_F^2 per example (the "ghost" form
   of Li et al. 2022, Bu et al. 2023): a program owns a BLOCK_T row block i of the T x T Gram matrices
   and walks the blocks j >= i (symmetry: off-diagonal blocks count twice), reducing both Gram tiles over
   the feature dimension and adding sum(A_ij * G_ij) to out[n].
3. `_channel_sums_kernel`: per-example gamma and beta gradients of a normalisation layer (BatchNorm,
   GroupNorm, LayerNorm), sum over positions of g * x_hat and of g, x_hat formed in registers.
The first two accumulate in fp32 (fp32 inputs as 3xTF32 products, not plain TF32: the 1e-4 relative
budget) and add their partial sums atomically into a zeroed (N,) buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tile caps: tl.dot needs every dimension >= 16; 64 keeps two fp32 64x64 accumulators in registers
# at 4 warps. Not yet tuned on a GPU.
MIN_TILE = 16
MAX_TILE = 64
BLOCK_P = 32


def _tile(n: int) -> int:
    return min(MAX_TILE, max(MIN_TILE, triton.next_power_of_2(n)))


def _precision(dtype: torch.dtype) -> str:
    # fp32: three TF32 products (tensor cores, ~fp32 accuracy); "tf32" leaves 16-bit operands as they are
    return "tf32x3" if dtype == torch.float32 else "tf32"


@triton.jit
def _conv_wgrad_sqnorm_kernel(
    # pointers
    x_ptr,    # (B, Cin, ID, IH, IW) input activations, any strides
    g_ptr,    # (B, Cout, OD, OH, OW) gradient w.r.t. the output, any strides
    out_ptr,  # (B,) fp32, zeroed; each program adds the squared norm of its tile
    # strides
    sxb, sxc, sxd, sxh, sxw,
    sgb, sgc, sgd, sgh, sgw,
    # sizes
    GROUPS, CIN_G, COUT_G, ID, IH, IW, OD, OH, OW, KD, KH, KW,
    SD, SH, SW, PD, PH, PW, DD, DH, DW,
    # constexprs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_bg = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bg // GROUPS
    grp = pid_bg % GROUPS
    KS = KD * KH * KW
    P = OD * OH * OW
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # output channel within the group
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)   # (input channel, tap) within the group
    m_ok = offs_m < COUT_G
    n_ok = offs_n < CIN_G * KS
    ci = offs_n // KS
    tap = offs_n % KS
    kd = tap // (KH * KW)
    kh = (tap // KW) % KH
    kw = tap % KW
    x_base = x_ptr + b.to(tl.int64) * sxb + (grp * CIN_G).to(tl.int64) * sxc
    g_base = g_ptr + b.to(tl.int64) * sgb + (grp * COUT_G).to(tl.int64) * sgc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < P
        od = p // (OH * OW)
        oh = (p // OW) % OH
        ow = p % OW
        g_tile = tl.load(g_base + offs_m[:, None] * sgc + (od * sgd + oh * sgh + ow * sgw)[None, :],
                         mask=m_ok[:, None] & p_ok[None, :], other=0.0)
        # implicit im2col: input coordinates of (position p, tap) pairs; padding reads as masked zeros
        i_d = od[:, None] * SD - PD + kd[None, :] * DD
        i_h = oh[:, None] * SH - PH + kh[None, :] * DH
        i_w = ow[:, None] * SW - PW + kw[None, :] * DW
        x_ok = (p_ok[:, None] & n_ok[None, :] & (i_d >= 0) & (i_d < ID) & (i_h >= 0) & (i_h < IH)
                & (i_w >= 0) & (i_w < IW))
        x_tile = tl.load(x_base + ci[None, :] * sxc + i_d * sxd + i_h * sxh + i_w * sxw, mask=x_ok, other=0.0)
        acc += tl.dot(g_tile, x_tile, input_precision=PRECISION)
    tl.atomic_add(out_ptr + b, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


def conv_wgrad_sqnorm(x, g, *, kernel_size, stride, padding, dilation, groups):
    """(B,) fp32 squared Frobenius norms of each example's conv weight gradient; x, g 5-D (see kernel)."""
    if x.dtype != g.dtype:
        x, g = x.float(), g.float()
    B, Cin = x.shape[:2]
    Cout = g.shape[1]
    cin_g, cout_g = Cin // groups, Cout // groups
    K = cin_g * kernel_size[0] * kernel_size[1] * kernel_size[2]
    out = torch.zeros(B, dtype=torch.float32, device=x.device)
    if B == 0 or g.numel() == 0:
        return out
    BLOCK_M, BLOCK_N = _tile(cout_g), _tile(K)
    grid = (B * groups, triton.cdiv(K, BLOCK_N), triton.cdiv(cout_g, BLOCK_M))
    _conv_wgrad_sqnorm_kernel[grid](
        x, g, out,
        *x.stride(), *g.stride(),
        groups, cin_g, cout_g, *x.shape[2:], *g.shape[2:], *kernel_size,
        *stride, *padding, *dilation,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_P=BLOCK_P, PRECISION=_precision(x.dtype),
    )
    return out


@triton.jit
def _gram_tile(base, rows_i, rows_j, ok_i, ok_j, st, sd, D,
               BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """X[rows_i] @ X[rows_j]^T for one (T, D) example X, accumulated over D in BLOCK_D slices."""
    d = tl.arange(0, BLOCK_D)
    gram = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + d
        xi = tl.load(base + rows_i[:, None] * st + cols[None, :] * sd, mask=ok_i[:, None] & (cols < D)[None, :],
                     other=0.0)
        xj = tl.load(base + rows_j[None, :] * st + cols[:, None] * sd, mask=ok_j[None, :] & (cols < D)[:, None],
                     other=0.0)
        gram += tl.dot(xi, xj, input_precision=PRECISION)
    return gram


@triton.jit
def _gram_sqnorm_kernel(
    # pointers
    a_ptr,    # (N, T, DA) activations, any strides
    g_ptr,    # (N, T, DG) output gradients, any strides
    out_ptr,  # (N,) fp32, zeroed; each program adds its row block's share
    # strides
    san, sat, sad, sgn, sgt, sgd,
    # sizes
    T, DA, DG,
    # constexprs
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    n = tl.program_id(0)
    bi = tl.program_id(1)
    rows_i = bi * BLOCK_T + tl.arange(0, BLOCK_T)
    ok_i = rows_i < T
    a_base = a_ptr + n.to(tl.int64) * san
    g_base = g_ptr + n.to(tl.int64) * sgn
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for bj in range(bi, tl.cdiv(T, BLOCK_T)):
        rows_j = bj * BLOCK_T + tl.arange(0, BLOCK_T)
        ok_j = rows_j < T
        gram_a = _gram_tile(a_base, rows_i, rows_j, ok_i, ok_j, sat, sad, DA, BLOCK_T, BLOCK_D, PRECISION)
        gram_g = _gram_tile(g_base, rows_i, rows_j, ok_i, ok_j, sgt, sgd, DG, BLOCK_T, BLOCK_D, PRECISION)
        weight = tl.where(bj == bi, 1.0, 2.0)  # block (j, i) mirrors block (i, j)
        acc += gram_a * gram_g * weight
    tl.atomic_add(out_ptr + n, tl.sum(tl.sum(acc, axis=1), axis=0))


def gram_sqnorm(a, g):
    """(N,) fp32 sum_{t,s} (a_t . a_s)(g_t . g_s) for a (N, T, DA), g (N, T, DG)."""
    if a.dtype != g.dtype:
        a, g = a.float(), g.float()
    N, T, DA = a.shape
    DG = g.shape[2]
    out = torch.zeros(N, dtype=torch.float32, device=a.device)
    if N == 0 or T == 0:
        return out
    BLOCK_T, BLOCK_D = _tile(T), _tile(max(DA, DG))
    grid = (N, triton.cdiv(T, BLOCK_T))
    _gram_sqnorm_kernel[grid](
        a, g, out,
        *a.stride(), *g.stride(),
        T, DA, DG,
        BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, PRECISION=_precision(a.dtype),
    )
    return out


# Channel block and position block of the normalisation-layer sums (a 16 x 128 fp32 tile per input).
NORM_BLOCK_C = 16
NORM_MAX_BLOCK_L = 128


@triton.jit
def _channel_sums_kernel(
    # pointers
    x_ptr,     # (B, C, L) layer input, any strides
    g_ptr,     # (B, C, L) gradient w.r.t. the layer output, any strides
    mean_ptr,  # (B, C) fp32 normalisation mean, any strides (0 where it is shared)
    rstd_ptr,  # (B, C) fp32 reciprocal standard deviation, any strides
    sgx_ptr,   # (B, C) fp32 out: sum_l g * (x - mean) * rstd   (example b's gamma gradient)
    sg_ptr,    # (B, C) fp32 out: sum_l g                        (example b's beta gradient)
    # strides
    sxb, sxc, sxl, sgb, sgc, sgl, smb, smc, srb, src,
    # sizes
    C, L,
    # constexprs
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Per-example affine-parameter gradients of a normalisation layer, y = x_hat * gamma + beta, in one
    read of x and g: x_hat is formed in registers from the (B, C) statistics."""
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mean = tl.load(mean_ptr + b * smb + c * smc, mask=c_ok, other=0.0)
    rstd = tl.load(rstd_ptr + b * srb + c * src, mask=c_ok, other=0.0)
    x_base = x_ptr + b.to(tl.int64) * sxb
    g_base = g_ptr + b.to(tl.int64) * sgb
    acc_gx = tl.zeros((BLOCK_C, BLOCK_L), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_C, BLOCK_L), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        pos = l0 + tl.arange(0, BLOCK_L)
        ok = c_ok[:, None] & (pos < L)[None, :]
        x = tl.load(x_base + c[:, None] * sxc + pos[None, :] * sxl, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_base + c[:, None] * sgc + pos[None, :] * sgl, mask=ok, other=0.0).to(tl.float32)
        acc_gx += g * (x - mean[:, None])  # masked g = 0 cancels the masked x
        acc_g += g
    tl.store(sgx_ptr + b * C + c, tl.sum(acc_gx, axis=1) * rstd, mask=c_ok)
    tl.store(sg_ptr + b * C + c, tl.sum(acc_g, axis=1), mask=c_ok)


def channel_sums(x, g, mean, rstd):
    """((B, C) sum_l g (x - mean) rstd, (B, C) sum_l g) in fp32 for x, g (B, C, L); mean, rstd (B, C)."""
    B, C, L = x.shape
    sgx = torch.empty(B, C, dtype=torch.float32, device=x.device)
    sg = torch.empty(B, C, dtype=torch.float32, device=x.device)
    if B == 0 or C == 0:
        return sgx, sg
    mean, rstd = mean.float(), rstd.float()
    grid = (B, triton.cdiv(C, NORM_BLOCK_C))
    _channel_sums_kernel[grid](
        x, g, mean, rstd, sgx, sg,
        *x.stride(), *g.stride(), *mean.stride(), *rstd.stride(),
        C, L,
        BLOCK_C=NORM_BLOCK_C, BLOCK_L=min(NORM_MAX_BLOCK_L, triton.next_power_of_2(max(L, 1))),
    )
    return sgx, sg
