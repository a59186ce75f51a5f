"""Batched power iteration: one vector per slot, slots advance together and finish independently.

The estimate is the Rayleigh quotient θ = vᵀ H v (|θ| converges to the largest |eigenvalue|); a slot stops
when the residual ||H v - θ v|| <= tol |θ|, which bounds the distance from θ to an eigenvalue by tol |θ|,
not only when the estimate stops changing. Slow when the top two |eigenvalues| are close: Lanczos is the
default for that reason.
"""
from __future__ import annotations

import torch


class PowerSlots:
    def __init__(self, slots: int, size: int, max_steps: int, tol: float, *, dtype, device):
        self.max_steps, self.tol = max_steps, tol
        self.current = torch.zeros(slots, size, dtype=dtype, device=device)
        self.steps = [0] * slots

    def start(self, slot: int, vector: torch.Tensor) -> None:
        self.current[slot] = vector / vector.norm()
        self.steps[slot] = 0

    def vectors(self, slots: list[int]) -> torch.Tensor:
        return self.current[slots]

    def update(self, slots: list[int], products: torch.Tensor):
        v = self.current[slots]
        w = products.to(v.dtype)
        theta = (v * w).sum(dim=1)
        residual = (w - theta[:, None] * v).norm(dim=1)
        norm = w.norm(dim=1)
        self.current[slots] = w / norm.clamp_min(torch.finfo(w.dtype).tiny)[:, None]
        theta_h, residual_h = theta.abs().double().cpu().tolist(), residual.double().cpu().tolist()
        done = []
        for i, s in enumerate(slots):
            self.steps[s] += 1
            done.append(residual_h[i] <= self.tol * theta_h[i] or self.steps[s] >= self.max_steps)
        return theta_h, residual_h, done
