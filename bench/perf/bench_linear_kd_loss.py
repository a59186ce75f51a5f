"""Benchmark of the fused-linear KD loss: kdfast against the eager composition, torch.compile and Liger-Kernel.

Every provider runs a forward and a backward of the same LLM head: student hidden states h (N, H) and weight
W (V, H) with gradients, a teacher given by its hidden states and weight (no gradient), labels with 5% ignored.
    kdfast    linear_kd_loss(h, W, y, LinearTeacher(th, tW)): logits chunk by chunk, never N x V at once
    eager     the composition users write: s = h @ W.T, t = th @ tW.T, then kdfast.kd_loss(s, t, y)
    compile   torch.compile of that composition (CUDA)
    liger     Liger-Kernel's LigerFusedLinearJSDLoss with beta=0, its forward-KL setting (CUDA, when installed;
              no T^2 factor, which costs nothing)
Modes: full (fwd+bwd time: the CPU providers interleaved in one process, best of the rounds; do_bench on CUDA)
and peak-memory (peak extra memory of one fwd+bwd above the inputs: on the CPU each provider in a fresh process,
the resident-set high-water mark reset after a warm-up call; on CUDA the allocator's peak). Before timing, kdfast
is checked against the eager composition in float64 at a small shape on the benchmark's device.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from kdfast import LinearTeacher, kd_loss, linear_kd_loss

from bench.common import (Budget, cuda_peer_available, make_row, newest_row, peak_extra_mib, skipped_row, time_ms,
                          wall_per_call_ms)

OP = "linear_kd_loss"
ALPHA, TEMPERATURE = 0.5, 4.0
IGNORED_FRACTION = 0.05
# name -> (N tokens, H, V, dtype): Liger's LLM shape (B*T = 8192, H = 4096, V = 128256) and the CPU shape
CONFIGS = {"8192x4096x128256-bf16": (8192, 4096, 128256, torch.bfloat16)}
CPU_CONFIGS = {"4096x256x32000-fp32": (4096, 256, 32000, torch.float32)}
SMOKE_CONFIGS = {"64x16x300-fp32": (64, 16, 300, torch.float32)}
CHECK_SHAPE = (50, 16, 300)  # N, H, V of the float64 check (chunks of 16 rows: N not a multiple)
CHECK_TOL = 1e-10


def make_inputs(N, H, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_(True)
    W = (torch.randn(V, H, generator=g) / H ** 0.5).to(device, dtype).requires_grad_(True)
    th = torch.randn(N, H, generator=g).to(device, dtype)
    tW = (torch.randn(V, H, generator=g) / H ** 0.5).to(device, dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < IGNORED_FRACTION] = -100
    return h, W, th, tW, y.to(device)


# ---------------------------------------------------------------------------------------- providers
def _kdfast(h, W, th, tW, y, chunk_size=None):
    return linear_kd_loss(h, W, y, LinearTeacher(th, tW), alpha=ALPHA, temperature=TEMPERATURE,
                          chunk_size=chunk_size)


def _eager(h, W, th, tW, y):
    with torch.no_grad():
        t = th @ tW.t()
    return kd_loss(h @ W.t(), t, y, alpha=ALPHA, temperature=TEMPERATURE)


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(_eager)



@functools.lru_cache(maxsize=None)
def _liger_loss():
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    return LigerFusedLinearJSDLoss(weight_hard_loss=1 - ALPHA, weight_soft_loss=ALPHA, beta=0.0,
                                   temperature=TEMPERATURE, ignore_index=-100)


def _liger(h, W, th, tW, y):
    return _liger_loss()(h, W, th, tW, y)


def providers(device) -> dict:
    """In the order they run: what the targets need first, should the budget run out (on CUDA Liger, then
    torch.compile, whose first calls compile)."""
    out = {"kdfast": _kdfast}
    if device.type == "cuda":
        if cuda_peer_available(device, "liger_kernel.chunked_loss"):
            out["liger"] = _liger
        out["compile"] = lambda *a: _compiled()(*a)
    out["eager"] = _eager
    return out


def _step(fn, inputs):
    """One forward + backward of `fn` on `inputs`, the gradients dropped first."""
    h, W = inputs[0], inputs[1]

    def step():
        h.grad = W.grad = None
        fn(*inputs).backward()
    return step


# -------------------------------------------------------------------------------------------- check
def check(device) -> dict:
    """kdfast against the eager composition in float64 (torch backend), value and gradients of h and W."""
    N, H, V = CHECK_SHAPE
    inputs = make_inputs(N, H, V, torch.float64, device, seed=1)
    h, W = inputs[0], inputs[1]
    out = {}
    for name, fn in (("kdfast", lambda *a: _kdfast(*a, chunk_size=16)), ("eager", _eager)):
        loss = fn(*inputs)
        out[name] = (loss.detach(), *torch.autograd.grad(loss, (h, W)))
    err = {name: float((a - b).norm() / b.norm())
           for name, a, b in zip(("loss", "grad_h", "grad_W"), out["kdfast"], out["eager"])}
    return make_row(op=OP, provider="kdfast", mode="check", shape=CHECK_SHAPE, dtype=torch.float64, device=device,
                    rel_err=err, ok=max(err.values()) <= CHECK_TOL)


# ------------------------------------------------------------------------------------------- memory
def _resident_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_peak_extra_mib(provider: str, config: tuple) -> float:
    """In this (fresh) process: the resident-set peak of one fwd+bwd above the resident set before it. A warm-up
    call at a tiny shape loads every library first; the high-water mark is then reset (/proc/self/clear_refs)."""
    N, H, V, dtype = config
    fn = providers(torch.device("cpu"))[provider]
    _step(fn, make_inputs(8, H, 64, dtype, "cpu"))()
    step = _step(fn, make_inputs(N, H, V, dtype, "cpu"))
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current resident set
    before = _resident_bytes("VmRSS")
    step()
    return (_resident_bytes("VmHWM") - before) / 2 ** 20


def _memory_in_child(provider: str, config: tuple) -> float:
    N, H, V, dtype = config
    cmd = [sys.executable, "-m", __name__, "--memory", provider, "--shape", f"{N}x{H}x{V}",
           "--dtype", str(dtype).replace("torch.", ""), "--threads", str(torch.get_num_threads())]
    root = str(Path(__file__).resolve().parents[__name__.count(".")])  # where this module's package lives
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_extra_mib"]


# ------------------------------------------------------------------------------------------- configs
def bench_config(name, config, device, quick, smoke, budget, emit) -> None:
    N, H, V, dtype = config
    fns = providers(device)
    if device.type == "cuda":
        for provider, fn in fns.items():
            if budget.spent():
                emit(skipped_row(op=OP, provider=provider, device=device, note=budget.note(f"{provider} at {name}")))
                continue
            inputs = make_inputs(N, H, V, dtype, device)
            step = _step(fn, inputs)
            step()  # compile / autotune outside the numbers
            inputs[0].grad = inputs[1].grad = None  # the gradients count as the step's extra memory
            mib = peak_extra_mib(step, device)
            ms, p20, p80 = time_ms(step, device, rep_ms=20.0 if quick else 200.0)
            emit(make_row(op=OP, provider=provider, mode="full", shape=(N, H, V), dtype=dtype, device=device,
                          ms=ms, p20=p20, p80=p80, peak_extra_mib=mib))
            del inputs, step
            torch.cuda.empty_cache()
        return
    # CPU: memory in fresh processes, time interleaved in this one
    mib = {provider: _memory_in_child(provider, config) for provider in fns}
    for provider, value in mib.items():
        emit(make_row(op=OP, provider=provider, mode="peak-memory", shape=(N, H, V), dtype=dtype, device=device,
                      peak_extra_mib=value, ratio_to_eager=value / mib["eager"], separate_process=True))
    if budget.spent():
        emit(skipped_row(op=OP, device=device, note=budget.note(f"fwd+bwd times at {name}")))
        return
    inputs = {p: make_inputs(N, H, V, dtype, device) for p in fns}
    steps = {p: _step(fn, inputs[p]) for p, fn in fns.items()}
    rounds = 2 if (quick or smoke) else 5
    samples = wall_per_call_ms(steps, device, rounds=rounds, calls=1, warmup=1)
    best = {p: min(v) for p, v in samples.items()}
    for p, v in samples.items():
        emit(make_row(op=OP, provider=p, mode="full", shape=(N, H, V), dtype=dtype, device=device, ms=best[p],
                      median_ms=float(torch.tensor(v).median()), samples=len(v), interleaved=True,
                      ratio_to_eager=best[p] / best["eager"]))


def run(*, device: torch.device, quick: bool = False, smoke: bool = False, budget_s: float | None = None,
        emit=None) -> list[dict]:
    """The check, then each config's time and memory rows, each passed to `emit` as soon as it is measured."""
    rows, budget = [], Budget(budget_s)

    def out(row):
        rows.append(row)
        if emit is not None:
            emit(row)

    if budget.spent():
        out(skipped_row(op=OP, device=device, note=budget.note("every row")))
        return rows
    out(check(device))
    if device.type == "cuda" and not cuda_peer_available(device, "liger_kernel.chunked_loss"):
        out(skipped_row(op=OP, provider="liger", device=device,
                        note="Liger-Kernel not installed (or not importable): pip install liger-kernel"))
    configs = SMOKE_CONFIGS if smoke else CONFIGS if device.type == "cuda" else CPU_CONFIGS
    for name, config in configs.items():
        if budget.spent():
            out(skipped_row(op=OP, device=device, note=budget.note(f"config {name}")))
            continue
        bench_config(name, config, device, quick, smoke, budget, out)
    return rows


