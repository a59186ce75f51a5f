"""Shard data sets' index cost: scanning a WebDataset tar's headers (per 1000 samples), loading many shards from
their `.idx.npz` sidecars against scanning them all, and positioned reads of images in random order.

The shards are written to a temporary folder first, so they sit in the page cache: the scan measures tar header
parsing and label reads, not the disk. Image bytes are random (the index never decodes them).

    python -m bench.perf.bench_shard_index [--samples 1000] [--image-kb 20] [--shards 1000] [--per-shard 10]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def write_shard(path: str, first: int, count: int, image_bytes: int, rng) -> None:
    import webdataset as wds
    with wds.TarWriter(path) as sink:
        for i in range(first, first + count):
            sink.write({"__key__": f"k{i:08d}", "jpg": rng.bytes(image_bytes), "cls": i % 1000})


def best_of(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1000, help="samples in the shard whose scan is timed")
    ap.add_argument("--image-kb", type=int, default=20)
    ap.add_argument("--shards", type=int, default=1000, help="shards loaded with and without sidecars")
    ap.add_argument("--per-shard", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from kdfast.data import load_dataset
    from kdfast.data.shard_index import save_index
    from kdfast.data.wds_source import index_options, scan_shard
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        one = os.path.join(tmp, "one.tar")
        write_shard(one, 0, args.samples, args.image_kb * 1024, rng)
        scan = best_of(lambda: scan_shard(one), args.rounds)
        print(f"scan of one shard: {args.samples} samples of {args.image_kb} KB in {scan * 1e3:.1f} ms "
              f"= {scan * 1e3 * 1000 / args.samples:.1f} ms per 1000 samples")
        folder = os.path.join(tmp, "many")
        os.makedirs(folder)
        for k in range(args.shards):
            write_shard(os.path.join(folder, f"s-{k:06d}.tar"), k * args.per_shard, args.per_shard, 1024, rng)
        pattern = f"wds:{folder}/s-{{000000..{args.shards - 1:06d}}}.tar"
        scanned = best_of(lambda: load_dataset(pattern), 1)
        for k in range(args.shards):
            path = os.path.join(folder, f"s-{k:06d}.tar")
            save_index(path + ".idx.npz", path, scan_shard(path), index_options(None, None))
        sidecars = best_of(lambda: load_dataset(pattern), args.rounds)
        n = args.shards * args.per_shard
        print(f"load_dataset of {args.shards} shards ({n} samples): {sidecars:.3f} s from sidecars, "
              f"{scanned:.3f} s scanning every tar")
        data = load_dataset(pattern)
        order = rng.permutation(n)[:5000]
        reads = best_of(lambda: [data.read(int(i)) for i in order], args.rounds)
        print(f"random-order reads of 1 KB images: {len(order) / reads:,.0f} per s (one process)")


if __name__ == "__main__":
    main()
