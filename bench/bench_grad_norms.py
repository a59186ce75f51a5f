"""Benchmark of per-example gradient norms: kdfast against the ways users compute them today.

    python -m bench.bench_grad_norms --device cuda --out bench/results/grad_norms.jsonl
    python -m bench.bench_grad_norms --device cpu            # small CPU shapes
    python -m bench.bench_grad_norms --smoke                 # a tiny CNN, seconds (the test suite's run)

Providers, all on the same model, batch and device (eval mode: BatchNorm with running statistics):
    plain     one training step's forward + backward of the mean cross-entropy (the yardstick)
    kdfast    kdfast.per_example_grad_norms (activation-only backward, a rule per layer)
    vmap      torch.func vmap(grad) over the whole model (kdfast.reference.grad_norms, the oracle)
    backpack  BackPACK's BatchL2Grad (when installed)
    opacus    Opacus' GradSampleModule, norms from its per-example gradients (when installed)
Each provider's norms are checked against vmap's before timing (max relative error in the row). A
provider that fails records its error instead of numbers. Times: median with p20/p80 (GPU: CUDA events
per provider; CPU: providers timed round-robin, as a shared machine's load drifts); memory: peak extra
device memory (GPU only); ratios to plain (time, memory) and kdfast's speedups over the others.
"""
from __future__ import annotations

import argparse
import copy
import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kdfast.grad_norms import per_example_grad_norms
from kdfast.reference.grad_norms import per_example_grad_norms_ref

from .common import QUANTILES, make_row, peak_extra_mib, report, time_ms

OP = "per_example_grad_norms"
# name -> (architecture, image size, batch, dtype on GPU); the CPU runs the small variants below in fp32
CONFIGS = {
    "resnet18-gn-32px-b128": ("resnet18-gn", 32, 128, torch.float32),
    "resnet50-224px-b64": ("resnet50", 224, 64, torch.bfloat16),
}
CPU_CONFIGS = {
    "resnet18-gn-32px-b16": ("resnet18-gn", 32, 16, torch.float32),
    "resnet50-64px-b8": ("resnet50", 64, 8, torch.float32),
}
SMOKE_CONFIGS = {"smallcnn-8px-b4": ("smallcnn", 8, 4, torch.float32)}  # the test suite's run: seconds
ALL_CONFIGS = {**CONFIGS, **CPU_CONFIGS, **SMOKE_CONFIGS}
NUM_CLASSES = 10
PROVIDERS = ("plain", "kdfast", "vmap", "backpack", "opacus")


def build_model(arch: str) -> nn.Module:
    import torchvision
    if arch == "smallcnn":
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                             nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, NUM_CLASSES))
    if arch == "resnet18-gn":
        return torchvision.models.resnet18(num_classes=NUM_CLASSES, norm_layer=lambda c: nn.GroupNorm(32, c))
    model = torchvision.models.resnet50(num_classes=NUM_CLASSES)
    for m in model.modules():  # non-trivial running statistics, as a trained model has
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


