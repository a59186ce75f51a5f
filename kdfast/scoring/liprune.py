"""LiPrune over fixed mini-batches (the paper's batch pruning, Algorithm 1 applied to batches).

The data set is cut once into fixed batches by a seeded permutation; batch j's score is
L_j = max |eigenvalue| of the Hessian (or Gauss-Newton matrix) of its mean loss at the current weights,
and every example carries its batch's L_j. Pruning keeps the whole batches with the largest L_j.
"""
from __future__ import annotations

import torch
from torch import nn

from kdfast.errors import InvalidArgumentError
from kdfast.runtime.checks import int_at_least, require
from kdfast.hessian import spectral_norms
from kdfast.runtime.progress import progress_bar
from kdfast.scoring.engine import batch_pipeline


def fixed_batches(num_examples: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Example indices of each fixed batch: consecutive slices of a seeded permutation (last one ragged)."""
    perm = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed))
    return list(perm.split(batch_size))


def _collate(dataset, indices: torch.Tensor, pipeline):
    """(inputs, targets) of one fixed batch. Data sets with a batch pipeline (JPEG folders loaded with
    decode=) yield (bytes, label, index) items that only their pipeline turns into inputs."""
    items = [dataset[i] for i in indices.tolist()]
    if pipeline is not None:
        batch = pipeline.collate_fn(items)
        return (batch[0] if pipeline.to_device is None else pipeline.to_device(batch)), batch[1]
    inputs = torch.stack([torch.as_tensor(item[0]) for item in items])
    targets = torch.as_tensor([int(item[1]) for item in items], dtype=torch.int64)
    return inputs, targets


def _check(model, dataset, batch_size, where):
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    require(where, int_at_least("batch_size", batch_size, 1, expected="an int >= 1"))
    if len(dataset) == 0:
        raise InvalidArgumentError(f"{where}: dataset is empty")


def liprune_batch_scores(model: nn.Module, dataset, batch_size: int, *, seed: int = 0, curvature: str = "hessian",
                         iters: int = 20, tol: float = 1e-3, method: str = "lanczos", device=None,
                         progress: bool = True, loss="ce"):
    """Per-example scores (N,) float32 (each example's batch's L_j) and batch ids (N,) int64.

    `dataset` yields (input, label). The model is scored in eval mode (BatchNorm on running statistics;
    its mode is restored afterwards) on `device` (default: where its parameters are; moved there).
    """
    _check(model, dataset, batch_size, "liprune_batch_scores")
    if device is not None:
        model.to(device)
    batches = fixed_batches(len(dataset), batch_size, seed)
    pipeline = batch_pipeline(dataset, next(model.parameters(), torch.empty(0)).device)
    was_training = model.training
    model.eval()
    try:
        with progress_bar(len(batches), desc="liprune", unit="batch", quiet=not progress) as bar:
            norms = spectral_norms(model, (_collate(dataset, b, pipeline) for b in batches), loss=loss,
                                   curvature=curvature, iters=iters, tol=tol, method=method, seed=seed,
                                   on_batch_done=lambda j: bar.update(1))
    finally:
        model.train(was_training)
    scores = torch.empty(len(dataset), dtype=torch.float32)
    batch_ids = torch.empty(len(dataset), dtype=torch.int64)
    for j, idx in enumerate(batches):
        scores[idx] = norms[j]
        batch_ids[idx] = j
    return scores, batch_ids


def keep_top_batches(scores: torch.Tensor, batch_ids: torch.Tensor, fraction: float) -> torch.Tensor:
    """Dataset indices (ascending) of the round(fraction * num_batches) batches (at least one) with the
    largest scores; ties go to the lower batch id."""
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise InvalidArgumentError(f"liprune_batches: fraction must be in (0, 1], got {fraction!r}")
    num_batches = int(batch_ids.max()) + 1
    per_batch = torch.full((num_batches,), -torch.inf, dtype=torch.float64)
    per_batch[batch_ids] = scores.double()
    keep = max(1, round(fraction * num_batches))
    order = sorted(range(num_batches), key=lambda j: (-per_batch[j].item(), j))[:keep]
    kept = torch.zeros(num_batches, dtype=torch.bool)
    kept[order] = True
    return kept[batch_ids].nonzero().flatten()


def liprune_batches(model: nn.Module, dataset, batch_size: int, fraction: float, seed: int = 0, **kwargs) -> torch.Tensor:
    """Indices of the examples in the fixed batches with the largest Hessian spectral norms (whole batches
    kept, round(fraction * num_batches) of them). kwargs go to liprune_batch_scores."""
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise InvalidArgumentError(f"liprune_batches: fraction must be in (0, 1], got {fraction!r}")
    scores, batch_ids = liprune_batch_scores(model, dataset, batch_size, seed=seed, **kwargs)
    return keep_top_batches(scores, batch_ids, fraction)
