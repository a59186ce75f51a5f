"""Smoke runs (seconds) of the variance-reduction and stochastic-LiPrune reproductions, so they cannot rot: each
writes its table with provenance, its claims and its figure."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("bench.common", reason="the bench/ folder ships with the repository, not the package")


@pytest.mark.parametrize("name", ["variance_reduction", "stochastic_liprune"])
def test_repro_smoke_writes_table_claims_and_figure(name, tmp_path, capsys):
    import importlib
    module = importlib.import_module(f"bench.repro.{name}")
    assert module.main(["--smoke", "--out", str(tmp_path)]) == 0
    text = (tmp_path / f"{name}.md").read_text()
    assert "## Claims" in text and "commit " in text and f"command: `python -m bench.repro.{name} --smoke" in text
    assert "nan" not in text.lower()
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert saved["provenance"]["date"] and saved["provenance"]["device"]
    if name == "stochastic_liprune":  # Eq. 2's gate by default, the ungated form beside it
        assert saved["gate"] is True and "| 0.3 | stochastic liprune, ungated |" in text
        assert "| 0.3 | stochastic liprune |" in text
    else:
        _check_variance_reduction_setup(text, saved)
    pytest.importorskip("matplotlib")
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert "Claims" in capsys.readouterr().out


def _check_variance_reduction_setup(text, saved):
    """λ* of Lemma 1 for c = L and c = μ/4 from the recorded moments, Theorems 1-2's conditions, and the extra run
    at a step that meets Theorem 1's."""
    from bench.repro.variance_reduction import meets
    c = saved["constants"]
    assert c["zero_eigenvalues"] == 5 and 0 < c["mu"] < c["L"] <= c["L_upper"] and c["L"] <= c["Lcal_upper"]
    (lr0, runs0), (lr1, _) = saved["results"]
    assert lr0 == 0.5 and lr1 == pytest.approx(1 / (8 * c["Lcal_upper"]), rel=1e-12)
    assert meets(lr1, c["thm1_lr"]) == "meets it" and meets(lr0, c["thm2_lr"]) == "violates it"
    assert f"## γ = {lr1:.4g}" in text and "Theorem 1 (γ ≤ 1/(8𝓛)" in text and "Theorem 2 (γ ≤ μ/(4L𝓛)" in text
    rep = runs0[0]["report"]
    for key, value in (("L", c["L"]), ("mu/4", c["mu"] / 4)):
        expected = rep["cross"] / (rep["teacher_sq"] + rep["teacher_full_sq"] / (value * lr0))
        assert rep["by_c"][key]["lambda_star"] == pytest.approx(expected, rel=1e-12)
    assert "at c = L (Theorem 2)" in text and "at c = μ/4 (Theorem 1)" in text
    assert "1 epochs from 0 (the paper: 100)" in text and "top-4 principal" in text


def test_smoothness_bounds_hold_on_a_small_problem():
    """The global-L and expected-smoothness upper bounds against the exact quantities: λ_max of the Hessian at
    random points, and E_ξ||∇f_ξ(x) - ∇f_ξ(x*)||² <= 2 𝓛 (f(x) - f*) over every batch of 2 of 8 examples."""
    import itertools
    import torch
    from torch import nn
    from bench.repro.variance_reduction import _zero_model, constants, hessian_at
    g = torch.Generator().manual_seed(6)
    f = torch.randn(4, 3, generator=g, dtype=torch.float64).repeat(2, 1) * 1.5  # each point twice, with two
    y = torch.tensor([0, 1, 2, 0, 1, 2, 1, 2])  # labels: not separable, so x* is finite
    xstar = _zero_model(3, torch.float64)
    opt = torch.optim.LBFGS(list(xstar.parameters()), max_iter=500, tolerance_grad=1e-12, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(xstar(f), y)
        loss.backward()
        return loss
    opt.step(closure)
    fstar = float(nn.functional.cross_entropy(xstar(f), y))
    assert all(float(p.grad.abs().max()) < 1e-8 for p in xstar.parameters())
    c = constants(xstar, f, y, batch=2)
    batches = [list(b) for b in itertools.combinations(range(8), 2)]

    def grads(model):
        params = list(model.parameters())
        return [torch.cat([t.reshape(-1) for t in torch.autograd.grad(
            nn.functional.cross_entropy(model(f[b]), y[b]), params)]) for b in batches]
    star = grads(xstar)
    model = _zero_model(3, torch.float64)
    for trial in range(5):
        with torch.no_grad():
            for p, q in zip(model.parameters(), xstar.parameters()):
                p.copy_(q + 2 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        assert float(torch.linalg.eigvalsh(hessian_at(model, f, y))[-1]) <= c["L_upper"] * (1 + 1e-12)
        gap = float(nn.functional.cross_entropy(model(f), y)) - fstar
        lhs = sum(float((a - s).square().sum()) for a, s in zip(grads(model), star)) / len(batches)
        assert 0 < lhs <= 2 * c["Lcal_upper"] * gap * (1 + 1e-9), (trial, lhs, gap)
