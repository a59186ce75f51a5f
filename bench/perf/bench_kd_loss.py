"""Benchmark of the fused KD loss: kdfast against eager PyTorch, torch.compile and Liger-Kernel.

Providers (each times its own copy of the inputs, so no provider sees another's overwritten logits):
    kdfast             kd_loss with default dispatch (Triton on CUDA, C++ on CPU, else torch)
    kdfast-stats       the same with return_stats=True (the statistics should cost next to nothing)
    kdfast-inplace     the same with inplace=True (the gradient overwrites the logits: no N x C buffer); its
                       logits are restored before each timed call, outside the time (CUDA events per call)
    kdfast-novalidate  validate=False (no host label check), in the eager-call rows
    kdfast-reverse_kl, kdfast-jsd   kd_loss with divergence="reverse_kl" / "jsd" (beta 0.5)
    kdfast-topk64      kd_loss against the teacher's top 64 classes (TopKTeacher, missing="tail", made outside
                       the timing): the sparse teacher's cost, which reads no dense teacher row
    kdfast-kernel      the Triton forward launcher alone (GPU; the kernel time at small shapes)
    eager              kdfast.losses.reference.kd_loss_ref in float32: the log_softmax / KL composition users write
    compile            torch.compile of that composition
    liger              Liger-Kernel's LigerCrossEntropyLoss + LigerKLDIVLoss (GPU, when installed)
    cross_entropy      F.cross_entropy alone, the yardstick of the eager-call rows (a drop-in loss should not
                       cost more host time than the loss it extends)
Modes (do_bench on the GPU, perf_counter on the CPU): forward (logits requiring grad, so kdfast's forward
writes the gradient), backward (alone, after an untimed forward), full (forward + backward). The backward
rows compare only providers doing the same work in their backward (`backward_work`): kdfast's forward writes
the gradient, so its backward is a no-op for loss.backward() and is not compared with eager's softmax
gradient; compare full rows. Mode eager-call: wall-clock ms per forward+backward call, back to back and
synchronised, as a training loop runs them (small, host-bound shapes; do_bench's cache flush hides host time).
Mode sweep / sweep-best: the forward launcher over BLOCK x num_warps x num_stages x SPLIT (its `config=`), the best
config per shape recorded. Plus a training step (linear head, loss, backward, SGD) eager, torch.compile'd and
CUDA-graph-captured, and the bandwidth floor: three passes over N x C elements (read student, read teacher,
write gradient) at the device-to-device copy bandwidth measured in the same run.
Before timing, every kernel variant is checked against the float64 reference on the benchmark's device.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import itertools

import torch
import torch.nn.functional as F

from kdfast import TopKTeacher, kd_loss
from kdfast.runtime.dispatch import resolve_backend
from kdfast.losses import triton as kernels
from kdfast.losses.reference import KD_STAT_NAMES, kd_loss_ref, kd_stats_ref

from bench.common import (Budget, copy_bandwidth_gbs, cuda_peer_available, make_row, newest_row, peak_extra_mib,
                          skipped_row, time_ms, wall_per_call_ms)

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
# eager-call rows (host-bound shapes): the GPU shapes, and the CPU proxy of the host path
EAGER_SHAPES = {"cuda": ((128, 10), (128, 100), (256, 1000), (1024, 1000)), "cpu": ((8, 10), (128, 10), (128, 100))}
SMOKE_EAGER_SHAPES = ((8, 10),)
# the launcher sweep: shapes, and the grid (quick: a subset) of BLOCK x num_warps x num_stages x SPLIT (programs
# per row, exchanging partial max/sum statistics)
SWEEP_CONFIGS = ("4096x32000-bf16", "8192x128256-bf16")
SWEEP_GRID = {"BLOCK": (2048, 4096, 8192, 16384), "num_warps": (4, 8, 16), "num_stages": (1, 2, 3),
              "SPLIT": (1, 2, 4, 8)}
QUICK_SWEEP_GRID = {"BLOCK": (4096, 8192), "num_warps": (8, 16), "num_stages": (1, 2), "SPLIT": (1, 4)}
# what each provider's backward does: backward rows are compared only within one kind
BACKWARD_WORK = {"kdfast": "none, gradient written by the forward", "eager": "softmax gradients",
                 "compile": "softmax gradients", "liger": "KL gradient only"}
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


TOPK = 64
_topk_cache: dict = {}


def _topk_teacher(t):
    """The top TOPK classes of teacher logits t as a tail TopKTeacher at the loss temperature, made once per
    teacher tensor (outside the timed calls)."""
    key = (t.data_ptr(), tuple(t.shape))
    if key not in _topk_cache:
        _topk_cache.clear()
        logprobs, ids = torch.log_softmax(t.float() / TEMPERATURE, -1).topk(min(TOPK, t.shape[-1]), -1)
        _topk_cache[key] = TopKTeacher(ids, logprobs, temperature=TEMPERATURE, missing="tail", validate=False)
    return _topk_cache[key]


def backward_work(provider: str) -> str | None:
    return BACKWARD_WORK.get("kdfast" if provider.startswith("kdfast") else provider)


def providers(device) -> dict:
    # the order they are timed in: what the targets need first, should the budget run out
    out = {"kdfast": lambda s, t, y: kd_loss(s, t, y, alpha=ALPHA, temperature=TEMPERATURE)}
    if device.type == "cuda":
        out["compile"] = lambda s, t, y: _compiled_eager()(s, t, y)
    out.update({
        "kdfast-stats": lambda s, t, y: kd_loss(s, t, y, alpha=ALPHA, temperature=TEMPERATURE, return_stats=True)[0],
        "kdfast-inplace": lambda s, t, y: kd_loss(s, t, y, alpha=ALPHA, temperature=TEMPERATURE, inplace=True),
        "eager": _eager,
        "kdfast-reverse_kl": lambda s, t, y: kd_loss(s, t, y, alpha=ALPHA, temperature=TEMPERATURE,
                                                     divergence="reverse_kl"),
        "kdfast-jsd": lambda s, t, y: kd_loss(s, t, y, alpha=ALPHA, temperature=TEMPERATURE, divergence="jsd"),
        "kdfast-topk64": lambda s, t, y: kd_loss(s, _topk_teacher(t), y, alpha=ALPHA, temperature=TEMPERATURE),
    })
    if cuda_peer_available(device, "liger_kernel.transformers.cross_entropy"):
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
def _measure(fn, s0, t, y, device, mode, rep_ms, restore=False):
    """(median, p20, p80) and peak memory of one provider in one mode, on its own copy of the logits.

    With restore (the in-place provider, whose forward overwrites the logits with the gradient) the logits
    get their values back before every call, outside the timed region.
    """
    s = s0.detach().clone().requires_grad_(True)

    def forward():
        s.grad = None
        return fn(s, t, y)

    def full():
        forward().backward()

    if not restore:
        if mode == "forward":
            return time_ms(forward, device, rep_ms=rep_ms), None
        if mode == "backward":
            return time_ms(lambda loss: loss.backward(), device, setup=forward, rep_ms=rep_ms), None
        return time_ms(full, device, rep_ms=rep_ms), peak_extra_mib(full, device)

    def fresh():
        with torch.no_grad():
            s.copy_(s0)

    if mode == "forward":
        return time_ms(lambda _: forward(), device, setup=fresh, rep_ms=rep_ms), None
    if mode == "backward":
        return time_ms(lambda loss: loss.backward(), device, setup=lambda: (fresh(), forward())[1], rep_ms=rep_ms), None
    timed = time_ms(lambda _: full(), device, setup=fresh, rep_ms=rep_ms)
    fresh()
    return timed, peak_extra_mib(full, device)


def _fits(N, C, dtype, device) -> bool:
    """Room for the inputs and the eager peer's float32 intermediates (about 12 N x C float32 buffers)."""
    if device.type != "cuda":
        return True
    itemsize = torch.tensor([], dtype=dtype).element_size()
    return torch.cuda.mem_get_info(device)[0] > 12 * N * C * 4 + 3 * N * C * itemsize


