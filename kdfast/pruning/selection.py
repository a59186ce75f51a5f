"""prune(): which examples to keep, given one score per example (higher = harder).

    keep = prune(scores, 0.3, "moderate", labels=labels, class_balanced=True)   # sorted LongTensor

Rounding. The number kept is k = round(fraction * N) with halves rounded up (floor(fraction * N + 0.5));
a fraction that keeps no example at all is an error. With class_balanced=True the same total k is split
into equal class quotas (the data-pruning paper's class-balanced scheme "equally draws samples from each
class"): classes are visited from smallest to largest (ties: lower label first), each gets
min(its size, floor(remaining budget / classes left)), so a class too small for its share keeps all of its
examples and hands the rest on, and any remainder lands on the largest classes. The quotas sum to exactly k.

Ties. Equal scores are ordered by dataset index (stable sorts), so every mode is deterministic; random and
ccs draw from a torch.Generator seeded with `seed`. The selection runs in NumPy: only random and ccs import torch.

Scores must be finite, except +inf (forgetting's "never learned" examples, which rank hardest).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from kdfast.data.split import class_groups
from kdfast.errors import InvalidArgumentError
from kdfast.runtime import checks
from kdfast.runtime.arrays import to_numpy
from kdfast.runtime.checks import require

if TYPE_CHECKING:
    import torch

MODES = ("hard", "easy", "moderate", "random", "ccs")
DRAWING = ("random", "ccs")  # the modes that draw from torch's generator (imported for them alone)


# ----------------------------------------------------------------------------------------- checks
def _check_scores(scores) -> np.ndarray:
    try:
        s = to_numpy(scores)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidArgumentError(f"prune: scores must be a 1-d float array, got {type(scores).__name__}") from exc
    if s.ndim != 1 or s.size == 0 or s.dtype.kind != "f":
        raise InvalidArgumentError(f"prune: scores must be a non-empty 1-d float array (one score per example), "
                                   f"got dtype {s.dtype} shape {tuple(s.shape)}")
    s = s.astype(np.float64)
    bad = np.isnan(s) | (s == -np.inf)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidArgumentError(f"prune: scores must be finite or +inf (forgetting's never-learned examples); "
                                   f"index {i} holds {float(s[i])} ({int(bad.sum())} bad scores in all)")
    return s


def _check_labels(labels, n) -> np.ndarray:
    try:
        y = to_numpy(labels)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidArgumentError(f"prune: labels must be a 1-d integer array, got {type(labels).__name__}") from exc
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise InvalidArgumentError(f"prune: labels must be a 1-d integer array, got dtype {y.dtype} shape "
                                   f"{tuple(y.shape)}")
    if y.size != n:
        raise InvalidArgumentError(f"prune: labels must have one entry per score ({n}), got {y.size}")
    return y.astype(np.int64)


def _check_args(fraction, mode, class_balanced, labels, seed, ccs_beta, ccs_strata):
    require("prune", checks.fraction("fraction", fraction, expected="a number in (0, 1] (the share of examples kept)"))
    if mode not in MODES:
        raise InvalidArgumentError(f"prune: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if class_balanced and labels is None:
        raise InvalidArgumentError("prune: class_balanced=True needs labels (one class index per example)")
    require("prune", checks.integer("seed", seed))
    require("prune", checks.in_range("ccs_beta", ccs_beta, 0.0, 1.0, high_open=True,
                                     expected="a number in [0, 1) (the hardest share dropped by ccs)"))
    require("prune", checks.positive_int("ccs_strata", ccs_strata))


# ----------------------------------------------------------------------------------------- rounding
def kept_count(fraction: float, n: int) -> int:
    """round(fraction * n), halves up."""
    return math.floor(float(fraction) * n + 0.5)


def class_quotas(class_sizes: list[int], k: int) -> list[int]:
    """Equal shares of k over classes, capped by class size; sums to k whenever k <= sum(class_sizes)."""
    quotas = [0] * len(class_sizes)
    order = sorted(range(len(class_sizes)), key=lambda c: (class_sizes[c], c))
    remaining = k
    for left, c in zip(range(len(order), 0, -1), order):
        quotas[c] = min(class_sizes[c], remaining // left)
        remaining -= quotas[c]
    return quotas


# ------------------------------------------------------------------------------------------- modes
# Each takes (scores float64 (n,), k, draw, ccs_beta, ccs_strata) and returns k positions in the scores; `draw(n)`
# is a random permutation of range(n) from the seeded generator (random and ccs only).
def _order_hard_first(s: np.ndarray) -> np.ndarray:
    return np.argsort(-s, kind="stable")  # descending, ties by index (-s keeps +inf hardest)


def _select_hard(s, k, draw, beta, strata):
    return _order_hard_first(s)[:k]


def _select_easy(s, k, draw, beta, strata):
    return np.argsort(s, kind="stable")[:k]


def _select_moderate(s, k, draw, beta, strata):
    # The middle of the ranking (the data-pruning paper's App. F): drop floor((N - k) / 2) easiest examples
    # and the rest (one more when N - k is odd) of the hardest.
    start = (len(s) - k) // 2
    return np.argsort(s, kind="stable")[start:start + k]


def _select_random(s, k, draw, beta, strata):
    return draw(len(s))[:k]


def _select_ccs(s, k, draw, beta, strata):
    """Coverage-centric selection (Zheng et al. 2022, Algorithm 1): drop the hardest beta share (never so many
    that fewer than k remain), split the rest into `strata` equal-width score bins, then fill the budget from
    the smallest bin up, each bin giving min(its size, remaining budget / bins left), at random within a bin."""
    n = len(s)
    drop = min(math.floor(beta * n + 0.5), n - k)
    pool = _order_hard_first(s)[drop:]
    vals = s[pool]
    finite = np.isfinite(vals)
    lo = float(vals[finite].min()) if finite.any() else 0.0
    hi = float(vals[finite].max()) if finite.any() else 0.0
    width = (hi - lo) / strata
    if width > 0:  # +inf scores (never learned) land in the top stratum through the clamp
        bins = np.minimum(np.floor((vals - lo) / width), strata - 1).astype(np.int64)
    else:  # every score equal: one stratum
        bins = np.zeros(len(pool), dtype=np.int64)
    members = [pool[bins == b] for b in range(strata)]
    members = [m for m in members if len(m)]
    sizes = [len(m) for m in members]
    chosen = [m[draw(len(m))[:q]] for m, q in zip(members, class_quotas(sizes, k))]
    return np.concatenate(chosen)


def _permutations(seed: int):
    """draw(n): torch.randperm(n) from a generator seeded with `seed` (the same draws on every machine)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    return lambda n: torch.randperm(n, generator=gen).numpy()


