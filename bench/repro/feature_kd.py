"""Reproduces the data-pruning paper's Table 1 on digits: does a feature-distillation term (VID, and FitNets hints,
attention transfer) added to logit KD help a student trained on a small forgetting-pruned subset?

The paper (App. C, Table 1; CIFAR-100, forgetting pruning, f = 5/10/30/50%) trains with
L = L_cls + alpha L_KD + beta L_R, alpha = beta = 1, against vanilla KD with alpha = 2 (beta = 0), and finds VID
best at every f. In kdfast's convention (loss = (1 - a) CE + a T^2 KL + beta' term) the same ratios are:
KD alone a = 2/3; KD + term a = 1/2 and beta' = beta / 2 (the whole loss halved, which SGD's lr absorbs).
beta is each term's usual weight (RepDistiller's: VID 1, hint 100, AT 1000), so beta' = 0.5, 50, 500.

Protocol, per seed: a CNN teacher (3 conv-BN-ReLU stages, width 16) trained on all 1397 training images for
--teacher-steps SGD steps, tracking forgetting events (converged: 100% train accuracy and train CE < 0.01,
checked and reported); forgetting-pruned subsets (the hardest f); students of the same architecture
(self-distillation) trained for the same --steps SGD steps at every f (batch 64, lr 0.05 cosine, momentum 0.9,
wd 5e-4, T = 4). Feature layers: the classifier heads' inputs (hint, vid: the pooled 32-d features) and the last
conv stage's 4x4 maps (at). Test accuracy on the 400 held-out images after the last step. Gaps are judged on
per-seed paired differences (holds: mean > 2 standard errors).

    python -m bench.repro.feature_kd                       # 3 seeds x 500 steps: 39 min wall in the recorded run
                                                           # (reports/feature_kd.md: one thread, shared machine)
    python -m bench.repro.feature_kd --full                # 5 seeds x 1500 steps
    python -m bench.repro.feature_kd --smoke --out /tmp/x  # seconds (tests)

Writes bench/repro/reports/feature_kd.{md,png,json}.
"""
from __future__ import annotations

import torch

from bench.common import measured, pyplot, save_figure
from bench.repro.digits_kd import (accuracy, converged, digits_main, make_model, mean_std, paired, train, train_state,
                                   verdict)
from kdfast.distill.terms import KD_TERMS, make_kd_term
from kdfast.scoring import ForgettingTracker
from kdfast.pruning.selection import prune

FRACTIONS = (0.05, 0.1, 0.3, 0.5)
# setting -> (alpha, feature term or None)
SETTINGS = {"no KD": (0.0, None), "KD": (2 / 3, None), "KD + VID": (0.5, "vid"), "KD + hint": (0.5, "hint"),
            "KD + AT": (0.5, "at")}
PAPER = {"no KD": (14.46, 22.21, 49.41, 67.47), "KD": (28.62, 46.27, 66.82, 70.95),
         "KD + VID": (32.5, 49.46, 67.38, 71.16), "KD + hint": (25.66, 44.84, 65.7, 70.77),
         "KD + AT": (28.26, 42.59, 65.75, 70.45)}
ARCH = "cnn"
SIZES = {"default": dict(seeds=3, steps=500, teacher_steps=1500),
         "full": dict(seeds=5, steps=1500, teacher_steps=3000),
         "smoke": dict(seeds=2, steps=4, teacher_steps=30)}  # 30 steps: every example seen once


def beta_of(term):
    return 0.5 * KD_TERMS[term].default_beta


def run_seed(seed, train_split, test_split, size, log):
    (x, y, _), (xt, yt, _) = train_split, test_split
    tracker = ForgettingTracker(len(y))
    teacher = train(make_model(1000 + seed, ARCH), x, y, keep=torch.arange(len(y)), steps=size["teacher_steps"],
                    seed=1000 + seed, forgetting=tracker)
    scores = tracker.scores()
    with torch.no_grad():
        teacher_logits = teacher(x)
    out = {"teacher_acc": accuracy(teacher, xt, yt), "teacher_state": train_state(teacher, x, y), "acc": {},
           "layers": {}}
    log(f"seed {seed}: teacher test acc {out['teacher_acc']:.4f}, train {out['teacher_state']}")
    for f in FRACTIONS:
        keep = prune(scores, f, "hard", seed=seed)
        for setting, (alpha, term_name) in SETTINGS.items():
            student = make_model(seed, ARCH)
            term = None
            if term_name is not None:
                torch.manual_seed(seed)
                term = make_kd_term(term_name, student, teacher, x[:1], beta=beta_of(term_name))
                out["layers"][term_name] = [term.student_layer, term.teacher_layer]
            train(student, x, y, keep=keep, steps=size["steps"], seed=seed, teacher=None if term is None else teacher,
                  teacher_logits=teacher_logits, alpha=alpha, kd_term=term)  # the teacher runs only for features
            out["acc"][f"{f}|{setting}"] = accuracy(student, xt, yt)
        log(f"seed {seed}: f = {f} done")
    return out


