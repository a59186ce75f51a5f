"""The cost of content digests (kdfast.data.digests) in CPU scoring of an image folder, as a ratio.

    python -m bench.run --only digests                  # 300 JPEGs of 500x375, resnet8 at 64 px, EL2N, 1 thread
    python -m bench.perf.bench_digests [--files 300] [--rounds 5]

The benchmark writes its own photograph-like JPEGs (bench_e2e's generator, about 110 kB each at quality 90) into a
temporary folder and scores it with kdfast.score on the PIL path (ImageFolderDataset: decode, resize, crop,
normalise per image), in this process (no loader workers: the digest is computed where the bytes are read, so
in-process timing sees all of it), twice per round, interleaved:

    with-digests     kdfast as it is: each file's bytes read once, crc32'd into the digest table, decoded from
                     memory, and checked against expected digests (set for every row, as a consumer sets them)
    without-digests  the reader as it was before digests: PIL opens the path itself, nothing hashed

Each round times both back to back, in alternating order (ABBA), so drifting load on a shared machine hits both
alike; `ratio_to_without_digests` is the median over rounds of the round's time with digests over its time
without (target <= 1.03), `best_ratio` the best times' ratio. `crc32_share`: the crc32 of every file's bytes
alone (timed over bytes in memory) over the best pass with digests, the hash's own share, which load barely
moves. Both variants must give bitwise the same scores.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from kdfast.data import load_dataset
from kdfast.data.digests import read_digests
from kdfast.data.imagefolder import UNSCALED_MODES, ImageFolderDataset, _sixteen_to_rgb
from kdfast.models import create_model

from bench.common import make_row, report
from bench.perf.bench_e2e import natural_image

OP = "digests"
TARGET = 1.03
CONFIGS = {"resnet8-64px-300x500x375": dict(model="resnet8", crop=64, files=300, width=500, height=375, batch=32,
                                            rounds=8),
           "smoke": dict(model="cnn", crop=16, files=12, width=64, height=48, batch=4, rounds=2)}


def _open_without_digests(self, index: int):
    """ImageFolderDataset._open as it was before digests (PIL reads the path; no hash), as the baseline."""
    from PIL import Image
    with Image.open(os.path.join(self.folder, self.files[index])) as img:
        mode = img.mode
        if mode not in UNSCALED_MODES:
            return _sixteen_to_rgb(img) if mode.startswith("I;16") else img.convert("RGB")
    raise AssertionError(f"unexpected mode {mode}")


def write_folder(root: Path, files: int, width: int, height: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(files):
        cls = root / f"c{i % 4}"
        cls.mkdir(parents=True, exist_ok=True)
        natural_image(rng, width, height).save(cls / f"{i:05d}.jpg", quality=90)


def measure(name: str, cfg: dict, device: torch.device) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="kdfast-bench-digests-"))
    try:
        write_folder(root, cfg["files"], cfg["width"], cfg["height"])
        data = load_dataset("folder", root=root, image_size=cfg["crop"])
        torch.manual_seed(0)
        model = create_model(cfg["model"], num_classes=4, in_channels=3, image_size=cfg["crop"])
        from kdfast.scoring import score

        def run():
            return score(model, data, "el2n", batch_size=cfg["batch"], device=device, progress=False)
        run()  # warm-up, and every row's digest recorded: the expected ones a consumer would set
        data.expect_digests(read_digests(data), what="the benchmark's first pass")
        times = {"with-digests": [], "without-digests": []}
        results = {}
        for r in range(cfg["rounds"]):
            for variant in (list(times) if r % 2 == 0 else list(times)[::-1]):
                patch = mock.patch.object(ImageFolderDataset, "_open", _open_without_digests) \
                    if variant == "without-digests" else mock.patch.object(ImageFolderDataset, "_open",
                                                                            ImageFolderDataset._open)
                with patch:
                    tic = time.perf_counter()
                    results[variant] = run()
                    times[variant].append(time.perf_counter() - tic)
        same = torch.equal(results["with-digests"], results["without-digests"])
        best = {variant: min(ts) for variant, ts in times.items()}
        ratio = float(np.median(np.array(times["with-digests"]) / np.array(times["without-digests"])))
        raw = [p.read_bytes() for p in root.rglob("*.jpg")]
        tic = time.perf_counter()
        for _ in range(5):
            for b in raw:
                zlib.crc32(b)
        crc32_share = (time.perf_counter() - tic) / 5 / best["with-digests"]
        mean_kb = sum(len(b) for b in raw) / cfg["files"] / 1024
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = []
    for variant, ts in times.items():
        ts = sorted(ts)
        rows.append(make_row(op=OP, provider=variant, mode="forward",
                             shape=(cfg["files"], 3, cfg["crop"], cfg["crop"]), dtype=torch.float32, device=device,
                             ms=best[variant] * 1e3, p20_ms=ts[len(ts) // 5] * 1e3, p80_ms=ts[(4 * len(ts)) // 5] * 1e3,
                             images_per_s=cfg["files"] / best[variant], config=name, model=cfg["model"],
                             threads=torch.get_num_threads(), mean_file_kb=round(mean_kb, 1),
                             same_scores=same, rounds=cfg["rounds"],
                             **({"ratio_to_without_digests": ratio, "crc32_share": crc32_share,
                                 "best_ratio": best["with-digests"] / best["without-digests"]}
                                if variant == "with-digests" else {})))
    return rows


def run(*, device, smoke: bool = False) -> list[dict]:
    """The `bench.run` entry point: one configuration (CPU scoring; on a GPU the decode is still the CPU's)."""
    device = torch.device(device)
    name = "smoke" if smoke else "resnet8-64px-300x500x375"
    return measure(name, CONFIGS[name], device)


def targets(rows: list[dict]) -> list[dict]:
    mine = [r for r in rows if r.get("op") == OP and r.get("provider") == "with-digests"
            and r.get("config") != "smoke" and r.get("device_type") == "cpu"]
    newest = max(mine, key=lambda r: r["date"]) if mine else None
    ratio = None if newest is None else newest.get("ratio_to_without_digests")
    return [{"issue": "digests", "what": "CPU image-folder scoring with content digests vs without",
             "measured": ratio, "target": f"<= {TARGET}", "met": None if ratio is None else ratio <= TARGET,
             "unit": "x time without"}]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=CONFIGS["resnet8-64px-300x500x375"]["files"])
    parser.add_argument("--rounds", type=int, default=CONFIGS["resnet8-64px-300x500x375"]["rounds"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = {**CONFIGS["resnet8-64px-300x500x375"], "files": args.files, "rounds": args.rounds}
    rows = measure("resnet8-64px-300x500x375", cfg, torch.device("cpu"))
    table = "\n".join(f"{r['provider']:>16}: best {r['ms'] / 1e3:.3f} s ({r['images_per_s']:.0f} images/s)"
                      + (f", {r['ratio_to_without_digests']:.4f}x without (median of rounds; best times "
                         f"{r['best_ratio']:.4f}x), crc32 alone {100 * r['crc32_share']:.2f}% of the pass"
                         if "ratio_to_without_digests" in r else "")
                      for r in rows)
    return report(rows, table + f"\nsame scores: {rows[0]['same_scores']}", args.out)


if __name__ == "__main__":
    raise SystemExit(main())
