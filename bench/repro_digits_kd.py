"""Reproduces the data-pruning-with-KD findings on scikit-learn's digits (real data, CPU, a few minutes).

For each seed: a teacher (MLP) trained on all 1397 training images, tracking forgetting events as it goes;
EL2N and last-layer GraNd scores (kdfast.score) from a model trained for 10% of the epochs ("early in
training", Paul et al.); then, for every f in {0.1, 0.2, 0.3, 0.5, 0.7} and every pruning method (random,
el2n, grand-last, forgetting: score methods keep the hardest f, as in the paper), a student of the same
architecture (self-distillation, as the paper's main runs) trained on the kept subset with no KD, KD
alpha = 0.5, and KD alpha = alpha_for_fraction(f). A sweep of alpha at f = 0.1 and f = 0.7 (random
pruning) checks the paper's f -> alpha trend directly. Test accuracy on the 400 held-out images.

Training uses kdfast.distill_step (the fused KD loss) on in-memory tensors: `fit` runs the same step per
batch behind a DataLoader, which on 8x8 images costs about as much as the step itself.

    python -m bench.repro_digits_kd                   # 3 seeds x 30 epochs: about 5 minutes on 2 busy CPU cores
    python -m bench.repro_digits_kd --seeds 1 --epochs 10        # a smoke run

Writes bench/figures/repro_digits_kd.{md,png,json}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np
import torch

import kdfast
from bench.common import code_commit, device_name, versions
from kdfast.data import load_dataset
from kdfast.distill import alpha_for_fraction, distill_step
from kdfast.models import create_model
from kdfast.scoring import ForgettingTracker
from kdfast.selection import prune

FRACTIONS = (0.1, 0.2, 0.3, 0.5, 0.7)
METHODS = ("random", "el2n", "grand-last", "forgetting")
KD_SETTINGS = ("no KD", "KD a=0.5", "KD a=auto")
SWEEP_FRACTIONS = (0.1, 0.7)
SWEEP_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
FIGURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")


def _tensors(split):
    ds = load_dataset("digits", split=split)
    return torch.stack([ds[i][0] for i in range(len(ds))]), ds.targets.clone(), ds


def _model(seed):
    torch.manual_seed(seed)
    return create_model("mlp", num_classes=10, in_channels=1, image_size=8)


def train(model, x, y, *, keep, epochs, seed, teacher_logits=None, alpha=0.0, temperature=4.0, lr=0.05,
          batch_size=64, forgetting=None):
    """SGD (momentum 0.9, wd 5e-4, cosine per epoch) with kdfast.distill_step; epoch e shuffles with seed + e."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    model.train()
    for epoch in range(epochs):
        order = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed + epoch))]
        for idx in order.split(batch_size):
            distill_step(model, None, x[idx], y[idx], opt, alpha=alpha, temperature=temperature,
                         teacher_logits=None if teacher_logits is None else teacher_logits[idx],
                         indices=idx, forgetting=forgetting)
        sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y):
    return float((model(x).argmax(-1) == y).float().mean())


