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
    for claim in ("- Fig. 1, final quality", "- Fig. 1, speed", "- Fig. 2 ", "- Sec. 2.5.1", "- Fig. 3", "- Fig. 5a",
                  "- Fig. 5b"):
        assert claim in text
    assert "commit " in text and "Measured " in text
    import json
    curves = json.loads((tmp_path / "kernel_regime.json").read_text())["results"]["teacher 20 / student 5 units"]
    for seed in curves:  # lambda = inf from the teacher's own units: zero gradient, the student never moves
        assert len({c[1] for c in seed["curves"]["lambda=inf"]}) == 1
        assert seed["curves"]["lambda=0.01"][-1][1] < seed["curves"]["lambda=0.01"][0][1]
