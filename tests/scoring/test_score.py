"""kdfast.score: every method against an independent float64 computation, ensembles, order, errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, vmap
from torch.utils.data import DataLoader, Dataset

import kdfast
from kdfast.errors import InvalidArgumentError


class Pairs(Dataset):
    """(x_i, y_i) from tensors; fresh random data per test."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _cnn(c=5):
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, c))
    with torch.no_grad():  # non-trivial running statistics, so eval mode differs from train mode
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.3, 0.3)
    return model


def _data(n=37, c=5, shape=(2, 6, 6), scale=2.0):
    return Pairs(torch.randn(n, *shape) * scale, torch.randint(0, c, (n,)))


def _oracle_logits(model, data):
    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return m(data.x.double())


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _per_example_sqnorms(model, data, params_of):
    """float64 torch.func oracle: sum over the chosen parameters of ||d CE_i / d theta||^2, per example."""
    m = copy.deepcopy(model).double().eval()
    params = {k: v.detach() for k, v in m.named_parameters()}
    chosen = {k for k in params if params_of(k)}

    def loss(p, x, y):
        out = functional_call(m, p, (x[None],))
        return nn.functional.cross_entropy(out, y[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, data.x.double(), data.y)
    return sum(g.reshape(len(data), -1).pow(2).sum(1) for k, g in grads.items() if k in chosen)


@pytest.mark.parametrize("logit_scale", [1.0, 300.0])  # 300: logits in the thousands, saturated softmax
def test_el2n_loss_margin_match_plain_softmax_in_float64(logit_scale):
    model, data = _cnn(), _data()
    with torch.no_grad():
        model[-1].weight.mul_(logit_scale)
    logits = _oracle_logits(model, data)
    p = logits.softmax(-1)
    onehot = nn.functional.one_hot(data.y, 5).double()
    others = logits.masked_fill(onehot.bool(), float("-inf")).amax(-1)
    expected = {"el2n": (p - onehot).norm(dim=1),
                "loss": nn.functional.cross_entropy(logits, data.y, reduction="none"),
                "margin": others - logits.gather(1, data.y[:, None]).squeeze(1)}
    for method, want in expected.items():
        got = kdfast.score(model, data, method.upper(), batch_size=8, progress=False)
        assert got.dtype == torch.float32 and got.shape == (len(data),)
        assert _rel(got, want) < 1e-5, (method, _rel(got, want))


def test_grand_last_matches_torch_func_last_layer_gradient():
    model, data = _cnn(), _data()
    want = _per_example_sqnorms(model, data, lambda k: k.startswith("7.")).sqrt()
    got = kdfast.score(model, data, "grand-last", batch_size=10, progress=False)
    assert _rel(got, want) < 1e-5, _rel(got, want)


def test_grand_last_without_bias_and_with_named_head():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 4, bias=False))
    data = _data(n=9, c=4, shape=(12,))
    want = _per_example_sqnorms(model, data, lambda k: k.startswith("3.")).sqrt()
    got = kdfast.score(model, data, "grand-last", head="3", progress=False)
    assert _rel(got, want) < 1e-5


def test_grand_matches_torch_func_full_gradient():
    model, data = _cnn(), _data(n=11)
    want = _per_example_sqnorms(model, data, lambda k: True).sqrt()
    got = kdfast.score(model, data, "grand", batch_size=4, progress=False)
    assert _rel(got, want) < 1e-4, _rel(got, want)


def test_grand_runs_through_one_plan_and_splits_batches_that_do_not_fit(monkeypatch):
    """One GradNormPlan per model for the whole data set (hooks installed once); a batch whose backward runs
    out of device memory is scored in halves, and the size that fitted is kept."""
    from kdfast.grad_norms import GradNormPlan
    model, data = _cnn(), _data(n=11)
    want = _per_example_sqnorms(model, data, lambda k: True).sqrt()
    opened, sizes = [], []
    enter, call = GradNormPlan.__enter__, GradNormPlan.__call__

    def counted_enter(self):
        opened.append(self)
        return enter(self)

    def small_memory(self, x, y, **kw):
        sizes.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return call(self, x, y, **kw)

    monkeypatch.setattr(GradNormPlan, "__enter__", counted_enter)
    monkeypatch.setattr(GradNormPlan, "__call__", small_memory)
    got = kdfast.score(model, data, "grand", batch_size=8, progress=False)
    assert _rel(got, want) < 1e-4, _rel(got, want)
    assert len(opened) == 1 and sizes[:4] == [8, 4, 2, 2] and max(sizes[4:]) == 2
    assert all(not m._forward_hooks for m in model.modules())  # released after scoring

    class Mix(nn.Module):  # its parameter meets the batch's mean: refused before any batch, the first model left as it was
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return x + self.s * x.mean(0, keepdim=True)

    model.train()
    with pytest.raises(kdfast.errors.UnsupportedModuleError, match="mixes the examples of the batch"):
        kdfast.score([model, nn.Sequential(_cnn(), Mix())], data, "grand", progress=False)
    assert model.training and all(not m._forward_hooks for m in model.modules())


def test_liprune_last_matches_dense_hessian_eigenvalue():
    model, data = _cnn(c=4), _data(n=6, c=4)
    m = copy.deepcopy(model).double().eval()
    feats = nn.Sequential(*list(m)[:-1])(data.x.double())
    head = m[-1]
    want = []
    for h, y in zip(feats, data.y):
        def loss(w, b):
            return nn.functional.cross_entropy((h @ w.T + b)[None], y[None])
        hw = hessian(loss, argnums=(0, 1))(head.weight.detach(), head.bias.detach())
        d = head.weight.numel()
        full = torch.cat([torch.cat([hw[0][0].reshape(d, d), hw[0][1].reshape(d, -1)], 1),
                          torch.cat([hw[1][0].reshape(-1, d), hw[1][1]], 1)], 0)
        want.append(torch.linalg.eigvalsh(full).abs().max())
    got = kdfast.score(model, data, "liprune-last", progress=False)
    assert _rel(got, torch.stack(want)) < 1e-4