def _floor_ms(N, C, dtype, bandwidth_gbs) -> float:
    itemsize = torch.tensor([], dtype=dtype).element_size()
    return 3 * N * C * itemsize / (bandwidth_gbs * 1e9) * 1e3


def bench_config(name, device, bandwidth_gbs, rep_ms, budget, emit) -> None:
    N, C, dtype = {**CONFIGS, **SMOKE_CONFIGS}[name]
    if not _fits(N, C, dtype, device):
        emit(skipped_row(op=OP, shape=(N, C), dtype=dtype, device=device, note="does not fit in device memory"))
        return
    s, t, y = make_inputs(N, C, dtype, device)
    floor_ms = _floor_ms(N, C, dtype, bandwidth_gbs)
    for provider, fn in providers(device).items():
        if budget.spent():
            emit(skipped_row(op=OP, provider=provider, shape=(N, C), dtype=dtype, device=device,
                             note=budget.note(f"{provider} at {name}")))
            continue
        for mode in MODES:
            common = dict(op=OP, provider=provider, mode=mode, shape=(N, C), dtype=dtype, device=device)
            try:
                (ms, p20, p80), peak = _measure(fn, s, t, y, device, mode, rep_ms,
                                                restore=provider == "kdfast-inplace")
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                emit(make_row(**common, note="out of memory"))
                continue
            except Exception as exc:  # a peer failing (e.g. built for another torch) must not end the run
                if provider.startswith("kdfast"):
                    raise
                emit(make_row(**common, note=f"failed: {type(exc).__name__}: {str(exc)[:200]}"))
                continue
            emit(make_row(**common, ms=ms, p20=p20, p80=p80, peak_extra_mib=peak, floor_ms=floor_ms,
                          ratio_to_floor=ms / floor_ms if mode == "full" else None,
                          input_mib=N * C * s.element_size() / 2 ** 20, fresh_inputs=True,
                          backward_work=backward_work(provider) if mode == "backward" else None,
                          backend=resolve_backend(None, device, op=OP) if provider.startswith("kdfast")
                          else None))


