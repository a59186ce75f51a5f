"""SVHN (cropped digits) from torchvision's on-disk layout, never downloaded here:

    ROOT/{train,test,extra}_32x32.mat    (MATLAB files: X (32, 32, 3, N) uint8, y (N, 1) with 10 meaning 0)
"""
from __future__ import annotations

import os

import numpy as np
import torch

from kdfast.data.base import DataError, LabeledDataset, normalize, random_crop_flip

SPLITS = ("train", "test", "extra")
_MEAN, _STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
LAYOUT = ("ROOT/{train,test,extra}_32x32.mat (torchvision's layout; download it once with "
          "torchvision.datasets.SVHN(ROOT, split, download=True))")


class SVHN(LabeledDataset):
    def __init__(self, root: str, split: str = "train", augment: bool = False):
        path = os.path.join(root, f"{split}_32x32.mat")
        if not os.path.isfile(path):
            raise DataError(f"dataset 'svhn': {path} not found; expected {LAYOUT}")
        try:
            import scipy.io
            mat = scipy.io.loadmat(path)
            images = np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1)), dtype=np.uint8)
            labels = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
            labels[labels == 10] = 0  # the files store digit 0 as 10
        except ImportError as exc:
            raise DataError("dataset 'svhn' needs scipy to read its .mat files: pip install scipy") from exc
        except Exception as exc:
            raise DataError(f"dataset 'svhn': cannot read {path} ({type(exc).__name__}: {exc}); expected "
                            f"{LAYOUT}") from exc
        if len(labels) != len(images):
            raise DataError(f"dataset 'svhn': {len(images)} images but {len(labels)} labels in {path}")
        self.images = torch.from_numpy(images)
        self.augment = augment
        super().__init__("svhn", labels, 10)

    def load(self, index: int) -> torch.Tensor:
        x = normalize(self.images[index].float() / 255.0, _MEAN, _STD)
        return random_crop_flip(x, 4, flip=False) if self.augment else x
