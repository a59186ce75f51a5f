"""Reproduces the kernel-regime KD paper's experiments (Figs. 1-3, 5) with two-layer ReLU networks on digits.

The paper's model (Eq. 1) f(x) = sum_k a_k / sqrt(m) relu(w_k . x), a_k in {-1, 1} fixed, w_k ~ N(0, kappa^2 I) with
kappa = 1e-2, trained by full-batch gradient descent on its Eq. 2,

    sum_i (y_i - f(x_i))^2 + lambda sum_i sum_k (phi_k(x_i) - relu(w_k . x_i))^2,

where phi_k = relu(wbar_{l_k} . x) are the hidden features of m teacher units drawn at random (l_1..l_m) from a
wider teacher (mbar units), and the student starts from those units' weights and output signs (Theorem 2's setup).
The paper uses the first two CIFAR-10 classes with labels +-1 and ||x|| = 1, a 100-unit teacher and 20-unit
students; here digits 3 vs 5 (offline; the first two classes, 0 vs 1, are separated by every setting within a
few iterations; --classes picks others), centred with the training mean and
scaled to ||x|| = 1. The learning rate is 0.9 / (2 lambda_max(H_infinity)) (the paper's 2e-4 is tuned to its data).

- Fig. 1 (lambda = 0.01): no teacher (random init, labels only), student with teacher, and the teacher itself.
- Fig. 2: lambda = 0 (the lottery-ticket retraining of the teacher's features), 0.01 and infinity (the label term
  dropped: pure feature matching, which from the teacher's own weights has zero gradient).
- Fig. 3 (lambda = 0.01): perfect teacher (final weights and features), imperfect teacher (an early snapshot's), and
  no student initialisation (random init, final teacher's features).
- Fig. 5: per hidden unit, the mean |<phi_k / ||phi_k||, v_j>| over the top --top-eigvecs eigenvectors v_j of the
  NTK Gram matrix H_infinity_ij = x_i.x_j (pi - arccos x_i.x_j) / (2 pi): partial vs full teacher, and students of
  an imperfect vs a perfect teacher.

    python -m bench.repro.kernel_regime          # paper widths (100/20) and wide (1000/200), 3 seeds; a few minutes
    python -m bench.repro.kernel_regime --full   # 10 seeds, 4x the iterations, also 4000/800
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from bench.common import measured, pyplot, repro_provenance, save_figure, stderr_log, write_report

REPORTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reports")
KAPPA = 1e-2
SETTINGS = ("teacher", "no teacher", "lambda=0.01", "lambda=0 (lottery ticket)", "lambda=inf",
            "imperfect teacher", "no student init")


def digits_pair(classes=(0, 1)):
    """(x, y, x_test, y_test): two digits classes, labels -1/+1, centred on the training mean, unit rows."""
    from kdfast.data import load_dataset

    def split(name):
        ds = load_dataset("digits", split=name)
        keep = (ds.targets == classes[0]) | (ds.targets == classes[1])
        x = ds.images[keep].reshape(int(keep.sum()), -1).double()
        return x, torch.where(ds.targets[keep] == classes[0], -1.0, 1.0).double()
    x, y = split("train")
    xt, yt = split("test")
    mean = x.mean(0)
    unit = lambda v: (v - mean) / (v - mean).norm(dim=1, keepdim=True)  # noqa: E731
    return unit(x), y, unit(xt), yt


def ntk_gram(x):
    """H_infinity of a two-layer ReLU network with Gaussian first-layer weights, for unit-norm rows."""
    c = (x @ x.T).clamp(-1.0, 1.0)
    return c * (math.pi - torch.arccos(c)) / (2 * math.pi)


def output(w, a, x):
    return torch.relu(x @ w.T) @ a / math.sqrt(len(a))


def gradient_descent(w, a, x, y, *, lam, phi, lr, iters, xt, yt, every, snapshot_at=None):
    """Full-batch GD on Eq. 2 (lam = inf drops the label term); curves of the label MSE on train and test."""
    w = w.clone().requires_grad_(True)
    curve, snap = [], None
    for it in range(iters + 1):
        if it % every == 0 or it == iters:
            with torch.no_grad():
                curve.append((it, float((output(w, a, x) - y).square().mean()),
                              float((output(w, a, xt) - yt).square().mean())))
        if it == snapshot_at:
            snap = w.detach().clone()
        if it == iters:
            break
        hidden = torch.relu(x @ w.T)
        feature = 0.0 if phi is None else (phi - hidden).square().sum()
        label = (y - hidden @ a / math.sqrt(len(a))).square().sum()
        loss = feature if math.isinf(lam) else label + (0.0 if phi is None else lam * feature)
        (g,) = torch.autograd.grad(loss, w)
        with torch.no_grad():
            w -= lr * g
    return {"w": w.detach(), "curve": curve, "snapshot": snap}


def overlap(phi, eigvecs):
    """Per unit: mean over the given eigenvectors of |<phi_k / ||phi_k||, v_j>| (units with zero features skipped)."""
    norms = phi.norm(dim=0)
    alive = norms > 0
    return ((phi[:, alive] / norms[alive]).T @ eigvecs).abs().mean(1)


def run_seed(seed, data, *, teacher_width, student_width, iters, early_frac, lr, top, every):
    x, y, xt, yt = data
    g = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    wbar0 = KAPPA * torch.randn(teacher_width, d, generator=g, dtype=torch.float64)
    abar = torch.randint(0, 2, (teacher_width,), generator=g).double() * 2 - 1
    early = max(1, round(early_frac * iters))
    kw = dict(lr=lr, iters=iters, xt=xt, yt=yt, every=every)
    teacher = gradient_descent(wbar0, abar, x, y, lam=0.0, phi=None, snapshot_at=early, **kw)
    units = torch.randperm(teacher_width, generator=g)[:student_width]
    a = abar[units]
    w_final, w_early = teacher["w"][units], teacher["snapshot"][units]
    phi_final, phi_early = torch.relu(x @ w_final.T), torch.relu(x @ w_early.T)
    w_random = KAPPA * torch.randn(student_width, d, generator=g, dtype=torch.float64)
    runs = {"teacher": teacher,
            "no teacher": gradient_descent(w_random, a, x, y, lam=0.0, phi=None, **kw),
            "lambda=0.01": gradient_descent(w_final, a, x, y, lam=0.01, phi=phi_final, **kw),
            "lambda=0 (lottery ticket)": gradient_descent(w_final, a, x, y, lam=0.0, phi=None, **kw),
            "lambda=inf": gradient_descent(w_final, a, x, y, lam=math.inf, phi=phi_final, **kw),
            "imperfect teacher": gradient_descent(w_early, a, x, y, lam=0.01, phi=phi_early, **kw),
            "no student init": gradient_descent(w_random, a, x, y, lam=0.01, phi=phi_final, **kw)}
    eigvecs = torch.linalg.eigh(ntk_gram(x)).eigenvectors[:, -top:]
    overlaps = {"teacher, partial": overlap(torch.relu(x @ teacher["snapshot"].T), eigvecs),
                "teacher, full": overlap(torch.relu(x @ teacher["w"].T), eigvecs),
                "student of imperfect teacher": overlap(torch.relu(x @ runs["imperfect teacher"]["w"].T), eigvecs),
                "student of perfect teacher": overlap(torch.relu(x @ runs["lambda=0.01"]["w"].T), eigvecs)}
    curves = {name: r["curve"] for name, r in runs.items()}
    teacher_early = next(c for c in teacher["curve"] if c[0] >= early)
    return {"curves": curves, "overlaps": {k: v.tolist() for k, v in overlaps.items()}, "early_iter": early,
            "early_teacher_train_mse": teacher_early[1]}


# ------------------------------------------------------------------------------------------- report
def _stat(values, digits=3):
    t = torch.tensor(values, dtype=torch.float64)
    return f"{float(t.mean()):.{digits}g} ± {float(t.std()) if len(values) > 1 else 0.0:.2g}"


def _at(curve, it):
    return next(c for c in curve if c[0] >= it)


def _iters_to(curve, level):
    """First recorded iteration whose training MSE is <= level (None if never)."""
    return next((c[0] for c in curve if c[1] <= level), None)


def table(seeds, names, checkpoints, column):
    lines = ["| setting | " + " | ".join(f"it {c}" for c in checkpoints) + " |", "|---|" + "---|" * len(checkpoints)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_stat([_at(s["curves"][name], c)[column] for s in seeds])
                                                for c in checkpoints) + " |")
    return lines


def claims(seeds, iters):
    final = {n: [s["curves"][n][-1] for s in seeds] for n in SETTINGS}
    mean = lambda n, col: sum(c[col] for c in final[n]) / len(seeds)  # noqa: E731
    wins = lambda a, b, col: sum(ca[col] < cb[col] for ca, cb in zip(final[a], final[b]))  # noqa: E731
    level = 3 * sum(s["curves"]["no teacher"][-1][1] for s in seeds) / len(seeds)
    speed = {n: [_iters_to(s["curves"][n], level) for s in seeds] for n in SETTINGS}
    fmt_speed = lambda n: ", ".join("never" if v is None else str(v) for v in speed[n])  # noqa: E731
    k = len(seeds)
    out = []

    def verdict(ok):
        return "holds" if ok else "does not hold"
    ok = wins("lambda=0.01", "no teacher", 2) == k and wins("lambda=0.01", "no teacher", 1) == k
    out.append(f"- Fig. 1, final quality: the student with a teacher (lambda = 0.01) beats the student without: "
               f"{verdict(ok)} (train MSE {mean('lambda=0.01', 1):.3g} vs {mean('no teacher', 1):.3g}, test "
               f"{mean('lambda=0.01', 2):.3g} vs {mean('no teacher', 2):.3g}; better test loss in "
               f"{wins('lambda=0.01', 'no teacher', 2)}/{k} seeds). The teacher: train {mean('teacher', 1):.3g}, "
               f"test {mean('teacher', 2):.3g}.")
    fast = [t for t in speed["lambda=0.01"] if t is not None]
    ok = all(a is not None and (b is None or a < b) for a, b in zip(speed["lambda=0.01"], speed["no teacher"]))
    out.append(f"- Fig. 1, speed (Theorem 3): iterations to bring the train MSE below {level:.3g} (3x the no-teacher "
               f"student's final value): with teacher {fmt_speed('lambda=0.01')}, without {fmt_speed('no teacher')}: "
               f"{verdict(ok and bool(fast))}. But the lottery-ticket run (the same initialisation from the teacher's "
               f"units, lambda = 0) gets there in {fmt_speed('lambda=0 (lottery ticket)')}: the head start comes from "
               f"initialising at the teacher's units (train MSE {sum(s['curves']['lambda=0.01'][0][1] for s in seeds) / k:.3g} "
               f"at iteration 0 instead of ~1), not from the distillation term.")
    best = min(("lambda=0.01", "lambda=0 (lottery ticket)", "lambda=inf"), key=lambda n: mean(n, 2))
    out.append(f"- Fig. 2 (lambda = 0.01 beats both extremes in quality and speed): {verdict(best == 'lambda=0.01')}; "
               f"the best final test MSE is {best}'s (lambda = 0.01: test {mean('lambda=0.01', 2):.3g}, train "
               f"{mean('lambda=0.01', 1):.3g}; lambda = 0: test {mean('lambda=0 (lottery ticket)', 2):.3g}, train "
               f"{mean('lambda=0 (lottery ticket)', 1):.3g}; {wins('lambda=0.01', 'lambda=0 (lottery ticket)', 2)}/{k} "
               f"seeds favour 0.01 on test). The paper's own Theorem 1 predicts a finite lambda to leave a bias: f_inf "
               f"= (a y + lambda sum_k a_k phi_k / sqrt(m)) / (a + lambda) is pulled towards the teacher units' output, "
               f"about sqrt(m / mbar) times the teacher's. lambda = inf keeps the student at its initialisation (train "
               f"MSE {mean('lambda=inf', 1):.3g}: the teacher's units alone): that part holds.")
    ok = mean("lambda=0 (lottery ticket)", 1) < 0.1 * mean("lambda=inf", 1)
    out.append(f"- Sec. 2.5.1 (lottery ticket: retraining m of the teacher's features on the labels reaches a small "
               f"training loss): {verdict(ok)}: train MSE after {iters} iterations {mean('lambda=0 (lottery ticket)', 1):.3g} "
               f"(from {sum(s['curves']['lambda=0 (lottery ticket)'][0][1] for s in seeds) / k:.3g} at the teacher's "
               "units); the theorem's zero is a limit of infinite width and time.")
    ok = (mean("lambda=0.01", 2) <= min(mean("imperfect teacher", 2), mean("no student init", 2)))
    out.append(f"- Fig. 3: the perfect teacher gives the best student: {verdict(ok)} (test MSE perfect "
               f"{mean('lambda=0.01', 2):.3g}, imperfect (snapshot at iteration {seeds[0]['early_iter']}, teacher train MSE "
               f"{sum(s['early_teacher_train_mse'] for s in seeds) / k:.3g}) {mean('imperfect teacher', 2):.3g}, no "
               f"student init {mean('no student init', 2):.3g}).")
    ov = {n: [sum(s["overlaps"][n]) / len(s["overlaps"][n]) for s in seeds] for n in seeds[0]["overlaps"]}
    om = {n: sum(v) / k for n, v in ov.items()}
    ok_t = all(f > p for f, p in zip(ov["teacher, full"], ov["teacher, partial"]))
    ok_s = all(f > p for f, p in zip(ov["student of perfect teacher"], ov["student of imperfect teacher"]))
    out.append(f"- Fig. 5a: the fully trained teacher's features overlap the top eigenvectors of H_infinity more than "
               f"the partially trained one's: {verdict(ok_t)} (mean overlap {om['teacher, full']:.4g} vs "
               f"{om['teacher, partial']:.4g}).")
    out.append(f"- Fig. 5b: and the student of the perfect teacher inherits it: {verdict(ok_s)} "
               f"({om['student of perfect teacher']:.4g} vs {om['student of imperfect teacher']:.4g}).")
    return out


def plot(results, path):
    plt = pyplot("kernel_regime")
    if plt is None:
        return False
    groups = (("Fig. 1", ("teacher", "no teacher", "lambda=0.01")),
              ("Fig. 2", ("teacher", "lambda=0 (lottery ticket)", "lambda=0.01", "lambda=inf")),
              ("Fig. 3", ("lambda=0.01", "imperfect teacher", "no student init")))
    fig, axes = plt.subplots(2 * len(results), 4, figsize=(20, 7.5 * len(results)), squeeze=False)
    for row, (label, seeds) in enumerate(results.items()):
        for col, (title, names) in enumerate(groups):
            for j, (what, column) in enumerate((("train", 1), ("test", 2))):
                ax = axes[2 * row + j, col]
                for name in names:
                    its = [c[0] for c in seeds[0]["curves"][name]]
                    vals = [sum(s["curves"][name][i][column] for s in seeds) / len(seeds) for i in range(len(its))]
                    shown = {0: "with teacher, lambda=0.01", 2: "perfect teacher (lambda=0.01)"}.get(col, name)
                    ax.plot(its, vals, label=shown if name == "lambda=0.01" else name)
                ax.set(yscale="log", xlabel="GD iteration", ylabel=f"{what} MSE", title=f"{label}: {title} ({what})")
                ax.legend(fontsize=7)
        for j, pair in enumerate((("teacher, partial", "teacher, full"),
                                  ("student of imperfect teacher", "student of perfect teacher"))):
            ax = axes[2 * row + j, 3]
            for name in pair:
                ax.hist([v for s in seeds for v in s["overlaps"][name]], bins=30, alpha=0.5, label=name)
            ax.set(xlabel="overlap with top eigenvectors of H_inf", title=f"{label}: Fig. 5{'ab'[j]}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="10 seeds, 4x the iterations, also 4000/800 units")
    parser.add_argument("--seeds", type=int, help="(default 3, --full 10)")
    parser.add_argument("--iters", type=int, help="GD iterations per run (default 1500, --full 6000)")
    parser.add_argument("--widths", help="teacher/student pairs (default 100/20,1000/200; --full adds 4000/800)")
    parser.add_argument("--classes", default="3,5",
                        help="two digits classes (default: %(default)s; 0 vs 1 is too easy to tell settings apart)")
    parser.add_argument("--early", type=float, default=0.02,
                        help="imperfect teacher: snapshot at this fraction of the iterations (default: %(default)s)")
    parser.add_argument("--top-eigvecs", type=int, default=5, help="Fig. 5 eigenvectors (default: %(default)s)")
    parser.add_argument("--out", default=REPORTS, help=f"figure folder (default: {REPORTS})")
    args = parser.parse_args(argv)
    seeds = args.seeds or (10 if args.full else 3)
    iters = args.iters or (6000 if args.full else 1500)
    widths_text = args.widths or ("100/20,1000/200,4000/800" if args.full else "100/20,1000/200")
    try:
        widths = [tuple(int(v) for v in pair.split("/")) for pair in widths_text.split(",")]
        classes = tuple(int(c) for c in args.classes.split(","))
    except ValueError:
        parser.error(f"--widths must look like 100/20,2000/400 and --classes like 0,1, got {widths_text!r}, "
                     f"{args.classes!r}")
    if seeds < 1 or iters < 10 or len(classes) != 2 or any(len(w) != 2 or not 0 < w[1] <= w[0] for w in widths) \
            or not 0 < args.early < 1:
        parser.error("--seeds >= 1, --iters >= 10, two --classes, student width <= teacher width, --early in (0, 1)")
    tic = time.perf_counter()
    log = stderr_log(tic)
    prov = repro_provenance("bench.repro.kernel_regime", argv)
    data = digits_pair(classes)
    lam_max = float(torch.linalg.eigvalsh(ntk_gram(data[0]))[-1])
    lr = 0.9 / (2 * lam_max)
    every = max(1, iters // 200)
    checkpoints = sorted({0, iters // 100, iters // 20, iters // 4, iters})
    results = {}
    for tw, sw in widths:
        label = f"teacher {tw} / student {sw} units"
        results[label] = []
        for seed in range(seeds):
            results[label].append(run_seed(seed, data, teacher_width=tw, student_width=sw, iters=iters,
                                           early_frac=args.early, lr=lr, top=args.top_eigvecs, every=every))
            log(f"{label}, seed {seed}")
    prov["elapsed_s"] = time.perf_counter() - tic
    has_png = plot(results, os.path.join(args.out, "kernel_regime.png"))
    text = [f"# KD in the kernel regime (`{prov['command']}`)", "",
            f"Digits classes {classes[0]} vs {classes[1]} as -1/+1 ({len(data[1])} train / {len(data[3])} test, centred, "
            f"unit norm); two-layer ReLU, a_k = +-1 fixed, w ~ N(0, {KAPPA:g}^2 I); full-batch GD, lr = 0.9 / (2 "
            f"lambda_max(H_inf)) = {lr:.3g}, {iters} iterations; label MSE (mean over examples) at a few iterations, "
            f"mean ± std over {seeds} seeds (teacher init, student units and random inits vary; the data do not).", ""]
    for label, seed_runs in results.items():
        text += [f"## {label}", "", "Train MSE:", "", *table(seed_runs, SETTINGS, checkpoints, 1), "", "Test MSE:", "",
                 *table(seed_runs, SETTINGS, checkpoints, 2), "", "Claims:", "", *claims(seed_runs, iters), ""]
    text += [measured(prov, figure="kernel_regime.png" if has_png else None), ""]
    # curves at the tables' iterations (the png has them all): (iteration, train MSE, test MSE)
    record = {"provenance": prov, "lr": lr, "results": {
        k: [{"curves": {n: [_at(c, it) for it in checkpoints] for n, c in s["curves"].items()},
             "mean_overlap": {n: sum(o) / len(o) for n, o in s["overlaps"].items()}} for s in v]
        for k, v in results.items()}}
    write_report(args.out, "kernel_regime", "\n".join(text), record, indent=None)
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
