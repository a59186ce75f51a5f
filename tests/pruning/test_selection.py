"""prune(): every mode against an independent sort, rounding (total and per class), class balance, determinism,
ties, +inf scores and every error path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kdfast
from kdfast.errors import InvalidArgumentError
from kdfast.pruning.selection import MODES, class_quotas, kept_count, prune


def _oracle_order(scores, hardest_first):
    """Python's sort on (score, index): ties by index, independent of torch.argsort."""
    key = (lambda i: (-scores[i], i)) if hardest_first else (lambda i: (scores[i], i))
    return sorted(range(len(scores)), key=key)


@pytest.mark.parametrize("n, fraction", [(1, 1.0), (7, 0.5), (10, 0.15), (101, 0.3), (64, 0.999), (50, 1.0)])
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_keeps_exactly_round_half_up_sorted_unique(n, fraction, mode):
    scores = torch.randn(n)
    keep = prune(scores, fraction, mode)
    k = int(np.floor(fraction * n + 0.5))
    assert keep.dtype == torch.int64 and keep.shape == (k,)
    assert torch.equal(keep, keep.sort().values) and len(set(keep.tolist())) == k
    assert int(keep.min()) >= 0 and int(keep.max()) < n


def test_rounding_halves_go_up():
    assert kept_count(0.15, 10) == 2 and kept_count(0.25, 10) == 3 and kept_count(0.05, 10) == 1
    assert kept_count(0.7, 100) == 70 and kept_count(0.3, 10) == 3 and kept_count(1.0, 13) == 13


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_hard_easy_moderate_match_an_independent_sort(dtype):
    n = 97
    scores = torch.randint(0, 12, (n,)).to(dtype) / 4  # many ties
    s = scores.double().tolist()
    k = kept_count(0.3, n)
    hard = _oracle_order(s, hardest_first=True)[:k]
    easy = _oracle_order(s, hardest_first=False)[:k]
    start = (n - k) // 2
    moderate = _oracle_order(s, hardest_first=False)[start:start + k]
    assert prune(scores, 0.3, "hard").tolist() == sorted(hard)
    assert prune(scores, 0.3, "easy").tolist() == sorted(easy)
    assert prune(scores, 0.3, "moderate").tolist() == sorted(moderate)
    # numpy input gives the same answer
    assert prune(scores.numpy(), 0.3, "hard").tolist() == sorted(hard)


def test_ties_break_by_index_and_plus_inf_ranks_hardest():
    scores = torch.tensor([1.0, float("inf"), 1.0, 1.0, float("inf"), 0.0])
    assert prune(scores, 0.5, "hard").tolist() == [0, 1, 4]  # both infs, then the first tied 1.0
    assert prune(scores, 0.5, "easy").tolist() == [0, 2, 5]
    assert prune(scores, 4 / 6, "moderate").tolist() == [0, 1, 2, 3]  # drops 1 easiest (5), 1 hardest (4)


