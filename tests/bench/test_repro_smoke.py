"""Reproduction scripts on tiny sizes (seconds), so they cannot rot; and the formulas they rest on against independent
references."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("bench.common", reason="the bench/ folder ships with the repository, not the package")


# ------------------------------------------------------------------- self-distillation chains (S1)
def test_repro_self_distill_smoke(tmp_path):
    from bench.repro.self_distill import main
    assert main(["--draws", "3", "--steps", "3", "--net-seeds", "1", "--net-steps", "2", "--epochs", "1",
                 "--net-weights", "0.5", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "self_distill.md").read_text()
    assert "- Theorem 4.4 (closed form = argmin of the validation error over the weight): holds." in text
    assert "- Theorem 4.5 (fixed paper weight a > 0: the chain tends to kernel ridge with lambda / a): holds." in text
    assert "| optimal (clipped), test |" in text and "commit " in text and "Measured " in text
    assert (tmp_path / "self_distill.json").is_file()


# ------------------------------------------------------------------------------ kernel regime (S3)
def test_ntk_gram_matches_monte_carlo():
    """H_inf_ij = E_w[x_i.x_j 1{w.x_i > 0} 1{w.x_j > 0}], w ~ N(0, I), for unit rows."""
    from bench.repro.kernel_regime import ntk_gram
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    w = torch.randn(400_000, 5, generator=g, dtype=torch.float64)
    on = (x @ w.T > 0).double()
    mc = (x @ x.T) * (on @ on.T) / w.shape[0]
    se = (x @ x.T).abs() * 0.5 / math.sqrt(w.shape[0])  # the indicator product's std is <= 1/2
    assert bool(((ntk_gram(x) - mc).abs() <= 4 * se + 1e-12).all())


def test_gradient_descent_step_follows_eq_9():
    """One GD step on Eq. 2 against the paper's Eq. 9, dw_k = 2 L_k [a_k / sqrt(m) (y - f) + lambda (phi_k - f_k)]."""
    from bench.repro.kernel_regime import gradient_descent
    g = torch.Generator().manual_seed(1)
    n, d, m, lam, lr = 9, 4, 3, 0.3, 0.05
    x, y = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    w0, a = torch.randn(m, d, generator=g, dtype=torch.float64), torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    phi = torch.rand(n, m, generator=g, dtype=torch.float64)
    out = gradient_descent(w0, a, x, y, lam=lam, phi=phi, lr=lr, iters=1, xt=x, yt=y, every=1)
    pre = x @ w0.T
    f_k = torch.relu(pre)
    f = f_k @ a / math.sqrt(m)
    expected = w0.clone()
    for k in range(m):
        L = x.T * (pre[:, k] > 0).double()  # (d, n): columns sigma'(w_k.x_i) x_i
        expected[k] += lr * 2 * L @ (a[k] / math.sqrt(m) * (y - f) + lam * (phi[:, k] - f_k[:, k]))
    torch.testing.assert_close(out["w"], expected, rtol=1e-12, atol=1e-14)
    assert out["curve"][0][1] == pytest.approx(float((f - y).square().mean()), rel=1e-12)