def report(runs, size, prov):
    acc = {k: mean_std([r["acc"][k] for r in runs]) for k in runs[0]["acc"]}
    teacher = mean_std([r["teacher_acc"] for r in runs])
    conv = [converged(r["teacher_state"]) for r in runs]
    states = "; ".join(f"seed {i}: train acc {100 * r['teacher_state']['train_acc']:.2f}%, CE "
                       f"{r['teacher_state']['train_ce']:.4f}" for i, r in enumerate(runs))
    pct = " | ".join(f"{int(100 * f)}%" for f in FRACTIONS)
    rows = [f"| method (kdfast a, beta') | {pct} | paper (CIFAR-100) {pct} |",
            "|---|" + "---|" * (2 * len(FRACTIONS))]
    for setting, (alpha, term) in SETTINGS.items():
        label = f"{setting} (a = {alpha:.3g}{f', beta = {beta_of(term):g}' if term else ''})"
        cells = [f"{acc[f'{f}|{setting}'][0]:.1f} ± {acc[f'{f}|{setting}'][1]:.1f}" for f in FRACTIONS]
        rows.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(f"{v:g}" for v in PAPER[setting]) + " |")
    checks = [("KD", "no KD", "KD beats no KD")] + [
        (s, "KD", f"{s} beats KD alone") for s in SETTINGS if s.startswith("KD +")] + [
        ("KD + VID", s, f"VID beats {s.split('+ ')[1]}") for s in ("KD + hint", "KD + AT")]
    claim_rows = ["| claim | f | measured (points, mean ± s.e. of paired differences) | verdict | paper |",
                  "|---|---|---|---|---|"]
    summary = []
    for a, b, claim in checks:
        found = {}
        for j, f in enumerate(FRACTIONS):
            d, se = paired(runs, "acc", f"{f}|{a}", f"{f}|{b}")
            found[f] = verdict(d, se)
            claim_rows.append(f"| {claim} | {f} | {d:+.1f} ± {se:.1f} | {found[f]} | "
                              f"{PAPER[a][j] - PAPER[b][j]:+.2f} |")
        paper = [f for j, f in enumerate(FRACTIONS) if PAPER[a][j] > PAPER[b][j]]
        summary.append(f"- {claim}: " + "; ".join(
            f"{v} at f = {', '.join(str(f) for f in FRACTIONS if found[f] == v)}"
            for v in ("holds", "reversed", "within noise") if v in found.values())
            + f" (the paper: better at f = {', '.join(map(str, paper)) or 'none'})")
    layers = ", ".join(f"{t}: student {s!r}, teacher {te!r}" for t, (s, te) in runs[0]["layers"].items())
    return "\n".join([
        "# Feature distillation on pruned digits (the data-pruning paper's Table 1)",
        "",
        f"Digits (1397 train / 400 test), forgetting pruning (hardest f kept, counts from the teacher's training); "
        f"CNN teacher and students (self-distillation), {size['steps']} SGD steps per student whatever f, teacher "
        f"{size['teacher_steps']} steps; {len(runs)} seeds; test accuracy % as mean ± std over seeds. Teacher "
        f"{teacher[0]:.1f} ± {teacher[1]:.1f}; convergence (train accuracy 100% and CE < 0.01): "
        f"{'all seeds converged' if all(conv) else 'NOT all seeds converged'} ({states}). Layers: {layers}.",
        "", *rows, "", "Summary (betas are the usual CIFAR ones, not tuned for 8x8 digits):", "", *summary, "",
        "Claims, judged on per-seed paired differences (holds: mean > 2 s.e.; reversed: mean < "
                       "-2 s.e.); the paper's column is its Table 1 gap on CIFAR-100 (one run, no spread):", "",
        *claim_rows, "",
        measured(prov, seeds=range(len(runs))), ""])


def plot(runs, path):
    plt = pyplot("feature_kd")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for setting, style in zip(SETTINGS, ("o:", "s-", "^-", "v--", "d--")):
        stats = [mean_std([r["acc"][f"{f}|{setting}"] for r in runs]) for f in FRACTIONS]
        ax.errorbar(FRACTIONS, [m for m, _ in stats], yerr=[s for _, s in stats], fmt=style, capsize=3,
                    label=setting)
    ax.set_xscale("log")
    ax.set_xticks(FRACTIONS, [str(f) for f in FRACTIONS])
    ax.set_xticks([], minor=True)  # no log-scale minor labels over the fractions
    ax.set_xlabel("fraction kept f (forgetting pruning)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main(argv=None) -> int:
    return digits_main(argv, name="feature_kd", doc=__doc__, sizes=SIZES, run_seed=run_seed, report=report,
                       plot=plot)


if __name__ == "__main__":
    raise SystemExit(main())
