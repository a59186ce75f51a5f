"""Batch Hessian spectral norms: kdfast (batched Lanczos over vmapped, compiled HVPs) against a sequential
eager double-backward power iteration per batch (what PyHessian users run: the gradient graph built once
per batch, then one autograd.grad per product), both stopping on the residual ||Hv - θv|| <= tol |θ|.

    python -m bench.bench_hessian --device cuda --out rows.jsonl     # 64 batches of 128, ResNet-18 GroupNorm 32x32
    python -m bench.bench_hessian --device cpu --smoke               # a tiny GroupNorm CNN, minutes on a busy CPU

Rows go to --out (bench/results.jsonl, then `python -m bench.run --render-only` puts them in RESULTS.md).
Reports batches/s, HVPs per batch, the one-off compile time (separately: a warm-up call on the same
product object), and each provider's worst relative error against a tight Lanczos reference (tol 1e-5).
The sequential baseline runs on the first --baseline-batches batches only (its batches/s is a per-batch
rate; all 64 would take minutes per run on the H100).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from bench.common import append_rows, make_row, sync
from kdfast.hessian import BatchedHVP, spectral_norms
from kdfast.hessian.hvp import COMPILED_VARIANTS


def resnet18_gn(num_classes: int = 10) -> nn.Module:
    from torchvision.models import resnet18
    return resnet18(num_classes=num_classes, norm_layer=lambda c: nn.GroupNorm(32, c))


def tiny_gn_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


def sequential_power(model: nn.Module, batches, *, tol: float, max_iters: int, seed: int = 0):
    """PyHessian-style: per batch, grads with create_graph once, then power iteration with one
    autograd.grad(grads, params, v, retain_graph=True) per product. Returns (norms, products per batch)."""
    params = [p for p in model.parameters() if p.requires_grad]
    norms, counts = [], []
    for j, (x, y) in enumerate(batches):
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny GroupNorm CNN, 4 batches of 16 at 16x16, baseline on 2")
    parser.add_argument("--batches", type=int, help="number of batches (default 64; smoke 8)")
    parser.add_argument("--batch-size", type=int, help="examples per batch (default 128; smoke 16)")
    parser.add_argument("--image-size", type=int, help="image side (default 32; smoke 16)")
    parser.add_argument("--tol", type=float, default=1e-3, help="relative accuracy (residual test)")
    parser.add_argument("--iters", type=int, default=20, help="Lanczos steps at most")
    parser.add_argument("--chunk", type=int, default=8, help="batches per vmapped product")
    parser.add_argument("--baseline-batches", type=int, help="batches the sequential baseline runs (default 8; smoke 2)")
    parser.add_argument("--baseline-iters", type=int, default=200, help="power steps at most for the baseline")
    parser.add_argument("--no-compile", action="store_true", help="vmap engine without torch.compile")
    parser.add_argument("--compile-variants", nargs="+", default=["auto"], choices=["auto", *COMPILED_VARIANTS],
                        help="compiled products to measure, each compiled apart (auto: the library's fallback chain)")
    parser.add_argument("--no-reference", action="store_true", help="skip the tight-tolerance reference")
    parser.add_argument("--skip", nargs="+", help="providers to leave out, e.g. kdfast-vmap (eager vmap is slow)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--out", type=Path, help="append JSON rows to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    num_batches = args.batches or (4 if args.smoke else 64)
    bsz = args.batch_size or (16 if args.smoke else 128)
    side = args.image_size or (16 if args.smoke else 32)
    torch.manual_seed(0)
    model = (tiny_gn_cnn() if args.smoke else resnet18_gn()).to(device).eval()
    batches = [(torch.randn(bsz, 3, side, side, device=device), torch.randint(0, 10, (bsz,), device=device))
               for _ in range(num_batches)]
    shape = (num_batches, bsz, 3, side, side)
    rows = []

    reference = None
    if not args.no_reference:
        # double backward with retained graphs (the fastest eager engine); other start vectors than the runs
        reference = spectral_norms(model, batches, tol=1e-5, iters=40, chunk=args.chunk, engine="loop", seed=1)

    def record(provider, seconds, norms, products, ran, compile_s=None, variant=None):
        err = None if reference is None else float(((norms - reference[:ran]).abs() / reference[:ran]).max())
        rows.append(make_row(op="hessian_spectral_norms", provider=provider, mode="full", shape=shape,
                             dtype=torch.float32, device=device, batches=ran, seconds=seconds,
                             batches_per_s=ran / seconds, hvps_per_batch=sum(products) / ran,
                             # one run: ms per batch, for bench.run's generic table (p20 = p80 = the value)
                             ms=1e3 * seconds / ran, p20=1e3 * seconds / ran, p80=1e3 * seconds / ran,
                             compile_s=compile_s, max_rel_err=err, tol=args.tol, variant=variant))
        print(f"{provider:>22}: {ran / seconds:8.3f} batches/s  {sum(products) / ran:6.1f} HVPs/batch  "
              f"max rel err {err if err is None else f'{err:.2e}'}" + (f"  compile {compile_s:.1f} s" if compile_s else "")
              + (f"  [{variant}]" if variant else ""))

    engines = [("kdfast-loop", "loop", False), ("kdfast-vmap", "vmap", False)]
    if device.type == "cuda" and not args.no_compile:
        engines += [(f"kdfast-{variant}", "vmap", True if variant == "auto" else variant)
                    for variant in args.compile_variants]
    engines = [e for e in engines if not args.skip or e[0] not in args.skip]
    for provider, engine, compiled in engines:
        products = BatchedHVP(model, engine=engine, compile=compiled)
        compile_s = None
        if compiled is not False:  # the one-off compile: same product object, same chunk, so the timed run reuses it
            sync(device)
            t0 = time.perf_counter()
            spectral_norms(model, batches[: args.chunk], iters=2, chunk=args.chunk, products=products)
            sync(device)
            compile_s = time.perf_counter() - t0
        sync(device)
        t0 = time.perf_counter()
        norms, info = spectral_norms(model, batches, tol=args.tol, iters=args.iters, chunk=args.chunk,
                                     products=products, return_info=True)
        sync(device)
        record(provider, time.perf_counter() - t0, norms, info.products, num_batches, compile_s, info.engine)

    ran = min(args.baseline_batches or (2 if args.smoke else 8), num_batches)
    sync(device)
    t0 = time.perf_counter()
    norms, counts = sequential_power(model, batches[:ran], tol=args.tol, max_iters=args.baseline_iters)
    sync(device)
    record("sequential-power-eager", time.perf_counter() - t0, norms, counts, ran)

    base = rows[-1]["batches_per_s"]
    for row in rows:
        row["speedup_vs"] = {"sequential-power-eager": row["batches_per_s"] / base}
    if args.out:
        append_rows(rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