@contextlib.contextmanager
def _threads(n: int | None):
    """torch's CPU threads set to n inside the block (None: unchanged)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bench_eager_calls(device, shapes, rounds, budget, emit) -> None:
    """Wall-clock ms per forward+backward call, back to back, synchronised (what a training loop sees), against
    F.cross_entropy's forward+backward alone. The CPU runs one thread: the proxy of the host path."""
    calls, warmup = (300, 30) if device.type == "cuda" else (100, 10)
    for N, C in shapes:
        if budget.spent():
            emit(skipped_row(op=OP, shape=(N, C), dtype=torch.float32, device=device,
                             note=budget.note(f"eager-call rows at {N}x{C}")))
            continue
        s0, t, y = make_inputs(N, C, torch.float32, device)
        fns = {"kdfast": lambda s: kd_loss(s, t, y, alpha=ALPHA, temperature=TEMPERATURE)}
        if "validate" in inspect.signature(kd_loss).parameters:
            fns["kdfast-novalidate"] = lambda s: kd_loss(s, t, y, alpha=ALPHA, temperature=TEMPERATURE,
                                                         validate=False)
        fns["eager"] = lambda s: _eager(s, t, y)
        if device.type == "cuda":
            fns["compile"] = lambda s: _compiled_eager()(s, t, y)
        fns["cross_entropy"] = lambda s: F.cross_entropy(s, y)

        def call(fn, s):
            def once():
                s.grad = None
                fn(s).backward()
            return once

        calls_of = {name: call(fn, s0.detach().clone().requires_grad_(True)) for name, fn in fns.items()}
        with _threads(1 if device.type == "cpu" else None):
            samples = wall_per_call_ms(calls_of, device, rounds=rounds, calls=calls, warmup=warmup)
            best = {name: min(v) for name, v in samples.items()}
            for name, v in samples.items():
                emit(make_row(op=OP, provider=name, mode="eager-call", shape=(N, C), dtype=torch.float32,
                              device=device, ms=best[name], median_ms=float(torch.tensor(v).median()),
                              samples=len(v), calls_per_sample=calls, fresh_inputs=True,
                              ratio_to_cross_entropy=best[name] / best["cross_entropy"],
                              backend=resolve_backend(None, device, op=OP) if name.startswith("kdfast") else None))