# ---------------------------------------------------------------------------------------- providers
def _plain(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def _kdfast(model, x, y):
    return per_example_grad_norms(model, x, y)


def _vmap(model, x, y):
    return per_example_grad_norms_ref(model, x, y)[0]


def _backpack_setup(model):
    from backpack import extend
    return extend(copy.deepcopy(model), use_converter=True), extend(nn.CrossEntropyLoss(reduction="sum"))


def _backpack(state, x, y):
    from backpack import backpack
    from backpack.extensions import BatchL2Grad
    model, loss_fn = state
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    with backpack(BatchL2Grad()):
        loss.backward()
    return torch.stack([p.batch_l2 for p in model.parameters()]).sum(0).sqrt()


def _opacus_setup(model):
    from opacus import GradSampleModule
    # Opacus records activations only in train mode; the same function here, as it refuses BatchNorm
    return GradSampleModule(copy.deepcopy(model).train(), loss_reduction="sum")


def _opacus(model, x, y):
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad_sample = None
    F.cross_entropy(model(x), y, reduction="sum").backward()
    return torch.stack([p.grad_sample.flatten(1).square().sum(1) for p in model.parameters()]).sum(0).sqrt()


def _provider(name, model):
    """(callable(x, y), or None when the peer is not installed)."""
    if name in ("backpack", "opacus"):
        try:
            __import__(name)
        except ImportError:
            return None
        state = _backpack_setup(model) if name == "backpack" else _opacus_setup(model)
        return functools.partial(_backpack if name == "backpack" else _opacus, state)
    return functools.partial({"plain": _plain, "kdfast": _kdfast, "vmap": _vmap}[name], model)


def _rel_err(got, want):
    return float(((got.double() - want.double()).abs() / want.double().abs().clamp_min(1e-30)).max())


def _interleaved_cpu_ms(fns: dict, reps: int) -> dict:
    """{provider: (median, p20, p80) ms}, the providers timed round-robin after one untimed round, so
    the load of a shared CPU shifts over all of them alike rather than over whichever ran at a bad time."""
    samples = {name: [] for name in fns}
    for rep in range(reps + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if rep:
                samples[name].append((time.perf_counter() - t0) * 1e3)
    q = torch.tensor(QUANTILES, dtype=torch.float64)
    return {name: tuple(float(v) for v in torch.tensor(s, dtype=torch.float64).quantile(q))
            for name, s in samples.items()}


def bench_config(name, arch, size, batch, dtype, device, providers, reps, command=None):
    torch.manual_seed(0)
    model = build_model(arch).to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    shape = (batch, 3, size, size)
    oracle = _vmap(model, x, y)
    extras, runs = {}, {}
    for provider in providers:
        extra = extras[provider] = {"config": name, "model": arch}
        try:
            fn = _provider(provider, model)
            if fn is None:
                del extras[provider]
                continue
            result = fn(x, y)
            if provider != "plain":
                extra["max_rel_err_vs_vmap"] = _rel_err(result, oracle)
            runs[provider] = functools.partial(fn, x, y)
        except Exception as exc:  # a peer failing on this model is a result too
            extra["error"] = extra["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if device.type == "cpu":
        timings = _interleaved_cpu_ms(runs, reps)
    else:
        timings = {provider: time_ms(run, device) for provider, run in runs.items()}
    rows = []
    for provider, extra in extras.items():
        if provider in runs:
            med, p20, p80 = timings[provider]
            extra.update(ms=med, p20=p20, p80=p80, peak_extra_mib=peak_extra_mib(runs[provider], device))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if command:  # run on its own rather than through bench.run (make_row's default command)
            extra["command"] = command
        rows.append(make_row(op=OP, provider=provider, mode="full", shape=shape, dtype=dtype, device=device, **extra))
    _add_ratios(rows)
    return rows


def _add_ratios(rows):
    by = {r["provider"]: r for r in rows if "ms" in r}
    plain, ours = by.get("plain"), by.get("kdfast")
    for r in by.values():
        if plain:
            r["time_vs_plain"] = r["ms"] / plain["ms"]
            if r["peak_extra_mib"] is not None and plain["peak_extra_mib"]:
                r["memory_vs_plain"] = r["peak_extra_mib"] / plain["peak_extra_mib"]
    if ours:
        ours["speedup_vs"] = {p: r["ms"] / ours["ms"] for p, r in by.items() if r is not ours}


def format_table(rows) -> str:
    head = f"{'config':24} {'provider':9} {'median ms':>10} {'p20':>9} {'p80':>9} {'peak MiB':>9} " \
           f"{'x plain':>8} {'mem x':>6} {'kdfast x':>9} {'rel err':>9}"
    speedups = {r["config"]: r["speedup_vs"] for r in rows if "speedup_vs" in r}
    rows = [{**r, "kdfast_speedup": speedups.get(r["config"], {}).get(r["provider"])} for r in rows]
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['config']:24} {r['provider']:9} {r['error']}")
            continue
        def f(key, fmt):
            v = r.get(key)
            return format(v, fmt) if v is not None else "-"
        lines.append(f"{r['config']:24} {r['provider']:9} {f('ms', '10.2f')} {f('p20', '9.2f')} "
                     f"{f('p80', '9.2f')} {f('peak_extra_mib', '9.0f')} {f('time_vs_plain', '8.2f')} "
                     f"{f('memory_vs_plain', '6.2f')} {f('kdfast_speedup', '9.1f')} {f('max_rel_err_vs_vmap', '9.1e')}")
    return "\n".join(lines)


def run(device: torch.device, quick: bool = False, smoke: bool = False, configs=None, providers=PROVIDERS,
        reps: int | None = None, command: str | None = None) -> list[dict]:
    """Rows of every config of the device (bench.run's entry point): GPU configs on CUDA, small ones on the CPU."""
    table = SMOKE_CONFIGS if smoke else CONFIGS if device.type == "cuda" else CPU_CONFIGS
    reps = reps or (3 if smoke or quick else 5)
    rows = []
    for name in configs or table:
        arch, size, batch, dtype = ALL_CONFIGS[name]
        rows += bench_config(name, arch, size, batch, dtype if device.type == "cuda" else torch.float32, device,
                             providers, reps, command)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="+", help="config names (default: all of the device's)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--reps", type=int, default=5, help="timed rounds per provider on the CPU")
    parser.add_argument("--smoke", action="store_true", help="a tiny CNN on the CPU only (seconds)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--out", type=Path, help="append JSON rows to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    unknown = [n for n in args.configs or () if n not in ALL_CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {sorted(ALL_CONFIGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu" if args.smoke else args.device)
    rows = run(device, smoke=args.smoke, configs=args.configs, providers=args.providers, reps=args.reps,
               command=" ".join(["python", "-m", "bench.bench_grad_norms", *sys.argv[1:]]))
    return report(rows, format_table(rows), args.out)


if __name__ == "__main__":
    sys.exit(main())
