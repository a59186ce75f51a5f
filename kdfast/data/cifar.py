"""CIFAR-10 / CIFAR-100 from torchvision's on-disk layout, read directly (never downloaded here):

    ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch}      (pickled dicts: b"data", b"labels")
    ROOT/cifar-100-python/{train, test}                         (pickled dicts: b"data", b"fine_labels")

Images are kept as one uint8 (N, 3, 32, 32) tensor; inputs are normalised with the usual per-channel
statistics; `augment=True` adds the standard random crop (padding 4) and horizontal flip for training.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import torch

from kdfast.data.base import DataError, LabeledDataset, normalize, random_crop_flip

_LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                b"labels", 10, ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, b"fine_labels", 100,
                 ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))),
}
SPLITS = ("train", "test")


def expected_layout(name: str) -> str:
    folder, files, *_ = _LAYOUTS[name]
    return (f"ROOT/{folder}/{{{', '.join(files['train'] + files['test'])}}} (torchvision's python-version "
            f"layout; download it once with torchvision.datasets.{name.upper()}"
            f"(ROOT, download=True))")


class CIFAR(LabeledDataset):
    def __init__(self, name: str, root: str, split: str = "train", augment: bool = False):
        folder, files, label_key, num_classes, (self.mean, self.std) = _LAYOUTS[name]
        data, labels = [], []
        for fname in files[split]:
            path = os.path.join(root, folder, fname)
            if not os.path.isfile(path):
                raise DataError(f"dataset {name!r}: {path} not found; expected {expected_layout(name)}")
            try:
                with open(path, "rb") as f:
                    entry = pickle.load(f, encoding="bytes")
                data.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(int(v) for v in entry[label_key])
            except Exception as exc:  # truncated file, wrong pickle, missing key: all one cause for the user
                raise DataError(f"dataset {name!r}: cannot read {path} ({type(exc).__name__}: {exc}); expected "
                                f"{expected_layout(name)}") from exc
        self.images = torch.from_numpy(np.concatenate(data))
        if len(labels) != len(self.images):
            raise DataError(f"dataset {name!r}: {len(self.images)} images but {len(labels)} labels under "
                            f"{os.path.join(root, folder)}")
        self.augment = augment
        super().__init__(name, labels, num_classes)

    def load(self, index: int) -> torch.Tensor:
        x = normalize(self.images[index].float() / 255.0, self.mean, self.std)
        return random_crop_flip(x, 4, flip=True) if self.augment else x
