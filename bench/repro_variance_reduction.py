"""Reproduces the KD-variance-reduction paper's convex experiments (Fig. 2b and Fig. 3) on digits (CPU, minutes).

Problem: multinomial logistic regression (no regularisation) on digits features that ship offline: the 1397
training images projected on their top-4 principal components, standardised. With 4 features the classes overlap,
so the cross-entropy has a finite minimiser x*, found here by L-BFGS in float64 (gradient norm printed).

For each seed (the mini-batch order): SGD without momentum or weight decay, batch 10, constant step γ, from
x0 = 0, through kdfast.distill_step at T = 1 (where the paper's Prop. 1 is exact for this model):
  - SGD (λ = 0);
  - self-distillation (Eq. 7) from an SGD-trained teacher (same recipe, another batch order), λ on a grid;
  - the same from the L-BFGS teacher θ = x* (Fig. 2b's "optimal" teacher);
  - unbiased self-distillation (Eq. 16: `correction=kdfast.teacher_gradient(teacher, data)`), same grid.
Metric: the exact full-data training loss gap f(x) − f* after every epoch (the paper averages mini-batch
losses instead), its minimum and its mean over the last epochs; per epoch, the mean squared distance between the
applied stochastic gradient and the true one, E||ĝ − ∇f(x)||² (Fig. 3 right; includes the bias).
λ* of Eq. 14 comes from kdfast.teacher_report(x*, θ, method="exact") (x* from the solve), and is set against the
grid-best λ; also shown: λ minimising a noisy-quadratic model of the stationary gap (not in the paper):
    gap(λ) ≈ ½ λ² ∇f(θ)ᵀ H⁺ ∇f(θ) + (γ/4) tr Cov(∇f_ξ(x*) − λ ∇f_ξ(θ)),  H = ∇²f(x*).

    python -m bench.repro_variance_reduction            # 2 seeds x 20 epochs: ~4 CPU-minutes (21 min wall when
                                                        # 8 jobs shared 2 cores)
    python -m bench.repro_variance_reduction --full     # 5 seeds x 50 epochs
    python -m bench.repro_variance_reduction --smoke --out /tmp/x   # seconds, for the test suite

Writes bench/figures/repro_variance_reduction.{md,png,json}.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from torch import nn

from bench.common import measured, pyplot, repro_provenance, save_figure, stderr_log, write_report
from kdfast.data import load_dataset
from kdfast.distill.setup import KDSetup
from kdfast.distill.step import distill_step
from kdfast.distill.variance_reduction import teacher_gradient, teacher_report

LAMBDAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)
SMOKE_LAMBDAS = (0.0, 0.5, 1.0)
FIGURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")
NAME = "repro_variance_reduction"
SETTINGS = ("SD, SGD teacher", "unbiased SD, SGD teacher", "SD, L-BFGS teacher")


def features(k=4):
    """(F, Y): top-k principal components of the digits training images, standardised, float64."""
    ds = load_dataset("digits", split="train")
    x = torch.stack([ds[i][0] for i in range(len(ds))]).reshape(len(ds), -1).double()
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    f = x @ v[:k].T
    return f / f.std(0), ds.targets.clone()


def _zero_model(k, dtype=torch.float32):
    m = nn.Linear(k, 10).to(dtype)
    nn.init.zeros_(m.weight)
    nn.init.zeros_(m.bias)
    return m


def solve(f, y):
    """x* by L-BFGS in float64 (restarted until the gradient stops shrinking); returns (model, f*, ||∇f(x*)||)."""
    model = _zero_model(f.shape[1], torch.float64)
    params = list(model.parameters())
    for _ in range(10):
        opt = torch.optim.LBFGS(params, lr=1, max_iter=1000, tolerance_grad=1e-14, tolerance_change=0,
                                history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(f), y)
            loss.backward()
            return loss
        opt.step(closure)
    loss = nn.functional.cross_entropy(model(f), y)
    grads = torch.autograd.grad(loss, params)
    return model, float(loss.detach()), float(torch.cat([g.reshape(-1) for g in grads]).norm())


def quadratic_lambda(xstar, f, y, report):
    """λ minimising the noisy-quadratic gap model above; needs ∇f(θ)ᵀ H⁺ ∇f(θ) at x* (float64)."""
    params = list(xstar.parameters())
    shapes = [p.shape for p in params]

    def loss_of(flat):
        w, b = flat[:shapes[0].numel()].view(shapes[0]), flat[shapes[0].numel():].view(shapes[1])
        return nn.functional.cross_entropy(f @ w.T + b, y)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    hess = torch.autograd.functional.hessian(loss_of, flat)
    g = report["teacher_full_vec"]
    quad = float(g @ torch.linalg.pinv(hess, hermitian=True, rtol=1e-10) @ g)
    lr = report["lr"]
    var_b = report["teacher_sq"] - report["teacher_full_sq"]
    return (lr / 2) * report["cross"] / (quad + (lr / 2) * var_b), quad


def _full_loss_gap(model, f64, y, fstar):
    with torch.no_grad():
        w, b = model.weight.double(), model.bias.double()
        return float(nn.functional.cross_entropy(f64 @ w.T + b, y)) - fstar


def train(f32, f64, y, fstar, *, epochs, lr, seed, teacher=None, lam=0.0, correction=None, batch=10):
    """SGD / self-distillation / unbiased self-distillation with distill_step; per-epoch gap and gradient MSE."""
    model = _zero_model(f32.shape[1])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    params = list(model.parameters())
    kd = KDSetup(teacher=teacher, alpha=lam, temperature=1.0, correction=correction if lam else None)
    gaps, mse = [], []
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 1_000 + epoch))
        sq, steps = 0.0, 0
        for start in range(0, len(y), batch):
            pick = order[start:start + batch]
            true = torch.autograd.grad(nn.functional.cross_entropy(model(f32), y), params)
            distill_step(model, f32[pick], y[pick], opt, kd)
            sq += float(sum(((p.grad - t) ** 2).sum() for p, t in zip(params, true)))
            steps += 1
        gaps.append(_full_loss_gap(model, f64, y, fstar))
        mse.append(sq / steps)
    return model, gaps, mse


def _summary(gaps, last):
    return {"min": min(gaps), "last": sum(gaps[-last:]) / last}


def run_seed(seed, data, args, log):
    f64, y, xstar, fstar = data
    f32 = f64.float()
    common = dict(epochs=args.epochs, lr=args.lr, seed=seed)
    teacher, tgaps, _ = train(f32, f64, y, fstar, **{**common, "seed": 10_000 + seed})
    xstar32 = copy.deepcopy(xstar).float()
    report = teacher_report(xstar, copy.deepcopy(teacher).double(), (f64, y), lr=args.lr, batch_size=10,
                            method="exact")
    g = teacher_gradient(copy.deepcopy(teacher).double(), (f64, y))
    report["teacher_full_vec"] = torch.cat([t.reshape(-1) for t in g.grads])
    lam_quad, quad = quadratic_lambda(xstar, f64, y, report)
    report.pop("teacher_full_vec")
    log(f"seed {seed}: SGD teacher gap {tgaps[-1]:.4g}; Eq. 14 lambda* {report['lambda_star']:.3f}, "
        f"quadratic-model lambda {lam_quad:.3f}")
    correction = teacher_gradient(teacher, (f32, y))
    runs = {}
    for lam in args.lambdas:
        for setting, kw in ((SETTINGS[0], dict(teacher=teacher)),
                            (SETTINGS[1], dict(teacher=teacher, correction=correction)),
                            (SETTINGS[2], dict(teacher=xstar32))):
            if lam == 0 and setting != SETTINGS[0]:
                continue  # λ = 0 is plain SGD in every setting
            _, gaps, mse = train(f32, f64, y, fstar, lam=lam, **kw, **common)
            runs[f"{setting}|{lam}"] = {"gaps": gaps, "mse": mse}
        log(f"seed {seed}: lambda {lam} done")
    return {"seed": seed, "teacher_gap": tgaps[-1], "report": report, "lambda_quadratic": lam_quad,
            "teacher_quad_form": quad, "runs": runs}


# ----------------------------------------------------------------------------------------- reporting
def _mean_std(values):
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def summarise(results, lambdas, last):
    """{setting|λ: {"min": (mean, std), "last": (mean, std)}} over seeds; λ = 0 (SGD) shared by all settings."""
    out = {}
    for setting in SETTINGS:
        for lam in lambdas:
            key = f"{SETTINGS[0] if lam == 0 else setting}|{lam}"
            per_seed = [_summary(r["runs"][key]["gaps"], last) for r in results]
            out[f"{setting}|{lam}"] = {m: _mean_std([s[m] for s in per_seed]) for m in ("min", "last")}
    return out


def _best(stats, setting, lambdas):
    return min(lambdas, key=lambda lam: stats[f"{setting}|{lam}"]["last"][0])


def claims(stats, results, lambdas):
    lines = []
    sgd = stats[f"{SETTINGS[0]}|0.0"]["last"][0]
    best_sd = _best(stats, SETTINGS[0], lambdas)
    v = stats[f"{SETTINGS[0]}|{best_sd}"]["last"][0]
    spread = max(stats[f"{SETTINGS[0]}|0.0"]["last"][1], stats[f"{SETTINGS[0]}|{best_sd}"]["last"][1])
    lines.append(f"Fig. 2 (SGD teacher): some λ > 0 beats SGD: {'holds' if best_sd > 0 and v < sgd else 'does not hold'}"
                 f" (best λ = {best_sd}: gap {v:.4g} vs SGD {sgd:.4g}, mean over the last epochs; the difference "
                 f"{sgd - v:.2g} is {'within' if sgd - v <= spread else 'beyond'} one seed-to-seed std, {spread:.2g}).")
    best_opt = _best(stats, SETTINGS[2], lambdas)
    mono = all(stats[f"{SETTINGS[2]}|{a}"]["last"][0] >= stats[f"{SETTINGS[2]}|{b}"]["last"][0]
               for a, b in zip(lambdas, lambdas[1:]))
    lines.append(f"Fig. 2b (L-BFGS teacher): larger λ is always better: {'holds' if mono else 'does not hold'} "
                 f"(best λ = {best_opt}).")
    best_unb = _best(stats, SETTINGS[1], lambdas)
    u = stats[f"{SETTINGS[1]}|{best_unb}"]["last"][0]
    u1 = stats[f"{SETTINGS[1]}|{lambdas[-1]}"]["last"][0]
    lines.append(f"Fig. 3 / Thm. 3: unbiased SD beats biased SD: {'holds' if u < v else 'does not hold'} "
                 f"(unbiased best λ = {best_unb}: {u:.4g}; at λ = {lambdas[-1]}: {u1:.4g}; biased best {v:.4g}); "
                 f"'no tuning, λ = 1' {'holds' if u1 <= 1.05 * u else 'does not hold'} here.")
    lam_eq14 = _mean_std([r["report"]["lambda_star"] for r in results])
    lam_quad = _mean_std([r["lambda_quadratic"] for r in results])
    lines.append(f"Eq. 14's λ* = {lam_eq14[0]:.3f} ± {lam_eq14[1]:.3f} (x* from L-BFGS, the SGD teacher) against "
                 f"the grid-best λ = {best_sd}: {'agrees' if abs(lam_eq14[0] - best_sd) <= 0.15 else 'disagrees'}. "
                 "Eq. 14 minimises an upper bound whose teacher-bias term λ²||∇f(θ)||² carries the constant 1/γ "
                 f"(App. C has c/γ with c = μ/4 or L); the noisy-quadratic model gives λ = {lam_quad[0]:.3f} ± "
                 f"{lam_quad[1]:.3f}, {'close to' if abs(lam_quad[0] - best_sd) <= 0.15 else 'also away from'} the "
                 "grid optimum.")
    ratio = _mean_std([r["report"]["noise_ratio"] for r in results])
    lines.append(f"Eq. 15 predicts N(λ*)/N(0) = {ratio[0]:.3f} ± {ratio[1]:.3f} (β = "
                 f"{_mean_std([r['report']['beta'] for r in results])[0]:.4f}, ρ = "
                 f"{_mean_std([r['report']['rho'] for r in results])[0]:.4f}) for the SGD teacher.")
    return lines


def table(stats, results, args, prov, fstar, gnorm):
    lambdas = args.lambdas
    head = "| setting | metric | " + " | ".join(f"λ = {lam}" for lam in lambdas) + " |"
    rows = [head, "|" + "---|" * (len(lambdas) + 2)]
    for setting in SETTINGS:
        for metric in ("last", "min"):
            cells = [f"{stats[f'{setting}|{lam}'][metric][0]:.4g} ± {stats[f'{setting}|{lam}'][metric][1]:.2g}"
                     for lam in lambdas]
            rows.append(f"| {setting} | {'mean last ' + str(args.last) if metric == 'last' else 'min'} | "
                        + " | ".join(cells) + " |")
    rep_rows = ["| seed | SGD teacher gap | β(θ) | ρ(x*, θ) | λ* (Eq. 14) | N(λ*)/N(0) (Eq. 15) | λ quadratic model |",
                "|---|---|---|---|---|---|---|"]
    for r in results:
        rep = r["report"]
        rep_rows.append(f"| {r['seed']} | {r['teacher_gap']:.4g} | {rep['beta']:.4g} | {rep['rho']:.4f} | "
                        f"{rep['lambda_star']:.3f} | {rep['noise_ratio']:.3f} | {r['lambda_quadratic']:.3f} |")
    return "\n".join([
        f"# Distillation as partial variance reduction, convex case (digits, `python -m bench.{NAME}`)",
        "",
        f"Softmax regression on the top-4 principal components of the 1397 digits training images; f* = {fstar:.6f} "
        f"(L-BFGS, float64, ||∇f(x*)|| = {gnorm:.1e}). SGD batch 10, γ = {args.lr}, no momentum or weight decay, "
        f"{args.epochs} epochs from 0, T = 1, seeds {args.seeds} (mini-batch orders). Cells: training loss gap "
        f"f(x) − f* (exact, full data) — mean over the last {args.last} epochs and minimum over epochs — mean ± std "
        "over seeds. λ = 0 is SGD.",
        "", *rows, "", "Teacher diagnostics (kdfast.teacher_report, exact expectation over batches of 10):", "",
        *rep_rows, "",
        measured(prov)])


def plot(stats, results, args, path):
    plt = pyplot(NAME)
    if plt is None:
        return
    lambdas = args.lambdas
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for setting, style in zip(SETTINGS, ("o-", "s-", "^-")):
        ax.errorbar(lambdas, [stats[f"{setting}|{lam}"]["last"][0] for lam in lambdas],
                    yerr=[stats[f"{setting}|{lam}"]["last"][1] for lam in lambdas], fmt=style, capsize=3,
                    label=setting)
    lam14 = sum(r["report"]["lambda_star"] for r in results) / len(results)
    lamq = sum(r["lambda_quadratic"] for r in results) / len(results)
    ax.axvline(lam14, color="k", ls="--", lw=1, label=f"Eq. 14 λ* = {lam14:.2f}")
    ax.axvline(lamq, color="gray", ls=":", lw=1, label=f"quadratic model λ = {lamq:.2f}")
    ax.set_xlabel("distillation weight λ")
    ax.set_ylabel(f"f(x) − f*, mean of last {args.last} epochs")
    ax.set_yscale("log")
    ax.set_title("Fig. 2b: loss gap vs λ")
    ax.legend(fontsize=7)
    best_sd = _best(stats, SETTINGS[0], lambdas)
    best_unb = _best(stats, SETTINGS[1], lambdas)
    curves = [("SGD", f"{SETTINGS[0]}|0.0"), (f"SD λ = {best_sd}", f"{SETTINGS[0]}|{best_sd}"),
              (f"unbiased SD λ = {best_unb}", f"{SETTINGS[1]}|{best_unb}")]
    if best_unb != lambdas[-1]:
        curves.append((f"unbiased SD λ = {lambdas[-1]}", f"{SETTINGS[1]}|{lambdas[-1]}"))
    for ax, field, title in ((axes[1], "gaps", "Fig. 3 left: f(x) − f*"),
                             (axes[2], "mse", "Fig. 3 right: E||ĝ − ∇f(x)||² per epoch")):
        for label, key in curves:
            mean = torch.tensor([r["runs"][key][field] for r in results], dtype=torch.float64).mean(0)
            ax.plot(range(1, len(mean) + 1), mean.tolist(), label=label)
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def write_outputs(results, args, prov, fstar, gnorm):
    stats = summarise(results, args.lambdas, args.last)
    text = table(stats, results, args, prov, fstar, gnorm) + "\n\n## Claims\n\n" + "\n".join(
        f"- {line}" for line in claims(stats, results, args.lambdas)) + "\n"
    write_report(args.out, NAME, text, {
        "args": {k: getattr(args, k) for k in ("seeds", "epochs", "lr", "lambdas", "last")},
        "provenance": prov, "fstar": fstar, "gnorm": gnorm, "results": results})
    plot(stats, results, args, os.path.join(args.out, f"{NAME}.png"))
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.5, help="SGD step size γ (default: %(default)s)")
    parser.add_argument("--full", action="store_true", help="5 seeds x 50 epochs")
    parser.add_argument("--smoke", action="store_true", help="1 seed, 1 epoch, 3 values of λ (seconds)")
    parser.add_argument("--out", default=FIGURES)
    parser.add_argument("--from-json", help="rebuild the table, claims and plot from a previous run's .json")
    args = parser.parse_args(argv)
    args.lambdas = LAMBDAS
    if args.from_json:
        with open(args.from_json) as fh:
            saved = json.load(fh)
        for key, value in saved["args"].items():
            setattr(args, key, tuple(value) if key == "lambdas" else value)
        print(write_outputs(saved["results"], args, saved["provenance"], saved["fstar"], saved["gnorm"]))
        return 0
    if args.full:
        args.seeds, args.epochs = 5, 50
    if args.smoke:
        args.seeds, args.epochs, args.lambdas = 1, 1, SMOKE_LAMBDAS
    args.last = max(1, min(10, args.epochs // 2))
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    prov = repro_provenance(f"bench.{NAME}", argv)
    start = time.perf_counter()
    log = stderr_log(start)
    f64, y = features()
    xstar, fstar, gnorm = solve(f64, y)
    log(f"x*: f* = {fstar:.6f}, ||grad|| = {gnorm:.2e}")
    results = [run_seed(seed, (f64, y, xstar, fstar), args, log) for seed in range(args.seeds)]
    prov["elapsed_s"] = time.perf_counter() - start
    print(write_outputs(results, args, prov, fstar, gnorm))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