# ------------------------------------------------------------------------------- the launcher alone
def launcher_takes_config(launcher=None) -> bool:
    return "config" in inspect.signature(launcher or kernels.kd_loss_fwd).parameters


def launch_forward(s, t, y, *, config=None, launcher=None, return_stats=False):
    """The forward launcher alone (mean loss, reduced in the kernel, and gradient): the one place that knows
    its arguments."""
    launcher = launcher or kernels.kd_loss_fwd
    extra = {} if config is None else {"config": config}
    return launcher(s, t, y, None, ALPHA, TEMPERATURE, -100, 2, True, return_stats, None, **extra)


def bench_kernel_only(device, rep_ms, emit) -> None:
    N, C, dtype = CONFIGS[STEP_CONFIG]
    s, t, y = make_inputs(N, C, dtype, device)
    s = s.detach()
    ms, p20, p80 = time_ms(lambda: launch_forward(s, t, y), device, rep_ms=rep_ms)
    emit(make_row(op=OP, provider="kdfast-kernel", mode="forward", shape=(N, C), dtype=dtype, device=device,
                  ms=ms, p20=p20, p80=p80, backend="triton"))
    wall = wall_per_call_ms({"kernel": lambda: launch_forward(s, t, y)}, device, rounds=5, calls=300,
                            warmup=30)["kernel"]
    emit(make_row(op=OP, provider="kdfast-kernel", mode="eager-call", shape=(N, C), dtype=dtype, device=device,
                  ms=min(wall), median_ms=float(torch.tensor(wall).median()), samples=len(wall), calls_per_sample=300,
                  backend="triton", note="forward launcher alone, wall clock per call"))


def _config_name(config: dict) -> str:
    return (f"BLOCK={config['BLOCK']} warps={config['num_warps']} stages={config['num_stages']}"
            + (f" split={config['SPLIT']}" if "SPLIT" in config else ""))


