"""Batch Hessian spectral norms (LiPrune): kdfast's batched Lanczos against a sequential eager double-backward
power iteration per batch (what PyHessian users run: the gradient graph built once per batch, then one
autograd.grad per product), both stopping on the residual ||Hv - θv|| <= tol |θ|.

    python -m bench.perf.bench_hessian                        # CPU: the smoke setting (tiny GroupNorm CNN), ~1 min
    python -m bench.perf.bench_hessian --device cuda --quick  # ResNet-18 GroupNorm, 16 batches of 128 at 32x32
    python -m bench.run --only hessian                   # the same through the runner (rows to results.jsonl)

Order, so a bounded run keeps what matters: the sequential baseline first, then kdfast's default engine
(double backward through retained graphs; on CUDA replayed from CUDA graphs, whose one-off capture is
timed apart in `compile_s`), then a tight Lanczos reference (tol 1e-5)
that gives every provider its worst relative error (row mode "accuracy"), then eager vmap and, only with
--compile, a compiled product (its one-off compile time in `compile_s`, apart from the timed run). On the CPU
the baseline and kdfast's run alternate for `rounds` rounds and the best of each counts (a shared machine).
Each row is printed and emitted as it is measured; once `budget_s` is spent nothing new starts and a
"skipped" row says what was left out.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench.common import make_row, report, sync
from kdfast.hessian import BatchedHVP, spectral_norms
from kdfast.hessian.hvp import COMPILED_VARIANTS

OP = "hessian_spectral_norms"
BASELINE = "sequential-power-eager"
REFERENCE_TOL = 1e-5


@dataclass(frozen=True)
class Setting:
    model: str
    batches: int
    batch: int
    side: int
    baseline_batches: int  # the baseline's per-batch rate comes from this prefix (it is the slow one)
    rounds: int  # alternating baseline / kdfast rounds, best of each (CPU noise)


SETTINGS = {
    "smoke": Setting("tiny-gn-cnn", batches=8, batch=16, side=16, baseline_batches=8, rounds=3),
    "quick": Setting("resnet18-gn", batches=16, batch=128, side=32, baseline_batches=4, rounds=1),
    "full": Setting("resnet18-gn", batches=64, batch=128, side=32, baseline_batches=8, rounds=1),
}


def resnet18_gn(num_classes: int = 10) -> nn.Module:
    from torchvision.models import resnet18
    return resnet18(num_classes=num_classes, norm_layer=lambda c: nn.GroupNorm(32, c))


def tiny_gn_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


MODELS = {"tiny-gn-cnn": tiny_gn_cnn, "resnet18-gn": resnet18_gn}


def sequential_power(model: nn.Module, batches, *, tol: float, max_iters: int, seed: int = 0, deadline=None):
    """PyHessian-style: per batch, grads with create_graph once, then power iteration with one
    autograd.grad(grads, params, v, retain_graph=True) per product. Returns (norms, products per batch);
    stops between batches once time.perf_counter() passes `deadline`."""
    params = [p for p in model.parameters() if p.requires_grad]
    norms, counts = [], []
    for j, (x, y) in enumerate(batches):
        if deadline is not None and j and time.perf_counter() > deadline:
            break
        loss = nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + j)
        v = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p) for p in params]
        scale = torch.sqrt(sum((t * t).sum() for t in v))
        v = [t / scale for t in v]
        theta = 0.0
        for it in range(1, max_iters + 1):
            hv = torch.autograd.grad(grads, params, v, retain_graph=True)
            theta_t = sum((a * b).sum() for a, b in zip(hv, v))
            residual = torch.sqrt(sum(((a - theta_t * b) ** 2).sum() for a, b in zip(hv, v)))
            norm = torch.sqrt(sum((a * a).sum() for a in hv))
            v = [a / norm for a in hv]
            theta = abs(theta_t.item())
            if residual.item() <= tol * theta:
                break
        norms.append(theta)
        counts.append(it)
    return torch.tensor(norms, dtype=torch.float32), counts


def run(*, device, quick: bool = False, smoke: bool = False, budget_s: float | None = None, emit=None,
        setting: str | None = None, tol: float = 1e-3, iters: int = 20, chunk: int = 8, baseline_iters: int = 200,
        compile: str | None = None, skip=()) -> list[dict]:
    """The `bench.run` entry point. Setting: smoke (the CPU target), quick, or full (the default on CUDA;
    on the CPU the default is smoke, as ResNet-18's products take seconds each there)."""
    device = torch.device(device)
    name = setting or ("smoke" if smoke or device.type == "cpu" else "quick" if quick else "full")
    cfg = SETTINGS[name]
    start = time.perf_counter()
    deadline = None if budget_s is None else start + budget_s
    torch.manual_seed(0)
    model = MODELS[cfg.model]().to(device).eval()
    batches = [(torch.randn(cfg.batch, 3, cfg.side, cfg.side, device=device),
                torch.randint(0, 10, (cfg.batch,), device=device)) for _ in range(cfg.batches)]
    shape = (cfg.batches, cfg.batch, 3, cfg.side, cfg.side)
    rows: list[dict] = []
    norms_of: dict[str, torch.Tensor] = {}

    def out_of_time() -> bool:
        return deadline is not None and time.perf_counter() > deadline

    def add(provider, mode, **metrics):
        row = make_row(op=OP, provider=provider, mode=mode, shape=shape, dtype=torch.float32, device=device,
                       setting=name, model=cfg.model, tol=tol,
                       command=" ".join(["python", "-m", "bench.perf.bench_hessian", *sys.argv[1:]]), **metrics)
        rows.append(row)
        print(_line(row), flush=True)
        if emit is not None:
            emit(row)
        return row

    def timed(provider, seconds, norms, products, ran, **extra):
        norms_of[provider] = norms
        ms = 1e3 * seconds / ran  # one run: ms per batch, for bench.run's generic table (p20 = p80 = ms)
        base = next((r for r in rows if r["provider"] == BASELINE and r["mode"] == "full"), None)
        speedup = None if base is None else base["ms"] / ms
        add(provider, "full", batches=ran, seconds=seconds, batches_per_s=ran / seconds,
            hvps_per_batch=sum(products) / ran, ms=ms, p20=ms, p80=ms,
            speedup_vs={BASELINE: speedup} if speedup is not None else None, **extra)

    def kdfast_run(products):
        sync(device)
        t0 = time.perf_counter()
        norms, info = spectral_norms(model, batches, tol=tol, iters=iters, chunk=chunk, products=products,
                                     return_info=True)
        sync(device)
        return time.perf_counter() - t0, norms, info

    def warm_up_s(products):
        """Seconds of the products' one-off work (CUDA-graph capture, compile) on a first chunk: timed apart,
        the timed runs reuse it."""
        sync(device)
        t0 = time.perf_counter()
        spectral_norms(model, batches[:chunk], iters=2, chunk=chunk, products=products)
        sync(device)
        return time.perf_counter() - t0

    # 1-2. the baseline and kdfast's default engine, alternating rounds (best of each). On CUDA the products'
    # one-off capture (one CUDA graph pair per slot) is timed apart, like a compile: the timed runs reuse it.
    loop = BatchedHVP(model, engine="loop")
    capture_s = warm_up_s(loop) if loop.cuda_graphs else None
    best_base = best_loop = None
    for r in range(cfg.rounds):
        if r and out_of_time():
            break
        sync(device)
        t0 = time.perf_counter()
        norms, counts = sequential_power(model, batches[:cfg.baseline_batches], tol=tol, max_iters=baseline_iters,
                                         deadline=deadline)
        sync(device)
        seconds = time.perf_counter() - t0
        if best_base is None or seconds / len(counts) < best_base[0] / len(best_base[2]):
            best_base = (seconds, norms, counts)
        if r == cfg.rounds - 1 or out_of_time():  # the baseline's last round: its row goes out now
            timed(BASELINE, best_base[0], best_base[1], best_base[2], len(best_base[2]), rounds=r + 1)
        if out_of_time() and best_loop is not None:
            break
        run_loop = kdfast_run(loop)
        if best_loop is None or run_loop[0] < best_loop[0]:
            best_loop = run_loop
    if BASELINE not in norms_of:
        timed(BASELINE, best_base[0], best_base[1], best_base[2], len(best_base[2]), rounds=r)
    seconds, norms, info = best_loop
    timed("kdfast-loop", seconds, norms, info.products, cfg.batches, variant=info.engine, chunk=info.chunk,
          rounds=cfg.rounds, compile_s=capture_s)

    # 3. the tight reference: every provider's worst relative error
    pending = [("kdfast-vmap", dict(engine="vmap"))]
    if compile:
        pending.append((f"kdfast-{compile}", dict(engine="vmap", compile=compile)))
    pending = [p for p in pending if p[0] not in skip]
    reference = None
    if not out_of_time():
        reference = spectral_norms(model, batches, tol=REFERENCE_TOL, iters=60, chunk=chunk, seed=1, products=loop)
        errors = {p: _max_rel_err(n, reference) for p, n in norms_of.items()}
        add("reference", "accuracy", reference_tol=REFERENCE_TOL, max_rel_err_by_provider=errors)

    # 4. the other engines
    for provider, kwargs in pending:
        if out_of_time():
            add(provider, "skipped", note=f"budget of {budget_s:.0f} s spent before {provider} started")
            continue
        products = BatchedHVP(model, **kwargs)
        compile_s = warm_up_s(products) if kwargs.get("compile") else None
        seconds, norms, info = kdfast_run(products)
        timed(provider, seconds, norms, info.products, cfg.batches, variant=info.engine, compile_s=compile_s,
              max_rel_err=None if reference is None else _max_rel_err(norms, reference))
    return rows


def _max_rel_err(norms: torch.Tensor, reference: torch.Tensor) -> float:
    ref = reference[: len(norms)].double()
    return float(((norms.double() - ref).abs() / ref).max())


def _line(row: dict) -> str:
    if row["mode"] == "accuracy":
        return "  accuracy vs tol-1e-5 Lanczos: " + ", ".join(
            f"{p} {e:.1e}" for p, e in row["max_rel_err_by_provider"].items())
    if row["mode"] == "skipped":
        return f"{row['provider']:>24}: skipped ({row['note']})"
    speedup = (row.get("speedup_vs") or {}).get(BASELINE)
    return (f"{row['provider']:>24}: {row['batches_per_s']:8.3f} batches/s  {row['hvps_per_batch']:5.1f} HVPs/batch"
            + (f"  {speedup:5.2f}x baseline" if speedup else "")
            + (f"  compile {row['compile_s']:.1f} s" if row.get("compile_s") else "")
            + (f"  [{row['variant']}]" if row.get("variant") else ""))


def targets(rows: list[dict]) -> list[dict]:
    """The LiPrune targets from the newest rows: >= 10x the sequential baseline on a GPU (quick or full
    setting, same tolerance), >= 3x on the CPU smoke setting at equal accuracy (kdfast's worst error against
    the reference no larger than the tolerance)."""
    out = []
    for device_type, settings, target, factor in (("cuda", ("quick", "full"), ">= 10x", 10.0),
                                                  ("cpu", ("smoke",), ">= 3x at equal accuracy", 3.0)):
        mine = [r for r in rows if r.get("op") == OP and r.get("device_type") == device_type
                and r.get("setting") in settings]
        loop = _newest(mine, "kdfast-loop", "full")
        speedup = None if loop is None else (loop.get("speedup_vs") or {}).get(BASELINE)
        met = None
        if speedup is not None:
            acc = _newest([r for r in mine if r["date"] >= loop["date"]], "reference", "accuracy")
            errors = (acc or {}).get("max_rel_err_by_provider") or {}
            accurate = all(errors.get(p, 1.0) <= loop["tol"] for p in ("kdfast-loop", BASELINE))
            met = speedup >= factor and accurate
        out.append({"issue": 12, "what": f"LiPrune batch spectral norms vs sequential eager power iteration "
                    f"({device_type}, {'/'.join(settings)} setting)", "measured": speedup, "target": target,
                    "met": met, "unit": "x baseline"})
    return out


def _newest(rows, provider, mode):
    mine = [r for r in rows if r["provider"] == provider and r["mode"] == mode]
    return max(mine, key=lambda r: r["date"]) if mine else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--setting", choices=sorted(SETTINGS), help="default: smoke on the CPU, full on CUDA")
    parser.add_argument("--smoke", action="store_true", help="the smoke setting (tiny GroupNorm CNN)")
    parser.add_argument("--quick", action="store_true", help="the quick setting (16 batches of ResNet-18)")
    parser.add_argument("--tol", type=float, default=1e-3, help="relative accuracy (residual test)")
    parser.add_argument("--iters", type=int, default=20, help="Lanczos steps at most")
    parser.add_argument("--chunk", type=int, default=8, help="batches in flight at once")
    parser.add_argument("--baseline-iters", type=int, default=200, help="power steps at most for the baseline")
    parser.add_argument("--compile", choices=COMPILED_VARIANTS, help="also measure this compiled vmap product")
    parser.add_argument("--skip", nargs="+", default=(), help="providers to leave out, e.g. kdfast-vmap")
    parser.add_argument("--budget-s", type=float, help="wall-clock seconds; nothing new starts after them")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default on the CPU: 1, as the smoke "
                        "setting's ops are too small to share; contended threads ran it 10x slower)")
    parser.add_argument("--out", type=Path, help="append JSON rows to this file")
    args = parser.parse_args(argv)
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    rows = run(device=args.device, quick=args.quick, smoke=args.smoke, budget_s=args.budget_s, setting=args.setting,
               tol=args.tol, iters=args.iters, chunk=args.chunk, baseline_iters=args.baseline_iters,
               compile=args.compile, skip=tuple(args.skip))
    table = "\n".join(f"issue {t['issue']}: {t['what']}: "
                      f"{t['measured'] if t['measured'] is None else round(t['measured'], 2)} ({t['target']}, "
                      f"met: {t['met']})" for t in targets(rows))
    return report(rows, table, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