def run_seed(seed, x, y, xt, yt, ds, epochs, log):
    everything = torch.arange(len(y))
    tracker = ForgettingTracker(len(y))
    teacher = train(_model(1000 + seed), x, y, keep=everything, epochs=epochs, seed=1000 + seed, forgetting=tracker)
    with torch.no_grad():
        teacher_logits = teacher(x)
    early = train(_model(2000 + seed), x, y, keep=everything, epochs=max(1, epochs // 10), seed=2000 + seed)
    scores = {
        "random": torch.zeros(len(y)),  # prune(mode="random") ignores the values
        "el2n": kdfast.score(early, ds, "el2n", progress=False),
        "grand-last": kdfast.score(early, ds, "grand-last", progress=False),
        "forgetting": tracker.scores(),
    }
    out = {"teacher_acc": accuracy(teacher, xt, yt), "main": {}, "sweep": {}}
    log(f"seed {seed}: teacher test acc {out['teacher_acc']:.4f}")
    for f in FRACTIONS:
        for method in METHODS:
            keep = prune(scores[method], f, "random" if method == "random" else "hard", seed=seed)
            alphas = {"no KD": 0.0, "KD a=0.5": 0.5, "KD a=auto": alpha_for_fraction(f)}
            done = {}
            for setting, alpha in alphas.items():
                if alpha not in done:  # alpha_for_fraction(0.7) == 0.5: the same run, not trained twice
                    student = train(_model(seed), x, y, keep=keep, epochs=epochs, seed=seed,
                                    teacher_logits=teacher_logits, alpha=alpha)
                    done[alpha] = accuracy(student, xt, yt)
                out["main"][f"{f}|{method}|{setting}"] = done[alpha]
        log(f"seed {seed}: f = {f} done")
    for f in SWEEP_FRACTIONS:
        keep = prune(scores["random"], f, "random", seed=seed)
        for alpha in SWEEP_ALPHAS:
            student = train(_model(seed), x, y, keep=keep, epochs=epochs, seed=seed, teacher_logits=teacher_logits,
                            alpha=alpha)
            out["sweep"][f"{f}|{alpha}"] = accuracy(student, xt, yt)
    return out


def _mean_std(values):
    a = 100 * np.asarray(values)
    return a.mean(), a.std(ddof=1) if len(a) > 1 else 0.0


def summarise(runs):
    main = {}
    for key in runs[0]["main"]:
        main[key] = _mean_std([r["main"][key] for r in runs])
    sweep = {key: _mean_std([r["sweep"][key] for r in runs]) for key in runs[0]["sweep"]}
    return main, sweep


def claims(main, sweep):
    """The paper's three claims, checked on the means (stds in the table say which gaps are noise)."""
    lines = []
    for f in FRACTIONS:
        gains = [max(main[f"{f}|{m}|KD a=0.5"][0], main[f"{f}|{m}|KD a=auto"][0]) - main[f"{f}|{m}|no KD"][0]
                 for m in METHODS]
        lines.append(f"1. KD vs no KD at f = {f}: best-KD gain per method " +
                     ", ".join(f"{m} {g:+.1f}" for m, g in zip(METHODS, gains)) + " points")
    for f in (0.1, 0.2):
        rnd = main[f"{f}|random|KD a=auto"][0]
        others = {m: main[f"{f}|{m}|KD a=auto"][0] for m in METHODS if m != "random"}
        better = [m for m, v in others.items() if v > rnd]
        lines.append(f"2. f = {f}, with KD (alpha auto): random {rnd:.1f}% vs " +
                     ", ".join(f"{m} {v:.1f}%" for m, v in others.items()) +
                     (f" (beaten by {', '.join(better)})" if better else " (random is best)"))
    for f in SWEEP_FRACTIONS:
        best = max(SWEEP_ALPHAS, key=lambda a: sweep[f"{f}|{a}"][0])
        lines.append(f"3. random f = {f}: best alpha {best} (" +
                     ", ".join(f"{a}: {sweep[f'{f}|{a}'][0]:.1f}" for a in SWEEP_ALPHAS) + ")")
    return lines


def table(main, sweep, teacher, args, prov):
    head = "| method | KD | " + " | ".join(f"f = {f}" for f in FRACTIONS) + " |"
    rows = [head, "|" + "---|" * (len(FRACTIONS) + 2)]
    for method in METHODS:
        for setting in KD_SETTINGS:
            cells = [f"{main[f'{f}|{method}|{setting}'][0]:.1f} ± {main[f'{f}|{method}|{setting}'][1]:.1f}"
                     for f in FRACTIONS]
            rows.append(f"| {method} | {setting} | " + " | ".join(cells) + " |")
    autos = ", ".join(f"{alpha_for_fraction(f):.3g}" for f in FRACTIONS)
    sweep_rows = ["| f | " + " | ".join(f"alpha = {a}" for a in SWEEP_ALPHAS) + " |",
                  "|" + "---|" * (len(SWEEP_ALPHAS) + 1)]
    for f in SWEEP_FRACTIONS:
        sweep_rows.append(f"| {f} | " + " | ".join(f"{sweep[f'{f}|{a}'][0]:.1f} ± {sweep[f'{f}|{a}'][1]:.1f}"
                                                  for a in SWEEP_ALPHAS) + " |")
    return "\n".join([
        f"Digits (1397 train / 400 test), MLP 64-256-256-10 teacher and students, {args.epochs} epochs, "
        f"T = 4, seeds {args.seeds}; test accuracy % (mean ± std over seeds). Teacher (all data): "
        f"{teacher[0]:.1f} ± {teacher[1]:.1f}. alpha auto = alpha_for_fraction(f) = {autos} for f = "
        f"{', '.join(map(str, FRACTIONS))}.",
        "", *rows, "", "Alpha sweep, random pruning:", "", *sweep_rows, "",
        f"Measured {prov['date']} on {prov['device']} in {prov['elapsed_s']:.0f} s; "
        f"{', '.join(f'{k} {v}' for k, v in sorted(prov['versions'].items()))}; commit {prov['commit']}; "
        f"command: `{prov['command']}`"])


def plot(main, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(METHODS), figsize=(4 * len(METHODS), 3.6), sharey=True)
    for ax, method in zip(axes, METHODS):
        for setting, style in zip(KD_SETTINGS, ("o-", "s--", "^-")):
            mean = [main[f"{f}|{method}|{setting}"][0] for f in FRACTIONS]
            std = [main[f"{f}|{method}|{setting}"][1] for f in FRACTIONS]
            ax.errorbar(FRACTIONS, mean, yerr=std, fmt=style, capsize=3, label=setting)
        ax.set_title(method)
        ax.set_xlabel("fraction kept f")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(runs, args, prov):
    main_stats, sweep = summarise(runs)
    teacher = _mean_std([r["teacher_acc"] for r in runs])
    os.makedirs(args.out, exist_ok=True)
    text = table(main_stats, sweep, teacher, args, prov) + "\n\nClaims:\n\n" + "\n".join(
        f"- {line}" for line in claims(main_stats, sweep)) + "\n"
    with open(os.path.join(args.out, "repro_digits_kd.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(args.out, "repro_digits_kd.json"), "w") as fh:
        json.dump({"args": {"seeds": args.seeds, "epochs": args.epochs}, "provenance": prov, "runs": runs}, fh,
                  indent=1)
    plot(main_stats, os.path.join(args.out, "repro_digits_kd.png"))
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default=FIGURES)
    parser.add_argument("--from-json", help="rebuild the table and plot from a previous run's .json, no training")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as fh:
            saved = json.load(fh)
        args.seeds, args.epochs = saved["args"]["seeds"], saved["args"]["epochs"]
        print(write_outputs(saved["runs"], args, saved["provenance"]))
        return 0
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    prov = {"commit": code_commit(),  # the code that runs (the tree may move on while it does)
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(torch.device("cpu")), "versions": versions()}
    start = time.perf_counter()
    x, y, ds = _tensors("train")
    xt, yt, _ = _tensors("test")

    def log(msg):
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", file=sys.stderr, flush=True)
    runs = [run_seed(seed, x, y, xt, yt, ds, args.epochs, log) for seed in range(args.seeds)]
    prov["command"] = f"python -m bench.repro_digits_kd {' '.join(sys.argv[1:])}".rstrip()
    prov["elapsed_s"] = time.perf_counter() - start
    print(write_outputs(runs, args, prov))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
