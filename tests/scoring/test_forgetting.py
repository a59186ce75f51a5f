"""ForgettingTracker on scripted sequences, and fed by a real training loop."""
from __future__ import annotations

import math

import pytest
import torch

from kdfast.errors import InvalidArgumentError
from kdfast.scoring import ForgettingTracker


def _count_forgetting(history):
    """Independent count from per-example presentation histories (lists of bools)."""
    out = []
    for seq in history:
        if not seq:
            out.append(math.nan)
        elif not any(seq):
            out.append(math.inf)
        else:
            out.append(float(sum(a and not b for a, b in zip(seq, seq[1:]))))
    return out


def test_scripted_sequence_counts_correct_to_incorrect_transitions():
    t = ForgettingTracker(5)
    steps = [([0, 1, 2, 3], [1, 0, 1, 0]),
             ([0, 1, 2], [0, 1, 1]),
             ([2, 3, 0], [0, 0, 1]),
             ([0, 1, 2, 3], [0, 0, 1, 0])]
    history = [[] for _ in range(5)]
    for idx, cor in steps:
        t.update(torch.tensor(idx), torch.tensor(cor, dtype=torch.float32))
        for i, c in zip(idx, cor):
            history[i].append(bool(c))
    got = t.scores()
    assert got.dtype == torch.float32
    assert got.tolist()[:4] == _count_forgetting(history)[:4] == [2.0, 1.0, 1.0, math.inf]
    assert math.isnan(got[4])  # never presented


def test_random_sequences_match_the_independent_count():
    n = 40
    t = ForgettingTracker(n)
    history = [[] for _ in range(n)]
    for _ in range(30):
        idx = torch.randperm(n)[: torch.randint(1, n, ()).item()]
        cor = torch.rand(len(idx)) < 0.6
        t.update(idx, cor)
        for i, c in zip(idx.tolist(), cor.tolist()):
            history[i].append(c)
    want = torch.tensor(_count_forgetting(history), dtype=torch.float32)
    torch.testing.assert_close(t.scores(), want, equal_nan=True, rtol=0, atol=0)


def test_repeats_within_a_batch_compare_with_the_state_before_it():
    t = ForgettingTracker(2)
    t.update(torch.tensor([0, 1]), torch.tensor([True, True]))
    t.update(torch.tensor([0, 0, 0]), torch.tensor([False, False, True]))  # sampled with replacement
    assert t.scores()[0] == 2.0 and int(t.presentations[0]) == 4 and int(t.corrects[0]) == 2


def test_state_dict_round_trip_and_errors():
    t = ForgettingTracker(6)
    t.update(torch.tensor([1, 2, 5]), torch.tensor([1, 0, 1]))
    t.update(torch.tensor([1, 5]), torch.tensor([0, 0]))
    u = ForgettingTracker(6)
    u.load_state_dict(t.state_dict())
    torch.testing.assert_close(u.scores(), t.scores(), equal_nan=True)
    with pytest.raises(InvalidArgumentError, match="expected \\(7,\\)"):
        ForgettingTracker(7).load_state_dict(t.state_dict())
    with pytest.raises(InvalidArgumentError, match="num_examples must be a positive integer, got 0"):
        ForgettingTracker(0)
    with pytest.raises(InvalidArgumentError, match="1-d of one length"):
        t.update(torch.tensor([1, 2]), torch.tensor([1]))
    with pytest.raises(InvalidArgumentError, match="indices must be integers"):
        t.update(torch.tensor([1.0]), torch.tensor([1]))


def test_fed_by_fit_counts_every_presentation():
    from kdfast.data import load_dataset
    from kdfast.models import create_model
    from kdfast.training.fit import TrainRecipe, fit
    data = torch.utils.data.Subset(load_dataset("digits"), range(96))
    tracker = ForgettingTracker(len(data))
    torch.manual_seed(0)
    fit(create_model("mlp", num_classes=10, in_channels=1), data, TrainRecipe(epochs=3, batch_size=32, lr=0.1),
        forgetting=tracker, progress=False)
    assert tracker.presentations.tolist() == [3] * 96
    s = tracker.scores()
    assert bool(((s >= 0) & (s <= 1) | torch.isinf(s)).all())  # 3 presentations allow at most 1 forgetting event
