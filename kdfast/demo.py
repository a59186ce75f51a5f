"""Demo on scikit-learn's bundled digits (offline): a teacher on all data, students on a random 20% with
and without distillation through the fused KD loss. Prints accuracies, the backend and the time taken.

    python -m kdfast.demo
"""
from __future__ import annotations

import sys
import time

import torch
from torch import nn

from .dispatch import resolve_backend
from .ops.kd_loss import kd_loss


def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise SystemExit("kdfast.demo needs scikit-learn (pip install scikit-learn)") from exc
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = perm[:400], perm[400:]
    return x[train], y[train], x[test], y[test]


def _mlp(width):
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))


def _train(model, x, y, teacher_logits=None, alpha=0.0, epochs=60, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            t = None if teacher_logits is None else teacher_logits[idx]
            loss = kd_loss(model(x[idx]), t, y[idx], alpha=alpha, temperature=4.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


@torch.no_grad()
def _accuracy(model, x, y):
    return (model(x).argmax(-1) == y).float().mean().item()


def main() -> int:
    start = time.perf_counter()
    x, y, xt, yt = _digits()
    torch.manual_seed(0)
    teacher = _train(_mlp(256), x, y)
    with torch.no_grad():
        teacher_logits = teacher(x)
    keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))[: len(y) // 5]
    print(f"digits: {len(y)} train / {len(yt)} test examples, kd_loss backend: "
          f"{resolve_backend(None, x.device, op='kd_loss')}", file=sys.stderr)
    print(f"{'model':<34}{'test acc':>9}")
    print(f"{'teacher (all data)':<34}{_accuracy(teacher, xt, yt):>9.3f}")
    for alpha in (0.0, 0.5, 0.9):
        student = _train(_mlp(32), x[keep], y[keep], teacher_logits[keep], alpha=alpha)
        name = f"student, random 20%, alpha={alpha}"
        print(f"{name:<34}{_accuracy(student, xt, yt):>9.3f}")
    print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
