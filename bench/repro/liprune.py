"""Reproduces the LiPrune paper's toy experiments (CPU, seconds): 100 runs vectorised in torch.

- Linear model (Sec. 4.1, Fig. 1): y = w* x + 0.2 ε, x ~ U[-5, 5], N = 1000, 400 test points, loss
  1/2 (w x - y)², L_i = x_i² (kdfast.hessian.squared_loss_lipschitz without bias). SGD batch 10, lr 0.01,
  w0 = 0, 30 iterations on the kept subset, r in {0.1, 0.3, 0.5, 0.7}: LiPrune (keep the r·N largest L_i)
  against random pruning, mean test loss with 95% intervals. w* is not given in the paper: 2 here.
- Non-convex sin(w x) (App. B.4): y = sin(w* x) + 0.1 ε, x ~ N(0, 1), w* = 12, model sin(w x); SGD batch
  10, lr 0.2, w0 = 8, 100 iterations; L_i = x_i² (1 + |y_i|), the tight global bound sup_w |f_i''(w)| of
  f_i = 1/2 (sin(w x_i) - y_i)² (f'' = x² (cos 2wx + y sin wx); with s = sin wx that is x² (1 - 2s² + y s), whose
  largest modulus over s in [-1, 1] is 1 + |y|, at s = -sign(y)). The training loss on all N: the advantage
  vanishes.

    python -m bench.repro.liprune            # writes bench/repro/reports/liprune_linear.png, liprune_sin.png, liprune.md
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from kdfast.hessian import squared_loss_lipschitz

RATIOS = (0.1, 0.3, 0.5, 0.7)
REPORTS = os.path.join(os.path.dirname(__file__), "reports")


def _kept(scores: torch.Tensor, ratio: float, method: str, gen: torch.Generator) -> torch.Tensor:
    """(runs, k) indices kept per run: the k largest scores (liprune) or k at random."""
    k = round(ratio * scores.shape[1])
    if method == "liprune":
        return scores.topk(k, dim=1).indices
    return torch.rand(scores.shape, generator=gen, dtype=torch.float64).argsort(dim=1)[:, :k]


def _sgd(x, y, kept, *, w0, lr, iters, batch, gen, grad_fn, loss_fn, eval_x, eval_y):
    """Vectorised minibatch SGD on a scalar weight per run; returns (runs, iters + 1) eval losses."""
    runs = x.shape[0]
    w = torch.full((runs, 1), float(w0), dtype=torch.float64)
    losses = [loss_fn(w, eval_x, eval_y)]
    for _ in range(iters):
        pick = kept.gather(1, torch.randint(0, kept.shape[1], (runs, batch), generator=gen))
        w = w - lr * grad_fn(w, x.gather(1, pick), y.gather(1, pick)).mean(dim=1, keepdim=True)
        losses.append(loss_fn(w, eval_x, eval_y))
    return torch.stack(losses, dim=1)


def linear_experiment(ratio: float, *, runs: int = 100, iters: int = 30, n: int = 1000, n_test: int = 400,
                      batch: int = 10, lr: float = 0.01, w_star: float = 2.0, seed: int = 0) -> dict:
    """Test-loss curves (runs, iters + 1) of LiPrune and random pruning on the same data per run."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(runs, n + n_test, generator=gen, dtype=torch.float64) * 10 - 5
    y = w_star * x + 0.2 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    x, y, x_test, y_test = x[:, :n], y[:, :n], x[:, n:], y[:, n:]
    scores = squared_loss_lipschitz(x.reshape(-1, 1), bias=False).view(runs, n).double()
    curves = {}
    for method in ("liprune", "random"):
        curves[method] = _sgd(
            x, y, _kept(scores, ratio, method, gen), w0=0.0, lr=lr, iters=iters, batch=batch, gen=gen,
            grad_fn=lambda w, xb, yb: (w * xb - yb) * xb,
            loss_fn=lambda w, xe, ye: 0.5 * (w * xe - ye).square().mean(dim=1),
            eval_x=x_test, eval_y=y_test)
    return curves


def sin_lipschitz(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sup_w |f''(w)| of f(w) = 1/2 (sin(w x) - y)²: x² (1 + |y|)."""
    return x.square() * (1 + y.abs())


def sin_experiment(ratio: float, *, runs: int = 100, iters: int = 100, n: int = 1000, batch: int = 10,
                   lr: float = 0.2, w0: float = 8.0, w_star: float = 12.0, seed: int = 0) -> dict:
    """Training-loss curves (on all N) of LiPrune and random pruning for the sin(w x) regression."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(runs, n, generator=gen, dtype=torch.float64)
    y = torch.sin(w_star * x) + 0.1 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    scores = sin_lipschitz(x, y)
    curves = {}
    for method in ("liprune", "random"):
        curves[method] = _sgd(
            x, y, _kept(scores, ratio, method, gen), w0=w0, lr=lr, iters=iters, batch=batch, gen=gen,
            grad_fn=lambda w, xb, yb: (torch.sin(w * xb) - yb) * torch.cos(w * xb) * xb,
            loss_fn=lambda w, xe, ye: 0.5 * (torch.sin(w * xe) - ye).square().mean(dim=1),
            eval_x=x, eval_y=y)
    return curves


def _band(curves: torch.Tensor):
    mean = curves.mean(dim=0)
    half = 1.96 * curves.std(dim=0) / curves.shape[0] ** 0.5
    return mean, mean - half, mean + half


def _plot(results: dict, title: str, ylabel: str, path: str, *, log: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.2), sharey=False)
    for ax, (ratio, curves) in zip(axes, results.items()):
        for method, color in (("liprune", "C0"), ("random", "C1")):
            mean, lo, hi = _band(curves[method])
            steps = range(len(mean))
            ax.plot(steps, mean, color=color, label=method)
            ax.fill_between(steps, lo, hi, color=color, alpha=0.25)
        if log:
            ax.set_yscale("log")
        ax.set_title(f"r = {ratio}")
        ax.set_xlabel("iteration")
    axes[0].set_ylabel(ylabel)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(results: dict, at: tuple[int, ...]) -> list[str]:
    lines = ["| r | method | " + " | ".join(f"it {t}" for t in at) + " |", "|---|---|" + "---|" * len(at)]
    for ratio, curves in results.items():
        for method in ("liprune", "random"):
            mean, lo, hi = _band(curves[method])
            lines.append(f"| {ratio} | {method} | " + " | ".join(f"{mean[t]:.3g} ± {(hi[t] - mean[t]):.2g}" for t in at) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100, help="independent runs (default: 100)")
    parser.add_argument("--out", default=REPORTS, help=f"figure folder (default: {REPORTS})")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    linear = {r: linear_experiment(r, runs=args.runs) for r in RATIOS}
    sin = {r: sin_experiment(r, runs=args.runs) for r in RATIOS}
    _plot(linear, "Linear model: test loss (mean, 95% interval)", "test loss", os.path.join(args.out, "liprune_linear.png"),
          log=True)
    _plot(sin, "sin(w x): training loss (mean, 95% interval)", "training loss", os.path.join(args.out, "liprune_sin.png"),
          log=False)
    lines = [f"# LiPrune toy experiments ({args.runs} runs; `python -m bench.repro.liprune`)", "",
             "## Linear model, test loss", *_table(linear, (0, 1, 2, 5, 10, 30)), "",
             "## sin(w x), training loss (L_i = x_i² (1 + |y_i|))", *_table(sin, (0, 10, 25, 50, 100)), "",
             f"Took {time.perf_counter() - start:.0f} s."]
    with open(os.path.join(args.out, "liprune.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
