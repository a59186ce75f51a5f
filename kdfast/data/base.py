"""What every data set of kdfast shares: the (input, label) contract, label checks, fingerprints, errors."""
from __future__ import annotations

import functools

import torch
from torch.utils.data import Dataset, Subset

from kdfast.data.digests import expect_digests as _expect_digests
from kdfast.data.identity import FileList, as_file_list, files_fingerprint
from kdfast.errors import DataError, InvalidArgumentError


class LabelError(DataError, InvalidArgumentError):
    """A label outside [0, num_classes): the one error of every label-range check (data sets, scoring)."""


def check_labels(targets: torch.Tensor, num_classes: int, where: str, *, indices=None,
                 why: str = "the data set is malformed") -> None:
    """Every label must lie in [0, num_classes); LabelError naming the first bad one and its dataset index
    (`indices[j]` for a batch, else its position)."""
    bad = (targets < 0) | (targets >= num_classes)
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        at = f"of dataset index {int(indices[j])}" if indices is not None else f"at index {j}"
        raise LabelError(f"{where}: label {int(targets[j])} {at} is outside [0, {num_classes}) "
                         f"({int(bad.sum())} bad labels in all); {why}")


class LabeledDataset(Dataset):
    """Map-style data set yielding (input tensor, int label) with `.targets`, `.num_classes`, `.name`.

    `files` lists each example's path relative to the root for file-backed data sets (None otherwise), so
    scores can be keyed by file name. Data sets that read files set `digests`, a DigestTable of the crc32 of the
    bytes each example read (data/digests.py), which `expect_digests` checks reads against.
    """

    digests = None

    def __init__(self, name: str, targets, num_classes: int, *, files: list[str] | None = None):
        self.name = name
        self.targets = torch.as_tensor(targets, dtype=torch.int64).reshape(-1)
        self.num_classes = int(num_classes)
        # file-backed sets set .folder first; their files carry each file's size and mtime, stat'ed once per run
        folder = getattr(self, "folder", None)
        self.files = None if files is None else files if isinstance(files, FileList) and files.folder == folder \
            else FileList(files, folder=folder)
        check_labels(self.targets, self.num_classes, name)

    def __len__(self) -> int:
        return int(self.targets.numel())

    @functools.cached_property
    def files_fingerprint(self) -> str | None:
        """sha256 of the relative paths, sizes and mtimes of `files` (data/identity.py); None without files."""
        return None if self.files is None else files_fingerprint(self.folder, self.files)

    def expect_digests(self, digests, *, what: str, hint: str = "restore the file, or remake it from the data as it "
                       "is now") -> None:
        """A later read of example i whose bytes' crc32 is not `digests[i]` raises DigestMismatchError naming the
        file, `what` (the artifact the digests come from) and `hint`; nothing for data sets that read no files."""
        _expect_digests(self, digests, what=what, hint=hint)

    def load(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, index: int):
        return self.load(int(index)), int(self.targets[index])


class LabeledSubset(Subset):
    """The examples `indices` of a LabeledDataset, itself one: `.targets`, `.num_classes`, `.name`, `.files`,
    `.folder` and `.classes` describe the subset; `load(i)` and items come from the parent's index `indices[i]`.
    A torch Subset, so code that looks through Subsets (batch pipelines) still finds the parent."""

    def __init__(self, dataset: LabeledDataset, indices):
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        super().__init__(dataset, idx.tolist())
        self.targets = dataset.targets[idx]
        self.num_classes, self.name = dataset.num_classes, dataset.name
        self.folder = getattr(dataset, "folder", None)
        self.files = None if dataset.files is None else as_file_list(dataset.files, self.folder).take(idx)
        self.classes = getattr(dataset, "classes", None)
        if getattr(dataset, "shards", None) is not None:  # shard data sets: the subset's keys; the first n examples
            # (--limit) the shards cut at n, which scoring works through; other subsets record the parent's shards
            from kdfast.data.shard_index import cut_shards
            self.keys = dataset.keys.take(self.indices)
            prefix = bool(torch.equal(idx, torch.arange(len(idx))))
            self.shards = cut_shards(dataset.shards, len(idx)) if prefix else dataset.shards

    files_fingerprint = LabeledDataset.files_fingerprint
    expect_digests = LabeledDataset.expect_digests  # mapped to the parent's rows (data/digests.py)

    def load(self, index: int) -> torch.Tensor:
        return self.dataset.load(self.indices[int(index)])


def class_names(dataset) -> list[str]:
    """Names of the classes: the folder names of image folders, else the class indices as text."""
    classes = getattr(dataset, "classes", None)
    return list(classes) if classes else [str(c) for c in range(dataset.num_classes)]


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