_SELECT = {"hard": _select_hard, "easy": _select_easy, "moderate": _select_moderate, "random": _select_random,
           "ccs": _select_ccs}


def keep_indices(scores, fraction, mode="hard", *, labels=None, class_balanced=False, seed=0, ccs_beta=0.1,
                 ccs_strata=50) -> np.ndarray:
    """prune()'s kept indices as a sorted int64 NumPy array; torch is imported only by the modes that draw
    (random, ccs), so kdfast-prune's other modes run without it."""
    _check_args(fraction, mode, class_balanced, labels, seed, ccs_beta, ccs_strata)
    s = _check_scores(scores)
    n = len(s)
    y = None if labels is None else _check_labels(labels, n)
    k = kept_count(fraction, n)
    if k == 0:
        raise InvalidArgumentError(f"prune: fraction={fraction} of {n} examples rounds to 0 kept; keep at least "
                                   f"one (fraction >= {0.5 / n:.3g})")
    draw = _permutations(seed) if mode in DRAWING else None
    select = _SELECT[mode]
    if not class_balanced:
        keep = select(s, k, draw, float(ccs_beta), ccs_strata)
    else:
        members = class_groups(y)  # classes sorted
        quotas = class_quotas([len(m) for m in members], k)
        keep = np.concatenate([m[select(s[m], q, draw, float(ccs_beta), ccs_strata)]
                               for m, q in zip(members, quotas) if q > 0])
    return np.sort(keep).astype(np.int64, copy=False)


def prune(scores, fraction, mode="hard", *, labels=None, class_balanced=False, seed=0, ccs_beta=0.1,
          ccs_strata=50) -> torch.LongTensor:
    """The indices of the examples to keep, sorted ascending: exactly round(fraction * N) of them.

    Args:
        scores: (N,) float scores in dataset order, higher = harder (kdfast.score's convention); +inf allowed.
        fraction: share kept, in (0, 1] (the data-pruning paper's f).
        mode: "hard" keeps the highest scores; "easy" the lowest; "moderate" the band around the median
            (App. F of the data-pruning paper); "random" a seeded uniform draw (scores unused); "ccs"
            coverage-centric selection (Zheng et al. 2022): drop the hardest `ccs_beta` share, then draw
            evenly from `ccs_strata` score strata.
        labels: (N,) class indices, needed for class_balanced.
        class_balanced: draw equal numbers from each class (see the module docstring for the quotas),
            applying `mode` within each class.
        seed: seeds random and ccs.

    Returns:
        a sorted int64 tensor of kept dataset indices (keep_indices gives the same as a NumPy array).
    """
    import torch
    return torch.from_numpy(keep_indices(scores, fraction, mode, labels=labels, class_balanced=class_balanced,
                                         seed=seed, ccs_beta=ccs_beta, ccs_strata=ccs_strata))
