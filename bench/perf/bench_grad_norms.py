"""Benchmark of per-example gradient norms: kdfast against the ways users compute them today.

    python -m bench.perf.bench_grad_norms --device cuda --out bench/results/grad_norms.jsonl
    python -m bench.perf.bench_grad_norms --device cpu            # small CPU shapes
    python -m bench.perf.bench_grad_norms --smoke                 # a tiny CNN, seconds (the test suite's run)
    python -m bench.perf.bench_grad_norms --census                # op/launch census only (any machine, seconds)

Providers, all on the same model, batch and device (eval mode: BatchNorm with running statistics):
    plain     one training step's forward + backward of the mean cross-entropy (the yardstick)
    kdfast    kdfast.per_example_grad_norms (activation-only backward, a rule per layer) through an open plan
    kdfast-graph  the same plan with cuda_graph=True: captured once, replayed (CUDA only)
    vmap      torch.func vmap(grad) over the whole model (kdfast.grad_norms.reference, the oracle)
    backpack  BackPACK's BatchL2Grad (when installed)
    opacus    Opacus' GradSampleModule, norms from its per-example gradients (when installed)
Each provider's norms are checked against vmap's before timing (max relative error in the row). A
provider that fails records its error instead of numbers. Times: median with p20/p80 (GPU: CUDA events
per provider; CPU: providers timed round-robin, as a shared machine's load drifts); memory: peak extra
device memory (GPU only); ratios to plain (time, memory) and kdfast's speedups over the others.

Census (mode "census", any device, CPU tensors): aten ops and kernel launches of one call, counted through
a TorchDispatchMode, of kdfast's GPU path (a GradNormPlan on backend "triton"; Triton launches counted at
their launcher, which does not run them) against the plain forward + backward of the same model. It
measures the host-side work that makes small batches launch-bound on a GPU; target <= 1.5x plain.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from torch.utils._python_dispatch import TorchDispatchMode

from kdfast.grad_norms import GradNormPlan, per_example_grad_norms
from kdfast.grad_norms.reference import per_example_grad_norms_ref

from bench.common import QUANTILES, make_row, peak_extra_mib, report, time_ms

OP = "per_example_grad_norms"
# name -> (architecture, image size, batch, dtype on GPU); the CPU runs the small variants below in fp32
CONFIGS = {
    "resnet18-gn-32px-b128": ("resnet18-gn", 32, 128, torch.float32),
    "resnet50-224px-b64": ("resnet50", 224, 64, torch.bfloat16),
    **{f"{arch}-224px-b64": (arch, 224, 64, torch.bfloat16) for arch in ("vit_b_16", "swin_t", "convnext_tiny")},
}
# The transformers and ConvNeXt at ImageNet size: no smaller image is representative of their cost split
# (tokens vs. weights); batch 2 keeps a round on a shared 2-core CPU under a minute.
ZOO = ("vit_b_16", "swin_t", "convnext_tiny")
CPU_CONFIGS = {
    "resnet18-gn-32px-b16": ("resnet18-gn", 32, 16, torch.float32),
    "resnet50-64px-b8": ("resnet50", 64, 8, torch.float32),
    **{f"{arch}-224px-b2": (arch, 224, 2, torch.float32) for arch in ZOO},
}
SMOKE_CONFIGS = {"smallcnn-8px-b4": ("smallcnn", 8, 4, torch.float32)}  # the test suite's run: seconds
# census: (architecture, image size, batch); op counts do not depend on the sizes, so small ones do
CENSUS_CONFIGS = {"resnet18-gn-32px-b4": ("resnet18-gn", 32, 4), "resnet50-64px-b2": ("resnet50", 64, 2),
                  "vit_b_16-32px-b2": ("vit_b_16", 32, 2), "swin_t-32px-b2": ("swin_t", 32, 2),
                  "convnext_tiny-32px-b2": ("convnext_tiny", 32, 2)}
SMOKE_CENSUS = {"smallcnn-8px-b4": ("smallcnn", 8, 4)}
CENSUS_TARGET = 1.5
ALL_CONFIGS = {**CONFIGS, **CPU_CONFIGS, **SMOKE_CONFIGS}
NUM_CLASSES = 10
PROVIDERS = ("plain", "kdfast", "kdfast-graph", "vmap", "backpack", "opacus")
ZOO_PROVIDERS = ("plain", "kdfast", "kdfast-graph")


def build_model(arch: str, size: int = 224) -> nn.Module:
    import torchvision
    if arch in ZOO:
        return torchvision.models.get_model(arch, num_classes=NUM_CLASSES, **({"image_size": size} if arch == "vit_b_16"
                                                                              else {}))
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
    return per_example_grad_norms(model, x, y)  # through the plan bench_config keeps open


def _loop(model, x, y):
    """Per-example autograd loop: the oracle where vmap's B copies of every gradient do not fit."""
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i:i + 1]).float(), y[i:i + 1], reduction="sum")
        norms.append(torch.sqrt(sum(g.float().square().sum() for g in torch.autograd.grad(loss, params))))
    return torch.stack(norms)


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


