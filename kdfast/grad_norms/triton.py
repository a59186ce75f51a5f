"""Triton kernels of the per-example gradient-norm engine and their launchers (CUDA, or CPU under
TRITON_INTERPRET=1). Checks and dispatch live in kdfast/grad_norms; inputs here are fp32/fp16/bf16.

Every kernel adds each example's squared norm atomically into a (B,) fp32 buffer the caller owns: the
engine passes one buffer for the whole network (no per-parameter adds afterwards), or one per parameter.

1. `_conv_wgrad_sqnorm_kernel`: ||W_b||_F^2 of each example b's convolution weight gradient
       W_b[co, ci, k] = sum_p g_b[co, p] * x_b[ci, in(p, k)]          (p: output position, k: kernel tap)
   an implicit GEMM per tap: a program owns a (BLOCK_M output channels) x (BLOCK_N input channels) tile of
   one example, group and kernel tap (the tap split once per program by constexpr KD x KH x KW, so the
   taps also spread the work over the GPU), sums over output positions in pipelined steps of a
   BLOCK_H x BLOCK_W window of the output (power-of-two sides: the position split is a shift and a mask,
   and the per-step coordinates are scalars), then adds the squared tile. The unfolded input and W_b are
   never written; zero padding is a masked load.
2. `_conv_gram_sqnorm_kernel`: the same norm in the Gram ("ghost") form of Li et al. 2022 / Bu et al. 2023,
       ||W_b||^2 = sum_{p,q} (u_p . u_q)(g_p . g_q)        (u_p: the unfolded input window of position p)
   for layers with few output positions: a program owns row block i of the P x P Gram matrices and walks
   the blocks j >= i (off-diagonal blocks count twice); the unfold is address arithmetic done once per
   block pair, the reduction loops run over (tap, input-channel block) and output-channel blocks.
   A Linear over T positions is the 1 x 1 x 1 convolution of both kernels. 1-D and 2-D convolutions run as
   3-D ones with unit leading spatial dims, by their strides (no view is made).
3. `_affine_sqnorm_kernel`: per-example squared norms of a normalisation layer's gamma and beta gradients,
   sum_c (sum_l g (x - mean) rstd)^2 and sum_c (sum_l g)^2, in one read of x and g, with the statistics
   read from what the forward saved (GroupNorm), from running statistics (BatchNorm: rstd formed here),
   or none (x_hat given; PReLU's negative part).
4. `_rank_one_sqnorm_kernel`: a Linear on one position per example, whose weight gradient g a^T has the
   squared norm ||a||^2 ||g||^2 and whose bias gradient g has ||g||^2: both from one read of a and g.
Matmul operands are cast in registers to the narrower input dtype (an fp32 input beside a bf16 gradient
under autocast is cast down, the gradient never up); products accumulate in fp32, fp32 operands as
3xTF32 (not plain TF32: the 1e-4 relative budget).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tile caps: tl.dot needs every dimension >= 16; 64 keeps a 64x64 fp32 accumulator plus its two operand
# tiles in registers at 4 warps. Not yet tuned on a GPU.
MIN_TILE = 16
MAX_TILE = 64
BLOCK_P = 64          # output positions per step of the direct kernel
NUM_STAGES = 3        # software-pipelined loads in flight (sm_80+); the interpreter ignores it
NORM_BLOCK_C = 16     # channel block and position block of the normalisation kernel
NORM_MAX_BLOCK_L = 128
STATS_NONE, STATS_RSTD, STATS_VAR = 0, 1, 2


def _pow2(n: int) -> int:  # plain Python: triton's helpers cost a wrapped call per use on the launch path
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tile(n: int) -> int:
    return min(MAX_TILE, max(MIN_TILE, _pow2(n)))


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def dot_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The operand dtype of the products: the narrowest input dtype (cast down in registers, never up)."""
    for dt in (torch.bfloat16, torch.float16):
        if any(t.dtype == dt for t in tensors):
            return dt
    return torch.float32


