"""Tiny on-disk data sets in the layouts kdfast reads (written by the tests themselves, never downloaded)."""
from __future__ import annotations

import os
import pickle
import time
from collections import namedtuple

import numpy as np
import torch

from kdfast.data import LabeledDataset
from kdfast.data.shard_index import KeyList, Shard


def write_cifar(root, name="cifar10", n=12, labels=None, seed=0):
    """A CIFAR tree with n images per batch file; returns (images (N, 3, 32, 32) uint8, labels) in file order."""
    rng = np.random.default_rng(seed)
    folder, files, key, classes = (("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                                    b"labels", 10) if name == "cifar10" else
                                   ("cifar-100-python", ["train", "test"], b"fine_labels", 100))
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    all_x, all_y = [], []
    for f in files:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = list(rng.integers(0, classes, n)) if labels is None else list(labels)
        with open(os.path.join(root, folder, f), "wb") as fh:
            pickle.dump({b"data": x, key: y}, fh)
        if f not in ("test_batch", "test"):
            all_x.append(x.reshape(-1, 3, 32, 32))
            all_y += [int(v) for v in y]
    return np.concatenate(all_x), np.asarray(all_y)


def write_svhn(root, split="train", n=10, seed=0):
    import scipy.io
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1))  # SVHN stores digit 0 as 10
    scipy.io.savemat(os.path.join(root, f"{split}_32x32.mat"), {"X": x, "y": y})
    return np.transpose(x, (3, 2, 0, 1)), y.reshape(-1) % 10


def write_image_folder(folder, classes=("cat", "dog", "emu"), per_class=3, size=(20, 14), seed=0):
    """ImageFolder tree of PNG and JPEG files; returns the relative paths in kdfast's order (class, then path)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    files = []
    for c in classes:
        os.makedirs(os.path.join(folder, c), exist_ok=True)
        for i in range(per_class):
            ext = ".png" if i % 2 else ".JPEG"
            img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
            img.save(os.path.join(folder, c, f"img{i}{ext}"))
            files.append(os.path.join(c, f"img{i}{ext}"))
    return files




class KeyedTensors(LabeledDataset):
    """A keyed, sharded source over in-memory tensors, as webdataset / Parquet sources expose it: `.keys` (one
    string per example) and `.shards` (Shard records in index order), `.files` None. `delay` seconds of sleep per
    loaded example stretch a run so a test can kill it mid-way."""

    def __init__(self, x, y, keys, shard_sizes, num_classes=10, name="keyed", delay=0.0):
        super().__init__(name, y, num_classes)
        self.x, self.keys, self.delay = x, KeyList.from_strings(keys), delay
        bounds = np.cumsum([0, *shard_sizes]).tolist()
        assert bounds[-1] == len(self.keys) == len(self.x)
        self.shards = [Shard(f"train-{i:04d}.tar", a, b, 1000 + 17 * i, 1_700_000_000_000_000_000 + i)
                       for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]

    def load(self, index):
        if self.delay:
            time.sleep(self.delay)
        return self.x[index]


def digit_keys(n, seed=0):
    """n distinct keys in no relation to their positions (webdataset-style `__key__`s)."""
    order = np.random.default_rng(seed).permutation(10 * n)[:n]
    return [f"n{k % 7:02d}/img_{k:06d}" for k in order]


def keyed_digits(n=120, shard_sizes=(17, 0, 40, 23, 31, 9), delay=0.0, seed=0):
    """The first n scikit-learn digits (1x8x8) as a keyed source in uneven shards (one empty)."""
    from kdfast.data import load_dataset
    digits = load_dataset("digits")
    x = torch.stack([digits.load(i) for i in range(n)])
    return KeyedTensors(x, digits.targets[:n], digit_keys(n, seed), shard_sizes, delay=delay)
def replace_keeping_size_and_mtime(path, color=(200, 30, 90)):
    """Rewrites the image at `path` as a plain `color` image of the same dimensions and format, padded after its
    end marker (which decoders ignore) to the old byte size, and restores the old mtime: what the up-front
    (path, size, mtime) fingerprint cannot see. Returns the new bytes."""
    import io

    from PIL import Image
    path = os.fspath(path)
    before, st = open(path, "rb").read(), os.stat(path)
    with Image.open(path) as img:
        size, fmt = img.size, img.format
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    new = buf.getvalue()
    assert len(new) <= len(before), (path, len(new), len(before))
    new += bytes(len(before) - len(new))
    with open(path, "wb") as fh:
        fh.write(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    return new
