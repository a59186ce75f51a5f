"""Triton kernels of the fused KD loss and their launchers (CUDA tensors, or CPU under TRITON_INTERPRET=1).

Per row i (student s, teacher t, label y, weight w, temperature T, distillation weight a):
    l_i       = w_i ((1 - a) ce_i + a T^2 kl_i),   ce_i = lse(s_i) - s_iy
    kl_i      = sum_c q_c (t_c/T - s_c/T) - lse(t_i/T) + lse(s_i/T),   q = softmax(t_i/T)   (q_c = 0 adds 0)
    dl_i/ds_i = w_i ((1 - a)(softmax(s_i) - e_y) + a T (softmax(s_i/T) - q))
(Hinton et al. 2015; the closed-form gradient makes backward a scaling of a buffer the forward wrote.)

The forward kernel runs one program per row:
  * C <= MAX_SINGLE_TILE: the row is loaded once into registers; statistics and gradient come from it.
  * larger C: pass 1 streams the row in TILE-wide tiles keeping running maxima and rescaled sums (online
    softmax, Milakov & Gimelshein 2018); pass 2 re-reads the row backwards (newest tiles first, the likeliest
    still in L2) to write the gradient and the two norm statistics. Without gradient and stats only pass 1 runs.
Both paths share the tile helpers below, so they compute the same function.
The contract of the launchers is documented in `kdfast/ops/kd_loss.py` and `kdfast/reference/kd_loss.py`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest row the forward keeps in registers in one tile, and the tile width of the two-pass path, with
# the warp ladder below: from the sm_90 compile (`python -m bench.kernel_resources`, no GPU needed), every
# 8192-wide variant at 16 warps fits its registers (96-128) without spilling, whereas 16384-wide fp32 with
# stats spills 96 bytes and 32 warps cap a thread at 64 registers and spill. Not yet timed on a GPU
# (bench/NOTES.md). Tests lower both to run the tiled path on small C.
MAX_SINGLE_TILE = 8192
TILE = 8192
# Up to this many rows every forward program counts the non-ignored labels itself (count_valid): N int64
# loads per program, from L2 (N^2 in all: 8 MB at 1024 rows), instead of four tiny launches, which matter
# only where host overhead dominates; above it the launcher counts with torch ops.
COUNT_VALID_MAX_ROWS = 1024
# Columns per program of the backward scaling kernel.
BWD_BLOCK = 4096
# Warps per program: block // 512, at least 4 and at most 16 (see the register note above).
_COLUMNS_PER_WARP = 512
_MAX_WARPS = 16


@triton.jit
def _online_tile(s, t, cols, y, inv_T, m, z, zT, mt, zt, A, m_other, HAS_TEACHER: tl.constexpr):
    """Pass 1 on one tile: fold the tile into the running statistics of the row.

    m: max of s; z = sum exp(s - m); zT = sum exp((s - m) / T); m_other: max of s over c != y;
    mt: max of t/T; zt = sum exp(t/T - mt); A = sum exp(t/T - mt) (t/T - s/T).
    A max that is still -inf (nothing finite seen yet) is replaced by 0 in the exponents, so a tile of
    -inf (masked tail, -inf teacher logits) adds exp(-inf) = 0 and never exp(-inf + inf) = NaN.
    """
    m_new = tl.maximum(m, tl.max(s, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    z = z * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe), 0)
    zT = zT * tl.exp((m - m_safe) * inv_T) + tl.sum(tl.exp((s - m_safe) * inv_T), 0)
    m_other = tl.maximum(m_other, tl.max(tl.where(cols == y, float("-inf"), s), 0))
    if HAS_TEACHER:
        tT = t * inv_T
        mt_new = tl.maximum(mt, tl.max(tT, 0))
        mt_safe = tl.where(mt_new == float("-inf"), 0.0, mt_new)
        et = tl.exp(tT - mt_safe)
        rescale = tl.exp(mt - mt_safe)
        zt = zt * rescale + tl.sum(et, 0)
        # q = 0 where t = -inf: contributes 0, never 0 * (-inf) = NaN
        A = A * rescale + tl.sum(tl.where(et > 0, et * (tT - s * inv_T), 0.0), 0)
        mt = mt_new
    return m_new, z, zT, mt, zt, A, m_other


@triton.jit
def _grad_tile(s, t, cols, y, inv_T, coef_ce, coef_kd, m, log_z, log_zT, mt, log_zt, HAS_TEACHER: tl.constexpr):
    """Pass 2 on one tile: d = softmax(s) - e_y and the unscaled row gradient g (masked columns give 0).

    Exponents subtract the row max before the log-sum: (s - m) is exact near the max, whereas s - lse would
    round lse at the scale of the logits (a relative error of 1e-4 in p at logits of 1e4).
    """
    d = tl.exp((s - m) - log_z) - tl.where(cols == y, 1.0, 0.0)
    g = coef_ce * d
    if HAS_TEACHER:
        g += coef_kd * (tl.exp((s - m) * inv_T - log_zT) - tl.exp((t * inv_T - mt) - log_zt))
    return g, d


@triton.jit
def _kd_loss_fwd_kernel(
    # pointers
    s_ptr,          # (N, C) student logits, fp32/fp16/bf16, unit column stride
    t_ptr,          # (N, C) teacher logits, any of those dtypes (HAS_TEACHER)
    y_ptr,          # (N,) int64 labels
    w_ptr,          # (N,) fp32 row weights (HAS_WEIGHT)
    scale_ptr,      # () fp32 gradient scale, the mean reduction's 1/n_valid (HAS_SCALE; written if COUNT_VALID)
    rows_ptr,       # (N,) fp32 out: weighted loss per row
    g_ptr,          # (N, C) out: grad_scale * dl_i/ds_i in its own dtype (RETURN_GRAD); may alias s_ptr
    stats_ptr,      # (6, N) fp32 out: ce, kl, el2n, grad_norm, correct, margin (RETURN_STATS)
    # strides (elements)
    s_stride, t_stride, g_stride,
    # sizes
    N, C,
    # runtime scalars
    alpha, temperature, ignore_index,
    # constexprs
    HAS_TEACHER: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SCALE: tl.constexpr,
    RETURN_GRAD: tl.constexpr, RETURN_STATS: tl.constexpr, SINGLE_TILE: tl.constexpr, BLOCK_C: tl.constexpr,
    COUNT_VALID: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = g_ptr + row * g_stride

    y = tl.load(y_ptr + row)
    valid = y != ignore_index
    in_range = (y >= 0) & (y < C)
    y_safe = tl.where(valid & in_range, y, 0)  # a bad label never addresses memory
    w = 1.0
    if HAS_WEIGHT:
        w = tl.load(w_ptr + row)
    # A label outside [0, C) poisons its row (loss, gradient, stats); ignored rows are zeroed by `valid` below.
    w = tl.where(in_range, w, float("nan"))
    s_y = tl.load(s_row + y_safe).to(tl.float32)
    inv_T = 1.0 / temperature
    coef_ce = w * (1.0 - alpha)
    coef_kd = w * alpha * temperature

    # ---- pass 1: row maxima and rescaled sums (ignored rows load nothing: their masks are all off)
    m = float("-inf")
    z = 0.0
    zT = 0.0
    mt = float("-inf")
    zt = 0.0
    A = 0.0
    m_other = float("-inf")
    cols0 = tl.arange(0, BLOCK_C)
    if SINGLE_TILE:
        mask = (cols0 < C) & valid
        s_reg = tl.load(s_row + cols0, mask=mask, other=float("-inf")).to(tl.float32)
        t_reg = s_reg
        if HAS_TEACHER:
            t_reg = tl.load(t_row + cols0, mask=mask, other=float("-inf")).to(tl.float32)
        m, z, zT, mt, zt, A, m_other = _online_tile(s_reg, t_reg, cols0, y, inv_T, m, z, zT, mt, zt, A, m_other,
                                                    HAS_TEACHER)
    else:
        for start in range(0, C, BLOCK_C):
            cols = start + cols0
            mask = (cols < C) & valid
            # evict_last: pass 2 reads these lines again
            s = tl.load(s_row + cols, mask=mask, other=float("-inf"), eviction_policy="evict_last").to(tl.float32)
            t = s
            if HAS_TEACHER:
                t = tl.load(t_row + cols, mask=mask, other=float("-inf"), eviction_policy="evict_last").to(tl.float32)
            m, z, zT, mt, zt, A, m_other = _online_tile(s, t, cols, y, inv_T, m, z, zT, mt, zt, A, m_other,
                                                        HAS_TEACHER)
    log_z = tl.log(z)
    log_zT = tl.log(zT)
    log_zt = tl.log(zt)
    ce = (m - s_y) + log_z
    kl = A / zt + (m * inv_T - mt) + (log_zT - log_zt)
    loss = (1.0 - alpha) * ce
    if HAS_TEACHER:
        loss += tl.where(alpha > 0, alpha * temperature * temperature * kl, 0.0)
    else:
        kl = float("nan")
    tl.store(rows_ptr + row, tl.where(valid, w * loss, 0.0))

    scale = 1.0
    if COUNT_VALID:  # mean reduction: 1 / max(n_valid, 1), counted by every program; program 0 stores it
        n_valid = 0
        for start in range(0, N, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            labels = tl.load(y_ptr + offs, mask=offs < N, other=ignore_index)
            n_valid += tl.sum((labels != ignore_index).to(tl.int32), 0)
        scale = 1.0 / tl.maximum(n_valid, 1).to(tl.float32)
        tl.store(scale_ptr, scale, mask=row == 0)
    elif HAS_SCALE:
        scale = tl.load(scale_ptr)

    # ---- pass 2: gradient (scaled by the reduction) and its norms
    if RETURN_GRAD or RETURN_STATS:
        sum_d2 = 0.0
        sum_g2 = 0.0
        if SINGLE_TILE:
            g, d = _grad_tile(s_reg, t_reg, cols0, y, inv_T, coef_ce, coef_kd, m, log_z, log_zT, mt, log_zt,
                              HAS_TEACHER)
            g = tl.where(valid, g, 0.0)
            sum_d2 = tl.sum(d * d, 0)
            sum_g2 = tl.sum(g * g, 0)
            if RETURN_GRAD:
                tl.store(g_row + cols0, (g * scale).to(g_ptr.dtype.element_ty), mask=cols0 < C)
        else:
            n_tiles = tl.cdiv(C, BLOCK_C)
            for i in range(0, n_tiles):
                # backwards: the tiles pass 1 read last are the likeliest still in L2
                cols = (n_tiles - 1 - i) * BLOCK_C + cols0
                mask = (cols < C) & valid
                s = tl.load(s_row + cols, mask=mask, other=float("-inf"), eviction_policy="evict_first").to(tl.float32)
                t = s
                if HAS_TEACHER:
                    t = tl.load(t_row + cols, mask=mask, other=float("-inf"),
                                eviction_policy="evict_first").to(tl.float32)
                g, d = _grad_tile(s, t, cols, y, inv_T, coef_ce, coef_kd, m, log_z, log_zT, mt, log_zt, HAS_TEACHER)
                g = tl.where(valid, g, 0.0)
                sum_d2 += tl.sum(d * d, 0)
                sum_g2 += tl.sum(g * g, 0)
                if RETURN_GRAD:
                    tl.store(g_row + cols, (g * scale).to(g_ptr.dtype.element_ty), mask=cols < C)
        if RETURN_STATS:
            margin = s_y - m_other
            nan = float("nan")
            tl.store(stats_ptr + row, tl.where(valid, tl.where(in_range, ce, nan), 0.0))
            tl.store(stats_ptr + N + row, tl.where(valid, tl.where(in_range, kl, nan), 0.0))
            tl.store(stats_ptr + 2 * N + row, tl.where(valid, tl.where(in_range, tl.sqrt(sum_d2), nan), 0.0))
            tl.store(stats_ptr + 3 * N + row, tl.where(valid, tl.sqrt(sum_g2), 0.0))
            tl.store(stats_ptr + 4 * N + row, tl.where(valid, tl.where(in_range, (margin > 0).to(tl.float32), nan),
                                                       0.0))
            tl.store(stats_ptr + 5 * N + row, tl.where(valid, tl.where(in_range, margin, nan), 0.0))


@triton.jit
def _kd_loss_bwd_kernel(
    g_ptr,          # (N, C) gradient written by the forward, scaled in place
    go_ptr,         # () or (N,) fp32 incoming gradient (go_stride 0 for a scalar)
    g_stride, go_stride,
    C,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    go = tl.load(go_ptr + row * go_stride)
    # loss.backward() passes exactly 1: the stored gradient is final, so touch no N x C memory and
    # decide it on the device (no host synchronisation).
    if go == 1.0:
        return
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    ptrs = g_ptr + row * g_stride + cols
    g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (g * go).to(g_ptr.dtype.element_ty), mask=mask)


def _num_warps(block: int) -> int:
    return max(4, min(_MAX_WARPS, block // _COLUMNS_PER_WARP))


def kd_loss_fwd(student, teacher, target, weight, grad_scale, alpha: float, temperature: float, ignore_index: int,
                need_grad: bool, return_stats: bool, grad_out=None, *, count_valid: bool = False):
    """Loss rows (N,) fp32, gradient (N, C) in the student's dtype or None, stats (6, N) fp32 or None.

    See `kdfast.reference.kd_loss.kd_loss_fwd_torch` for the contract; `grad_out` receives the gradient
    (it may be `student` itself: the in-place mode). With count_valid, grad_scale is an output instead: it
    receives 1 / max(n_valid, 1), the mean reduction's factor, which also scales the gradient.
    """
    N, C = student.shape
    if count_valid and (N == 0 or N > COUNT_VALID_MAX_ROWS):
        torch.reciprocal((target != ignore_index).sum(dtype=torch.float32).clamp_(min=1), out=grad_scale)
        count_valid = False
    rows = torch.empty(N, dtype=torch.float32, device=student.device)
    grad = None
    if need_grad:
        grad = grad_out if grad_out is not None else torch.empty_like(student, memory_format=torch.contiguous_format)
    stats = torch.empty((6, N), dtype=torch.float32, device=student.device) if return_stats else None
    if N == 0:
        return rows, grad, stats
    single = triton.next_power_of_2(C) <= MAX_SINGLE_TILE
    block = max(16, triton.next_power_of_2(C) if single else min(TILE, triton.next_power_of_2(C)))
    _kd_loss_fwd_kernel[(N,)](
        student, teacher if teacher is not None else student, target,
        weight if weight is not None else rows, grad_scale if grad_scale is not None else rows,
        rows, grad if grad is not None else rows, stats if stats is not None else rows,
        student.stride(0), teacher.stride(0) if teacher is not None else 0, grad.stride(0) if grad is not None else 0,
        N, C,
        float(alpha), float(temperature), int(ignore_index),
        HAS_TEACHER=teacher is not None, HAS_WEIGHT=weight is not None, HAS_SCALE=grad_scale is not None,
        RETURN_GRAD=grad is not None, RETURN_STATS=return_stats, SINGLE_TILE=single, BLOCK_C=block,
        COUNT_VALID=count_valid, BLOCK_N=min(1024, max(16, triton.next_power_of_2(N))) if count_valid else 16,
        num_warps=_num_warps(block),
    )
    return rows, grad, stats


def kd_loss_bwd(grad, grad_output) -> None:
    """grad *= grad_output in place (0-d, or one value per row); a no-op on the device when it is exactly 1."""
    N, C = grad.shape
    if N == 0 or C == 0:
        return
    go = grad_output.reshape(-1) if grad_output.dim() else grad_output
    go_stride = go.stride(0) if go.dim() else 0
    block = min(BWD_BLOCK, max(16, triton.next_power_of_2(C)))
    _kd_loss_bwd_kernel[(N, triton.cdiv(C, block))](grad, go, grad.stride(0), go_stride, C, BLOCK_C=block,
                                                     num_warps=_num_warps(block))
