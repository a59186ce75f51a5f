"""Held-out splits for data sets without a test split: stratified by class and seeded."""
from __future__ import annotations

import torch

from kdfast.runtime import checks
from kdfast.runtime.checks import require


def stratified_split(targets, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices), both sorted int64: round(fraction * n_c) examples of each class c
    are held out (at least one of every class with two or more examples), drawn with a generator seeded by
    `seed`, so the split is the same on every machine."""
    require("stratified_split", checks.fraction("fraction", fraction, closed_high=False, expected="in (0, 1)"))
    targets = torch.as_tensor(targets, dtype=torch.int64).reshape(-1)
    gen = torch.Generator().manual_seed(int(seed))
    held = []
    _, counts = torch.unique(targets, return_counts=True)  # classes sorted
    # each class's indices, ascending: one stable sort by label, not one comparison pass per class
    for members in torch.split(torch.argsort(targets, stable=True), counts.tolist()):
        k = int(round(fraction * len(members)))
        k = min(max(k, 1 if len(members) >= 2 else 0), len(members) - 1)
        held.append(members[torch.randperm(len(members), generator=gen)[:k]])
    val = torch.sort(torch.cat(held)).values if held else torch.empty(0, dtype=torch.int64)
    mask = torch.ones(len(targets), dtype=torch.bool)
    mask[val] = False
    return torch.nonzero(mask).reshape(-1), val