def test_random_is_seeded_and_ignores_scores():
    a = prune(torch.randn(200), 0.2, "random", seed=5)
    b = prune(torch.randn(200), 0.2, "random", seed=5)
    c = prune(torch.randn(200), 0.2, "random", seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_every_mode_is_deterministic():
    scores, labels = torch.randn(150), torch.randint(0, 4, (150,))
    for mode in MODES:
        for cb in (False, True):
            a = prune(scores, 0.37, mode, labels=labels, class_balanced=cb, seed=2)
            b = prune(scores.clone(), 0.37, mode, labels=labels.clone(), class_balanced=cb, seed=2)
            assert torch.equal(a, b), (mode, cb)


def test_ccs_drops_the_hardest_share_and_covers_the_strata():
    n = 1000
    scores = torch.rand(n, dtype=torch.float64)
    keep = prune(scores, 0.2, "ccs", ccs_beta=0.1, ccs_strata=10)
    assert len(keep) == 200
    hardest = set(_oracle_order(scores.tolist(), True)[:100])
    assert not hardest & set(keep.tolist())
    # ten roughly equal strata of the remaining scores, 20 drawn from each
    pool = sorted(set(range(n)) - hardest)
    lo, hi = float(scores[pool].min()), float(scores[pool].max())
    bins = ((scores[keep] - lo) / ((hi - lo) / 10)).floor().clamp(max=9).long()
    assert torch.bincount(bins, minlength=10).tolist() == [20] * 10


def test_ccs_small_strata_give_all_and_pass_the_rest_on():
    # 3 examples in a low stratum, 97 crowded in a high one
    scores = torch.cat([torch.tensor([0.0, 0.01, 0.02]), 1 + torch.rand(97) * 0.01])
    keep = prune(scores, 0.5, "ccs", ccs_beta=0.0, ccs_strata=2)
    assert {0, 1, 2} <= set(keep.tolist()) and len(keep) == 50


def test_ccs_never_drops_below_the_budget_and_handles_inf():
    scores = torch.cat([torch.rand(10), torch.full((5,), float("inf"))])
    keep = prune(scores, 1.0, "ccs", ccs_beta=0.5)
    assert keep.tolist() == list(range(15))
    assert len(prune(scores, 0.6, "ccs", ccs_beta=0.0)) == 9
    assert len(prune(torch.full((8,), 3.0), 0.5, "ccs")) == 4


def test_class_quotas_equal_capped_and_exact():
    assert class_quotas([10, 10, 10], 25) == [8, 8, 9]
    assert class_quotas([2, 50, 50], 30) == [2, 14, 14]
    assert class_quotas([5, 3], 8) == [5, 3]
    assert class_quotas([4, 4, 9], 12) == [4, 4, 4]
    assert class_quotas([4, 9, 4], 13) == [4, 5, 4]


@pytest.mark.parametrize("mode", MODES)
def test_class_balanced_draws_equally_and_applies_the_mode_within_each_class(mode):
    labels = torch.cat([torch.full((40,), 0), torch.full((60,), 1), torch.full((5,), 2), torch.full((95,), 3)])
    labels = labels[torch.randperm(len(labels))]
    scores = torch.randn(len(labels))
    keep = prune(scores, 0.2, mode, labels=labels, class_balanced=True, seed=1)
    assert len(keep) == 40
    counts = torch.bincount(labels[keep], minlength=4).tolist()
    assert counts == [11, 12, 5, 12]  # smallest class first: 5, then 35 // 3, 24 // 2, 12
    assert counts[2] == 5  # the small class gives all it has
    if mode == "hard":
        for c in range(4):
            members = (labels == c).nonzero().squeeze(1).tolist()
            order = sorted(members, key=lambda i: (-float(scores[i]), i))
            assert sorted(set(keep.tolist()) & set(members)) == sorted(order[:counts[c]])


@pytest.mark.parametrize("mode", MODES)
def test_class_balanced_per_class_draws_are_those_of_a_per_class_loop(mode):
    # classes visited in label order, each drawn from its members in index order: random and ccs consume the
    # generator class by class, so the grouping by one sort must give the same members in the same order
    from kdfast.pruning.selection import _SELECT, _permutations
    gen = torch.Generator().manual_seed(4)
    labels = torch.tensor([7, -2, 30, 7, 7, 30, -2, 7, 30, 30, 30, 7] * 9)[torch.randperm(108, generator=gen)]
    scores = torch.randn(108, generator=gen, dtype=torch.float64).round(decimals=1)  # ties too
    keep = prune(scores, 0.4, mode, labels=labels, class_balanced=True, seed=5)
    classes = torch.unique(labels)
    members = [torch.nonzero(labels == c).squeeze(1) for c in classes]
    quotas = class_quotas([len(m) for m in members], kept_count(0.4, 108))
    draw, s = _permutations(5), scores.numpy()
    expected = torch.cat([m[_SELECT[mode](s[m.numpy()], q, draw, 0.1, 50)] for m, q in zip(members, quotas) if q])
    assert keep.tolist() == sorted(expected.tolist())


def test_class_balanced_quota_assignment_is_documented_one():
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 10)
    keep = prune(torch.randn(30), 25 / 30, "random", labels=labels, class_balanced=True)
    assert torch.bincount(labels[keep]).tolist() == [8, 8, 9]  # remainder on the last of equal-size classes


@pytest.mark.parametrize("kwargs, match", [
    (dict(fraction=0.0), r"fraction must be a number in \(0, 1\]"),
    (dict(fraction=1.5), r"fraction must be a number in \(0, 1\]"),
    (dict(fraction=float("nan")), r"fraction must be a number in \(0, 1\]"),
    (dict(fraction="0.5"), r"fraction must be a number in \(0, 1\]"),
    (dict(fraction=0.001), "rounds to 0 kept"),
    (dict(mode="medium"), "mode must be one of hard, easy, moderate, random, ccs, got 'medium'"),
    (dict(class_balanced=True), "class_balanced=True needs labels"),
    (dict(labels=torch.zeros(9, dtype=torch.int64)), r"labels must have one entry per score \(10\), got 9"),
    (dict(labels=torch.zeros(10)), "labels must be a 1-d integer array"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(mode="ccs", ccs_beta=1.0), r"ccs_beta must be a number in \[0, 1\)"),
    (dict(mode="ccs", ccs_strata=0), "ccs_strata must be a positive integer"),
])
def test_errors_name_the_argument_and_value(kwargs, match):
    args = dict(scores=torch.randn(10), fraction=0.5)
    args.update(kwargs)
    with pytest.raises(InvalidArgumentError, match=match):
        prune(**args)


@pytest.mark.parametrize("scores, match", [
    (torch.tensor([0.1, float("nan"), 0.3]), r"index 1 holds nan"),
    (torch.tensor([0.1, float("-inf")]), r"index 1 holds -inf"),
    (torch.arange(5), "1-d float array"),
    (torch.randn(3, 2), "1-d float array"),
    (torch.randn(0), "non-empty"),
    ("scores.npy", "1-d float array"),
])
def test_bad_scores_are_refused(scores, match):
    with pytest.raises(InvalidArgumentError, match=match):
        prune(scores, 0.5)


def test_public_api():
    assert kdfast.prune is prune
