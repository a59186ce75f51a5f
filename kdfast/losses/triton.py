"""Triton kernels of the fused KD loss and their launchers (CUDA tensors, or CPU under TRITON_INTERPRET=1).

Per row i (student s, teacher t, label y, weight w, temperature T, distillation weight a):
    l_i       = w_i ((1 - a) ce_i + a T^2 kl_i),   ce_i = lse(s_i) - s_iy
    kl_i      = sum_c q_c (t_c/T - s_c/T) - lse(t_i/T) + lse(s_i/T),   q = softmax(t_i/T)   (q_c = 0 adds 0)
    dl_i/ds_i = w_i ((1 - a)(softmax(s_i) - e_y) + a T (softmax(s_i/T) - q))
(Hinton et al. 2015; the closed-form gradient makes backward a scaling of a buffer the forward wrote.)
DIVERGENCE 1 (reverse_kl) and 2 (jsd) replace kl_i by KL(p || q) or beta KL(q || m) + (1 - beta) KL(p || m)
and the teacher's gradient term T (p - q) by T p (h - sum p h), h = log(p / q) or (1 - beta) log(p / m)
(formulas in kdfast/losses/reference.py); they need p and q normalised, so the tiled path reads the row
once more between pass 1 and pass 2 (pass 1b) to sum the divergence. A sparse teacher (HAS_TOPK: k ids and
log-probabilities per row, never a dense row) is k + 1 buckets, its ids and the tail: the student's side is
the usual pass 1 without teacher; the k ids' probabilities are gathered after it, every class gets the tail's
gradient in pass 2 and the ids are rewritten with their own after it (a barrier between the two stores).

The forward kernel runs one program per row:
  * C <= the one-tile cap: the row is loaded once into registers; statistics and gradient come from it.
  * larger C: pass 1 streams the row in BLOCK_C-wide tiles keeping running maxima and rescaled sums (online
    softmax, Milakov & Gimelshein 2018), its loads pipelined over NUM_STAGES tiles; pass 2 re-reads the row
    backwards (newest tiles first, the likeliest still in L2) to write the gradient and the two norm
    statistics. Without gradient and stats only pass 1 runs. Optionally (config SPLIT > 1) a row's pass 1 is
    shared by SPLIT adjacent programs; the last of them to finish (a per-row ticket) combines their partial
    statistics and runs pass 2, so no program ever waits on another.
Every exponential is one exp2 of a pre-scaled argument, (x - m) * (log2(e) / T) with the constant folded on
the host side of the loop (the max subtracted first: exact near it), instead of tl.exp's longer expansion.
The reduction ("sum", "mean") happens in the same launch: each program stores its row's loss and takes a
ticket from a per-device counter; the program holding the last ticket sums the rows in row order
(deterministic) and resets the counter. With reduction="mean" and N <= COUNT_VALID_MAX_ROWS every program
also counts the non-ignored labels itself, so the gradient leaves the forward already scaled by 1/n: a forward
+ backward is two launches (the backward returns on the device when the upstream gradient is exactly 1).
Launches go through a cache of compiled kernels keyed by what Triton specialises on, skipping Triton's
generic per-call binding; the ordinary launch is the fallback (and the only path under the interpreter).
The contract of the launchers is documented in `kdfast/losses/reference.py` (kd_loss_fwd_torch).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kdfast.runtime.dispatch import triton_interpret

# Largest row the forward keeps in registers in one tile, and the tile width of the two-pass path, with
# the warp ladder below: from the sm_90 compile (`python -m bench.perf.kernel_resources`, no GPU needed), every
# 8192-wide variant at 16 warps fits its registers (96-128) without spilling, whereas 16384-wide fp32 with
# stats spills 96 bytes and 32 warps cap a thread at 64 registers and spill. Tests lower both to run the
# tiled path on small C; `config=` overrides them per call (the benchmark's sweep).
MAX_SINGLE_TILE = 8192
TILE = 8192
# Tiles in flight in the tiled path's pass 1 (software pipelining of the loads, where Triton applies it).
NUM_STAGES = 2
# Programs per row on the tiled path (1: no split; see forward_config). Tests raise it to cover the split.
SPLIT = 1
# Up to this many rows every forward program counts the non-ignored labels itself (count_valid): N int64
# loads per program, from L2 (N^2 in all: 8 MB at 1024 rows), instead of four tiny launches, which matter
# only where host overhead dominates; above it the launcher counts with torch ops.
COUNT_VALID_MAX_ROWS = 1024
# Columns per tile of the backward scaling kernel, and its grid bound (programs loop over the tiles).
BWD_BLOCK = 4096
BWD_MAX_PROGRAMS = 1024
# Warps per program: block // 512, at least 4 and at most 16 (see the register note above).
_COLUMNS_PER_WARP = 512
_MAX_WARPS = 16
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
CONFIG_KEYS = ("BLOCK", "num_warps", "num_stages", "SPLIT")


@triton.jit
def _online_tile(s, t, cols, y, k1, kT, m, z, zT, mt, zt, A, m_other, bad_s, bad_t, HAS_TEACHER: tl.constexpr):
    """Pass 1 on one tile: fold the tile into the running statistics of the row.

    m: max of s; z = sum exp(s - m); zT = sum exp((s - m) / T); m_other: max of s over c != y;
    mt: max of t (unscaled); zt = sum exp((t - mt) / T); A = sum exp((t - mt) / T) (t - s) / T.
    k1 = log2(e), kT = log2(e) / T: exp(x / T) = exp2(x * kT). bad_s / bad_t count NaN or +inf logits.
    A max that is still -inf (nothing finite seen yet) is replaced by 0 in the exponents, so a tile of
    -inf (masked tail, -inf teacher logits) adds exp(-inf) = 0 and never exp(-inf + inf) = NaN.
    """
    bad_s += tl.sum((~(s < float("inf"))).to(tl.int32), 0)
    m_new = tl.maximum(m, tl.max(s, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = s - m_safe  # exact near the max, where s * k - m * k would round m * k at the scale of the logits
    z = z * tl.exp2((m - m_safe) * k1) + tl.sum(tl.exp2(d * k1), 0)
    zT = zT * tl.exp2((m - m_safe) * kT) + tl.sum(tl.exp2(d * kT), 0)
    m_other = tl.maximum(m_other, tl.max(tl.where(cols == y, float("-inf"), s), 0))
    if HAS_TEACHER:
        bad_t += tl.sum((~(t < float("inf"))).to(tl.int32), 0)
        mt_new = tl.maximum(mt, tl.max(t, 0))
        mt_safe = tl.where(mt_new == float("-inf"), 0.0, mt_new)
        et = tl.exp2((t - mt_safe) * kT)
        rescale = tl.exp2((mt - mt_safe) * kT)
        zt = zt * rescale + tl.sum(et, 0)
        # q = 0 where t = -inf: contributes 0, never 0 * (-inf) = NaN
        A = A * rescale + tl.sum(tl.where(et > 0, et * (t - s), 0.0), 0) * (kT * 0.6931471805599453)
        mt = mt_new
    return m_new, z, zT, mt, zt, A, m_other, bad_s, bad_t


@triton.jit
def _div_terms(p, q, lp, lq, beta, DIVERGENCE: tl.constexpr):
    """Per bucket (student p, teacher q, their natural logarithms): the divergence's terms, the terms of
    sum p h, and h (the gradient is T p (h - sum p h)). A probability of 0 adds 0 (never 0 * inf = NaN); the
    jsd's log m is a log-sum-exp of log(beta q) and log((1 - beta) p), -inf only where both are 0."""
    if DIVERGENCE == 0:
        return tl.where(q > 0, q * (lq - lp), 0.0), 0.0 * p, 0.0 * p
    if DIVERGENCE == 1:
        h = lp - lq
        ph = tl.where(p > 0, p * h, 0.0)
        return ph, ph, h
    a = lq + tl.log(beta)
    b = lp + tl.log(1.0 - beta)
    mx = tl.maximum(a, b)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    lm = mx_safe + tl.log(tl.exp(a - mx_safe) + tl.exp(b - mx_safe))
    h = (1.0 - beta) * (lp - lm)
    ph = tl.where(p > 0, p * h, 0.0)
    return beta * tl.where(q > 0, q * (lq - lm), 0.0) + ph, ph, h