def test_repro_kernel_regime_smoke(tmp_path):
    from bench.repro.kernel_regime import SETTINGS, main
    assert main(["--seeds", "2", "--iters", "20", "--widths", "20/5", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "kernel_regime.md").read_text()
    for name in SETTINGS:
        assert f"| {name} |" in text
    for claim in ("- Fig. 1, quality", "- Fig. 1, speed", "- Fig. 2 ", "- Sec. 2.5.1", "- Fig. 3", "- Fig. 5a",
                  "- Fig. 5b", "## Verdicts over every setup"):
        assert claim in text
    assert "commit " in text and "Measured " in text
    import json
    saved = json.loads((tmp_path / "kernel_regime.json").read_text())
    # the paper's setup by default: unit rows without centring, q on, both lambda = 0 students, k = 1, 5, 20
    assert saved["setup"] == {"centring": ["none"], "lottery": ["teacher-units", "reset"], "q": True,
                              "overlap_k": [1, 5, 20], "seeds": 2, "iters": 20}
    curves = saved["results"]["centring none, teacher 20 / student 5 units"]
    for seed in curves:  # lambda = inf from the teacher's own units: zero gradient, the student never moves
        assert seed["teacher_scale"] == pytest.approx(math.sqrt(5 / 20), rel=1e-15)
        assert set(seed["mean_overlap"]) == {"1", "5", "20"}
        assert len({c[1] for c in seed["curves"]["lambda=inf"]}) == 1
        assert seed["curves"]["lambda=0.01"][-1][1] < seed["curves"]["lambda=0.01"][0][1]
        # the reset student starts from the teacher's init (kappa = 1e-2: outputs near 0, MSE near mean y^2 = 1),
        # the teacher-units student from its trained units
        assert seed["curves"]["lambda=0, reset units"][0][1] == pytest.approx(1.0, abs=0.05)
        assert seed["curves"]["lambda=0, teacher's units"][0][1] < 0.8


def test_digits_pair_centres_only_when_asked():
    """The paper's Sec. 4 normalises rows to norm 1 and nothing else; train-mean centring is the opt-in variant."""
    from bench.repro.kernel_regime import digits_pair
    from kdfast.data import load_dataset
    ds = load_dataset("digits", split="train")
    keep = (ds.targets == 3) | (ds.targets == 5)
    raw = ds.images[keep].reshape(int(keep.sum()), -1).double()
    x, y, xt, _ = digits_pair((3, 5))
    torch.testing.assert_close(x, raw / raw.norm(dim=1, keepdim=True), rtol=1e-14, atol=0)
    assert set(y.tolist()) == {-1.0, 1.0} and bool((x.norm(dim=1) - 1).abs().max() < 1e-12)
    xc, _, xtc, _ = digits_pair((3, 5), "train-mean")
    centred = raw - raw.mean(0)
    torch.testing.assert_close(xc, centred / centred.norm(dim=1, keepdim=True), rtol=1e-14, atol=0)
    assert not torch.allclose(xt, xtc)


def test_teacher_output_scale_makes_the_student_units_unbiased():
    """Theorem 2: with output weights q abar / sqrt(mbar), q = sqrt(m / mbar), the mean over every m-subset of the
    teacher's units, read out as a / sqrt(m), is the teacher's output (exhaustive enumeration, float64)."""
    import itertools
    from bench.repro.kernel_regime import output, teacher_output_scale
    g = torch.Generator().manual_seed(2)
    mbar, m, n, d = 7, 3, 5, 4
    w = torch.randn(mbar, d, generator=g, dtype=torch.float64)
    abar = torch.randint(0, 2, (mbar,), generator=g).double() * 2 - 1
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    subsets = [list(c) for c in itertools.combinations(range(mbar), m)]
    mean_student = sum(output(w[s], abar[s], x) for s in subsets) / len(subsets)
    torch.testing.assert_close(mean_student, output(w, teacher_output_scale(m, mbar) * abar, x), rtol=1e-12, atol=0)
    assert teacher_output_scale(m, mbar, q=False) == 1.0
    assert not torch.allclose(mean_student, output(w, abar, x))


# ---------------------------------------------------------------------------------- LiPrune (S4)
def test_sin_lipschitz_is_the_tight_bound_on_the_second_derivative():
    """sup_w |f''(w)| of f = 1/2 (sin(w x) - y)^2, from autograd on a dense grid of w covering every phase of w x."""
    from bench.repro.liprune import sin_lipschitz
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(6, generator=g, dtype=torch.float64), torch.tensor([0.3, -2.0], dtype=torch.float64)])
    y = torch.cat([torch.randn(6, generator=g, dtype=torch.float64) * 3,
                   torch.tensor([6.0, -0.1], dtype=torch.float64)])
    w = torch.linspace(-60, 60, 200_001, dtype=torch.float64)
    for xi, yi in zip(x, y):
        wg = w.clone().requires_grad_(True)
        (d1,) = torch.autograd.grad((0.5 * (torch.sin(wg * xi) - yi).square()).sum(), wg, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), wg)
        sup, bound = float(d2.abs().max()), float(sin_lipschitz(xi, yi))
        assert sup <= bound * (1 + 1e-12) and sup >= bound * (1 - 1e-4), (float(xi), float(yi), sup, bound)


def test_stochastic_liprune_gates_each_iteration():
    """Eq. 2: a stochastic iteration moves the weight only when its Bernoulli(r) gate is 1 (the skipped iterations
    count); the ungated control and fixed-subset methods move at every iteration."""
    from bench.repro.stochastic_liprune import _linear_run
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1400, generator=g, dtype=torch.float64) * 10 - 5
    y = 2 * x + 0.2 * torch.randn(1400, generator=g, dtype=torch.float64)
    steps, ratio = 400, 0.3
    for method, low, high in (("stochastic liprune", 80, 160), ("stochastic uniform", 80, 160),
                              ("stochastic liprune, ungated", steps, steps), ("random", steps, steps)):
        curve = _linear_run(x[:1000], y[:1000], x[1000:], y[1000:], method, ratio, steps=steps, batch=10, lr=1e-4,
                            gen=torch.Generator().manual_seed(5), seed=0)
        moved = int((curve[1:] != curve[:-1]).sum())  # Binomial(400, 0.3) when gated: 120 ± 9.2
        assert curve.shape == (steps + 1,) and low <= moved <= high, (method, moved)