def test_random_is_seeded_reproducible_and_model_free():
    data = _data(n=50)
    a = kdfast.score(None, data, "random", seed=3, progress=False)
    b = kdfast.score(_cnn(), data, "random", seed=3, progress=False)
    c = kdfast.score(None, data, "random", seed=4, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and bool((a >= 0).all() and (a < 1).all())


def test_ensemble_averages_members_and_returns_them():
    data = _data()
    models = [_cnn() for _ in range(3)]
    mean, per = kdfast.score(models, data, "el2n", progress=False, return_per_model=True)
    singles = torch.stack([kdfast.score(m, data, "el2n", progress=False) for m in models])
    assert per.shape == (3, len(data))
    torch.testing.assert_close(per, singles, rtol=0, atol=0)
    torch.testing.assert_close(mean, singles.mean(0))


def test_order_is_dataset_order_with_workers_and_loaders():
    model, data = _cnn(), _data(n=45)
    ref = kdfast.score(model, data, "el2n", batch_size=7, progress=False)
    workers = kdfast.score(model, data, "el2n", batch_size=7, num_workers=2, progress=False)
    loader = kdfast.score(model, DataLoader(data, batch_size=7, num_workers=2), "el2n", progress=False)
    torch.testing.assert_close(workers, ref, rtol=0, atol=0)
    torch.testing.assert_close(loader, ref, rtol=0, atol=0)
    want = (_oracle_logits(model, data).softmax(-1) - nn.functional.one_hot(data.y, 5)).norm(dim=1)
    assert _rel(ref, want) < 1e-5


def test_scoring_uses_eval_mode_and_restores_modes():
    model, data = _cnn(), _data()
    model.train()
    model[1].eval()  # a mixed state must come back exactly
    before = [m.training for m in model.modules()]
    got = kdfast.score(model, data, "loss", progress=False)
    assert [m.training for m in model.modules()] == before
    want = nn.functional.cross_entropy(_oracle_logits(model, data), data.y, reduction="none")
    assert _rel(got, want) < 1e-5


def test_bf16_precision_stays_within_the_dtype_error_budget():
    model, data = _cnn(), _data()
    want = (_oracle_logits(model, data).softmax(-1) - nn.functional.one_hot(data.y, 5)).norm(dim=1)
    got = kdfast.score(model, data, "el2n", precision="bf16", progress=False)
    assert float((got.double() - want).abs().max()) < 0.05


def test_errors_name_the_argument():
    model, data = _cnn(), _data()
    with pytest.raises(InvalidArgumentError, match="method must be one of .*el2n.*got 'nope'"):
        kdfast.score(model, data, "nope")
    with pytest.raises(InvalidArgumentError, match="forgetting.*ForgettingTracker"):
        kdfast.score(model, data, "forgetting")
    with pytest.raises(InvalidArgumentError, match="must not shuffle.*RandomSampler"):
        kdfast.score(model, DataLoader(data, shuffle=True), "el2n")
    with pytest.raises(InvalidArgumentError, match="drop_last"):
        kdfast.score(model, DataLoader(data, batch_size=8, drop_last=True), "el2n")
    with pytest.raises(InvalidArgumentError, match="precision must be one of"):
        kdfast.score(model, data, "el2n", precision="fp8")
    with pytest.raises(InvalidArgumentError, match="batch_size must be a positive integer, got 0"):
        kdfast.score(model, data, "el2n", batch_size=0)
    with pytest.raises(InvalidArgumentError, match="empty list"):
        kdfast.score([], data, "el2n")
    bad = Pairs(data.x, data.y.clone())
    bad.y[5] = 9
    with pytest.raises(InvalidArgumentError, match="label 9 of dataset index 5 is outside \\[0, 5\\)"):
        kdfast.score(model, bad, "el2n", batch_size=4, progress=False)


def test_head_that_does_not_make_the_logits_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Tanh())  # the last Linear is not the output layer
    data = _data(n=6, shape=(12,))
    with pytest.raises(InvalidArgumentError, match="did not produce the model's output"):
        kdfast.score(model, data, "grand-last", progress=False)
    with pytest.raises(InvalidArgumentError, match="no nn.Linear"):
        kdfast.score(nn.Sequential(nn.Flatten()), data, "grand-last", progress=False)


def test_benchmark_smoke_runs_and_checks_its_scores():
    from bench.perf.bench_score import run, targets
    emitted = []
    rows = run(device=torch.device("cpu"), smoke=True, emit=emitted.append)
    assert emitted == rows
    assert [r["provider"] for r in rows] == ["inference", "eager-el2n", "el2n", "grand-last"]
    assert all(r["images_per_s"] > 0 and r["ratio_to_inference"] > 0 for r in rows)
    assert rows[2]["max_rel_err_vs_float64"] < 1e-5
    grand = run(device=torch.device("cpu"), smoke=True, methods=["grand"])
    assert [r["provider"] for r in grand] == ["inference", "eager-el2n", "fwd-bwd", "grand"]
    assert grand[-1]["time_vs_fwd_bwd"] > 0
    spent = run(device=torch.device("cpu"), smoke=True, budget_s=0.0)  # every provider says it was skipped
    assert [r["mode"] for r in spent] == ["skipped"] * 4 and all("budget" in r["note"] for r in spent)
    goals = targets(rows + grand)
    assert [g["issue"] for g in goals] == [11, 11, 11] and all(g["measured"] is None for g in goals)  # GPU only
