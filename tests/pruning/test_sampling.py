"""ImportanceSampler: draw count, empirical p ∝ scores, unbiased weights, reproducibility, bad scores."""
import pytest
import torch

from kdfast.errors import InvalidArgumentError
from kdfast.pruning.sampling import ImportanceSampler


def test_draw_count_and_index_range():
    sampler = ImportanceSampler(torch.rand(101) + 0.1, 0.3)
    draws = list(sampler)
    assert len(sampler) == len(draws) == 30
    assert all(0 <= i < 101 for i in draws)


def test_draw_frequencies_follow_scores():
    scores = torch.rand(20, dtype=torch.float64) * 5 + 0.05
    sampler = ImportanceSampler(scores, 1.0, seed=7)
    counts = torch.zeros(20, dtype=torch.float64)
    epochs = 2000
    for _ in range(epochs):
        counts += torch.bincount(torch.tensor(list(sampler)), minlength=20)
    freq = counts / counts.sum()
    p = scores / scores.sum()
    # multinomial standard error per cell: sqrt(p (1 - p) / draws); 5 sigma
    se = (p * (1 - p) / counts.sum()).sqrt()
    assert ((freq - p).abs() <= 5 * se).all(), f"worst z {((freq - p).abs() / se).max():.2f}"


def test_weights_make_the_pruned_epoch_sum_unbiased():
    # E[sum over one epoch's draws of w_i g_i] = sum_i g_i, i.e. (1/n) E[...] = mean g, for any per-example g.
    n = 50
    scores = torch.rand(n, dtype=torch.float64) ** 3 + 1e-3  # skewed
    g = torch.randn(n, 3, dtype=torch.float64)
    sampler = ImportanceSampler(scores, 0.2, seed=1)
    assert torch.allclose(sampler.weights.double(), 1 / (len(sampler) * sampler.probs), rtol=1e-6)
    exact = (sampler.probs[:, None] * sampler.weights.double()[:, None] * g).sum(dim=0) * len(sampler) / n
    assert torch.allclose(exact, g.mean(dim=0), rtol=1e-6)  # the identity behind the estimator
    epochs = 4000
    total = torch.zeros(3, dtype=torch.float64)
    sq = torch.zeros(3, dtype=torch.float64)
    for _ in range(epochs):
        idx = torch.tensor(list(sampler))
        est = (sampler.weights.double()[idx, None] * g[idx]).sum(dim=0) / n
        total += est
        sq += est.square()
    mean = total / epochs
    se = ((sq / epochs - mean.square()) / epochs).sqrt()
    assert ((mean - g.mean(dim=0)).abs() <= 5 * se).all(), f"mean {mean.tolist()} vs {g.mean(dim=0).tolist()}"


def test_epochs_differ_and_replay_from_the_seed():
    scores = torch.rand(40) + 0.5
    sampler = ImportanceSampler(scores, 0.5, seed=3)
    first, second = list(sampler), list(sampler)
    assert first != second
    replay = ImportanceSampler(scores, 0.5, seed=3)
    replay.set_epoch(1)
    assert list(replay) == second


@pytest.mark.parametrize("scores,needle", [
    (torch.tensor([1.0, 0.0, 2.0]), "scores"),
    (torch.tensor([1.0, float("nan"), 2.0]), "scores"),
    (torch.tensor([1.0, -1.0, 2.0]), "scores"),
    (torch.tensor([1.0, float("inf")]), "scores"),
    (torch.zeros(4), "scores"),
    (torch.ones(2, 2), "1-D"),
    (torch.ones(0), "non-empty"),
])
def test_degenerate_scores_raise(scores, needle):
    with pytest.raises(InvalidArgumentError, match=needle):
        ImportanceSampler(scores, 0.5)


@pytest.mark.parametrize("fraction", [0, -0.5, 1.2])
def test_bad_fraction_raises(fraction):
    with pytest.raises(InvalidArgumentError, match="fraction"):
        ImportanceSampler(torch.ones(5), fraction)
