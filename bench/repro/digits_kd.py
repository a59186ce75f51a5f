"""Reproduces the data-pruning-with-KD findings on scikit-learn's digits (real data, CPU), with
a fixed budget of SGD steps per student, early-training scores and several seeds.

Protocol, per seed:
- teacher: an MLP (64-256-256-10) trained on all 1397 training images for --teacher-steps SGD steps (cosine to
  0), tracking forgetting events as it goes. It is CONVERGED when, at the end, its training accuracy is 100%
  and its mean training cross-entropy is below 0.01 (checked and reported; the table says if any seed fails).
- scores: EL2N and last-layer GraNd (kdfast.score) from the teacher's snapshot after --early-epochs passes over
  the data (the paper's EL2N is an early-training score; 0 reads them off the converged teacher), and its
  forgetting counts over the whole run.
- random pruning draws equal numbers per class (--random class-balanced, the paper's scheme) or uniformly.
- --label-noise P: a share P of the training labels replaced by another class (per seed), for teacher and
  students alike; the test labels stay clean. The paper's case for a larger alpha at small f is that hard
  subsets concentrate noisy labels, and digits is clean.
- students: the same architecture (self-distillation, as the paper's main runs), each trained for the same
  --steps SGD steps whatever f (batch 64, cosine to 0 over the steps), so a student on 10% of the data sees
  as many updates as one on 70%; f in {0.1, 0.2, 0.3, 0.5, 0.7} x pruning {random, el2n, grand-last,
  forgetting} (score methods keep the hardest f, as in the paper) x {no KD, KD alpha = 0.5, KD alpha =
  alpha_for_fraction(f)}; and an alpha sweep at f in {0.1, 0.3, 0.7} (random pruning).
- test accuracy on the 400 held-out images after the last step (no early stopping on the test set).

The claims are judged on per-seed paired differences: a gap "holds" when its mean exceeds twice its standard
error (std of the per-seed differences / sqrt(seeds)); otherwise it is reported as within noise.

    python -m bench.repro.digits_kd                       # 5 seeds x 1000 steps: ~75 min wall on a shared machine
    python -m bench.repro.digits_kd --label-noise 0.2     # the noisy-label variant
    python -m bench.repro.digits_kd --full                # 5 seeds x 3000 steps
    python -m bench.repro.digits_kd --smoke --out /tmp/x  # seconds (tests)

Writes bench/repro/reports/digits_kd.{md,png,json}.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import time

import numpy as np
import torch

import kdfast
from bench.common import load_saved, measured, pyplot, repro_provenance, save_figure, stderr_log, write_report
from kdfast.data import load_dataset
from kdfast.distill.step import alpha_for_fraction, distill_step
from kdfast.models import create_model
from kdfast.scoring import ForgettingTracker
from kdfast.pruning.selection import prune

FRACTIONS = (0.1, 0.2, 0.3, 0.5, 0.7)
METHODS = ("random", "el2n", "grand-last", "forgetting")
KD_SETTINGS = ("no KD", "KD a=0.5", "KD a=auto")
SWEEP_FRACTIONS = (0.1, 0.3, 0.7)
SWEEP_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
CONVERGED_CE = 0.01
REPORTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reports")
RANDOM_MODES = ("class-balanced", "uniform")
EARLY_SHARE = 0.1  # EL2N's early point: epoch 20 of 200 in its paper; here a tenth of the teacher's passes
SIZES = {"default": dict(seeds=5, steps=1000, teacher_steps=2000),
         "full": dict(seeds=5, steps=3000, teacher_steps=4000),
         "smoke": dict(seeds=2, steps=8, teacher_steps=30)}  # 30 steps: every example seen once


def tensors(split):
    ds = load_dataset("digits", split=split)
    return torch.stack([ds[i][0] for i in range(len(ds))]), ds.targets.clone(), ds


def make_model(seed, arch="mlp"):
    torch.manual_seed(seed)
    return create_model(arch, num_classes=10, in_channels=1, image_size=8)


def train(model, x, y, *, keep, steps, seed, teacher=None, teacher_logits=None, alpha=0.0, temperature=4.0,
          lr=0.05, batch_size=64, forgetting=None, kd_term=None, snapshots=None):
    """`steps` SGD steps (momentum 0.9, wd 5e-4, cosine to 0 over the steps) with kdfast.distill_step on the
    kept examples, reshuffled at every pass (pass e with seed + e). kd_term's parameters join the optimizer.
    `snapshots` {pass: None} gets an eval-mode copy of the model at the start of each listed pass."""
    params = [{"params": list(model.parameters())}]
    if kd_term is not None:
        params.append({"params": list(kd_term.parameters())})
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    kd = kdfast.KDSetup(teacher=teacher, alpha=alpha, temperature=temperature, kd_term=kd_term)
    done, epoch = 0, 0
    while done < steps:
        if snapshots is not None and epoch in snapshots:
            snapshots[epoch] = copy.deepcopy(model).eval()
        order = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed + epoch))]
        for idx in order.split(batch_size):
            if done == steps:
                break
            distill_step(model, x[idx], y[idx], opt, kd,
                         teacher_logits=None if teacher_logits is None else teacher_logits[idx],
                         indices=idx, forgetting=forgetting)
            sched.step()
            done += 1
        epoch += 1
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y):
    return float((model(x).argmax(-1) == y).float().mean())


@torch.no_grad()
def train_state(model, x, y):
    logits = model(x)
    return {"train_acc": float((logits.argmax(-1) == y).float().mean()),
            "train_ce": float(torch.nn.functional.cross_entropy(logits, y))}


def converged(state):
    return state["train_acc"] == 1.0 and state["train_ce"] < CONVERGED_CE


def noisy_labels(y, share, seed, classes=10):
    """A share of the labels (round(share n), chosen at random) moved to a uniformly drawn other class."""
    g = torch.Generator().manual_seed(50_000 + seed)
    flip = torch.randperm(len(y), generator=g)[:round(share * len(y))]
    out = y.clone()
    out[flip] = (y[flip] + torch.randint(1, classes, (len(flip),), generator=g)) % classes
    return out


def keep_random(y, fraction, seed, mode):
    """Random pruning: equal draws per class (class-balanced, the paper's scheme) or uniform over the data."""
    return prune(torch.zeros(len(y)), fraction, "random", seed=seed, labels=y, class_balanced=mode == "class-balanced")


def run_seed(seed, train_split, test_split, size, log):
    (x, y, ds), (xt, yt, _) = train_split, test_split
    if size["label_noise"]:
        y = noisy_labels(y, size["label_noise"], seed)
        ds = torch.utils.data.TensorDataset(x, y)
    everything = torch.arange(len(y))
    tracker = ForgettingTracker(len(y))
    early = size["early_epochs"]
    if early is None:
        early = max(1, round(EARLY_SHARE * size["teacher_steps"] * 64 / len(y)))
    snaps = {early: None} if early else None
    teacher = train(make_model(1000 + seed), x, y, keep=everything, steps=size["teacher_steps"], seed=1000 + seed,
                    forgetting=tracker, snapshots=snaps)
    scorer = snaps[early] if snaps else teacher
    if scorer is None:
        raise ValueError(f"--early-epochs {early} is past the teacher's {size['teacher_steps']} steps")
    with torch.no_grad():
        teacher_logits = teacher(x)
    scores = {
        "el2n": kdfast.score(scorer, ds, "el2n", progress=False),
        "grand-last": kdfast.score(scorer, ds, "grand-last", progress=False),
        "forgetting": tracker.scores(),
    }
    out = {"early_epochs": early, "teacher_acc": accuracy(teacher, xt, yt),
           "teacher_state": train_state(teacher, x, y), "main": {}, "sweep": {}}
    log(f"seed {seed}: teacher test acc {out['teacher_acc']:.4f}, train {out['teacher_state']}")
    cache = {}

    def student(method, f, alpha):
        key = (method, f, alpha)
        if key not in cache:  # alpha_for_fraction(0.7) == 0.5 and the sweep reuses main runs: never train twice
            keep = (keep_random(y, f, seed, size["random"]) if method == "random"
                    else prune(scores[method], f, "hard", seed=seed))
            cache[key] = accuracy(train(make_model(seed), x, y, keep=keep, steps=size["steps"], seed=seed,
                                        teacher_logits=teacher_logits, alpha=alpha), xt, yt)
        return cache[key]
    for f in FRACTIONS:
        for method in METHODS:
            for setting, alpha in (("no KD", 0.0), ("KD a=0.5", 0.5), ("KD a=auto", alpha_for_fraction(f))):
                out["main"][f"{f}|{method}|{setting}"] = student(method, f, alpha)
        log(f"seed {seed}: f = {f} done")
    for f in SWEEP_FRACTIONS:
        for alpha in SWEEP_ALPHAS:
            out["sweep"][f"{f}|{alpha}"] = student("random", f, alpha)
    return out


# ------------------------------------------------------------------------------------------- summary
def mean_std(values):
    a = 100 * np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def paired(runs, part, a, b):
    """Mean and standard error (points) of the per-seed difference a - b."""
    d = 100 * np.array([r[part][a] - r[part][b] for r in runs])
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("inf")


def verdict(diff, se):
    if abs(diff) <= 2 * se:
        return "undecidable"
    return "holds" if diff > 0 else "does not hold"


CLAIMS = ("KD (alpha auto) beats no KD", "with KD, random pruning beats the score method (the paper: at small f)",
          "alpha auto beats alpha 0.5 (random pruning)",
          "without KD, random pruning beats the score method (the paper: at small f)")


def claims(runs):
    """The paper's claims as (claim, case, measured, verdict) rows from paired per-seed differences."""
    rows = []

    def add(claim, case, a, b):
        d, se = paired(runs, "main", a, b)
        rows.append((claim, case, f"{d:+.1f} ± {se:.1f}", verdict(d, se)))
    for f in FRACTIONS:
        for method in METHODS:
            add(CLAIMS[0], f"{method}, f = {f}", f"{f}|{method}|KD a=auto", f"{f}|{method}|no KD")
    for f in FRACTIONS:
        for method in METHODS[1:]:
            add(CLAIMS[1], f"vs {method}, f = {f}", f"{f}|random|KD a=auto", f"{f}|{method}|KD a=auto")
    for f in FRACTIONS:
        for method in METHODS[1:]:
            add(CLAIMS[3], f"vs {method}, f = {f}", f"{f}|random|no KD", f"{f}|{method}|no KD")
    for f in FRACTIONS:
        if alpha_for_fraction(f) != 0.5:  # at f = 0.7 the two are the same run
            add(CLAIMS[2], f"alpha {alpha_for_fraction(f):.3g}, f = {f}", f"{f}|random|KD a=auto",
                f"{f}|random|KD a=0.5")
    return rows


def claim_summary(rows):
    """One line per claim: where it holds, where it does not; the rest is undecidable at these seeds."""
    lines = []
    for claim in CLAIMS:
        mine = [r for r in rows if r[0] == claim]
        parts = [f"{v} in {len([r for r in mine if r[3] == v])}/{len(mine)}"
                 + (f" ({'; '.join(r[1] for r in mine if r[3] == v)})" if v != "undecidable" else "")
                 for v in ("holds", "does not hold", "undecidable") if any(r[3] == v for r in mine)]
        lines.append(f"- {claim}: " + ", ".join(parts))
    return lines


def best_alphas(runs):
    """Per f: (best alpha by mean, the alphas tied with it: paired difference to the best within 2 s.e.)."""
    out = {}
    for f in SWEEP_FRACTIONS:
        means = {a: mean_std([r["sweep"][f"{f}|{a}"] for r in runs])[0] for a in SWEEP_ALPHAS}
        best = max(SWEEP_ALPHAS, key=lambda a: means[a])
        tied = [a for a in SWEEP_ALPHAS if a == best or
                verdict(*paired(runs, "sweep", f"{f}|{best}", f"{f}|{a}")) == "undecidable"]
        out[f] = (best, tied)
    return out


def alpha_trend(best):
    """The paper: the best alpha grows as f shrinks. Judged on the best alphas and the ties around them."""
    order = [best[f][0] for f in SWEEP_FRACTIONS]
    detail = "; ".join(f"f = {f}: best {b}, tied {t}" for f, (b, t) in best.items())
    common = set.intersection(*(set(t) for _, t in best.values()))
    if all(b <= a for a, b in zip(order, order[1:])) and order[0] > order[-1] and not common:
        return f"holds ({detail})"
    if common:
        return (f"undecidable: alpha = {', '.join(map(str, sorted(common)))} is within "
                f"2 s.e. of the best at every f ({detail})")
    return f"does not hold ({detail})"


def report(runs, size, prov):
    main = {k: mean_std([r["main"][k] for r in runs]) for k in runs[0]["main"]}
    sweep = {k: mean_std([r["sweep"][k] for r in runs]) for k in runs[0]["sweep"]}
    teacher = mean_std([r["teacher_acc"] for r in runs])
    conv = [converged(r["teacher_state"]) for r in runs]
    states = "; ".join(f"seed {i}: train acc {100 * r['teacher_state']['train_acc']:.2f}%, CE "
                       f"{r['teacher_state']['train_ce']:.4f}" for i, r in enumerate(runs))
    head = "| method | KD | " + " | ".join(f"f = {f}" for f in FRACTIONS) + " |"
    rows = [head, "|" + "---|" * (len(FRACTIONS) + 2)]
    for method in METHODS:
        for setting in KD_SETTINGS:
            cells = [f"{main[f'{f}|{method}|{setting}'][0]:.1f} ± {main[f'{f}|{method}|{setting}'][1]:.1f}"
                     for f in FRACTIONS]
            rows.append(f"| {method} | {setting} | " + " | ".join(cells) + " |")
    sweep_rows = ["| f | " + " | ".join(f"alpha = {a}" for a in SWEEP_ALPHAS) + " | best |",
                  "|" + "---|" * (len(SWEEP_ALPHAS) + 2)]
    best = best_alphas(runs)
    for f in SWEEP_FRACTIONS:
        sweep_rows.append(f"| {f} | " + " | ".join(f"{sweep[f'{f}|{a}'][0]:.1f} ± {sweep[f'{f}|{a}'][1]:.1f}"
                                                  for a in SWEEP_ALPHAS) + f" | {best[f][0]} |")
    trend = alpha_trend(best)
    found = claims(runs)
    claim_rows = ["| claim | case | measured (points, mean ± s.e. of paired differences) | verdict |",
                  "|---|---|---|---|"]
    claim_rows += [f"| {c} | {case} | {m} | {v} |" for c, case, m, v in found]
    autos = ", ".join(f"{alpha_for_fraction(f):.3g}" for f in FRACTIONS)
    return "\n".join([
        "# Data pruning with KD on digits: a fixed step budget, early-training scores, several seeds",
        "",
        f"Digits (1397 train / 400 test); MLP 64-256-256-10 teacher and students (self-distillation); every "
        f"student trained for {size['steps']} SGD steps (batch 64, lr 0.05 cosine to 0, momentum 0.9, wd 5e-4, "
        f"T = 4) whatever f; the teacher for {size['teacher_steps']} steps on all data. Scores: EL2N and GraNd-last "
        + (f"from the teacher after {runs[0]['early_epochs']} passes over the data (early training)"
           if runs[0]["early_epochs"] else "from the converged teacher")
        + f", forgetting over its whole run. Random pruning: {size['random']}. Label noise: "
        + (f"{100 * size['label_noise']:g}% of the training labels moved to another class (teacher and students; "
           "test labels clean)" if size["label_noise"] else "none (digits is clean)")
        + f". {len(runs)} seeds (seed changes teacher, scores, pruning draw and "
        f"student init); test accuracy % as mean ± std over seeds. alpha auto = alpha_for_fraction(f) = {autos} "
        f"for f = {', '.join(map(str, FRACTIONS))}."
        + ("" if all(size[k] >= v for k, v in SIZES["default"].items()) else
           " Reduced size (shared 2-core machine): the script's default is "
           + ", ".join(f"{k} {v}" for k, v in SIZES["default"].items()) + "."),
        "",
        f"Teacher test accuracy {teacher[0]:.1f} ± {teacher[1]:.1f}. Convergence (train accuracy 100% and train CE "
        f"< {CONVERGED_CE}): {'all seeds converged' if all(conv) else 'NOT all seeds converged'} ({states}).",
        "", *rows, "", "Alpha sweep, random pruning:", "", *sweep_rows, "",
        f"Claims, judged on per-seed paired differences over {len(runs)} seeds (holds: mean > 2 s.e.; does not hold: "
        "mean < -2 s.e.; undecidable in between):", "",
        "Summary:", "", *claim_summary(found), f"- the best alpha grows as f shrinks: {trend}", "", *claim_rows, "",
        measured(prov, seeds=range(len(runs))), ""])


def plot(runs, path):
    plt = pyplot("digits_kd")
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(METHODS) + 1, figsize=(4 * (len(METHODS) + 1), 3.6))
    for ax, method in zip(axes, METHODS):
        for setting, style in zip(KD_SETTINGS, ("o-", "s--", "^-")):
            stats = [mean_std([r["main"][f"{f}|{method}|{setting}"] for r in runs]) for f in FRACTIONS]
            ax.errorbar(FRACTIONS, [m for m, _ in stats], yerr=[s for _, s in stats], fmt=style, capsize=3,
                        label=setting)
        ax.set_title(method)
        ax.set_xlabel("fraction kept f")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend()
    low = min(ax.get_ylim()[0] for ax in axes[:-1])
    for ax in axes[:-1]:  # one scale, so the pruning methods compare at a glance
        ax.set_ylim(low, max(a.get_ylim()[1] for a in axes[:-1]))
    ax = axes[-1]
    for f in SWEEP_FRACTIONS:
        stats = [mean_std([r["sweep"][f"{f}|{a}"] for r in runs]) for a in SWEEP_ALPHAS]
        ax.errorbar(SWEEP_ALPHAS, [m for m, _ in stats], yerr=[s for _, s in stats], fmt="o-", capsize=3,
                    label=f"f = {f}")
    ax.set_title("alpha sweep (random)")
    ax.set_xlabel("alpha")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def digits_main(argv, *, name, doc, sizes, run_seed, report, plot, add_setup=None) -> int:
    """The command line of the digits reproductions: a size (--full, --smoke, overrides), --from-json, and a seed
    loop that writes `name`.{md,json,png} after every seed. `run_seed(seed, train, test, size, log)` gets the
    splits as (x, y, dataset). `add_setup(parser)` adds setup flags and returns args -> {key: value} merged into
    the size (so the json records them)."""
    def help_of(size):
        return f"{size['seeds']} seeds x {size['steps']} steps"
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help=f"{help_of(sizes['full'])} (teacher {sizes['full']['teacher_steps']})")
    parser.add_argument("--smoke", action="store_true",
                        help=f"{help_of(sizes['smoke'])}: checks the pipeline, in seconds")
    parser.add_argument("--seeds", type=int, help="override the size's number of seeds")
    parser.add_argument("--steps", type=int, help="override the students' SGD step budget")
    parser.add_argument("--out", default=REPORTS)
    parser.add_argument("--from-json", help="rebuild the table and plot from a previous run's .json, no training")
    setup = add_setup(parser) if add_setup else (lambda args: {})
    args = parser.parse_args(argv)

    def write_outputs(runs, size, prov):
        text = report(runs, size, prov)
        write_report(args.out, name, text, {"size": size, "provenance": prov, "runs": runs})
        plot(runs, os.path.join(args.out, f"{name}.png"))
        return text
    if args.from_json:
        saved = load_saved(args.from_json)
        print(write_outputs(saved["runs"], saved["size"], saved["provenance"]))
        return 0
    size = dict(sizes["full" if args.full else "smoke" if args.smoke else "default"])
    size.update({k: v for k, v in (("seeds", args.seeds), ("steps", args.steps)) if v is not None})
    size.update(setup(args))
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    prov = repro_provenance(f"bench.repro.{name}", argv)
    start = time.perf_counter()
    log = stderr_log(start)
    train_split, test_split = tensors("train"), tensors("test")
    runs = []
    for seed in range(size["seeds"]):
        runs.append(run_seed(seed, train_split, test_split, size, log))
        prov["elapsed_s"] = time.perf_counter() - start
        text = write_outputs(runs, size, prov)  # every finished seed is on disk
    print(text)
    return 0