@triton.jit
def _grad_tile(s, t, cols, y, k1, kT, coef_ce, coef_kd, m, mt, log2_z, log2_zT, log2_zt, beta, sum_ph, a_out,
               HAS_TEACHER: tl.constexpr, HAS_TOPK: tl.constexpr, DIVERGENCE: tl.constexpr):
    """Pass 2 on one tile: d = softmax(s) - e_y and the unscaled row gradient g (masked columns give 0).

    softmax(s)_c = exp2((s_c - m) k1 - log2 z): the max is subtracted first, (s - m) being exact near it,
    whereas s - lse would round lse at the scale of the logits (1e-4 relative error in p at logits of 1e4).
    sum_ph: the row's sum p h (DIVERGENCE > 0); a_out: the top-k tail's gradient coefficient (HAS_TOPK).
    """
    ds = s - m
    d = tl.exp2(ds * k1 - log2_z) - tl.where(cols == y, 1.0, 0.0)
    g = coef_ce * d
    if HAS_TEACHER:
        # alpha == 0 never reads the teacher (a NaN teacher times 0 would poison the gradient)
        if DIVERGENCE == 0:
            g += tl.where(coef_kd != 0.0, coef_kd * (tl.exp2(ds * kT - log2_zT) - tl.exp2((t - mt) * kT - log2_zt)),
                          0.0)
        else:
            x = ds * kT - log2_zT
            xt = (t - mt) * kT - log2_zt
            p = tl.exp2(x)
            _, _, h = _div_terms(p, tl.exp2(xt), x * 0.6931471805599453, xt * 0.6931471805599453, beta, DIVERGENCE)
            g += tl.where(coef_kd != 0.0, tl.where(p > 0, coef_kd * p * (h - sum_ph), 0.0), 0.0)
    if HAS_TOPK:
        p = tl.exp2(ds * kT - log2_zT)
        g += tl.where(coef_kd != 0.0, tl.where(p > 0, coef_kd * p * a_out, 0.0), 0.0)
    return g, d