def _mma_dtype(dtype: torch.dtype):
    """The dtype the products run in: the operand dtype; fp32 under TRITON_INTERPRET=1, whose 16-bit dot is
    wrong (a bf16 x bf16 product is exact in fp32, so the rounding tested is the same)."""
    from kdfast.runtime.dispatch import triton_interpret
    return tl.float32 if triton_interpret() else _TL_DTYPES[dtype]


def _precision(dtype: torch.dtype) -> str:
    # fp32: three TF32 products (tensor cores, ~fp32 accuracy); "tf32" leaves 16-bit operands as they are
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _as_3d(t: torch.Tensor):
    """(sizes, strides) of a (B, C, *S) tensor with 1 <= len(S) <= 3 as if lifted to (B, C, D, H, W) by unit
    leading spatial dims: the kernels take strides, so no view op is needed."""
    pad = 5 - t.dim()
    return (*t.shape[:2], *(1,) * pad, *t.shape[2:]), (*t.stride()[:2], *(0,) * pad, *t.stride()[2:])


def _lift(values, n: int, fill: int) -> tuple:
    return (fill,) * (3 - n) + tuple(values)


def position_window(ow: int, block_p: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_W): a block_p-position window of the output, as wide as the output row allows."""
    block_w = min(block_p, _pow2(max(ow, 1)))
    return block_p // block_w, block_w


@triton.jit
def _conv_wgrad_sqnorm_kernel(
    # pointers
    x_ptr,    # (B, Cin, ID, IH, IW) input activations, any strides (channels-last too)
    g_ptr,    # (B, Cout, OD, OH, OW) gradient w.r.t. the output, any strides
    out_ptr,  # (B,) fp32; each program adds the squared norm of its tile
    # strides
    sxb, sxc, sxd, sxh, sxw,
    sgb, sgc, sgd, sgh, sgw,
    # sizes
    GROUPS, CIN_G, COUT_G, ID, IH, IW, OD, OH, OW,
    SD, SH, SW, PD, PH, PW, DD, DH, DW, N_BLOCKS,
    # constexprs
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    NUM_STAGES: tl.constexpr, DOT_DTYPE: tl.constexpr, MMA_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_bg = tl.program_id(0)
    pid_tn = tl.program_id(1)                          # (tap, input-channel block)
    pid_m = tl.program_id(2)
    b = pid_bg // GROUPS
    grp = pid_bg % GROUPS
    tap = pid_tn // N_BLOCKS                           # scalars, once per program
    kd = tap // (KH * KW)
    kh = (tap // KW) % KH
    kw = tap % KW
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # output channel within the group
    offs_n = pid_tn % N_BLOCKS * BLOCK_N + tl.arange(0, BLOCK_N)   # input channel within the group
    m_ok = offs_m < COUT_G
    n_ok = offs_n < CIN_G
    win = tl.arange(0, BLOCK_H * BLOCK_W)
    wh = win // BLOCK_W                                # powers of two: a shift and a mask, once
    ww = win % BLOCK_W
    x_base = x_ptr + b.to(tl.int64) * sxb + (grp * CIN_G).to(tl.int64) * sxc
    g_base = g_ptr + b.to(tl.int64) * sgb + (grp * COUT_G).to(tl.int64) * sgc
    g_rows = offs_m[:, None] * sgc
    x_cols = offs_n[None, :] * sxc
    nbw = tl.cdiv(OW, BLOCK_W)
    nbh = tl.cdiv(OH, BLOCK_H)
    steps = OD * nbh * nbw
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in tl.range(0, steps, num_stages=NUM_STAGES):
        od = step // (nbh * nbw)                       # scalars: one split per step, not per element
        oh = (step // nbw) % nbh * BLOCK_H + wh
        ow = step % nbw * BLOCK_W + ww
        p_ok = (oh < OH) & (ow < OW)
        g_tile = tl.load(g_base + g_rows + (od * sgd + oh * sgh + ow * sgw)[None, :],
                         mask=m_ok[:, None] & p_ok[None, :], other=0.0)
        i_d = od * SD - PD + kd * DD
        i_h = oh * SH - PH + kh * DH
        i_w = ow * SW - PW + kw * DW
        x_ok = p_ok & (i_h >= 0) & (i_h < IH) & (i_w >= 0) & (i_w < IW) & (i_d >= 0) & (i_d < ID)
        x_tile = tl.load(x_base + x_cols + (i_d * sxd + i_h * sxh + i_w * sxw)[:, None],
                         mask=x_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(g_tile.to(DOT_DTYPE).to(MMA_DTYPE), x_tile.to(DOT_DTYPE).to(MMA_DTYPE),
                      input_precision=PRECISION)
    tl.atomic_add(out_ptr + b, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


def conv_wgrad_sqnorm(x, g, *, kernel_size, stride, padding, dilation, groups, out=None):
    """Adds each example's squared conv weight-gradient norm into `out` ((B,) fp32; new zeros when None) for
    x (B, Cin, *S), g (B, Cout, *O) with 1 to 3 spatial dims (a Linear over T positions: 1x1 over T)."""
    n = x.dim() - 2
    (B, Cin, *in_size), x_strides = _as_3d(x)
    (_, Cout, *out_size), g_strides = _as_3d(g)
    cin_g, cout_g = Cin // groups, Cout // groups
    out = torch.zeros(B, dtype=torch.float32, device=x.device) if out is None else out
    if B == 0 or g.numel() == 0:
        return out
    dt = dot_dtype(x, g)
    # channels-last input (channels contiguous): wide channel tiles; otherwise rows are contiguous and the
    # position window carries the coalescing
    block_n = _tile(cin_g) if x.stride(1) == 1 else min(_tile(cin_g), 32)
    block_h, block_w = position_window(out_size[2], BLOCK_P)
    BLOCK_M = _tile(cout_g)
    kd, kh, kw = _lift(kernel_size, n, 1)
    n_blocks = _cdiv(cin_g, block_n)
    grid = (B * groups, kd * kh * kw * n_blocks, _cdiv(cout_g, BLOCK_M))
    _conv_wgrad_sqnorm_kernel[grid](
        x, g, out,
        *x_strides, *g_strides,
        groups, cin_g, cout_g, *in_size, *out_size,
        *_lift(stride, n, 1), *_lift(padding, n, 0), *_lift(dilation, n, 1), n_blocks,
        KD=kd, KH=kh, KW=kw,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_W=block_w,
        NUM_STAGES=NUM_STAGES, DOT_DTYPE=_TL_DTYPES[dt], MMA_DTYPE=_mma_dtype(dt), PRECISION=_precision(dt),
    )
    return out


@triton.jit
def _conv_gram_sqnorm_kernel(
    # pointers
    x_ptr,    # (B, Cin, ID, IH, IW) input activations, any strides
    g_ptr,    # (B, Cout, OD, OH, OW) gradient w.r.t. the output, any strides
    out_ptr,  # (B,) fp32; each program adds its row block's share
    # strides
    sxb, sxc, sxd, sxh, sxw,
    sgb, sgc, sgd, sgh, sgw,
    # sizes
    GROUPS, CIN_G, COUT_G, ID, IH, IW, OD, OH, OW,
    SD, SH, SW, PD, PH, PW, DD, DH, DW,
    # constexprs
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    NUM_STAGES: tl.constexpr, DOT_DTYPE: tl.constexpr, MMA_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_bg = tl.program_id(0)
    bi = tl.program_id(1)
    b = pid_bg // GROUPS
    grp = pid_bg % GROUPS
    P = OD * OH * OW
    x_base = x_ptr + b.to(tl.int64) * sxb + (grp * CIN_G).to(tl.int64) * sxc
    g_base = g_ptr + b.to(tl.int64) * sgb + (grp * COUT_G).to(tl.int64) * sgc
    c = tl.arange(0, BLOCK_C)
    rows_i = bi * BLOCK_T + tl.arange(0, BLOCK_T)
    ok_i = rows_i < P
    od_i = rows_i // (OH * OW)                         # once per program
    oh_i = (rows_i // OW) % OH
    ow_i = rows_i % OW
    g_off_i = od_i * sgd + oh_i * sgh + ow_i * sgw
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for bj in range(bi, tl.cdiv(P, BLOCK_T)):
        rows_j = bj * BLOCK_T + tl.arange(0, BLOCK_T)
        ok_j = rows_j < P
        od_j = rows_j // (OH * OW)                     # once per block pair, outside the reduction loops
        oh_j = (rows_j // OW) % OH
        ow_j = rows_j % OW
        gram_u = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
        for tap in range(KD * KH * KW):
            kd = tap // (KH * KW)
            kh = (tap // KW) % KH
            kw = tap % KW
            d_i = od_i * SD - PD + kd * DD
            h_i = oh_i * SH - PH + kh * DH
            w_i = ow_i * SW - PW + kw * DW
            in_i = ok_i & (d_i >= 0) & (d_i < ID) & (h_i >= 0) & (h_i < IH) & (w_i >= 0) & (w_i < IW)
            off_i = d_i * sxd + h_i * sxh + w_i * sxw
            d_j = od_j * SD - PD + kd * DD
            h_j = oh_j * SH - PH + kh * DH
            w_j = ow_j * SW - PW + kw * DW
            in_j = ok_j & (d_j >= 0) & (d_j < ID) & (h_j >= 0) & (h_j < IH) & (w_j >= 0) & (w_j < IW)
            off_j = d_j * sxd + h_j * sxh + w_j * sxw
            for c0 in tl.range(0, CIN_G, BLOCK_C, num_stages=NUM_STAGES):
                cols = c0 + c
                c_ok = cols < CIN_G
                u_i = tl.load(x_base + off_i[:, None] + cols[None, :] * sxc, mask=in_i[:, None] & c_ok[None, :],
                              other=0.0)
                u_j = tl.load(x_base + off_j[None, :] + cols[:, None] * sxc, mask=in_j[None, :] & c_ok[:, None],
                              other=0.0)
                gram_u += tl.dot(u_i.to(DOT_DTYPE).to(MMA_DTYPE), u_j.to(DOT_DTYPE).to(MMA_DTYPE),
                                  input_precision=PRECISION)
        g_off_j = od_j * sgd + oh_j * sgh + ow_j * sgw
        gram_g = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
        for c0 in tl.range(0, COUT_G, BLOCK_C, num_stages=NUM_STAGES):
            cols = c0 + c
            c_ok = cols < COUT_G
            g_i = tl.load(g_base + g_off_i[:, None] + cols[None, :] * sgc, mask=ok_i[:, None] & c_ok[None, :],
                          other=0.0)
            g_j = tl.load(g_base + g_off_j[None, :] + cols[:, None] * sgc, mask=ok_j[None, :] & c_ok[:, None],
                          other=0.0)
            gram_g += tl.dot(g_i.to(DOT_DTYPE).to(MMA_DTYPE), g_j.to(DOT_DTYPE).to(MMA_DTYPE),
                              input_precision=PRECISION)
        weight = tl.where(bj == bi, 1.0, 2.0)  # block (j, i) mirrors block (i, j)
        acc += gram_u * gram_g * weight
    tl.atomic_add(out_ptr + b, tl.sum(tl.sum(acc, axis=1), axis=0))


def conv_gram_sqnorm(x, g, *, kernel_size, stride, padding, dilation, groups, out=None):
    """As conv_wgrad_sqnorm, by the Gram form (cheaper where few output positions meet many weights)."""
    n = x.dim() - 2
    (B, Cin, *in_size), x_strides = _as_3d(x)
    (_, Cout, *out_size), g_strides = _as_3d(g)
    cin_g, cout_g = Cin // groups, Cout // groups
    P = out_size[0] * out_size[1] * out_size[2]
    out = torch.zeros(B, dtype=torch.float32, device=x.device) if out is None else out
    if B == 0 or P == 0:
        return out
    dt = dot_dtype(x, g)
    BLOCK_T = _tile(P)
    kd, kh, kw = _lift(kernel_size, n, 1)
    grid = (B * groups, _cdiv(P, BLOCK_T))
    _conv_gram_sqnorm_kernel[grid](
        x, g, out,
        *x_strides, *g_strides,
        groups, cin_g, cout_g, *in_size, *out_size,
        *_lift(stride, n, 1), *_lift(padding, n, 0), *_lift(dilation, n, 1),
        KD=kd, KH=kh, KW=kw,
        BLOCK_T=BLOCK_T, BLOCK_C=_tile(max(cin_g, cout_g)),
        NUM_STAGES=NUM_STAGES, DOT_DTYPE=_TL_DTYPES[dt], MMA_DTYPE=_mma_dtype(dt), PRECISION=_precision(dt),
    )
    return out


@triton.jit
def _affine_sqnorm_kernel(
    # pointers
    x_ptr,     # (B, C, L) layer input (or x_hat with STATS == 0), any strides
    g_ptr,     # (B, C, L) gradient w.r.t. the layer output, any strides
    mean_ptr,  # (B, G) mean per example and channel group (stride 0 where shared); unused with STATS == 0
    stat_ptr,  # (B, G) rstd (STATS == 1) or variance (STATS == 2, rstd = 1 / sqrt(var + eps))
    outw_ptr,  # (B,) fp32 += sum_c (sum_l g * x_hat)^2      (example b's gamma gradient, squared)
    outb_ptr,  # (B,) fp32 += sum_c (sum_l g)^2              (example b's beta gradient, squared)
    # strides
    sxb, sxc, sxl, sgb, sgc, sgl, smb, smg, ssb, ssg,
    # sizes
    C, L, CPG,
    # runtime scalars
    eps,
    # constexprs
    STATS: tl.constexpr, NEG_PART: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    x_base = x_ptr + b.to(tl.int64) * sxb
    g_base = g_ptr + b.to(tl.int64) * sgb
    acc_gx = tl.zeros((BLOCK_C, BLOCK_L), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_C, BLOCK_L), dtype=tl.float32)
    if STATS == 0:
        mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    else:
        mean = tl.load(mean_ptr + b * smb + (c // CPG) * smg, mask=c_ok, other=0.0).to(tl.float32)
    for l0 in range(0, L, BLOCK_L):
        pos = l0 + tl.arange(0, BLOCK_L)
        ok = c_ok[:, None] & (pos < L)[None, :]
        g = tl.load(g_base + c[:, None] * sgc + pos[None, :] * sgl, mask=ok, other=0.0).to(tl.float32)
        if HAS_W:
            x = tl.load(x_base + c[:, None] * sxc + pos[None, :] * sxl, mask=ok, other=0.0).to(tl.float32)
            if NEG_PART:
                x = tl.minimum(x, 0.0)
            acc_gx += g * (x - mean[:, None])  # masked g = 0 cancels the masked x
        if HAS_B:
            acc_g += g
    if HAS_W:
        sgx = tl.sum(acc_gx, axis=1)
        if STATS == 1:
            sgx = sgx * tl.load(stat_ptr + b * ssb + (c // CPG) * ssg, mask=c_ok, other=0.0).to(tl.float32)
        if STATS == 2:
            var = tl.load(stat_ptr + b * ssb + (c // CPG) * ssg, mask=c_ok, other=1.0).to(tl.float32)
            sgx = sgx / tl.sqrt(var + eps)
        tl.atomic_add(outw_ptr + b, tl.sum(sgx * sgx, axis=0))
    if HAS_B:
        sg = tl.sum(acc_g, axis=1)
        tl.atomic_add(outb_ptr + b, tl.sum(sg * sg, axis=0))


def affine_sqnorm(x, g, mean, stat, *, stats, eps=0.0, neg_part=False, out_w=None, out_b=None):
    """Adds sum_c (sum_l g x_hat)^2 into out_w and sum_c (sum_l g)^2 into out_b (each (B,) fp32, or None to
    skip it) for x, g (B, C, L); mean, stat (B, G) with G dividing C (see the kernel's STATS)."""
    B, C, L = x.shape
    if B == 0 or C == 0 or (out_w is None and out_b is None):
        return
    G = mean.shape[1] if stats != STATS_NONE else C
    mean = mean if stats != STATS_NONE else x
    stat = stat if stats != STATS_NONE else x
    grid = (B, _cdiv(C, NORM_BLOCK_C))
    _affine_sqnorm_kernel[grid](
        x, g, mean, stat, out_w if out_w is not None else out_b, out_b if out_b is not None else out_w,
        *x.stride(), *g.stride(), *mean.stride()[:2], *stat.stride()[:2],
        C, L, C // G,
        float(eps),
        STATS=stats, NEG_PART=neg_part, HAS_W=out_w is not None, HAS_B=out_b is not None,
        BLOCK_C=NORM_BLOCK_C, BLOCK_L=min(NORM_MAX_BLOCK_L, _pow2(max(L, 1))),
    )


@triton.jit
def _rank_one_sqnorm_kernel(
    # pointers
    a_ptr,     # (B, DA) layer input, any strides
    g_ptr,     # (B, DG) gradient w.r.t. the layer output, any strides
    outw_ptr,  # (B,) fp32 += ||a_b||^2 ||g_b||^2     (weight)
    outb_ptr,  # (B,) fp32 += ||g_b||^2               (bias)
    # strides
    sab, sad, sgb, sgd,
    # sizes
    DA, DG,
    # constexprs
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    d = tl.arange(0, BLOCK)
    g_base = g_ptr + b.to(tl.int64) * sgb
    sg = tl.zeros((BLOCK,), dtype=tl.float32)
    for d0 in range(0, DG, BLOCK):
        g = tl.load(g_base + (d0 + d) * sgd, mask=d0 + d < DG, other=0.0).to(tl.float32)
        sg += g * g
    gg = tl.sum(sg, axis=0)
    if HAS_W:
        a_base = a_ptr + b.to(tl.int64) * sab
        sa = tl.zeros((BLOCK,), dtype=tl.float32)
        for d0 in range(0, DA, BLOCK):
            a = tl.load(a_base + (d0 + d) * sad, mask=d0 + d < DA, other=0.0).to(tl.float32)
            sa += a * a
        tl.atomic_add(outw_ptr + b, tl.sum(sa, axis=0) * gg)
    if HAS_B:
        tl.atomic_add(outb_ptr + b, gg)


RANK_ONE_BLOCK = 1024


def rank_one_sqnorm(a, g, *, out_w=None, out_b=None):
    """Adds ||a_b||^2 ||g_b||^2 into out_w and ||g_b||^2 into out_b ((B,) fp32, or None to skip) for a (B, DA),
    g (B, DG)."""
    B = a.shape[0]
    if B == 0 or (out_w is None and out_b is None):
        return
    _rank_one_sqnorm_kernel[(B,)](
        a, g, out_w if out_w is not None else out_b, out_b if out_b is not None else out_w,
        *a.stride(), *g.stride(),
        a.shape[1], g.shape[1],
        HAS_W=out_w is not None, HAS_B=out_b is not None, BLOCK=min(RANK_ONE_BLOCK, _pow2(max(a.shape[1], g.shape[1]))),
    )