def setup_flags(parser):
    parser.add_argument("--random", choices=RANDOM_MODES, default="class-balanced",
                        help="random pruning: equal draws per class (the paper) or uniform (default: %(default)s)")
    parser.add_argument("--early-epochs", type=int,
                        help="EL2N and GraNd from the teacher after this many passes (0: the converged teacher) "
                             f"(default: {EARLY_SHARE:g} of the teacher's passes, 9 at 2000 steps)")
    parser.add_argument("--label-noise", type=float, default=0.0,
                        help="share of training labels moved to another class (default: %(default)s)")
    parser.add_argument("--teacher-steps", type=int, help="override the teacher's SGD step budget")

    def setup(args):
        if (args.early_epochs is not None and args.early_epochs < 0) or not 0 <= args.label_noise < 1:
            parser.error(f"--early-epochs must be >= 0 and --label-noise in [0, 1), got {args.early_epochs}, "
                         f"{args.label_noise}")
        out = {"random": args.random, "early_epochs": args.early_epochs, "label_noise": args.label_noise}
        if args.teacher_steps is not None:
            out["teacher_steps"] = args.teacher_steps
        return out
    return setup


def main(argv=None) -> int:
    return digits_main(argv, name="digits_kd", doc=__doc__, sizes=SIZES, run_seed=run_seed, report=report,
                       plot=plot, add_setup=setup_flags)


if __name__ == "__main__":
    raise SystemExit(main())