def sweep(name, device, bandwidth_gbs, grid, rep_ms, budget, emit, launcher=None) -> None:
    """Every BLOCK x num_warps x num_stages of `grid` through the launcher's `config=`, then the best config
    of the shape against the launcher's own default (config=None), all in this run. A config the compiler
    refuses (too many registers or shared memory) is counted, not recorded."""
    N, C, dtype = {**CONFIGS, **SMOKE_CONFIGS}[name]
    if not launcher_takes_config(launcher):
        emit(skipped_row(op=OP, provider="kdfast-kernel", shape=(N, C), dtype=dtype, device=device,
                         note="sweep: the forward launcher takes no config= (needs the launcher that accepts "
                              "{'BLOCK', 'num_warps', 'num_stages'})"))
        return
    if not _fits(N, C, dtype, device):
        emit(skipped_row(op=OP, provider="kdfast-kernel", shape=(N, C), dtype=dtype, device=device,
                         note="sweep: does not fit in device memory"))
        return
    s, t, y = make_inputs(N, C, dtype, device)
    s = s.detach()
    floor_ms = _floor_ms(N, C, dtype, bandwidth_gbs)
    default_ms = time_ms(lambda: launch_forward(s, t, y, launcher=launcher), device, rep_ms=rep_ms)[0]
    timed, failed, untried = {}, 0, 0
    for values in itertools.product(*grid.values()):
        config = dict(zip(grid, values))
        if budget.spent():
            untried += 1
            continue
        try:
            ms, p20, p80 = time_ms(lambda: launch_forward(s, t, y, config=config, launcher=launcher), device,
                                   rep_ms=rep_ms)
        except Exception as exc:  # out of resources, or a config the launcher rejects
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            failed += 1
            continue
        timed[_config_name(config)] = (ms, config)
        emit(make_row(op=OP, provider="kdfast-kernel", mode="sweep", shape=(N, C), dtype=dtype, device=device,
                      variant=_config_name(config), config=config, ms=ms, p20=p20, p80=p80, floor_ms=floor_ms,
                      ratio_to_floor=ms / floor_ms, ratio_to_default=ms / default_ms, backend="triton"))
    note = (f"{len(timed)} configs timed, {failed} refused by the compiler or launcher"
            + (f", {untried} not tried (budget spent)" if untried else ""))
    if not timed:
        emit(skipped_row(op=OP, provider="kdfast-kernel", shape=(N, C), dtype=dtype, device=device,
                         note=f"sweep: no config timed ({note})"))
        return
    ms, config = min(timed.values(), key=lambda v: v[0])
    emit(make_row(op=OP, provider="kdfast-kernel", mode="sweep-best", shape=(N, C), dtype=dtype, device=device,
                  config=config, ms=ms, default_ms=default_ms, speedup_vs_default=default_ms / ms, floor_ms=floor_ms,
                  ratio_to_floor=ms / floor_ms, backend="triton", note=note))


def bench_training_step(device, rep_ms, emit) -> None:
    """Linear head -> loss -> backward -> SGD, eager, torch.compile'd (fullgraph) and CUDA-graph-captured."""
    N, C, dtype = CONFIGS[STEP_CONFIG]
    x = torch.randn(N, STEP_FEATURES, device=device)
    t = torch.randn(N, C, device=device) * 3
    y = torch.randint(0, C, (N,), device=device)
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
            emit(make_row(op=OP, provider=f"step-{how}-{loss_name}", mode="full", shape=(N, C), dtype=dtype,
                          device=device, ms=ms, p20=p20, p80=p80, features=STEP_FEATURES))


def run(*, device: torch.device, quick: bool = False, smoke: bool = False, budget_s: float | None = None,
        emit=None) -> list[dict]:
    """Every row of this benchmark on `device`, each passed to `emit` as soon as it is measured: checks, the
    bandwidth floor, eager calls, the configs, the launcher alone, its sweep, training steps. Within
    `budget_s` seconds: what is left when the budget is spent gets a "skipped" row."""
    rows, budget = [], Budget(budget_s)

    def out(row):
        rows.append(row)
        if emit is not None:
            emit(row)

    def section(what, fn, *args) -> None:
        if budget.spent():
            out(skipped_row(op=OP, device=device, note=budget.note(what)))
        else:
            fn(*args)

    # CPU timings share the machine with whatever else runs: more samples for a stable median
    rep_ms = 20.0 if (quick or smoke) else (200.0 if device.type == "cuda" else 1000.0)
    rounds = 3 if (quick or smoke) else 7
    names = list(SMOKE_CONFIGS) if smoke else list(CONFIGS) if device.type == "cuda" else list(CPU_CONFIGS)
    for row in check_variants(device, [(8, 37)] if smoke else [(64, 1000), (8, 50257)]):
        out(row)
    bandwidth = copy_bandwidth_gbs(device, nbytes=(1 << 22) if smoke else (1 << 30))
    out(make_row(op="copy", provider="torch", mode="bandwidth", shape=(), dtype=torch.float32, device=device,
                 gbs=bandwidth))
    if device.type == "cuda" and not cuda_peer_available(device, "liger_kernel.transformers.cross_entropy"):
        out(skipped_row(op=OP, provider="liger", device=device,
                        note="Liger-Kernel not installed (or not importable): pip install liger-kernel"))
    section("eager-call rows", bench_eager_calls, device,
            SMOKE_EAGER_SHAPES if smoke else EAGER_SHAPES[device.type], rounds, budget, out)
    for name in names:
        section(f"config {name}", bench_config, name, device, bandwidth, rep_ms, budget, out)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type != "cuda":
        out(skipped_row(op=OP, provider="kdfast-kernel", device=device,
                        note="launcher-alone and sweep rows: GPU only (Triton kernels)"))
    else:
        section("the launcher alone", bench_kernel_only, device, rep_ms, out)
        for name in SWEEP_CONFIGS:
            section(f"sweep at {name}", sweep, name, device, bandwidth, QUICK_SWEEP_GRID if quick else SWEEP_GRID,
                    rep_ms, budget, out)
            torch.cuda.empty_cache()
    if not smoke:
        section("training steps", bench_training_step, device, rep_ms, out)
    if device.type == "cuda" and not smoke:
        section("the N x C > 2^31 check", lambda: [out(r) for r in check_large_offsets(device)])
    return rows


