"""Importance sampling for stochastic pruning (the LiPrune paper's Eq. 2 and Theorem 2).

Each epoch draws m = round(r·n) indices i.i.d. with p_i ∝ scores_i (with replacement, as in Eq. 2), and
`weights` w_i = 1/(m p_i) (= 1/(r·n·p_i) up to the rounding of r·n) keep the gradient unbiased: for any
per-example g, E[sum over the epoch's draws of w_i g_i] = sum_i g_i, so one pruned epoch makes, in
expectation, the progress of one full epoch. Pass `weights[indices]` as the KD loss's `weight=`;
`fit(model, dataset, recipe, subset=ImportanceSampler(scores, r))` does that and resamples every epoch.
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler

from kdfast.errors import InvalidArgumentError


class ImportanceSampler(Sampler[int]):
    def __init__(self, scores, fraction: float, seed: int = 0):
        scores = torch.as_tensor(scores).detach().cpu()
        if scores.ndim != 1 or scores.numel() == 0:
            raise InvalidArgumentError(f"ImportanceSampler: scores must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
        scores = scores.double()
        bad = ~torch.isfinite(scores) | (scores <= 0)
        if bad.any():
            first = int(bad.nonzero()[0])
            raise InvalidArgumentError(
                f"ImportanceSampler: scores must be finite and > 0 (every example needs a chance to be drawn for "
                f"the weights to stay unbiased), got {int(bad.sum())} bad values, first scores[{first}] = "
                f"{scores[first].item()}; clamp them, e.g. scores.clamp_min(1e-12)")
        if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise InvalidArgumentError(f"ImportanceSampler: fraction must be in (0, 1], got {fraction!r}")
        if scores.numel() > 1 << 24:
            raise InvalidArgumentError(
                f"ImportanceSampler: at most 2**24 examples (torch.multinomial's limit), got {scores.numel()}")
        self.probs = scores / scores.sum()
        self.num_samples = max(1, round(fraction * scores.numel()))
        self.weights = (1.0 / (self.num_samples * self.probs)).float()
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Draws depend on (seed, epoch) only, so a resumed run redraws the same epochs."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        draws = torch.multinomial(self.probs, self.num_samples, replacement=True, generator=gen)
        return iter(draws.tolist())

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume the same draws: the seed, the epoch and the distribution."""
        return {"seed": self.seed, "epoch": self.epoch, "num_samples": self.num_samples, "probs": self.probs.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restores the epoch after checking that `state` comes from a sampler with the same scores, fraction
        and seed (a resumed run must redraw the epochs it would have drawn)."""
        probs = state.get("probs")
        same = (isinstance(probs, torch.Tensor) and probs.shape == self.probs.shape
                and torch.allclose(probs.double(), self.probs, rtol=1e-12, atol=0)
                and state.get("num_samples") == self.num_samples and state.get("seed") == self.seed)
        if not same:
            raise InvalidArgumentError(
                "ImportanceSampler.load_state_dict: the saved sampler differs from this one (scores, fraction or "
                f"seed: saved seed {state.get('seed')!r}, {state.get('num_samples')!r} draws per epoch; this "
                f"one seed {self.seed}, {self.num_samples}); resume with the same scores, fraction and seed")
        self.epoch = int(state["epoch"])
