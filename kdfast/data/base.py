"""What every data set of kdfast shares: the (input, label) contract, label checks, fingerprints, errors."""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import KDFastError


class DataError(KDFastError, ValueError):
    """A data set root is missing or malformed, an image is unreadable, or a label is out of range."""


def labels_fingerprint(targets) -> str:
    """sha256 hex of the labels as little-endian int64: ties scores and caches to one labelling of one data set."""
    arr = np.ascontiguousarray(torch.as_tensor(targets, dtype=torch.int64).cpu().numpy(), dtype="<i8")
    return hashlib.sha256(arr.tobytes()).hexdigest()


def check_labels(targets: torch.Tensor, num_classes: int, where: str) -> None:
    """Every label must lie in [0, num_classes); the message names the first bad index."""
    bad = (targets < 0) | (targets >= num_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise DataError(f"{where}: label {int(targets[i])} at index {i} is outside [0, {num_classes}) "
                        f"({int(bad.sum())} bad labels in all); the data set is malformed")


class LabeledDataset(Dataset):
    """Map-style data set yielding (input tensor, int label) with `.targets`, `.num_classes`, `.name`.

    `files` lists each example's path relative to the root for file-backed data sets (None otherwise), so
    scores can be keyed by file name.
    """

    def __init__(self, name: str, targets, num_classes: int, *, files: list[str] | None = None):
        self.name = name
        self.targets = torch.as_tensor(targets, dtype=torch.int64).reshape(-1)
        self.num_classes = int(num_classes)
        self.files = files
        check_labels(self.targets, self.num_classes, name)

    def __len__(self) -> int:
        return int(self.targets.numel())

    def load(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, index: int):
        return self.load(int(index)), int(self.targets[index])


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Per-channel (x - mean) / std for a (C, H, W) tensor."""
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool) -> torch.Tensor:
    """The CIFAR training augmentation: zero-pad, crop back at a random offset, mirror half the time."""
    h, w = x.shape[-2:]
    x = torch.nn.functional.pad(x, (padding,) * 4)
    i, j = (int(v) for v in torch.randint(0, 2 * padding + 1, (2,)))
    x = x[..., i:i + h, j:j + w]
    if flip and bool(torch.rand(()) < 0.5):
        x = x.flip(-1)
    return x