# ------------------------------------------------------------------------------------------ targets
def _target(what, row, measured, bound, unit, target) -> dict:
    return {"issue": 19, "what": what, "measured": measured, "target": target, "unit": unit,
            "met": None if measured is None else measured <= bound, "commit": row["commit"] if row else None}


def _newest(rows, **match):
    hits = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return max(hits, key=lambda r: r["date"]) if hits else None


def targets(rows: list[dict]) -> list[dict]:
    """CPU: peak extra memory <= 0.25 x the eager composition's, time <= 1.25 x; GPU: memory and time <= Liger's."""
    mine = [r for r in rows if r.get("op") == OP]
    out = []
    cpu = [r for r in mine if r.get("device_type") == "cpu"]
    mem = _newest(cpu, provider="kdfast", mode="peak-memory", shape="4096x256x32000", dtype="float32")
    out.append(_target("CPU 4096x256x32000 fp32 fwd+bwd peak extra memory vs the eager composition", mem,
                       mem and mem.get("ratio_to_eager"), 0.25, "x eager", "<= 0.25"))
    r = newest_row(cpu, provider="kdfast", mode="full", shape="4096x256x32000", dtype="float32")
    out.append(_target("CPU 4096x256x32000 fp32 fwd+bwd time vs the eager composition (interleaved)", r,
                       r and r.get("ratio_to_eager"), 1.25, "x eager", "<= 1.25"))
    gpu = [r for r in mine if r.get("device_type") == "cuda"]
    k = newest_row(gpu, provider="kdfast", mode="full", shape="8192x4096x128256", dtype="bfloat16")
    lg = k and newest_row(gpu, provider="liger", mode="full", shape=k["shape"], dtype=k["dtype"], commit=k["commit"])
    for what, field in (("peak extra memory", "peak_extra_mib"), ("fwd+bwd time", "ms")):
        ratio = k[field] / lg[field] if k and lg and k.get(field) and lg.get(field) else None
        out.append(_target(f"GPU 8192x4096x128256 bf16 {what} vs Liger's fused-linear JSD (beta=0)", k, ratio, 1.0,
                           "x Liger", "<= 1"))
    return out


def _main(argv=None) -> int:
    """The memory child: one provider's peak extra memory, printed as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.perf.bench_linear_kd_loss")
    parser.add_argument("--memory", required=True, choices=("kdfast", "eager"))
    parser.add_argument("--shape", required=True, help="NxHxV")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    N, H, V = (int(x) for x in args.shape.split("x"))
    mib = cpu_peak_extra_mib(args.memory, (N, H, V, getattr(torch, args.dtype)))
    print(json.dumps({"provider": args.memory, "shape": args.shape, "peak_extra_mib": mib}))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
