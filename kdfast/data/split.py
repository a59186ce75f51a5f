"""Held-out splits for data sets without a test split: stratified by class and seeded."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kdfast.runtime import checks
from kdfast.runtime.arrays import to_numpy
from kdfast.runtime.checks import require

if TYPE_CHECKING:
    import torch


def class_groups(targets) -> list[np.ndarray]:
    """Each class's indices (int64) in `targets`, ascending, classes in label order: one stable sort by label
    (numpy's, a radix sort for 16-bit labels; torch's stable argsort and torch.unique took a second at 1.28M
    examples)."""
    labels = to_numpy(targets).astype(np.int64, copy=False).reshape(-1)
    if len(labels) == 0:
        return []
    if 0 <= labels.min() and labels.max() < 2**16:
        labels = labels.astype(np.uint16)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    return np.split(order.astype(np.int64, copy=False), bounds)


def stratified_split(targets, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices), both sorted int64: round(fraction * n_c) examples of each class c
    are held out (at least one of every class with two or more examples), drawn with a generator seeded by
    `seed`, so the split is the same on every machine."""
    import torch
    require("stratified_split", checks.fraction("fraction", fraction, closed_high=False, expected="in (0, 1)"))
    targets = torch.as_tensor(targets, dtype=torch.int64).reshape(-1)
    gen = torch.Generator().manual_seed(int(seed))
    held = []
    for members in class_groups(targets):
        k = int(round(fraction * len(members)))
        k = min(max(k, 1 if len(members) >= 2 else 0), len(members) - 1)
        held.append(torch.from_numpy(members)[torch.randperm(len(members), generator=gen)[:k]])
    val = torch.from_numpy(np.sort(torch.cat(held).numpy())) if held else torch.empty(0, dtype=torch.int64)
    mask = torch.ones(len(targets), dtype=torch.bool)
    mask[val] = False
    return torch.nonzero(mask).reshape(-1), val
