"""Scoring throughput against plain inference of the same model, in the same run.

    python -m bench.perf.bench_score --device cuda --out bench/results/results.jsonl   # ResNet-50, 224 px, batch 256, bf16
    python -m bench.perf.bench_score --device cpu                              # small models on the CPU

Providers, on one synthetic batch already on the device (ImageNet-shaped on the GPU; no data loading):
    inference     model(x) under no_grad: the yardstick (bf16 autocast + channels_last on the GPU, like scoring)
    el2n, grand-last, loss, margin, liprune-last
                  kdfast's BatchScorer: the same forward, the fused loss's stats, the head's feature norms
    eager-el2n    what users write today: softmax, one-hot, norm in separate torch ops after the forward
    fwd-bwd       a plain training step's forward + backward (mean cross-entropy) under the same autocast: GraNd's
                  yardstick
    grand         full per-example gradient norms through the scorer's GradNormPlan (one forward + backward)
Each row has images/s and `ratio_to_inference`: the median over rounds of inference time / provider time,
the two timed back to back in each round; grand's row also has `time_vs_fwd_bwd`, the median over rounds of
its time / fwd-bwd's, paired the same way. Scores are checked against a float64 recomputation from the
logits. `targets(rows)`: the scoring targets (el2n and grand-last <= 1.02x inference time, grand <= 1.3x fwd-bwd on
the GPU config).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

from kdfast.runtime.dispatch import resolve_backend
from kdfast.models import create_model
from kdfast.scoring import BatchScorer, get_method

from bench.common import Budget, make_row, newest_row, report, skipped_row, sync, time_ms

OP = "score"
# name -> (model, in_channels, image size, batch, num_classes, precision)
GPU_CONFIGS = {"resnet50-224px-b256-bf16": ("resnet50", 3, 224, 256, 1000, "bf16")}
CPU_CONFIGS = {
    "resnet20-32px-b256": ("resnet20", 3, 32, 256, 10, "fp32"),
    "cnn-digits-b512": ("cnn", 1, 8, 512, 10, "fp32"),
}
SMOKE_CONFIGS = {"cnn-digits-b64": ("cnn", 1, 8, 64, 10, "fp32")}
ALL_CONFIGS = {**GPU_CONFIGS, **CPU_CONFIGS, **SMOKE_CONFIGS}
FAST_METHODS = ("el2n", "grand-last", "loss", "margin", "liprune-last")


def _eager_el2n(model, x, y, autocast):
    with torch.no_grad(), autocast():
        logits = model(x)
    p = logits.float().softmax(-1)
    return (p - nn.functional.one_hot(y, p.shape[-1]).float()).norm(dim=1)


def _autocast(device, precision):
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _check(method, scores, model, x, y, autocast):
    """Max relative error of kdfast's scores against float64 formulas on the same (low-precision) logits."""
    with torch.no_grad(), autocast():
        logits = model(x)
    s = logits.double()
    p = s.softmax(-1)
    el2n = (p - nn.functional.one_hot(y, p.shape[-1]).double()).norm(dim=1)
    want = {"el2n": el2n, "loss": nn.functional.cross_entropy(s, y, reduction="none"),
            "margin": s.scatter(1, y[:, None], float("-inf")).amax(1) - s.gather(1, y[:, None]).squeeze(1)}
    if method not in want:
        return None
    return float(((scores.double() - want[method]).abs() / want[method].abs().clamp_min(1e-6)).max())


