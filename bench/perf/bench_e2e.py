"""End-to-end scoring throughput from a folder of JPEG files, against the ceilings measured in the same run.

    python -m bench.run --only e2e                      # ResNet-50, 224 px, batch 256, bf16 on a GPU
    python -m bench.perf.bench_e2e --device cpu              # a small model on the CPU (500x375 JPEGs, 64 px crop)

The benchmark writes its own ImageNet-like JPEGs (500x375, about 110 kB at quality 90: smooth colour fields
at several scales, a gradient and luminance grain, so they compress like photographs) in the ImageNet layout
under the system temp dir, once, and reuses them. Rows (images/s in each):

    read            the loader workers' job alone: file bytes into uint8 tensors, one process, page cache warm
    receive-per-image, receive-flat
                    the main process receiving one batch of file bytes from a loader worker (the worker's batches
                    already queued: unpickling and mapping the shared memory only), as one tensor per image
                    (a plain collate) and as the one flat buffer + offsets kdfast's workers send
    decode-batched  decode + resize + crop + normalise of a batch already in memory on the decode device
                    (nvJPEG on a GPU; on the CPU one core, `images_per_s_workers` scales it to the workers)
    decode-pil      the PIL path (imagefolder.py) per core; `images_per_s_all_cores` scales it to the machine
    inference       model(x) on a synthetic in-memory batch (bf16 autocast + channels_last on a GPU)
    fwd+bwd         forward + backward of the mean cross-entropy on the same batch
    score-el2n, score-grand
                    BatchScorer alone on the in-memory batch (the model-only scoring throughput)
    e2e-el2n, e2e-grand
                    kdfast's score_batches over the folder (decode="auto": on the GPU when there is one),
                    steady state: from the first batch's arrival to the last (worker start-up excluded).
                    `ratio_to_ceiling`: el2n against min(decode, inference), grand against score-grand (issue
                    12's targets: >= 0.80 for both on one H100 or H200; >= 0.90 on the CPU); `stages_ms`: read,
                    decode, model and loss
                    per batch, each timed alone in one process (model = the forward, loss = the rest of the
                    BatchScorer call: the fused loss's stats, or for grand the backward and the norms).
The per-batch median and p20/p80 of the e2e rows are over passes. With a few hundred files a GPU pass would
be too short, so the GPU config visits each file `repeats` times (files served from the page cache).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from kdfast.data import load_dataset
from kdfast.data.gpu_decode import collate_encoded, resolve_decode_device
from kdfast.data.imagefolder import IMAGENET_LAYOUT, ImageFolderDataset
from kdfast.models import create_model
from kdfast.scoring import BatchScorer, get_method, score_batches

from bench.common import make_row, report, sync, time_ms

OP = "e2e"
CACHE_ROOT = Path(tempfile.gettempdir()) / "kdfast-bench-e2e"
GENERATOR_VERSION = 1  # bump when the image generator changes, so stale caches are not reused


@dataclass(frozen=True)
class Config:
    model: str
    crop: int
    batch: int
    num_classes: int
    precision: str
    files: int
    width: int
    height: int
    repeats: int  # visits of each file per pass
    workers: int
    passes: int


GPU_CONFIGS = {"resnet50-224px-b256-bf16": Config("resnet50", 224, 256, 1000, "bf16", files=512, width=500,
                                                  height=375, repeats=8, workers=12, passes=5)}
CPU_CONFIGS = {"resnet8-64px-b32": Config("resnet8", 64, 32, 10, "fp32", files=128, width=500, height=375,
                                          repeats=1, workers=2, passes=3)}
SMOKE_CONFIGS = {"cnn-16px-b4": Config("cnn", 16, 4, 10, "fp32", files=12, width=64, height=48, repeats=1,
                                       workers=0, passes=1)}
ALL_CONFIGS = {**GPU_CONFIGS, **CPU_CONFIGS, **SMOKE_CONFIGS}
CLASSES = 8  # wnid folders; every config's model has at least this many outputs


def natural_image(rng: np.random.Generator, width: int, height: int):
    """Colour fields at 64/16/4/2 px scales + a horizontal gradient + per-pixel luminance grain (PIL image)."""
    from PIL import Image
    a = np.zeros((height, width, 3), np.float32)
    for scale, weight in ((64, 1.0), (16, 0.6), (4, 0.5), (2, 0.5)):
        field = rng.normal(0, 1, (height // scale + 2, width // scale + 2, 3)).astype(np.float32)
        a += weight * np.stack([np.asarray(Image.fromarray(field[..., k], mode="F").resize((width, height),
                                                                                           Image.BICUBIC))
                                for k in range(3)], -1)
    a = 128 + 45 * a + 8 * rng.normal(0, 1, (height, width, 1)).astype(np.float32)
    a += np.linspace(-30, 30, width, dtype=np.float32)[None, :, None]
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def jpeg_folder(cfg: Config) -> Path:
    """ROOT (holding ROOT/train/<wnid>/*.JPEG) for this config's files, written once and reused."""
    root = CACHE_ROOT / f"v{GENERATOR_VERSION}-{cfg.files}x{cfg.width}x{cfg.height}"
    done = root / "complete"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    for i in range(cfg.files):
        wnid = f"n{i % CLASSES:08d}"
        (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
        natural_image(rng, cfg.width, cfg.height).save(root / "train" / wnid / f"{wnid}_{i}.JPEG", quality=90)
    done.write_text("written by bench/perf/bench_e2e.py\n")  # last: an interrupted write is redone, not reused
    return root


def _rate(batch: int, ms: float) -> float:
    return batch / (ms * 1e-3)


def _serial_ms(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) * 1e3 / n


class _InMemoryBytes(Dataset):
    """Items as the byte-reading folder yields them, from memory: the worker does no I/O."""

    def __init__(self, datas):
        self.datas = datas

    def __len__(self):
        return len(self.datas)

    def __getitem__(self, i):
        return self.datas[i], 0, i


def _collate_per_image(items):
    """What a plain collate sends for variable-length files: one tensor per image."""
    datas, labels, indices = zip(*items)
    return list(datas), torch.tensor(labels), torch.tensor(indices)


def receive_ms(datas, batch: int, collate, batches: int = 4) -> float:
    """Main-process ms per batch to take `batches` batches from one loader worker that has already queued
    them: the receive cost alone (shared-memory handles, unpickling), not the worker's."""
    loader = DataLoader(_InMemoryBytes(datas * (batches + 1)), batch_size=batch, num_workers=1, collate_fn=collate,
                        prefetch_factor=batches)
    it = iter(loader)
    t0 = time.perf_counter()
    next(it)  # the worker is up
    time.sleep(max(0.5, 4 * (time.perf_counter() - t0)))  # ... and has queued the rest
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    ms = (time.perf_counter() - t0) * 1e3 / batches
    del it
    return ms


def e2e_pass(model, data, method, cfg: Config, device) -> tuple[float, int, np.ndarray]:
    """(seconds from the first batch's arrival to the end, images after the first batch, scores).

    Needs at least two batches (every config has them)."""
    t_first, counted, scores = None, 0, []
    for idx, values, _ in score_batches([model], data, method, batch_size=cfg.batch, num_workers=cfg.workers,
                                        device=device, precision=cfg.precision):
        if t_first is None:
            t_first = time.perf_counter()
        else:
            counted += len(idx)
        scores.append(values[:, 0].numpy())
    sync(device)
    return time.perf_counter() - t_first, counted, np.concatenate(scores)


def bench_config(name: str, cfg: Config, device: torch.device, quick: bool, emit=None, deadline=None) -> list[dict]:
    torch.manual_seed(0)
    root = jpeg_folder(cfg)
    rep = dict(warmup_ms=10.0, rep_ms=30.0, min_reps=3) if quick else dict(warmup_ms=200.0, rep_ms=1500.0)
    data = load_dataset("imagenet", root=str(root), decode="auto", image_size=cfg.crop)
    pil = ImageFolderDataset("imagenet", str(root / "train"), IMAGENET_LAYOUT, image_size=cfg.crop)
    n = len(data) * cfg.repeats
    decode_on = resolve_decode_device("auto", device)
    model = create_model(cfg.model, num_classes=cfg.num_classes, in_channels=3, image_size=cfg.crop)
    model.to(device).eval()
    shape, dtype = (cfg.batch, 3, cfg.crop, cfg.crop), torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    kb = float(np.mean([os.path.getsize(root / "train" / f) for f in data.files])) / 1e3
    common = dict(config=name, model=cfg.model, files=len(data), file_kb=kb, image=f"{cfg.width}x{cfg.height}",
                  decode_device=decode_on.type, workers=cfg.workers,
                  command=" ".join(["python", "-m", "bench.perf.bench_e2e", *sys.argv[1:]]))
    rows = []

    def row(provider, mode, med, p20, p80, **extra):
        rows.append(make_row(op=OP, provider=provider, mode=mode, shape=shape, dtype=dtype, device=device, ms=med,
                             p20=p20, p80=p80, images_per_s=_rate(cfg.batch, med), **common, **extra))
        if emit is not None:
            emit(rows[-1])
        return rows[-1]

    batch_ids = [i % len(data) for i in range(cfg.batch)]
    read_ms = _serial_ms(lambda: [data.read(i) for i in batch_ids], 1 if quick else 3)
    row("read", "forward", read_ms, read_ms, read_ms)
    datas = [data.read(i) for i in batch_ids]
    per_image = min(receive_ms(datas, cfg.batch, _collate_per_image) for _ in range(1 if quick else 3))
    flat = min(receive_ms(datas, cfg.batch, collate_encoded) for _ in range(1 if quick else 3))
    row("receive-per-image", "forward", per_image, per_image, per_image)
    row("receive-flat", "forward", flat, flat, flat, ratio_to_per_image=flat / per_image)
    names = [data.files[i] for i in batch_ids]
    decode_ms = time_ms(lambda: data.decoder(datas, decode_on, names), device, **rep)
    # the row is emitted as it is made: its fields are complete before that
    workers = {"images_per_s_workers": _rate(cfg.batch, decode_ms[0]) * max(1, cfg.workers)} \
        if decode_on.type == "cpu" else {}
    decode = row("decode-batched", "forward", *decode_ms, **workers)
    cores = os.cpu_count() or 1
    pil_ms = _serial_ms(lambda: [pil.load(i) for i in batch_ids], 1)
    row("decode-pil", "forward", pil_ms, pil_ms, pil_ms, images_per_s_all_cores=_rate(cfg.batch, pil_ms) * cores,
        cores=cores)
    decode_rate = decode.get("images_per_s_workers", decode["images_per_s"])

    # model-only ceilings on a synthetic in-memory batch, as the scorer sees it (channels_last on a GPU)
    y = torch.randint(0, cfg.num_classes, (cfg.batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    with BatchScorer([model], get_method("el2n"), device=device, precision=cfg.precision) as scorer:
        x = scorer.prepare(torch.randn(shape, device=device))

    def inference():
        with torch.no_grad(), autocast:
            return model(x)

    def forward_with_graph():
        with autocast:
            return model(x)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
    infer = row("inference", "forward", *time_ms(inference, device, **rep))
    row("fwd+bwd", "full", *time_ms(fwd_bwd, device, **rep))
    fwd_graph_ms = time_ms(forward_with_graph, device, **rep)[0]
    model.zero_grad(set_to_none=True)

    items = Subset(data, [i % len(data) for i in range(n)]) if cfg.repeats > 1 else data
    for method_name, mode, model_ms in (("el2n", "forward", infer["ms"]), ("grand", "full", fwd_graph_ms)):
        if deadline is not None and time.perf_counter() > deadline:
            rows.append(make_row(op=OP, provider=f"e2e-{method_name}", mode="skipped", shape=shape, dtype=dtype,
                                 device=device, note="budget spent", **common))
            if emit is not None:
                emit(rows[-1])
            continue
        method = get_method(method_name)
        with BatchScorer([model], method, device=device, precision=cfg.precision) as scorer:
            alone = row(f"score-{method_name}", mode, *time_ms(lambda: scorer(x, y), device, **rep))
        score_ms = alone["ms"]
        ceiling, ceiling_name = ((min(decode_rate, infer["images_per_s"]), "min(decode, inference)")
                                 if method_name == "el2n" else (alone["images_per_s"], "score-grand"))
        passes = [e2e_pass(model, items, method, cfg, device) for _ in range(1 if quick else cfg.passes)]
        # ms per batch in the steady state: the first batch (worker start-up, pipeline fill) is left out
        per_batch = [seconds * 1e3 * cfg.batch / counted for seconds, counted, _ in passes]
        med, p20, p80 = (float(np.quantile(per_batch, q)) for q in (0.5, 0.2, 0.8))
        ips = _rate(cfg.batch, med)
        row(f"e2e-{method_name}", mode, med, p20, p80,
            stages_ms={"read": read_ms, "receive": flat, "decode": decode["ms"], "model": model_ms,
                       "loss": max(0.0, score_ms - model_ms)},
            images_scored=n, images_timed=passes[0][1], ceiling=ceiling_name, ceiling_images_per_s=ceiling,
            scores_finite=bool(all(np.isfinite(p[2]).all() and len(p[2]) == n for p in passes)),
            ratio_to_ceiling=ips / ceiling, ratio_to_floor=ceiling / ips)
    return rows


def run(*, device, quick: bool = False, smoke: bool = False, budget_s: float | None = None, emit=None,
        configs=None) -> list[dict]:
    """The `bench.run` entry point: rows for this device's configurations, each emitted as it is measured;
    once `budget_s` is spent no new configuration (or e2e method) starts and a "skipped" row says so."""
    device = torch.device(device)
    table = SMOKE_CONFIGS if smoke else (GPU_CONFIGS if device.type == "cuda" else CPU_CONFIGS)
    deadline = None if budget_s is None else time.perf_counter() + budget_s
    rows = []
    for name in configs or table:
        cfg = ALL_CONFIGS[name]
        if deadline is not None and rows and time.perf_counter() > deadline:
            rows.append(make_row(op=OP, provider="all", mode="skipped", shape=(cfg.batch, 3, cfg.crop, cfg.crop),
                                 dtype=torch.float32, device=device, config=name,
                                 note=f"budget of {budget_s:.0f} s spent before config {name}"))
            if emit is not None:
                emit(rows[-1])
            continue
        rows += bench_config(name, cfg, device, quick or smoke, emit=emit, deadline=deadline)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def targets(rows: list[dict]) -> list[dict]:
    """The end-to-end scoring targets from the newest e2e rows of each device type."""
    out = []
    for device_type, configs, factor in (("cuda", GPU_CONFIGS, 0.8), ("cpu", CPU_CONFIGS, 0.9)):
        for method, ceiling in (("el2n", "min(decode, inference)"), ("grand", "model-only GraNd (score-grand)")):
            mine = [r for r in rows if r.get("op") == OP and r.get("device_type") == device_type
                    and r.get("config") in configs and r.get("provider") == f"e2e-{method}"
                    and r.get("mode") != "skipped"]
            newest = max(mine, key=lambda r: r["date"]) if mine else None
            ratio = None if newest is None else newest.get("ratio_to_ceiling")
            out.append({"issue": 12, "what": f"end-to-end {method.upper() if method == 'el2n' else 'GraNd'} from "
                        f"JPEG vs {ceiling} ({device_type})", "measured": ratio, "target": f">= {factor}",
                        "met": None if ratio is None else ratio >= factor, "unit": "x ceiling"})
    return out


def format_table(rows) -> str:
    head = f"{'config':26} {'provider':15} {'ms/batch':>9} {'images/s':>10} {'x ceiling':>9}  stages ms"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = r.get("ratio_to_ceiling")
        stages = " ".join(f"{k}={v:.1f}" for k, v in (r.get("stages_ms") or {}).items())
        if r["mode"] == "skipped":
            lines.append(f"{r.get('config', ''):26} {r['provider']:15} skipped: {r['note']}")
            continue
        lines.append(f"{r['config']:26} {r['provider']:15} {r['ms']:9.2f} {r['images_per_s']:10.0f} "
                     f"{'' if ratio is None else format(ratio, '9.2f'):>9}  {stages}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="+", choices=sorted(ALL_CONFIGS))
    parser.add_argument("--quick", action="store_true", help="one pass, shorter timing loops")
    parser.add_argument("--out", type=Path, help="append JSON rows to this file (bench/results/results.jsonl)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    rows = run(device=device, quick=args.quick, configs=args.configs)
    return report(rows, format_table(rows), args.out)


if __name__ == "__main__":
    sys.exit(main())
