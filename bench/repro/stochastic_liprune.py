"""LiPrune's stochastic pruning (its Eq. 2, Theorem 2) against deterministic top-r LiPrune and random pruning
(CPU, a few minutes).

Stochastic pruning (Eq. 2) draws each step's examples with p_i ∝ L_i, weights their loss by 1/(r n p_i) and
applies the step only when a Bernoulli(r) gate ζ_t is 1, so the expected step is the full-data gradient step
and only a share r of the iterations touch data; kdfast.ImportanceSampler supplies the draws and the weights
(`fit(..., subset=ImportanceSampler(...))`).
"stochastic uniform" (p_i = 1/n, weights 1/r) is the control that separates the importance of p from the
1/r amplification.

1. Linear model: every method runs the same number of SGD iterations, the gated ones counting their skipped
   iterations as Theorem 2 does (the gate is one ζ_t per step of the batch of 10). --gate (default) also shows the
   ungated form beside it ("ungated": every step applied with weight 1/(r n p_i), i.e. rate η/r at equal
   executed steps); --no-gate shows only that.

   The paper's linear model (Sec. 4.1, Fig. 1): y = w* x + 0.2 ε, x ~ U[-5, 5], N = 1000, 400 test points,
   f_i = ½ (w x_i − y_i)², L_i = x_i², SGD batch 10, lr 0.01, w0 = 0, 30 steps, r ∈ {0.1, 0.3, 0.5, 0.7}, w* = 2;
   test loss, mean ± 95% interval over runs (float64).
2. Digits, a 64-256-256-10 MLP (non-convex) through kdfast.training.fit: L_i from `kdfast.score(...,
   "liprune-last")` of a model trained for 3 epochs; r ∈ {0.1, 0.3}; students trained from scratch with the
   digits recipe (SGD momentum 0.9, cosine), the same number of epochs of r n examples for every method; test
   accuracy, mean ± std over seeds. An ImportanceSampler epoch of round(r n) draws is an epoch of n gated
   iterations with the skipped ones left out (their count fixed at its mean), so here the methods compare at
   equal executed steps, where the stochastic ones step 1/r further on average.

    python -m bench.repro.stochastic_liprune                # 100 linear runs, 3 digits seeds x 30 epochs: 1-2 min
    python -m bench.repro.stochastic_liprune --full         # 400 linear runs, 5 seeds x 60 epochs
    python -m bench.repro.stochastic_liprune --smoke --out /tmp/x   # seconds

Writes bench/repro/reports/stochastic_liprune.{md,png,json}.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch

from bench.common import measured, pyplot, repro_provenance, save_figure, stderr_log, write_report
from kdfast.data import load_dataset
from kdfast.models import create_model
from kdfast.pruning.sampling import ImportanceSampler
from kdfast.scoring import score
from kdfast.pruning.selection import prune
from kdfast.training.fit import TrainRecipe, evaluate, fit

NAME = "stochastic_liprune"
REPORTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reports")
METHODS = ("no pruning", "random", "liprune top-r", "stochastic liprune", "stochastic uniform")
UNGATED = ("stochastic liprune, ungated", "stochastic uniform, ungated")
RATIOS = (0.1, 0.3, 0.5, 0.7)
DIGITS_RATIOS = (0.1, 0.3)
CHECKPOINTS = (0, 1, 2, 5, 10, 20, 30)


# ------------------------------------------------------------------------------------------- linear
def _linear_run(x, y, xt, yt, method, ratio, *, steps, batch, lr, gen, seed):
    """Test-loss curve (steps + 1,) of one SGD run on the scalar model w x. Stochastic methods apply step t only
    when their Bernoulli(ratio) gate is 1 (Eq. 2), unless the method is marked ungated."""
    n = x.numel()
    weights = None
    gated = method in METHODS[3:]
    method = method.removesuffix(", ungated")
    if method == "no pruning":
        pool = torch.arange(n)
    elif method == "random":
        pool = torch.randperm(n, generator=gen)[:round(ratio * n)]
    elif method == "liprune top-r":
        pool = prune(x.square(), ratio, "hard")
    else:
        scores = x.square() if method == "stochastic liprune" else torch.ones(n, dtype=torch.float64)
        sampler = ImportanceSampler(scores, ratio, seed=seed)
        weights = sampler.weights.double()
        # the sampler's epochs, concatenated until `steps` batches are drawn
        draws, epoch = [], 0
        while len(draws) < steps * batch:
            sampler.set_epoch(epoch)
            draws += list(sampler)
            epoch += 1
        draws = torch.tensor(draws[:steps * batch]).view(steps, batch)
    gate = (torch.rand(steps, generator=gen, dtype=torch.float64) < ratio if gated
            else torch.ones(steps, dtype=torch.bool))
    w = torch.zeros((), dtype=torch.float64)
    curve = [0.5 * (w * xt - yt).square().mean()]
    for t in range(steps):
        if not gate[t]:  # ζ_t = 0: the iteration counts, nothing moves
            curve.append(curve[-1])
            continue
        if weights is None:
            pick = pool[torch.randint(0, pool.numel(), (batch,), generator=gen)]
            scale = torch.ones(batch, dtype=torch.float64)
        else:
            pick = draws[t]
            scale = weights[pick]
        w = w - lr * (scale * (w * x[pick] - y[pick]) * x[pick]).mean()
        curve.append(0.5 * (w * xt - yt).square().mean())
    return torch.stack(curve)


def linear_experiment(ratio, *, runs, steps=30, n=1000, n_test=400, batch=10, lr=0.01, w_star=2.0, seed=0,
                      methods=METHODS + UNGATED):
    """{method: (runs, steps + 1) test-loss curves}, each run on fresh data shared by the methods."""
    curves = {m: [] for m in methods}
    for r in range(runs):
        gen = torch.Generator().manual_seed(seed * 100_003 + r)
        x = torch.rand(n + n_test, generator=gen, dtype=torch.float64) * 10 - 5
        y = w_star * x + 0.2 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
        for method in methods:
            curves[method].append(_linear_run(x[:n], y[:n], x[n:], y[n:], method, ratio, steps=steps, batch=batch,
                                              lr=lr, gen=gen, seed=r))
    return {m: torch.stack(c) for m, c in curves.items()}


# ------------------------------------------------------------------------------------------- digits
def _mlp(seed):
    torch.manual_seed(seed)
    return create_model("mlp", num_classes=10, in_channels=1, image_size=8)


def digits_experiment(ratio, seed, scores, train, test, epochs):
    """{method: test accuracy} of students trained from scratch on the same budget of SGD steps."""
    recipe = TrainRecipe(epochs=epochs, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                         seed=seed)
    out = {}
    for method in METHODS[1:]:
        if method == "random":
            subset = prune(scores, ratio, "random", seed=seed)
        elif method == "liprune top-r":
            subset = prune(scores, ratio, "hard")
        else:
            s = scores if method == "stochastic liprune" else torch.ones_like(scores)
            subset = ImportanceSampler(s, ratio, seed=seed)
        model = _mlp(100 + seed)
        fit(model, train, recipe, subset=subset, progress=False)
        out[method] = evaluate(model, test)["acc"]
    return out


def liprune_scores(train, seed, epochs=3):
    model = _mlp(seed)
    fit(model, train, TrainRecipe(epochs=epochs, batch_size=64, lr=0.05, seed=seed), progress=False)
    return score(model, train, "liprune-last", progress=False)


# ----------------------------------------------------------------------------------------- reporting
def _ci(t):
    """Mean and 95% half-interval over dim 0."""
    return t.mean(0), 1.96 * t.std(0) / math.sqrt(t.shape[0])


def linear_table(linear, steps):
    cols = [c for c in CHECKPOINTS if c <= steps]
    rows = ["| r | method | " + " | ".join(f"step {c}" for c in cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for ratio, curves in linear.items():
        for method in curves:
            mean, half = _ci(curves[method])
            rows.append(f"| {ratio} | {method} | " + " | ".join(f"{mean[c]:.3g} ± {half[c]:.2g}" for c in cols) + " |")
    return rows


def digits_table(digits):
    rows = ["| r | " + " | ".join(METHODS[1:]) + " |", "|" + "---|" * len(METHODS)]
    for ratio, per_seed in digits.items():
        cells = []
        for method in METHODS[1:]:
            acc = torch.tensor([s[method] for s in per_seed], dtype=torch.float64) * 100
            cells.append(f"{acc.mean():.1f} ± {acc.std():.1f}" if len(per_seed) > 1 else f"{acc.mean():.1f}")
        rows.append(f"| {ratio} | " + " | ".join(cells) + " |")
    return rows


def claims(linear, digits, steps):
    """Speed = mean over steps 1..T of log10 test loss, per run (lower is faster); 'faster' when the 95%
    intervals do not overlap."""
    lines = []
    for ratio, curves in linear.items():
        speed = {m: _ci(c[:, 1:].log10().mean(1)) for m, c in curves.items()}

        def versus(a, b):
            (ma, ha), (mb, hb) = speed[a], speed[b]
            return "faster" if ma + ha < mb - hb else "slower" if mb + hb < ma - ha else "no different"
        end = {m: c[:, steps].mean().item() for m, c in curves.items()}
        for lip, uni, form in (("stochastic liprune", "stochastic uniform", "gated (Eq. 2)"),
                               (*UNGATED, "ungated")):
            if lip not in curves:
                continue
            lines.append(
                f"linear, r = {ratio}, {form}: stochastic LiPrune is {versus(lip, 'random')} than random pruning, "
                f"{versus(lip, 'liprune top-r')} than top-r LiPrune, {versus(lip, uni)} than stochastic uniform "
                f"sampling and {versus(lip, 'no pruning')} than no pruning at equal iterations (mean log10 test loss "
                f"over the steps: {speed[lip][0]:.3f} / {speed['random'][0]:.3f} / {speed['liprune top-r'][0]:.3f} / "
                f"{speed[uni][0]:.3f} / {speed['no pruning'][0]:.3f}); final test loss {end[lip]:.3g} / "
                f"{end['random']:.3g} / {end['liprune top-r']:.3g} / {end[uni]:.3g} / {end['no pruning']:.3g}.")
    for ratio, per_seed in digits.items():
        acc = {m: sum(s[m] for s in per_seed) / len(per_seed) * 100 for m in METHODS[1:]}
        parts = []
        for other in ("random", "liprune top-r", "stochastic uniform"):
            d = torch.tensor([s["stochastic liprune"] - s[other] for s in per_seed], dtype=torch.float64) * 100
            se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else math.inf
            v = "holds" if d.mean() > 2 * se else "does not hold" if d.mean() < -2 * se else \
                f"undecidable at {len(d)} seeds"
            parts.append(f"beats {other}: {v} ({float(d.mean()):+.1f} ± {se:.1f} points)")
        lines.append(f"digits MLP, r = {ratio}, equal executed steps: stochastic LiPrune "
                     f"{acc['stochastic liprune']:.1f}%, "
                     f"top-r {acc['liprune top-r']:.1f}%, random {acc['random']:.1f}%, stochastic uniform "
                     f"{acc['stochastic uniform']:.1f}%; stochastic LiPrune " + "; ".join(parts) + ".")
    return lines


def plot(linear, path):
    plt = pyplot(NAME)
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(linear), figsize=(4 * len(linear), 3.5), sharey=True)
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, (ratio, curves) in zip(axes, linear.items()):
        for method in curves:
            mean, half = _ci(curves[method])
            steps = range(mean.numel())
            ax.plot(steps, mean.tolist(), label=method)
            ax.fill_between(steps, (mean - half).tolist(), (mean + half).tolist(), alpha=0.2)
        ax.set_yscale("log")
        ax.set_title(f"linear model, r = {ratio}")
        ax.set_xlabel("SGD step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test loss")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def write_outputs(linear, digits, args, prov):
    text = "\n".join([
        f"# LiPrune's stochastic pruning vs top-r and random (`python -m bench.{NAME}`)", "",
        f"## 1. Linear model (the paper's Eq. 3), test loss, mean ± 95% interval over {args.runs} runs", "",
        f"Every method runs the same {args.steps} SGD iterations (batch 10, lr 0.01, w0 = 0). Stochastic: p_i ∝ L_i = "
        "x_i² (or uniform), loss weights 1/(r n p_i) (kdfast.ImportanceSampler), each iteration applied only when "
        "its Bernoulli(r) gate is 1 (Eq. 2; the skipped iterations count)"
        + ("; the ', ungated' rows apply every iteration (rate η/r at equal executed steps)." if args.gate else
           ". --no-gate: every iteration applied, rate η/r at equal executed steps (not Eq. 2)."), "",
        *linear_table(linear, args.steps), "",
        f"## 2. Digits MLP via kdfast.training.fit, test accuracy %, {args.seeds} seeds, {args.epochs} epochs of "
        "r n examples each", "", "Scores: liprune-last of an MLP trained 3 epochs (kdfast.score).", "",
        *digits_table(digits), "", "## Claims", "", *[f"- {c}" for c in claims(linear, digits, args.steps)], "",
        "Reading: the weights 1/(r n p_i) scale the step by 1/r on average; with the gate only a share r of the "
        "iterations step, so in expectation an iteration moves as far as a full-data step (Theorem 2's rate is in "
        "η/r per executed step). Without the gate every iteration steps 1/r further than fixed-subset training, "
        "which is what the ungated rows show. 'stochastic uniform' (p_i = 1/n) has the same amplification without "
        "the importance, so the gap between it and stochastic LiPrune is what p ∝ L_i buys (Theorem 2 allows a step "
        "up to r / mean(L_i) with p ∝ L_i but only r / max(L_i) uniformly). "
        "Stochastic pruning is not data reduction: each epoch draws afresh, so over E epochs a share of about "
        "1 − exp(−rE) of the examples is seen (top-r and random see r of them), which favours it on digits.", "",
        measured(prov), ""])
    write_report(args.out, NAME, text, {
        "provenance": prov, "gate": args.gate, "digits": {str(k): v for k, v in digits.items()},
        "linear_final": {str(r): {m: _ci(c[:, -1])[0].item() for m, c in cur.items()} for r, cur in linear.items()}})
    plot(linear, os.path.join(args.out, f"{NAME}.png"))
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="linear-model runs (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=30, help="linear-model SGD steps (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=3, help="digits seeds (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=30, help="digits epochs (default: %(default)s)")
    parser.add_argument("--full", action="store_true", help="400 linear runs, 5 digits seeds x 60 epochs")
    parser.add_argument("--smoke", action="store_true", help="seconds: 4 linear runs, 1 seed x 1 epoch")
    parser.add_argument("--gate", action=argparse.BooleanOptionalAction, default=True,
                        help="Eq. 2's Bernoulli(r) gate on the stochastic methods, the ungated rows beside them "
                             "(default: on; --no-gate: ungated only)")
    parser.add_argument("--out", default=REPORTS)
    args = parser.parse_args(argv)
    ratios, digits_ratios = RATIOS, DIGITS_RATIOS
    if args.full:
        args.runs, args.seeds, args.epochs = 400, 5, 60
    if args.smoke:
        args.runs, args.steps, args.seeds, args.epochs = 4, 5, 1, 1
        ratios, digits_ratios = (0.3,), (0.3,)
    torch.set_num_threads(1)
    prov = repro_provenance(f"bench.repro.{NAME}", argv)
    start = time.perf_counter()
    log = stderr_log(start)
    linear = {}
    for ratio in ratios:
        linear[ratio] = linear_experiment(ratio, runs=args.runs, steps=args.steps,
                                          methods=METHODS + UNGATED if args.gate else METHODS[:3] + UNGATED)
        log(f"linear r = {ratio} done")
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    digits = {ratio: [] for ratio in digits_ratios}
    for seed in range(args.seeds):
        scores = liprune_scores(train, seed, epochs=1 if args.smoke else 3)
        for ratio in digits_ratios:
            digits[ratio].append(digits_experiment(ratio, seed, scores, train, test, args.epochs))
            log(f"digits seed {seed} r = {ratio} done")
    prov["elapsed_s"] = time.perf_counter() - start
    print(write_outputs(linear, digits, args, prov))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