def bench_config(name, arch, channels, size, batch, num_classes, precision, device, methods, quick, budget=None,
                 emit=None):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=num_classes, in_channels=channels, image_size=size).to(device).eval()
    x = torch.randn(batch, channels, size, size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    autocast = _autocast(device, precision)
    rep = dict(warmup_ms=50.0, rep_ms=200.0) if quick else dict(warmup_ms=200.0, rep_ms=1500.0)
    shape = (batch, channels, size, size)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    rows = []

    def record(provider, fn, **extra):
        if budget is not None and budget.spent():
            rows.append(skipped_row(op=OP, provider=provider, shape=shape, dtype=dtype, device=device, config=name,
                                    note=budget.note(f"{provider} at {name}")))
        else:
            if provider == "grand":
                extra["time_vs_fwd_bwd"] = 1.0 / paired_ratio(fn, fwd_bwd, device, rounds)
            med, p20, p80 = time_ms(fn, device, **rep)
            rows.append(make_row(op=OP, provider=provider, mode="forward", shape=shape, dtype=dtype, device=device,
                                 config=name, model=arch, ms=med, p20=p20, p80=p80, images_per_s=batch / (med * 1e-3),
                                 ratio_to_inference=paired_ratio(inference, fn, device, rounds),
                                 command=" ".join(["python", "-m", "bench.perf.bench_score", *sys.argv[1:]]), **extra))
        if emit is not None:
            emit(rows[-1])

    rounds = 5 if quick else 21
    backend = resolve_backend(None, device, op="kd_loss")
    with BatchScorer([model], get_method("el2n"), device=device, precision=precision) as scorer:
        xin = scorer.prepare(x)  # channels_last on the GPU, as scoring sees it

    def inference():
        with torch.no_grad(), autocast():
            return model(xin)
    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        with autocast():
            loss = nn.functional.cross_entropy(model(xin), y)
        loss.backward()

    record("inference", inference)
    record("eager-el2n", lambda: _eager_el2n(model, xin, y, autocast))
    if "grand" in methods:
        record("fwd-bwd", fwd_bwd)
    for method in methods:
        m = get_method(method)
        with BatchScorer([model], m, device=device, precision=precision) as scorer:
            scores = scorer(xin, y)[0][:, 0]
            record(method, lambda: scorer(xin, y), backend=backend,
                   max_rel_err_vs_float64=_check(method, scores, model, xin, y, autocast))
    return rows


def _once_ms(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def paired_ratio(reference, fn, device, rounds) -> float:
    """Median over rounds of time(reference) / time(fn), the two run back to back in each round.

    Neighbours in time share the machine's state, so the ratio holds up where absolute times drift (a shared
    CPU, GPU clocks); the medians in the row say how fast, this says how close to inference.
    """
    _once_ms(reference, device), _once_ms(fn, device)  # warm both
    ratios = [_once_ms(reference, device) / _once_ms(fn, device) for _ in range(rounds)]
    return float(torch.tensor(ratios).median())


def run(*, device, quick: bool = False, smoke: bool = False, budget_s: float | None = None, emit=None, methods=None,
        configs=None) -> list[dict]:
    """The `bench.run` entry point: rows for this device's configurations, each handed to `emit` when measured;
    no new configuration starts once `budget_s` seconds are spent (a "skipped" row says so)."""
    device = torch.device(device)
    table = SMOKE_CONFIGS if smoke else (GPU_CONFIGS if device.type == "cuda" else CPU_CONFIGS)
    methods = methods or (FAST_METHODS[:2] if smoke else (*FAST_METHODS, "grand"))
    rows, budget = [], Budget(budget_s)
    for name in configs or table:
        rows += bench_config(name, *ALL_CONFIGS[name], device, methods,
                             quick or smoke, budget, emit)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _grand_vs_fwd_bwd(gpu: list[dict], r: dict | None) -> float | None:
    """GraNd time / plain fwd+bwd time: the ratio this benchmark pairs in each round; rows recorded before it
    did fall back to the end-to-end benchmark's fwd+bwd row of the same configuration, device and commit."""
    if r is None:
        return None
    if r.get("time_vs_fwd_bwd"):
        return r["time_vs_fwd_bwd"]
    plain = newest_row(gpu, op="e2e", provider="fwd+bwd", commit=r["commit"], device=r["device"])
    return r["ms"] / plain["ms"] if plain else None


def targets(rows: list[dict]) -> list[dict]:
    """The scoring targets on the GPU configuration (ResNet-50, 224 px, b256, bf16): EL2N and grand-last
    within 2% of inference time; GraNd within 1.3x a plain forward+backward (`_grand_vs_fwd_bwd`)."""
    name = next(iter(GPU_CONFIGS))
    gpu = [r for r in rows if r.get("device_type") == "cuda" and r.get("config") == name]
    out = []
    for method in ("el2n", "grand-last"):
        r = newest_row(gpu, op=OP, provider=method)
        measured = 1.0 / r["ratio_to_inference"] if r and r.get("ratio_to_inference") else None
        out.append({"issue": 11, "what": f"GPU score({method}) {name} time vs inference", "measured": measured,
                    "target": "<= 1.02", "unit": "x inference", "met": None if measured is None else measured <= 1.02,
                    "commit": r and r["commit"]})
    r = newest_row(gpu, op=OP, provider="grand")
    measured = _grand_vs_fwd_bwd(gpu, r)
    out.append({"issue": 11, "what": f"GPU score(grand) {name} time vs plain fwd+bwd", "measured": measured,
                "target": "<= 1.3", "unit": "x fwd+bwd", "met": None if measured is None else measured <= 1.3,
                "commit": r and r["commit"]})
    return out


def format_table(rows) -> str:
    head = f"{'config':26} {'provider':13} {'median ms':>10} {'p20':>9} {'p80':>9} {'images/s':>10} {'x infer':>8} " \
           f"{'rel err':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["mode"] == "skipped":
            lines.append(f"{r['config']:26} {r['provider']:13} {r['note']}")
            continue
        err = r.get("max_rel_err_vs_float64")
        lines.append(f"{r['config']:26} {r['provider']:13} {r['ms']:10.3f} {r['p20']:9.3f} {r['p80']:9.3f} "
                     f"{r['images_per_s']:10.0f} {r['ratio_to_inference']:8.3f} "
                     f"{'-' if err is None else format(err, '8.1e'):>8}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="+", choices=sorted({**GPU_CONFIGS, **CPU_CONFIGS, **SMOKE_CONFIGS}))
    parser.add_argument("--methods", nargs="+", choices=(*FAST_METHODS, "grand"))
    parser.add_argument("--quick", action="store_true", help="shorter timing loops")
    parser.add_argument("--out", type=Path, help="append JSON rows to this file (bench/results/results.jsonl)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    rows = run(device=device, quick=args.quick, methods=args.methods, configs=args.configs)
    return report(rows, format_table(rows), args.out)


if __name__ == "__main__":
    sys.exit(main())