# ------------------------------------------------------------------------------------------ targets
def _target(what, row, measured, bound, unit, target) -> dict:
    return {"issue": 10, "what": what, "measured": measured, "target": target, "unit": unit,
            "met": None if measured is None else measured <= bound, "commit": row["commit"] if row else None}


def targets(rows: list[dict]) -> list[dict]:
    """The KD-loss issue's open targets, from the newest rows: GPU ones from CUDA rows, the CPU proxy of the
    host path from CPU rows (measured None where this device has no such row)."""
    gpu = [r for r in rows if r.get("op") == OP and r.get("device_type") == "cuda"]
    cpu = [r for r in rows if r.get("op") == OP and r.get("device_type") == "cpu"]
    out = []
    for shape, bound in (("8192x128256", 1.5), ("4096x32000", 2.0)):
        r = newest_row(gpu, provider="kdfast", mode="full", shape=shape, dtype="bfloat16")
        out.append(_target(f"GPU {shape} bf16 fwd+bwd vs the 3-pass floor", r, r and r.get("ratio_to_floor"), bound,
                           "x floor", f"<= {bound:g}"))
    r = newest_row(gpu, provider="kdfast-kernel", mode="forward", shape="256x1000", dtype="float32")
    out.append(_target("GPU forward launcher alone, 256x1000 fp32 (do_bench)", r, r and r["ms"] * 1e3, 10.0, "us",
                       "<= 10"))
    for device_rows, shapes, where in ((gpu, ("128x10", "128x100", "256x1000"), "GPU"),
                                       (cpu, ("8x10", "128x10", "128x100"), "CPU (1 thread)")):
        for shape in shapes:
            r = newest_row(device_rows, provider="kdfast", mode="eager-call", shape=shape, dtype="float32")
            out.append(_target(f"{where} eager fwd+bwd call {shape} fp32, wall vs F.cross_entropy fwd+bwd", r,
                               r and r.get("ratio_to_cross_entropy"), 1.0, "x F.cross_entropy", "<= 1"))
    # ahead of torch.compile at every shape: the worst kdfast / compile ratio over the shapes both measured
    worst, worst_row = None, None
    for mode in ("full", "eager-call"):
        for r in [r for r in gpu if r["provider"] == "kdfast" and r["mode"] == mode and "ms" in r]:
            c = newest_row(gpu, provider="compile", mode=mode, shape=r["shape"], dtype=r["dtype"], commit=r["commit"])
            if c is not None and (worst is None or r["ms"] / c["ms"] > worst):
                worst, worst_row = r["ms"] / c["ms"], r
    where = f" (at {worst_row['shape']} {worst_row['dtype']}, {worst_row['mode']})" if worst_row else ""
    out.append(_target("GPU kdfast vs torch.compile, worst shape (fwd+bwd, do_bench and eager call)", worst_row,
                       worst, 1.0 - 1e-9, "x torch.compile" + where, "< 1 at every shape"))
    return out
