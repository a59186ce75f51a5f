"""Benchmark of the fused KD loss: kdfast against eager PyTorch, torch.compile and Liger-Kernel.

Providers (one setup shared by speed and memory):
    kdfast           kd_loss with default dispatch (Triton on CUDA, C++ on CPU, else torch)
    kdfast-stats     the same with return_stats=True (the statistics should cost next to nothing)
    kdfast-inplace   the same with inplace=True (the gradient overwrites the logits: no N x C buffer)
    kdfast-kernel    the Triton forward launcher alone (GPU; the kernel time at small shapes)
    eager            kdfast.reference.kd_loss_ref in float32: the log_softmax / KL composition users write
    compile          torch.compile of that composition
    liger            Liger-Kernel's LigerCrossEntropyLoss + LigerKLDIVLoss (GPU, when installed)
Modes: forward (logits requiring grad, so kdfast's forward writes the gradient), backward (alone, after an
untimed forward), full (forward + backward). Plus a training step (linear head, loss, backward, SGD) eager,
torch.compile'd and CUDA-graph-captured, and the bandwidth floor: three passes over N x C elements (read
student, read teacher, write gradient) at the device-to-device copy bandwidth measured in the same run.
Before timing, every kernel variant is checked against the float64 reference on the benchmark's device.
"""
from __future__ import annotations

import functools
import importlib

import torch

from kdfast import kd_loss
from kdfast.dispatch import resolve_backend
from kdfast.reference.kd_loss import KD_STAT_NAMES, kd_loss_ref, kd_stats_ref

from .common import copy_bandwidth_gbs, make_row, peak_extra_mib, time_ms

OP = "kd_loss"
ALPHA, TEMPERATURE = 0.5, 4.0
IGNORED_FRACTION = 0.05
# name -> (N, C, dtype): the four shapes; the CPU compares C++ with eager at 1024 x 1000
CONFIGS = {
    "256x1000-fp32": (256, 1000, torch.float32),
    "1024x1000-fp32": (1024, 1000, torch.float32),
    "4096x32000-bf16": (4096, 32000, torch.bfloat16),
    "8192x128256-bf16": (8192, 128256, torch.bfloat16),
}
CPU_CONFIGS = ("1024x1000-fp32",)
SMOKE_CONFIGS = {"16x50-fp32": (16, 50, torch.float32)}
MODES = ("forward", "backward", "full")
STEP_CONFIG = "256x1000-fp32"
STEP_FEATURES = 512
# relative-error bounds of the device check, by dtype (fp32 arithmetic; bf16 gradient rounding)
CHECK_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


# ------------------------------------------------------------------------------------------- inputs
def make_inputs(N, C, dtype, device):
    s = (torch.randn(N, C, device=device) * 3).to(dtype).requires_grad_(True)
    t = (torch.randn(N, C, device=device) * 3).to(dtype)
    y = torch.randint(0, C, (N,), device=device)
    y[torch.rand(N, device=device) < IGNORED_FRACTION] = -100
    return s, t, y