def _provider(name, model, stack=None):
    """(callable(x, y), or None when the peer is not installed or the provider needs CUDA)."""
    if name == "kdfast-graph":
        if not torch.cuda.is_available() or next(model.parameters()).device.type != "cuda":
            return None
        return stack.enter_context(GradNormPlan(model, cuda_graph=True))
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
    model = build_model(arch, size).to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    shape = (batch, 3, size, size)
    oracle = (_loop if arch in ZOO else _vmap)(model, x, y)
    extras, runs = {}, {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(GradNormPlan(model))  # kdfast's calls run through it: hooks once, as scoring does
        for provider in providers:
            extra = extras[provider] = {"config": name, "model": arch}
            try:
                fn = _provider(provider, model, stack)
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


# ------------------------------------------------------------------------------------------- census
def _is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


ALLOCATIONS = {"empty", "empty_strided", "empty_like"}


class OpCensus(TorchDispatchMode):
    """Counts aten ops and, of those, the ones that launch a kernel (not views, not bare allocations)."""

    def __init__(self):
        super().__init__()
        self.aten_ops = self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.aten_ops += 1
        if not _is_view(func) and func._schema.name.split("::")[-1] not in ALLOCATIONS:
            self.launches += 1
        return func(*args, **(kwargs or {}))


class _CountedKernel:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` counts one launch and runs nothing."""

    def __init__(self, census):
        self.census = census

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.census.launches += 1
        return launch


@contextlib.contextmanager
def counted_triton_launches(census):
    """kdfast's Triton launchers on CPU tensors, each launch counted in `census` instead of run."""
    from kdfast.grad_norms import triton as kernels
    names = [n for n in vars(kernels) if n.startswith("_") and n.endswith("_kernel")]
    saved = {n: getattr(kernels, n) for n in names}
    interpret = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # lets the dispatcher pick "triton" for CPU tensors
    try:
        for n in names:
            setattr(kernels, n, _CountedKernel(census))
        yield
    finally:
        for n, k in saved.items():
            setattr(kernels, n, k)
        if interpret is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = interpret


def census_counts(model, x, y) -> dict[str, tuple[int, int]]:
    """{"plain": (aten ops, launches), "kdfast": (...)} of one call each, after one uncounted call."""
    out = {}
    _plain(model, x, y)
    with OpCensus() as census:
        _plain(model, x, y)
    model.zero_grad(set_to_none=True)
    out["plain"] = (census.aten_ops, census.launches)
    census = OpCensus()
    with counted_triton_launches(census), GradNormPlan(model, backend="triton") as plan:
        plan(x, y)
        census.aten_ops = census.launches = 0
        with census:
            plan(x, y)
    out["kdfast"] = (census.aten_ops, census.launches)
    return out


def census_rows(configs=None, smoke=False, command=None) -> list[dict]:
    rows = []
    for name in configs or (SMOKE_CENSUS if smoke else CENSUS_CONFIGS):
        arch, size, batch = {**CENSUS_CONFIGS, **SMOKE_CENSUS}[name]
        torch.manual_seed(0)
        model = build_model(arch, size).eval()
        x, y = torch.randn(batch, 3, size, size), torch.randint(0, NUM_CLASSES, (batch,))
        counts = census_counts(model, x, y)
        plain_launches = counts["plain"][1]
        for provider, (ops, launches) in counts.items():
            extra = {"command": command} if command else {}
            rows.append(make_row(op=OP, provider=provider, mode="census", shape=(batch, 3, size, size),
                                 dtype=torch.float32, device=torch.device("cpu"), config=name, model=arch,
                                 aten_ops=ops, kernel_launches=launches, ratio_to_plain=launches / plain_launches,
                                 ops_ratio_to_plain=ops / counts["plain"][0],
                                 backend="triton" if provider == "kdfast" else None, **extra))
    return rows


# --------------------------------------------------------------------------------- cost model check
def cost_model_rows(device, command=None) -> list[dict]:
    """Per conv layer of ResNet-50 (224 px, b64, bf16): both Triton forms timed, against the choice of
    forms.prefer_gram. A GPU-only measurement; elsewhere one "skipped" row says so."""
    shape, dtype = (64, 3, 224, 224), torch.bfloat16
    extra = {"command": command} if command else {}
    if device.type != "cuda":
        return [make_row(op=OP, provider="kdfast", mode="skipped", shape=shape, dtype=dtype, device=device,
                         config="cost-model-resnet50", note="cost model check: needs a GPU (Triton kernels timed)",
                         **extra)]
    import math

    from kdfast.grad_norms.forms import prefer_gram
    from kdfast.grad_norms import triton as kernels
    model = build_model("resnet50").to(device).eval().to(memory_format=torch.channels_last)
    x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, o: seen.append((m, a[0], o))) for m in model.modules()
             if isinstance(m, nn.Conv2d)]
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        model(x)
    for h in hooks:
        h.remove()
    chosen_ms = best_ms = agree = 0
    for m, a, o in seen:
        g = torch.randn_like(o)
        kw = dict(kernel_size=(1, *m.kernel_size), stride=(1, *m.stride), padding=(0, *m.padding),
                  dilation=(1, *m.dilation), groups=m.groups)
        a5, g5 = a[:, :, None], g[:, :, None]
        direct = time_ms(lambda: kernels.conv_wgrad_sqnorm(a5, g5, **kw), device)[0]
        gram = time_ms(lambda: kernels.conv_gram_sqnorm(a5, g5, **kw), device)[0]
        taps = math.prod(m.kernel_size)
        pick_gram = prefer_gram(math.prod(o.shape[2:]), m.in_channels // m.groups * taps,
                                m.out_channels // m.groups, taps=taps, backend="triton")
        chosen_ms += gram if pick_gram else direct
        best_ms += min(gram, direct)
        agree += pick_gram == (gram < direct)
    return [make_row(op=OP, provider="kdfast", mode="cost_model", shape=shape, dtype=dtype, device=device,
                     config="cost-model-resnet50", layers=len(seen), agree_fraction=agree / len(seen),
                     chosen_ms=chosen_ms, best_ms=best_ms, ratio_to_best=chosen_ms / best_ms, **extra)]


def format_table(rows) -> str:
    head = f"{'config':24} {'provider':9} {'median ms':>10} {'p20':>9} {'p80':>9} {'peak MiB':>9} " \
           f"{'x plain':>8} {'mem x':>6} {'kdfast x':>9} {'rel err':>9}"
    speedups = {r["config"]: r["speedup_vs"] for r in rows if "speedup_vs" in r}
    rows = [r for r in rows if r["mode"] == "full"] + [r for r in rows if r["mode"] != "full"]
    rows = [{**r, "kdfast_speedup": speedups.get(r["config"], {}).get(r["provider"])} for r in rows]
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["mode"] == "census":
            lines.append(f"{r['config']:24} {r['provider']:9} census: {r['aten_ops']} aten ops, "
                         f"{r['kernel_launches']} launches ({r['ratio_to_plain']:.2f}x plain's launches, "
                         f"{r['ops_ratio_to_plain']:.2f}x its ops)")
            continue
        if r["mode"] == "cost_model":
            lines.append(f"{r['config']:24} {r['provider']:9} cost model agrees on {r['agree_fraction']:.0%} of "
                         f"{r['layers']} layers; its choices take {r['ratio_to_best']:.2f}x the best forms' time")
            continue
        if r["mode"] == "skipped":
            lines.append(f"{r['config']:24} {r['provider']:9} skipped: {r['note']}")
            continue
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


def run(*, device, quick: bool = False, smoke: bool = False, budget_s: float | None = None, emit=None,
        configs=None, providers=PROVIDERS, reps: int | None = None, command: str | None = None,
        census: bool = True) -> list[dict]:
    """The runner's entry point: the census rows, then timed rows of every config of the device (GPU
    configs on CUDA, small ones on the CPU); each row goes to `emit` as soon as it exists; once `budget_s`
    seconds are spent no new config starts (a "skipped" row says which)."""
    device = torch.device(device)
    start = time.perf_counter()
    table = SMOKE_CONFIGS if smoke else CONFIGS if device.type == "cuda" else CPU_CONFIGS
    reps = reps or (3 if smoke or quick else 5)
    rows = []

    def keep(new):
        for row in new:
            rows.append(row)
            if emit is not None:
                emit(row)

    if census:
        keep(census_rows(smoke=smoke, command=command))
    if not smoke:
        keep(cost_model_rows(device, command))
    for name in configs or table:
        if budget_s is not None and time.perf_counter() - start > budget_s:
            arch, size, batch, dtype = ALL_CONFIGS[name]
            keep([make_row(op=OP, provider="kdfast", mode="skipped", shape=(batch, 3, size, size), dtype=dtype,
                           device=device, config=name, model=arch,
                           note=f"skipped: the module's budget of {budget_s:.0f} s was spent")])
            continue
        arch, size, batch, dtype = ALL_CONFIGS[name]
        # the peers have no attention or layer-scale support (BackPACK, Opacus) or hold B copies of 30-90 M
        # parameters (vmap): the zoo rows time kdfast against the plain step
        chosen = [p for p in providers if p in ZOO_PROVIDERS] if arch in ZOO else providers
        keep(bench_config(name, arch, size, batch, dtype if device.type == "cuda" else torch.float32, device,
                          chosen, reps, command))
    return rows


def _newest(rows, **match):
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return max(found, key=lambda r: r["date"]) if found else None


def targets(rows: list[dict]) -> list[dict]:
    """The per-example gradient-norm targets this module measures, from the newest rows (None where not measured)."""
    out = []
    for config, what in (("resnet18-gn-32px-b128", "per_example_grad_norms ResNet-18 GN 32px b128 fp32 vs plain "
                          "fwd+bwd (GPU)"),
                         ("resnet50-224px-b64", "per_example_grad_norms ResNet-50 224px b64 bf16 vs plain fwd+bwd "
                          "(GPU)")):
        r = _newest(rows, op=OP, provider="kdfast", mode="full", config=config, device_type="cuda")
        v = r.get("time_vs_plain") if r else None
        out.append({"issue": 11, "what": what, "measured": v, "target": "<= 1.5",
                    "met": None if v is None else v <= 1.5, "unit": "x plain time"})
    for config, arch in (("resnet18-gn-32px-b4", "ResNet-18 GN"), ("resnet50-64px-b2", "ResNet-50 BN eval")):
        r = _newest(rows, op=OP, provider="kdfast", mode="census", config=config)
        v = r["ratio_to_plain"] if r else None
        out.append({"issue": 11, "what": f"op/launch census of per_example_grad_norms, {arch}, vs plain fwd+bwd",
                    "measured": v, "target": f"<= {CENSUS_TARGET}", "met": None if v is None else v <= CENSUS_TARGET,
                    "unit": "x plain kernel launches"})
    for arch in ZOO:
        for config, device, target in ((f"{arch}-224px-b64", "cuda", 1.5), (f"{arch}-224px-b2", "cpu", 2.0)):
            r = _newest(rows, op=OP, provider="kdfast", mode="full", config=config, device_type=device)
            v = r.get("time_vs_plain") if r else None
            out.append({"issue": 22, "what": f"per_example_grad_norms {config} vs plain fwd+bwd ({device.upper()})",
                        "measured": v, "target": f"<= {target}", "met": None if v is None else v <= target,
                        "unit": "x plain time"})
        r = _newest(rows, op=OP, provider="kdfast", mode="census", config=f"{arch}-32px-b2")
        v = r["ratio_to_plain"] if r else None
        out.append({"issue": 22, "what": f"op/launch census of per_example_grad_norms, {arch}, vs plain fwd+bwd",
                    "measured": v, "target": f"<= {CENSUS_TARGET}", "met": None if v is None else v <= CENSUS_TARGET,
                    "unit": "x plain kernel launches"})
    r = _newest(rows, op=OP, mode="cost_model", config="cost-model-resnet50", device_type="cuda")
    v = r["ratio_to_best"] if r else None
    out.append({"issue": 11, "what": "Gram/direct cost model: time of its per-layer choices vs the best form, "
                "ResNet-50 b64 bf16 (GPU)", "measured": v, "target": "<= 1.05", "met": None if v is None else v <= 1.05,
                "unit": "x best forms' time"})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="+", help="config names (default: all of the device's)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--reps", type=int, default=5, help="timed rounds per provider on the CPU")
    parser.add_argument("--smoke", action="store_true", help="a tiny CNN on the CPU only (seconds)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--census", action="store_true", help="the op/launch census only")
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
    command = " ".join(["python", "-m", "bench.perf.bench_grad_norms", *sys.argv[1:]])
    rows = (census_rows(smoke=args.smoke, command=command) if args.census else
            run(device=device, smoke=args.smoke, configs=args.configs, providers=args.providers, reps=args.reps,
                command=command))
    return report(rows, format_table(rows), args.out)


if __name__ == "__main__":
    sys.exit(main())
