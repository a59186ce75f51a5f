"""scikit-learn's bundled 8x8 digits: 1797 images, 10 classes, offline (the embedded default data set).

There is no official split; "train" and "test" come from one fixed permutation (seed 0, 400 test images),
each kept in the original order; "all" is all 1797.
"""
from __future__ import annotations

import torch

from kdfast.data.base import DataError, LabeledDataset

SPLITS = ("train", "test", "all")
NUM_TEST = 400


class Digits(LabeledDataset):
    def __init__(self, split: str = "train"):
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise DataError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from exc
        bunch = load_digits()
        images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
        labels = torch.tensor(bunch.target, dtype=torch.int64)
        if split != "all":
            perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
            keep = perm[NUM_TEST:] if split == "train" else perm[:NUM_TEST]
            keep = keep.sort().values
            images, labels = images[keep], labels[keep]
        self.images = images
        super().__init__("digits", labels, 10)

    def load(self, index: int) -> torch.Tensor:
        return self.images[index]