@triton.jit
def _kd_loss_fwd_kernel(
    # pointers
    s_ptr,          # (N, C) student logits, fp32/fp16/bf16, unit column stride
    t_ptr,          # (N, C) teacher logits, any of those dtypes (HAS_TEACHER)
    y_ptr,          # (N,) int64 labels
    w_ptr,          # (N,) fp32 row weights (HAS_WEIGHT)
    scale_ptr,      # () fp32 gradient scale, the mean reduction's 1/n (HAS_SCALE)
    rows_ptr,       # (N,) fp32 out: weighted loss per row
    loss_ptr,       # () fp32 out: the reduced loss (REDUCE)
    count_ptr,      # () int32 ticket counter, 0 between launches (REDUCE)
    part_ptr,       # (N, SPLIT, 9) fp32 scratch: each part's pass-1 statistics (SPLIT > 1)
    row_count_ptr,  # (>= N,) int32 per-row ticket counters, 0 between launches (SPLIT > 1)
    g_ptr,          # (N, C) out: scale * dl_i/ds_i in its own dtype (RETURN_GRAD); may alias s_ptr
    stats_ptr,      # (6, N) fp32 out: ce, kl, el2n, grad_norm, correct, margin (RETURN_STATS)
    ids_ptr,        # (N, K) int64 the sparse teacher's class ids (HAS_TOPK)
    lp_ptr,         # (N, K) fp32 their log-probabilities at the capture temperature (HAS_TOPK)
    # strides (elements)
    s_stride, t_stride, g_stride, ids_stride, lp_stride,
    # sizes
    N, C, K,
    # runtime scalars (ratio: capture temperature / T, the sparse teacher's logprob scale at T)
    alpha, temperature, ignore_index, beta, ratio,
    # constexprs
    HAS_TEACHER: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SCALE: tl.constexpr,
    RETURN_GRAD: tl.constexpr, RETURN_STATS: tl.constexpr, SINGLE_TILE: tl.constexpr, BLOCK_C: tl.constexpr,
    COUNT_VALID: tl.constexpr, BLOCK_N: tl.constexpr, REDUCE: tl.constexpr, NUM_STAGES: tl.constexpr,
    SPLIT: tl.constexpr, DIVERGENCE: tl.constexpr, HAS_TOPK: tl.constexpr, TAIL: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # SPLIT programs per row (tiled path), adjacent in the grid so that a row's parts run together
    row = (tl.program_id(0) // SPLIT).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = g_ptr + row * g_stride
    nan = float("nan")

    y = tl.load(y_ptr + row)
    valid = y != ignore_index
    in_range = (y >= 0) & (y < C)
    y_safe = tl.where(valid & in_range, y, 0)  # a bad label never addresses memory
    w = 1.0
    if HAS_WEIGHT:
        w = tl.load(w_ptr + row)
    # A label outside [0, C) poisons its row (loss, gradient, stats); ignored rows are zeroed by `valid` below.
    w = tl.where(in_range, w, nan)
    s_y = tl.load(s_row + y_safe).to(tl.float32)
    inv_T = 1.0 / temperature
    k1 = 1.4426950408889634
    kT = k1 * inv_T

    # ---- pass 1: row maxima and rescaled sums (ignored rows load nothing: their masks are all off)
    m = float("-inf")
    z = 0.0
    zT = 0.0
    mt = float("-inf")
    zt = 0.0
    A = 0.0
    m_other = float("-inf")
    bad_s = 0
    bad_t = 0
    cols0 = tl.arange(0, BLOCK_C)
    if SINGLE_TILE:
        mask = (cols0 < C) & valid
        s_reg = tl.load(s_row + cols0, mask=mask, other=float("-inf")).to(tl.float32)
        t_reg = s_reg
        if HAS_TEACHER:
            t_reg = tl.load(t_row + cols0, mask=mask, other=float("-inf")).to(tl.float32)
        m, z, zT, mt, zt, A, m_other, bad_s, bad_t = _online_tile(s_reg, t_reg, cols0, y, k1, kT, m, z, zT, mt, zt,
                                                                  A, m_other, bad_s, bad_t, HAS_TEACHER)
    else:
        # this program's share of the row's tiles (all of them without a split)
        lo = 0
        hi = C
        if SPLIT > 1:
            per = tl.cdiv(tl.cdiv(C, BLOCK_C), SPLIT) * BLOCK_C
            lo = (tl.program_id(0) % SPLIT) * per
            hi = tl.minimum(lo + per, C)
        for start in tl.range(lo, hi, BLOCK_C, num_stages=NUM_STAGES):
            cols = start + cols0
            mask = (cols < C) & valid
            # evict_last: pass 2 reads these lines again
            s = tl.load(s_row + cols, mask=mask, other=float("-inf"), eviction_policy="evict_last").to(tl.float32)
            t = s
            if HAS_TEACHER:
                t = tl.load(t_row + cols, mask=mask, other=float("-inf"), eviction_policy="evict_last").to(tl.float32)
            m, z, zT, mt, zt, A, m_other, bad_s, bad_t = _online_tile(s, t, cols, y, k1, kT, m, z, zT, mt, zt, A,
                                                                      m_other, bad_s, bad_t, HAS_TEACHER)
        if SPLIT > 1:
            # Publish this part's statistics; the row's last part to finish combines them and carries on (pass 2
            # over the whole row, which the parts have just read: the re-read comes from L2). No program waits.
            part_row = part_ptr + (row * SPLIT + tl.program_id(0) % SPLIT) * 9
            tl.store(part_row, m)
            tl.store(part_row + 1, z)
            tl.store(part_row + 2, zT)
            tl.store(part_row + 3, mt)
            tl.store(part_row + 4, zt)
            tl.store(part_row + 5, A)
            tl.store(part_row + 6, m_other)
            tl.store(part_row + 7, bad_s.to(tl.float32))
            tl.store(part_row + 8, bad_t.to(tl.float32))
            tl.debug_barrier()  # every thread's stores happen before the ticket (released by acq_rel)
            if tl.atomic_add(row_count_ptr + row, 1, sem="acq_rel") != SPLIT - 1:
                return
            tl.atomic_xchg(row_count_ptr + row, 0, sem="relaxed")
            parts = part_ptr + (row * SPLIT + tl.arange(0, SPLIT)) * 9
            ms = tl.load(parts, cache_modifier=".cg")
            m = tl.max(ms, 0)
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            z = tl.sum(tl.load(parts + 1, cache_modifier=".cg") * tl.exp2((ms - m_safe) * k1), 0)
            zT = tl.sum(tl.load(parts + 2, cache_modifier=".cg") * tl.exp2((ms - m_safe) * kT), 0)
            mts = tl.load(parts + 3, cache_modifier=".cg")
            mt = tl.max(mts, 0)
            rescale = tl.exp2((mts - tl.where(mt == float("-inf"), 0.0, mt)) * kT)
            zt = tl.sum(tl.load(parts + 4, cache_modifier=".cg") * rescale, 0)
            A = tl.sum(tl.where(rescale > 0, tl.load(parts + 5, cache_modifier=".cg") * rescale, 0.0), 0)
            m_other = tl.max(tl.load(parts + 6, cache_modifier=".cg"), 0)
            bad_s = tl.sum(tl.load(parts + 7, cache_modifier=".cg"), 0).to(tl.int32)
            bad_t = tl.sum(tl.load(parts + 8, cache_modifier=".cg"), 0).to(tl.int32)
    # Non-finite logits: a student row with NaN/+inf or no finite logit is undefined (NaN everywhere but
    # correct = 0); so is the teacher's, which poisons kl, and the loss and gradient unless alpha == 0.
    s_undefined = (bad_s > 0) | (m == float("-inf"))
    kd_on = alpha != 0.0
    log2_z = tl.log2(z)
    log2_zT = tl.log2(zT)
    log2_zt = tl.log2(zt)
    m_safe = tl.where(s_undefined, 0.0, m)
    mt_safe = tl.where(mt == float("-inf"), 0.0, mt)
    ce = (m - s_y) + log2_z * 0.6931471805599453
    kl = A / zt + (m - mt) * inv_T + (log2_zT - log2_zt) * 0.6931471805599453
    sum_ph = 0.0  # sum p h of the reverse_kl / jsd gradient
    a_out = 0.0   # the sparse teacher's tail coefficient
    if HAS_TEACHER and DIVERGENCE != 0:
        # pass 1b: the divergence from the normalised p and q (from registers, or one more read of the row)
        if SINGLE_TILE:
            x = (s_reg - m_safe) * kT - log2_zT
            xt = (t_reg - mt_safe) * kT - log2_zt
            terms, ph, _ = _div_terms(tl.exp2(x), tl.exp2(xt), x * 0.6931471805599453, xt * 0.6931471805599453,
                                      beta, DIVERGENCE)
            kl = tl.sum(terms, 0)
            sum_ph = tl.sum(ph, 0)
        else:
            kl = 0.0
            for start in tl.range(0, C, BLOCK_C, num_stages=NUM_STAGES):
                cols = start + cols0
                mask = (cols < C) & valid
                s = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                t = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                x = (s - m_safe) * kT - log2_zT
                xt = (t - mt_safe) * kT - log2_zt
                terms, ph, _ = _div_terms(tl.exp2(x), tl.exp2(xt), x * 0.6931471805599453,
                                          xt * 0.6931471805599453, beta, DIVERGENCE)
                kl += tl.sum(terms, 0)
                sum_ph += tl.sum(ph, 0)
    if HAS_TOPK:
        # the sparse teacher's k ids (a bad id is masked: a NaN-free wrong answer, never a wild read)
        kcols = tl.arange(0, BLOCK_K)
        kmask = (kcols < K) & valid
        ids = tl.load(ids_ptr + row * ids_stride + kcols, mask=kmask, other=0)
        id_ok = kmask & (ids >= 0) & (ids < C)
        lpk = tl.load(lp_ptr + row * lp_stride + kcols, mask=kmask, other=float("-inf")).to(tl.float32)
        s_ids = tl.load(s_row + ids, mask=id_ok, other=float("-inf")).to(tl.float32)
        x_ids = (s_ids - m_safe) * kT - log2_zT
        P = tl.exp2(x_ids)
        lP = x_ids * 0.6931471805599453
        if TAIL:
            lq = lpk
        else:  # renormalised over the k at temperature T: softmax(ratio * logprobs)
            xq = ratio * lpk
            mq = tl.max(xq, 0)
            mq = tl.where(mq == float("-inf"), 0.0, mq)
            lq = xq - mq - tl.log(tl.sum(tl.exp(xq - mq), 0))
        q = tl.exp(lq)
        has_tail = K < C
        P_t = tl.where(has_tail, tl.maximum(1.0 - tl.sum(P, 0), 0.0), 0.0)
        Q_t = 0.0
        if TAIL:
            Q_t = tl.where(has_tail, tl.maximum(1.0 - tl.sum(q, 0), 0.0), 0.0)
        terms, ph, h = _div_terms(P, q, lP, lq, beta, DIVERGENCE)
        terms_t, ph_t, h_t = _div_terms(P_t, Q_t, tl.log(P_t), tl.log(Q_t), beta, DIVERGENCE)
        kl = tl.sum(terms, 0) + terms_t
        sum_ph = tl.sum(ph, 0) + ph_t
        if DIVERGENCE == 0:
            a_out = 1.0 - tl.where(P_t > 0, Q_t / P_t, 0.0)
            kd_ids = P - q
        else:
            a_out = tl.where(has_tail, h_t - sum_ph, 0.0)
            kd_ids = tl.where(P > 0, P * (h - sum_ph), 0.0)
    # a weight of exactly 0 or 1 drops its term (an infinite ce or kl times 0 would be NaN)
    loss = tl.where(alpha != 1.0, (1.0 - alpha) * ce, 0.0)
    if HAS_TEACHER or HAS_TOPK:
        t_undefined = False
        if HAS_TEACHER:
            t_undefined = (bad_t > 0) | (mt == float("-inf"))
        kl = tl.where(t_undefined, nan, kl)
        loss += tl.where(kd_on, alpha * temperature * temperature * kl, 0.0)
        row_nan = s_undefined | (t_undefined & kd_on)
    else:
        kl = nan
        row_nan = s_undefined
    # reverse_kl: an infinite divergence has no finite gradient (NaN), its loss is +inf
    grad_nan = row_nan
    if DIVERGENCE == 1:
        grad_nan = row_nan | ((kl == float("inf")) & kd_on)
    loss = tl.where(row_nan, nan, w * loss)
    tl.store(rows_ptr + row, tl.where(valid, loss, 0.0))

    scale = 1.0
    if COUNT_VALID:  # mean reduction: 1 / max(n_valid, 1), counted by every program
        n_valid = 0
        for start in range(0, N, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            labels = tl.load(y_ptr + offs, mask=offs < N, other=ignore_index)
            n_valid += tl.sum((labels != ignore_index).to(tl.int32), 0)
        scale = 1.0 / tl.maximum(n_valid, 1).to(tl.float32)
    elif HAS_SCALE:
        scale = tl.load(scale_ptr)

    if REDUCE:  # the last program to finish its row sums every row, in row order
        tl.debug_barrier()  # every thread's row store happens before the ticket (released by acq_rel)
        ticket = tl.atomic_add(count_ptr, 1, sem="acq_rel")
        if ticket == N - 1:
            total = 0.0
            for start in range(0, N, BLOCK_N):
                offs = start + tl.arange(0, BLOCK_N)
                total += tl.sum(tl.load(rows_ptr + offs, mask=offs < N, other=0.0, cache_modifier=".cg"), 0)
            tl.store(loss_ptr, total * scale)
            tl.atomic_xchg(count_ptr, 0, sem="relaxed")

    # ---- pass 2: gradient (scaled by the reduction) and its norms
    if RETURN_GRAD or RETURN_STATS:
        coef_ce = w * (1.0 - alpha)
        coef_kd = tl.where(kd_on, w * alpha * temperature, 0.0)
        sum_d2 = 0.0
        sum_g2 = 0.0
        if SINGLE_TILE:
            g, d = _grad_tile(s_reg, t_reg, cols0, y, k1, kT, coef_ce, coef_kd, m_safe, mt_safe, log2_z, log2_zT,
                              log2_zt, beta, sum_ph, a_out, HAS_TEACHER, HAS_TOPK, DIVERGENCE)
            g = tl.where(valid, tl.where(grad_nan, nan, g), 0.0)
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
                g, d = _grad_tile(s, t, cols, y, k1, kT, coef_ce, coef_kd, m_safe, mt_safe, log2_z, log2_zT,
                                  log2_zt, beta, sum_ph, a_out, HAS_TEACHER, HAS_TOPK, DIVERGENCE)
                g = tl.where(valid, tl.where(grad_nan, nan, g), 0.0)
                sum_d2 += tl.sum(d * d, 0)
                sum_g2 += tl.sum(g * g, 0)
                if RETURN_GRAD:
                    tl.store(g_row + cols, (g * scale).to(g_ptr.dtype.element_ty), mask=cols < C)
        if HAS_TOPK:
            # the ids' own gradient over the tail's that pass 2 wrote there (and in the norm: theirs replaced)
            d_ids = tl.exp2((s_ids - m_safe) * k1 - log2_z) - tl.where(ids == y, 1.0, 0.0)
            p_ids = tl.where(P > 0, coef_kd * P * a_out, 0.0)
            g_old = coef_ce * d_ids + tl.where(coef_kd != 0.0, p_ids, 0.0)
            g_ids = coef_ce * d_ids + tl.where(coef_kd != 0.0, coef_kd * kd_ids, 0.0)
            g_old = tl.where(id_ok, tl.where(grad_nan, nan, g_old), 0.0)
            g_ids = tl.where(id_ok, tl.where(grad_nan, nan, g_ids), 0.0)
            sum_g2 += tl.sum(g_ids * g_ids - g_old * g_old, 0)
            if RETURN_GRAD:
                tl.debug_barrier()  # every thread's pass-2 stores land before these overwrite some of them
                tl.store(g_row + ids, (g_ids * scale).to(g_ptr.dtype.element_ty), mask=id_ok)
        if RETURN_STATS:
            margin = s_y - m_other
            bad = ~in_range | s_undefined  # a bad label: NaN everywhere; an undefined row: correct = 0
            tl.store(stats_ptr + row, tl.where(valid, tl.where(bad, nan, ce), 0.0))
            tl.store(stats_ptr + N + row, tl.where(valid, tl.where(bad, nan, kl), 0.0))
            tl.store(stats_ptr + 2 * N + row, tl.where(valid, tl.where(bad, nan, tl.sqrt(sum_d2)), 0.0))
            tl.store(stats_ptr + 3 * N + row, tl.where(valid, tl.where(bad | grad_nan, nan, tl.sqrt(sum_g2)), 0.0))
            correct = tl.where(s_undefined, 0.0, (margin > 0).to(tl.float32))
            tl.store(stats_ptr + 4 * N + row, tl.where(valid, tl.where(in_range, correct, nan), 0.0))
            tl.store(stats_ptr + 5 * N + row, tl.where(valid, tl.where(bad, nan, margin), 0.0))


@triton.jit
def _kd_loss_bwd_kernel(
    g_ptr,          # (N, C) gradient written by the forward, scaled in place
    go_ptr,         # () or (N,) fp32 incoming gradient (go_stride 0 for a scalar)
    g_stride, go_stride,
    C, n_tiles,     # n_tiles = N * cdiv(C, BLOCK_C) tiles, shared out over the programs of a bounded grid
    BLOCK_C: tl.constexpr,
):
    # loss.backward() passes exactly 1 (a scalar): the stored gradient is final, so every program returns
    # after one load, deciding it on the device (no host synchronisation); a bounded grid keeps that to a few
    # hundred programs where one per tile was N x C / BLOCK_C (0.65 ms at 8192 x 128256).
    if go_stride == 0:
        if tl.load(go_ptr) == 1.0:
            return
    col_tiles = tl.cdiv(C, BLOCK_C)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        row = (tile // col_tiles).to(tl.int64)
        go = tl.load(go_ptr + row * go_stride)
        if go != 1.0:
            cols = (tile % col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
            mask = cols < C
            ptrs = g_ptr + row * g_stride + cols
            g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(ptrs, (g * go).to(g_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------ launching
def _num_warps(block: int) -> int:
    return max(4, min(_MAX_WARPS, block // _COLUMNS_PER_WARP))


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def forward_config(C: int, config: dict | None = None) -> dict:
    """The forward's tile and launch parameters for C classes: SINGLE_TILE, BLOCK_C, num_warps, num_stages.

    config: None (the tuned default) or a dict with any of BLOCK (the tile width: the row is one tile when
    its power-of-two width fits, else it is tiled at BLOCK), num_warps, num_stages (pipelined tiles of
    the tiled path; the one-tile path has no loop to pipeline) and SPLIT (a power of two: programs per row on
    the tiled path, each folding a share of the row's tiles, the last to finish running pass 2; default 1
    until a GPU sweep shows it helps).
    """
    config = config or {}
    unknown = set(config) - set(CONFIG_KEYS)
    if unknown:
        raise ValueError(f"kd_loss_fwd: config keys must be among {CONFIG_KEYS}, got {sorted(unknown)}")
    block, split = config.get("BLOCK"), config.get("SPLIT", SPLIT)
    if block is not None and (block < 16 or block & (block - 1)):
        raise ValueError(f"kd_loss_fwd: config['BLOCK'] must be a power of two >= 16, got {block}")
    if split < 1 or split & (split - 1):
        raise ValueError(f"kd_loss_fwd: config['SPLIT'] must be a power of two >= 1, got {split}")
    width = max(16, _pow2(C))
    single = width <= (MAX_SINGLE_TILE if block is None else block)
    block_c = width if single else (TILE if block is None else block)
    return {"SINGLE_TILE": single, "BLOCK_C": block_c,
            "num_warps": config.get("num_warps", _num_warps(block_c)),
            "num_stages": config.get("num_stages", 1 if single else NUM_STAGES),
            "SPLIT": 1 if single else split}


# Compiled kernels by specialisation, launched without Triton's per-call binding (None: unavailable here, as
# under the interpreter, which has no compiled kernels; Triton reads TRITON_INTERPRET at decoration, as here).
_compiled: dict | None = None if triton_interpret() else {}
_counters: dict = {}  # device -> int32 ticket counter, reset to 0 by the kernel that uses it
_row_counters: dict = {}  # device -> int32 per-row ticket counters of the split path, reset likewise


def _spec(x) -> tuple:
    """What Triton specialises a runtime argument on: tensors by dtype and 16-byte alignment, integers by
    width, == 1 and divisibility by 16 (a superset is safe: it only splits the cache further)."""
    if isinstance(x, torch.Tensor):
        return x.dtype, x.data_ptr() % 16 == 0
    if isinstance(x, int):
        return x == 1, x % 16 == 0, -2 ** 31 <= x < 2 ** 31
    return type(x)


def _launch(kernel, grid, args: tuple, constexprs: dict, num_warps: int, num_stages: int):
    """kernel[grid](*args, **constexprs) through the cache of compiled kernels where Triton exposes them."""
    global _compiled
    if _compiled is not None and _hooks() == (None, None):
        device = _driver.get_current_device()  # a compiled kernel is loaded into one device's context
        key = (kernel, device, grid[1:], num_warps, num_stages, *constexprs.values(), *map(_spec, args))
        compiled = _compiled.get(key)
        if compiled is not None:
            try:
                compiled.run(*grid, _driver.get_current_stream(device), compiled.function,
                             compiled.packed_metadata, None, None, None, *args, *constexprs.values())
                return
            except (AttributeError, TypeError):  # another Triton's launcher API: the ordinary launch from now on
                _compiled = None
        compiled = kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        if _compiled is not None and hasattr(compiled, "packed_metadata"):
            _compiled[key] = compiled
        return
    kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)


def _hooks():
    """Triton's launch hooks (a profiler's): the direct launch skips them, so it runs only when both are unset."""
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    return (runtime.launch_enter_hook, runtime.launch_exit_hook) if runtime is not None else ("unknown", None)


class _Driver:
    """triton.runtime.driver.active's device and stream queries, bound once."""

    def __getattr__(self, name):
        active = triton.runtime.driver.active
        self.get_current_device, self.get_current_stream = active.get_current_device, active.get_current_stream
        return getattr(self, name)


_driver = _Driver()


def _counter(device: torch.device) -> torch.Tensor:
    """The device's ticket counter. One per device, not per stream: a CUDA graph captures on its own stream and
    must reuse the counter made before capture (so two reductions must not run concurrently on two streams of
    one device)."""
    counter = _counters.get(device)
    if counter is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("kd_loss: call it once before capturing a CUDA graph (its reduction counter is "
                               "allocated on first use, which a capture would tie to the graph's memory)")
        counter = _counters[device] = torch.zeros((), dtype=torch.int32, device=device)
    return counter


def _row_counter(device: torch.device, N: int) -> torch.Tensor:
    counters = _row_counters.get(device)
    if counters is None or counters.numel() < N:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("kd_loss: call it once at this size before capturing a CUDA graph (the split "
                               "path's counters are allocated on first use)")
        counters = _row_counters[device] = torch.zeros(max(N, 1024), dtype=torch.int32, device=device)
    return counters


def kd_loss_fwd(student, teacher, target, weight, alpha: float, temperature: float, ignore_index: int,
                reduction: int, need_grad: bool, return_stats: bool, grad_out=None, divergence: int = 0,
                beta: float = 0.5, normalizer: float | None = None, *, config: dict | None = None):
    """Loss ((N,) rows for reduction 0, else 0-d; fp32), gradient (N, C) in the student's dtype or None, stats
    (6, N) fp32 or None; reduction 0 (none), 1 (sum), 2 (mean).

    See `kdfast.losses.reference.kd_loss_fwd_torch` for the contract; `grad_out` receives the gradient
    (it may be `student` itself: the in-place mode); teacher: dense logits, None, or a sparse teacher
    (ids, logprobs, ratio, tail) tuple. config: tile/warps/stages overrides (`forward_config`).
    """
    N, C = student.shape
    device = student.device
    sparse = isinstance(teacher, tuple)
    ids, logprobs, ratio, tail = teacher if sparse else (None, None, 1.0, False)
    if sparse:
        teacher = None
    rows = torch.empty(N, dtype=torch.float32, device=device)
    grad = None
    if need_grad:
        grad = grad_out if grad_out is not None else torch.empty_like(student, memory_format=torch.contiguous_format)
    stats = torch.empty((6, N), dtype=torch.float32, device=device) if return_stats else None
    loss = rows if reduction == 0 else torch.empty((), dtype=torch.float32, device=device)
    count_valid = reduction == 2 and 0 < N <= COUNT_VALID_MAX_ROWS and normalizer is None
    scale = None
    if reduction == 2 and normalizer is not None:
        scale = torch.full((), 1.0 / normalizer, dtype=torch.float32, device=device)
    elif reduction == 2 and not count_valid:
        scale = torch.reciprocal((target != ignore_index).sum(dtype=torch.float32).clamp_(min=1))
    if N == 0:
        if reduction:
            loss.zero_()
        return loss, grad, stats
    cfg = forward_config(C, config)
    reduce, split = reduction != 0, cfg["SPLIT"]
    _launch(_kd_loss_fwd_kernel, (N * split, 1, 1), (
        student, teacher if teacher is not None else student, target,
        weight if weight is not None else rows, scale if scale is not None else rows,
        rows, loss, _counter(device) if reduce else target,
        torch.empty(N * split * 9, dtype=torch.float32, device=device) if split > 1 else rows,
        _row_counter(device, N) if split > 1 else target,
        grad if grad is not None else rows, stats if stats is not None else rows,
        ids if sparse else target, logprobs if sparse else rows,
        student.stride(0), teacher.stride(0) if teacher is not None else 0, grad.stride(0) if grad is not None else 0,
        ids.stride(0) if sparse else 0, logprobs.stride(0) if sparse else 0,
        N, C, ids.shape[1] if sparse else 1, float(alpha), float(temperature), int(ignore_index), float(beta),
        float(ratio)),
        {"HAS_TEACHER": teacher is not None, "HAS_WEIGHT": weight is not None, "HAS_SCALE": scale is not None,
         "RETURN_GRAD": grad is not None, "RETURN_STATS": return_stats, "SINGLE_TILE": cfg["SINGLE_TILE"],
         "BLOCK_C": cfg["BLOCK_C"], "COUNT_VALID": count_valid,
         "BLOCK_N": min(1024, max(16, _pow2(N))) if count_valid or reduce else 16, "REDUCE": reduce,
         "NUM_STAGES": cfg["num_stages"], "SPLIT": split, "DIVERGENCE": int(divergence), "HAS_TOPK": sparse,
         "TAIL": bool(tail), "BLOCK_K": max(16, _pow2(ids.shape[1])) if sparse else 16},
        cfg["num_warps"], cfg["num_stages"])
    return loss, grad, stats


def kd_loss_bwd(grad, grad_output) -> None:
    """grad *= grad_output in place (0-d, or one value per row); a no-op on the device when it is exactly 1."""
    N, C = grad.shape
    if N == 0 or C == 0:
        return
    go = grad_output.reshape(-1) if grad_output.dim() > 1 else grad_output
    go_stride = go.stride(0) if go.dim() else 0
    block = min(BWD_BLOCK, max(16, _pow2(C)))
    n_tiles = N * math.ceil(C / block)
    _launch(_kd_loss_bwd_kernel, (min(n_tiles, BWD_MAX_PROGRAMS), 1, 1), (grad, go, grad.stride(0), go_stride, C,
                                                                          n_tiles),
            {"BLOCK_C": block}, _num_warps(block), 1)