# ---------------------------------------------------------------------------------------- providers
def _eager(s, t, y):
    return kd_loss_ref(s, t, y, alpha=ALPHA, temperature=TEMPERATURE, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _compiled_eager():
    return torch.compile(_eager)


def _liger_available(device) -> bool:
    if device.type != "cuda":
        return False
    try:
        importlib.import_module("liger_kernel.transformers.cross_entropy")
    except Exception:  # absent, or built for another torch
        return False
    return True


@functools.lru_cache(maxsize=None)
def _liger_losses():
    from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    from liger_kernel.transformers.kl_div import LigerKLDIVLoss
    return LigerCrossEntropyLoss(ignore_index=-100), LigerKLDIVLoss(reduction="batchmean", log_target=True)


def _liger(s, t, y):
    ce, kl = _liger_losses()
    # The KL term first: Liger's cross-entropy writes its gradient into the logits it is given.
    log_p = torch.log_softmax(s.float() / TEMPERATURE, -1)
    log_q = torch.log_softmax(t.float() / TEMPERATURE, -1)
    kd = kl(log_p, log_q)
    return (1 - ALPHA) * ce(s, y) + ALPHA * TEMPERATURE ** 2 * kd


def providers(device) -> dict:
    out = {
        "kdfast": lambda s, t, y: kd_loss(s, t, y, alpha=ALPHA, temperature=TEMPERATURE),
        "kdfast-stats": lambda s, t, y: kd_loss(s, t, y, alpha=ALPHA, temperature=TEMPERATURE, return_stats=True)[0],
        "kdfast-inplace": lambda s, t, y: kd_loss(s, t, y, alpha=ALPHA, temperature=TEMPERATURE, inplace=True),
        "eager": _eager,
    }
    if device.type == "cuda":
        out["compile"] = lambda s, t, y: _compiled_eager()(s, t, y)
    if _liger_available(device):
        out["liger"] = _liger
    return out


# -------------------------------------------------------------------------------------------- check
def _rel_err(out, ref) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    finite = torch.isfinite(ref)
    if not bool((out[~finite].isnan() == ref[~finite].isnan()).all()):
        return float("inf")
    return float((out[finite] - ref[finite]).norm() / ref[finite].norm().clamp(min=1e-30))


def check_variants(device, shapes) -> list[dict]:
    """kdfast's loss, gradient and stats against the float64 reference: every dtype, path and option."""
    rows = []
    for N, C in shapes:
        for dtype in CHECK_TOL:
            for inplace in (False, True):
                s, t, y = make_inputs(N, C, dtype, device)
                t[0, : C // 2] = float("-inf")
                leaf = s.detach().clone().requires_grad_(True)
                ref_leaf = s.detach().cpu().double().requires_grad_(True)
                ref_loss = kd_loss_ref(ref_leaf, t.cpu(), y.cpu(), alpha=ALPHA, temperature=TEMPERATURE)
                ref_loss.backward()
                ref_stats = kd_stats_ref(ref_leaf.detach(), t.cpu(), y.cpu(), alpha=ALPHA, temperature=TEMPERATURE)
                student = leaf * 1 if inplace else leaf
                loss, stats = kd_loss(student, t, y, alpha=ALPHA, temperature=TEMPERATURE, return_stats=True,
                                      inplace=inplace)
                loss.backward()
                errs = {"loss": _rel_err(loss, ref_loss), "grad": _rel_err(leaf.grad, ref_leaf.grad),
                        **{f"stats.{k}": _rel_err(stats[k], ref_stats[k]) for k in KD_STAT_NAMES}}
                worst = max(errs.values())
                rows.append(make_row(op=OP, provider="kdfast-inplace" if inplace else "kdfast", mode="check",
                                     shape=(N, C), dtype=dtype, device=device,
                                     backend=resolve_backend(None, device, op=OP), rel_err=errs,
                                     ok=worst <= CHECK_TOL[dtype]))
    return rows


def check_large_offsets(device) -> list[dict]:
    """N x C > 2^31 (int64 row offsets): the last rows, addressed beyond 2^31 elements, against the reference."""
    N, C = 8200, 262144
    need = 3 * N * C * 2 + (1 << 30)
    if device.type != "cuda" or torch.cuda.mem_get_info(device)[0] < need:
        return []
    s, t, y = make_inputs(N, C, torch.bfloat16, device)
    loss = kd_loss(s, t, y, alpha=ALPHA, temperature=TEMPERATURE, reduction="none")
    loss.sum().backward()
    tail = slice(N - 4, N)
    ref_leaf = s[tail].detach().cpu().double().requires_grad_(True)
    ref = kd_loss_ref(ref_leaf, t[tail].cpu(), y[tail].cpu(), alpha=ALPHA, temperature=TEMPERATURE,
                      reduction="none")
    ref.sum().backward()
    errs = {"loss": _rel_err(loss[tail], ref), "grad": _rel_err(s.grad[tail], ref_leaf.grad)}
    del s, t, loss
    return [make_row(op=OP, provider="kdfast", mode="check", shape=(N, C), dtype=torch.bfloat16, device=device,
                     backend="triton", rel_err=errs, ok=max(errs.values()) <= CHECK_TOL[torch.bfloat16])]


# ------------------------------------------------------------------------------------------- timing
def _measure(fn, s, t, y, device, mode, rep_ms):
    def forward():
        s.grad = None
        return fn(s, t, y)

    if mode == "forward":
        return time_ms(forward, device, rep_ms=rep_ms), None
    if mode == "backward":
        return time_ms(lambda loss: loss.backward(), device, setup=forward, rep_ms=rep_ms), None

    def full():
        forward().backward()

    return time_ms(full, device, rep_ms=rep_ms), peak_extra_mib(full, device)


def _fits(N, C, dtype, device) -> bool:
    """Room for the inputs and the eager peer's float32 intermediates (about 12 N x C float32 buffers)."""
    if device.type != "cuda":
        return True
    itemsize = torch.tensor([], dtype=dtype).element_size()
    return torch.cuda.mem_get_info(device)[0] > 12 * N * C * 4 + 2 * N * C * itemsize


def bench_config(name, device, bandwidth_gbs, rep_ms) -> list[dict]:
    N, C, dtype = {**CONFIGS, **SMOKE_CONFIGS}[name]
    if not _fits(N, C, dtype, device):
        return [make_row(op=OP, provider="all", mode="skipped", shape=(N, C), dtype=dtype, device=device,
                         note="does not fit in device memory")]
    s, t, y = make_inputs(N, C, dtype, device)
    floor_ms = 3 * N * C * s.element_size() / (bandwidth_gbs * 1e9) * 1e3
    rows, medians = [], {}
    for provider, fn in providers(device).items():
        for mode in MODES:
            try:
                (ms, p20, p80), peak = _measure(fn, s, t, y, device, mode, rep_ms)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append(make_row(op=OP, provider=provider, mode=mode, shape=(N, C), dtype=dtype, device=device,
                                     note="out of memory"))
                continue
            except Exception as exc:  # a peer failing (e.g. built for another torch) must not end the run
                if provider.startswith("kdfast"):
                    raise
                rows.append(make_row(op=OP, provider=provider, mode=mode, shape=(N, C), dtype=dtype, device=device,
                                     note=f"failed: {type(exc).__name__}: {str(exc)[:200]}"))
                continue
            medians[provider, mode] = ms
            rows.append(make_row(op=OP, provider=provider, mode=mode, shape=(N, C), dtype=dtype, device=device,
                                 ms=ms, p20=p20, p80=p80, peak_extra_mib=peak, floor_ms=floor_ms,
                                 ratio_to_floor=ms / floor_ms if mode == "full" else None,
                                 input_mib=N * C * s.element_size() / 2 ** 20,
                                 backend=resolve_backend(None, device, op=OP) if provider.startswith("kdfast")
                                 else None))
    for row in rows:  # speedups of kdfast over each peer, from the same run
        if row["provider"] == "kdfast" and "ms" in row:
            row["speedup_vs"] = {p: medians[p, m] / row["ms"] for (p, m) in medians
                                 if m == row["mode"] and not p.startswith("kdfast")}
    if device.type == "cuda" and name == STEP_CONFIG:
        rows += bench_kernel_only(s, t, y, device, rep_ms)
    return rows


def bench_kernel_only(s, t, y, device, rep_ms) -> list[dict]:
    from kdfast.kernels.kd_loss import kd_loss_fwd
    s2, scale = s.detach(), torch.tensor(1.0 / s.shape[0], device=device)
    ms, p20, p80 = time_ms(lambda: kd_loss_fwd(s2, t, y, None, scale, ALPHA, TEMPERATURE, -100, True, False, None),
                           device, rep_ms=rep_ms)
    return [make_row(op=OP, provider="kdfast-kernel", mode="forward", shape=tuple(s.shape), dtype=s.dtype,
                     device=device, ms=ms, p20=p20, p80=p80, backend="triton")]


def bench_training_step(device, rep_ms) -> list[dict]:
    """Linear head -> loss -> backward -> SGD, eager, torch.compile'd (fullgraph) and CUDA-graph-captured."""
    N, C, dtype = CONFIGS[STEP_CONFIG]
    x = torch.randn(N, STEP_FEATURES, device=device)
    t = torch.randn(N, C, device=device) * 3
    y = torch.randint(0, C, (N,), device=device)
    rows = []
    losses = {
        "kdfast": lambda logits: kd_loss(logits, t, y, alpha=ALPHA, temperature=TEMPERATURE),
        "eager": lambda logits: _eager(logits, t, y),
    }
    for loss_name, loss_fn in losses.items():
        for how in ("eager", "compile", "cudagraph") if device.type == "cuda" else ("eager", "compile"):
            head = torch.nn.Linear(STEP_FEATURES, C, device=device)
            opt = torch.optim.SGD(head.parameters(), lr=1e-3)
            forward = (torch.compile(lambda inp: loss_fn(head(inp)), fullgraph=True) if how == "compile"
                       else lambda inp: loss_fn(head(inp)))

            def step():
                opt.zero_grad(set_to_none=False)
                forward(x).backward()
                opt.step()

            run = step
            if how == "cudagraph":
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(3):
                        step()
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                run = graph.replay
            ms, p20, p80 = time_ms(run, device, rep_ms=rep_ms)
            rows.append(make_row(op=OP, provider=f"step-{how}-{loss_name}", mode="full", shape=(N, C), dtype=dtype,
                                 device=device, ms=ms, p20=p20, p80=p80, features=STEP_FEATURES))
    return rows


def run(*, device: torch.device, quick: bool = False, smoke: bool = False) -> list[dict]:
    """Every row of this benchmark on `device`: checks, configs, kernel-only time, training steps."""
    # CPU timings share the machine with whatever else runs: more samples for a stable median
    rep_ms = 20.0 if (quick or smoke) else (200.0 if device.type == "cuda" else 1000.0)
    if smoke:
        names = list(SMOKE_CONFIGS)
    elif device.type == "cuda":
        names = list(CONFIGS)
    else:
        names = list(CPU_CONFIGS)
    check_shapes = [(8, 37)] if smoke else [(64, 1000), (8, 50257)]
    rows = check_variants(device, check_shapes)
    if not smoke:
        rows += check_large_offsets(device)
    bandwidth = copy_bandwidth_gbs(device, nbytes=(1 << 22) if smoke else (1 << 30))
    rows.append(make_row(op="copy", provider="torch", mode="bandwidth", shape=(), dtype=torch.float32, device=device,
                         gbs=bandwidth))
    for name in names:
        rows += bench_config(name, device, bandwidth, rep_ms)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda" and not smoke:
        rows += bench_training_step(device, rep_ms)
    return rows
