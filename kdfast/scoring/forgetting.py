"""Forgetting events (Toneva et al. 2019): how often an example goes from classified correctly to incorrectly
between consecutive presentations during training. Higher means harder.

Examples that were presented but never classified correctly ("never learned") rank hardest: +inf.
Examples never presented at all get NaN (there is nothing to score; prune() refuses NaN).
"""
from __future__ import annotations

import torch

from kdfast.errors import InvalidArgumentError
from kdfast.runtime.checks import positive_int, require

_STATE = ("forgets", "last_correct", "corrects", "presentations")


class ForgettingTracker:
    """Counts forgetting events per example from any training loop, on the device, without host syncs.

        tracker = ForgettingTracker(len(dataset))
        for x, y, idx in loader:                    # idx: dataset indices of the batch
            loss, stats = kd_loss(model(x), None, y, alpha=0, return_stats=True)
            tracker.update(idx, stats["correct"])   # same device as the batch
        scores = tracker.scores()                   # (N,) float32, higher = harder

    `kdfast.training.fit(..., forgetting=tracker)` feeds it every step and checkpoints its state.
    An example repeated within one batch (sampling with replacement) is compared, each time, with its state
    before that batch (which repeat sets the state after the batch is unspecified).
    """

    def __init__(self, num_examples: int, *, device=None):
        require("ForgettingTracker", positive_int("num_examples", num_examples))
        self.num_examples = num_examples
        device = torch.device("cpu") if device is None else torch.device(device)
        self.forgets = torch.zeros(num_examples, dtype=torch.int32, device=device)
        self.last_correct = torch.zeros(num_examples, dtype=torch.bool, device=device)
        # counts (not flags) so that repeats within one batch accumulate deterministically
        self.corrects = torch.zeros(num_examples, dtype=torch.int32, device=device)
        self.presentations = torch.zeros(num_examples, dtype=torch.int32, device=device)

    def _to(self, device: torch.device) -> None:
        for name in _STATE:
            setattr(self, name, getattr(self, name).to(device))

    def update(self, indices: torch.Tensor, correct: torch.Tensor) -> None:
        """Records one presentation of examples `indices` (dataset indices) with `correct` (bool or 0/1 floats)."""
        if not isinstance(indices, torch.Tensor) or not isinstance(correct, torch.Tensor):
            raise InvalidArgumentError("ForgettingTracker.update: indices and correct must be tensors, got "
                                       f"{type(indices).__name__} and {type(correct).__name__}")
        if indices.shape != correct.shape or indices.dim() != 1:
            raise InvalidArgumentError("ForgettingTracker.update: indices and correct must be 1-d of one length, got "
                                       f"shapes {tuple(indices.shape)} and {tuple(correct.shape)}")
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise InvalidArgumentError(f"ForgettingTracker.update: indices must be integers, got {indices.dtype}")
        if indices.device != self.forgets.device:
            self._to(indices.device)  # follow the training loop's device once
        idx = indices.long()
        now = correct.to(device=idx.device) != 0
        forgot = self.last_correct[idx] & ~now
        self.forgets.index_put_((idx,), forgot.to(torch.int32), accumulate=True)
        self.corrects.index_put_((idx,), now.to(torch.int32), accumulate=True)
        self.presentations.index_put_((idx,), torch.ones_like(idx, dtype=torch.int32), accumulate=True)
        self.last_correct[idx] = now

    def scores(self) -> torch.Tensor:
        """(N,) float32: forgetting events; +inf for never-learned examples, NaN for never-presented ones."""
        s = self.forgets.to(torch.float32)
        s = torch.where(self.corrects > 0, s, torch.full_like(s, float("inf")))
        return torch.where(self.presentations > 0, s, torch.full_like(s, float("nan")))

    def state_dict(self) -> dict:
        return {name: getattr(self, name).cpu() for name in _STATE}

    def load_state_dict(self, state: dict) -> None:
        for name in _STATE:
            value = state[name]
            if tuple(value.shape) != (self.num_examples,):
                raise InvalidArgumentError(f"ForgettingTracker.load_state_dict: {name} has shape {tuple(value.shape)}, "
                                           f"expected ({self.num_examples},)")
            setattr(self, name, value.to(self.forgets.device, getattr(self, name).dtype))
