"""Held-out splits for data sets without a test split: stratified by class and seeded."""
from __future__ import annotations

import numpy as np
import torch

from kdfast.runtime import checks
from kdfast.runtime.checks import require


def stratified_split(targets, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices), both sorted int64: round(fraction * n_c) examples of each class c
    are held out (at least one of every class with two or more examples), drawn with a generator seeded by
    `seed`, so the split is the same on every machine."""
    require("stratified_split", checks.fraction("fraction", fraction, closed_high=False, expected="in (0, 1)"))
    targets = torch.as_tensor(targets, dtype=torch.int64).reshape(-1).numpy()
    gen = torch.Generator().manual_seed(int(seed))
    # each class's indices, ascending, classes sorted: one stable sort by label (numpy's: a radix sort, where
    # torch's unique + argsort take ~50x longer at ImageNet's 1.28M labels)
    order = np.argsort(targets, kind="stable")
    ordered = targets[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]])) if len(order) else []
    held = []
    for members in np.split(order, starts[1:]):
        k = int(round(fraction * len(members)))
        k = min(max(k, 1 if len(members) >= 2 else 0), len(members) - 1)
        held.append(members[torch.randperm(len(members), generator=gen)[:k].numpy()])  # the draws torch made
    val = np.sort(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
    mask = np.ones(len(targets), dtype=bool)
    mask[val] = False
    return torch.from_numpy(np.flatnonzero(mask).astype(np.int64)), torch.from_numpy(val.astype(np.int64))
