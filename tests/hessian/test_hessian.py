"""Hessian spectral norms against float64 oracles: closed forms vs torch.func.hessian + eigvalsh,
the secular-equation solver vs dense eigvalsh (and mpmath where float64 eigvalsh is not exact)."""
import warnings

import mpmath
import pytest
import torch
from torch import nn

from kdfast.errors import InvalidArgumentError, UnsupportedModuleError
from kdfast.hessian import (BatchedHVP, softmax_ce_lipschitz, softmax_hessian_lambda_max, spectral_norms,
                            squared_loss_lipschitz)
from kdfast.hessian.hvp import DEFAULT_COMPILED, FlatParams


def _rel_err(got, want):
    return ((got.double() - want.double()).abs() / want.double().abs()).max().item()


def _dense_lambda_max(p):
    p = p.double() / p.double().sum(dim=1, keepdim=True)
    return torch.linalg.eigvalsh(torch.diag_embed(p) - p[:, :, None] * p[:, None, :])[:, -1]


def _mp_lambda_max(logits_row):
    # 250-digit softmax and eigensolver: exact where float64 rounds p_(1) to 1. The eigensolver's error is
    # absolute (~10^-dps against entries of order 1) while λ_max is about exp(-(z_(1) - z_(2))), as small as
    # 1e-156 for these logits: 80 digits left a 3e-6 relative error on a row with λ_max = 1e-76.
    mpmath.mp.dps = 250
    z = [mpmath.mpf(v) for v in logits_row.tolist()]
    top = max(z)
    e = [mpmath.exp(v - top) for v in z]
    p = [v / sum(e) for v in e]
    n = len(p)
    m = mpmath.matrix([[(p[r] if r == c else 0) - p[r] * p[c] for c in range(n)] for r in range(n)])
    return float(max(mpmath.eigsy(m)[0]))


@pytest.mark.parametrize("rows,scale,num_classes", [(32, 1.0, 10), (8, 5.0, 100), (2, 1e-4, 200), (32, 3.0, 7)])
def test_lambda_max_matches_dense_eigvalsh(rows, scale, num_classes):
    probs = (torch.randn(rows, num_classes, dtype=torch.float64) * scale).softmax(dim=1)
    got = softmax_hessian_lambda_max(probs)
    err = _rel_err(got, _dense_lambda_max(probs))
    assert err < 1e-12, f"max rel err {err:.3e}"


def test_lambda_max_two_classes_is_twice_p1_p2():
    # C = 2: diag(p) - p pᵀ = p1 p2 [[1, -1], [-1, 1]], eigenvalue 2 p1 p2 = 2 σ(d) σ(-d), d = z1 - z2.
    logits = torch.randn(64, 2, dtype=torch.float64) * 8
    d = logits[:, 0] - logits[:, 1]
    want = 2 * torch.sigmoid(d) * torch.sigmoid(-d)
    err = _rel_err(softmax_hessian_lambda_max(logits.softmax(dim=1)), want)
    assert err < 1e-12, f"max rel err {err:.3e}"


@pytest.mark.parametrize("scale,num_classes", [(30.0, 6), (60.0, 4)])
def test_lambda_max_peaked_matches_mpmath(scale, num_classes):
    logits = torch.randn(8, num_classes, dtype=torch.float64) * scale
    got = softmax_hessian_lambda_max(logits.softmax(dim=1))
    want = torch.tensor([_mp_lambda_max(row) for row in logits], dtype=torch.float64)
    err = _rel_err(got, want)
    assert err < 1e-12, f"max rel err {err:.3e} (worst row {(got - want).abs().div(want).argmax().item()})"


def test_lambda_max_float32_input_is_solved_in_float64():
    probs = (torch.randn(32, 50) * 3).softmax(dim=1)
    err = _rel_err(softmax_hessian_lambda_max(probs), _dense_lambda_max(probs))
    assert err < 1e-10, f"max rel err {err:.3e}"


def test_lambda_max_ties_and_degenerate_rows():
    probs = torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.4, 0.4, 0.2], [0.25, 0.25, 0.25, 0.25][:3]],
                         dtype=torch.float64)
    probs = probs / probs.sum(dim=1, keepdim=True)
    err = _rel_err(softmax_hessian_lambda_max(probs), _dense_lambda_max(probs))
    assert err < 1e-14, f"max rel err {err:.3e}"
    # one certain class: the Hessian is 0; a single class: 0
    one_hot = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    assert softmax_hessian_lambda_max(one_hot).item() == 0.0
    assert softmax_hessian_lambda_max(torch.ones(3, 1)).abs().max().item() == 0.0


def _linear_ce_hessian_lambda(h, y, num_classes, weight, bias):
    def loss(params):
        w, b = params[:-num_classes].view(num_classes, -1), params[-num_classes:]
        return torch.nn.functional.cross_entropy((h @ w.T + b)[None], y[None])
    params = torch.cat([weight.flatten(), bias])
    hess = torch.func.hessian(loss)(params)
    return torch.linalg.eigvalsh(hess).abs().max()


def test_softmax_ce_lipschitz_matches_func_hessian():
    num_classes, dim = 5, 4
    weight = torch.randn(num_classes, dim, dtype=torch.float64)
    bias = torch.randn(num_classes, dtype=torch.float64)
    feats = torch.randn(6, dim, dtype=torch.float64) * 2
    labels = torch.randint(0, num_classes, (6,))
    probs = (feats @ weight.T + bias).softmax(dim=1)
    got = softmax_ce_lipschitz(probs, feats.square().sum(dim=1))
    assert got.dtype == torch.float32 and got.shape == (6,)
    want = torch.stack([_linear_ce_hessian_lambda(f, y, num_classes, weight, bias) for f, y in zip(feats, labels)])
    err = _rel_err(got, want)
    assert err < 1e-6, f"max rel err {err:.3e}"


@pytest.mark.parametrize("bias", [True, False])
def test_squared_loss_lipschitz_matches_func_hessian(bias):
    outputs, dim = 3, 5
    feats = torch.randn(4, dim, dtype=torch.float64) * 3
    targets = torch.randn(4, outputs, dtype=torch.float64)

    def hessian_norm(x, y):
        def loss(params):
            w = params[: outputs * dim].view(outputs, dim)
            b = params[outputs * dim:] if bias else 0.0
            return 0.5 * (x @ w.T + b - y).square().sum()
        params = torch.randn(outputs * dim + (outputs if bias else 0), dtype=torch.float64)
        return torch.linalg.eigvalsh(torch.func.hessian(loss)(params)).abs().max()

    want = torch.stack([hessian_norm(x, y) for x, y in zip(feats, targets)])
    err = _rel_err(squared_loss_lipschitz(feats, bias=bias), want)
    assert err < 1e-6, f"max rel err {err:.3e}"


def test_closed_form_bad_inputs_name_the_argument():
    with pytest.raises(InvalidArgumentError, match="probs"):
        softmax_ce_lipschitz(torch.rand(4), torch.rand(4))
    with pytest.raises(InvalidArgumentError, match="feat_sqnorm"):
        softmax_ce_lipschitz(torch.rand(4, 3), torch.rand(5))
    with pytest.raises(InvalidArgumentError, match="probs"):
        softmax_ce_lipschitz(torch.randint(0, 3, (4, 3)), torch.rand(4))
    with pytest.raises(InvalidArgumentError, match="features"):
        squared_loss_lipschitz(torch.rand(4))


# ---------------------------------------------------------------------------------- batch spectral norms


def _tiny_net():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double().eval()


def _tiny_batches(count=5, size=9, ragged=4):
    batches = [(torch.randn(size, 5, dtype=torch.float64) * 2, torch.randint(0, 4, (size,))) for _ in range(count)]
    return batches + [(torch.randn(ragged, 5, dtype=torch.float64), torch.randint(0, 4, (ragged,)))]


def _dense_curvature(model, x, y, curvature):
    flat = FlatParams(model)
    w = FlatParams.flatten(flat.params[n] for n in flat.names)

    def outputs(v):
        return torch.func.functional_call(model, flat.unflatten(v), (x,))

    if curvature == "hessian":
        return torch.func.hessian(lambda v: nn.functional.cross_entropy(outputs(v), y))(w)
    jac = torch.func.jacrev(outputs)(w)  # (B, C, P)
    p = outputs(w).softmax(dim=-1)
    out_hess = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / x.shape[0]
    return torch.einsum("bcp,bcd,bdq->pq", jac, out_hess, jac)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("engine", ["loop", "vmap"])
def test_batched_products_match_dense_curvature(curvature, engine):
    model = _tiny_net()
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (3, 6))
    size = FlatParams(model).size
    v = torch.randn(3, size, dtype=torch.float64)
    got = BatchedHVP(model, curvature=curvature, engine=engine)(x, y, v)
    want = torch.stack([_dense_curvature(model, x[k], y[k], curvature) @ v[k] for k in range(3)])
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-12, f"max rel err {err:.3e}"


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("method,iters", [("lanczos", 40), ("power", 600)])
def test_spectral_norms_match_dense_eigvalsh(curvature, method, iters):
    model, batches = _tiny_net(), _tiny_batches()
    want = torch.stack([torch.linalg.eigvalsh(_dense_curvature(model, x, y, curvature)).abs().max()
                        for x, y in batches])
    got, info = spectral_norms(model, batches, curvature=curvature, method=method, iters=iters, tol=1e-3,
                               chunk=3, return_info=True)
    assert got.dtype == torch.float32 and got.shape == (len(batches),)
    assert all(info.converged), f"unconverged batches: {info.converged}, residuals {info.residuals}"
    err = _rel_err(got, want)
    assert err < 1e-3, f"max rel err {err:.3e}; products per batch {info.products}"


def test_spectral_norms_vmap_engine_equals_loop_and_is_reproducible():
    model, batches = _tiny_net(), _tiny_batches(count=3)
    loop = spectral_norms(model, batches, engine="loop", chunk=2, seed=3)
    vmapped = spectral_norms(model, batches, engine="vmap", chunk=2, seed=3)
    assert torch.allclose(loop, vmapped, rtol=1e-5, atol=0)
    assert torch.equal(loop, spectral_norms(model, batches, engine="loop", chunk=2, seed=3))


def test_lanczos_needs_fewer_products_than_power_on_close_eigenvalues():
    # A quadratic loss whose Hessian has top eigenvalues 1.0 and 0.98: power iteration crawls, Lanczos does not.
    eig = torch.tensor([1.0, 0.98, 0.5, 0.3, 0.2, 0.1], dtype=torch.float64)
    model = nn.Linear(6, 1, bias=False).double().eval()
    x = torch.diag(eig.sqrt())[None] * 6 ** 0.5  # mean of 1/2 (w·x_i)^2 over 6 rows: H = diag(eig)
    y = torch.zeros(1, 6, 1, dtype=torch.float64)
    loss = lambda out, tgt: 0.5 * (out - tgt).square().sum() / out.shape[0]  # noqa: E731
    batches = [(x[0], y[0])]
    lz, lz_info = spectral_norms(model, batches, loss=loss, method="lanczos", iters=20, tol=1e-6, return_info=True)
    pw, pw_info = spectral_norms(model, batches, loss=loss, method="power", iters=2000, tol=1e-6, return_info=True)
    assert abs(lz.item() - 1.0) < 1e-5 and abs(pw.item() - 1.0) < 1e-3
    assert lz_info.products[0] <= 7 < pw_info.products[0]


def test_spectral_norms_refuse_train_mode_batchnorm_and_bad_arguments():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)).double()
    batches = _tiny_batches(count=1)
    with pytest.raises(UnsupportedModuleError, match="eval"):
        spectral_norms(model.train(), [(batches[0][0], batches[0][1])])
    spectral_norms(model.eval(), [(batches[0][0], batches[0][1])])  # running statistics: fine
    tiny = _tiny_net()
    with pytest.raises(InvalidArgumentError, match="method"):
        spectral_norms(tiny, batches, method="arnoldi")
    with pytest.raises(InvalidArgumentError, match="curvature"):
        spectral_norms(tiny, batches, curvature="fisher")
    with pytest.raises(InvalidArgumentError, match="tol"):
        spectral_norms(tiny, batches, tol=0)
    with pytest.raises(InvalidArgumentError, match="iters"):
        spectral_norms(tiny, batches, iters=0)
    with pytest.raises(InvalidArgumentError, match="batches"):
        spectral_norms(tiny, [])
    with pytest.raises(InvalidArgumentError, match="loss"):
        spectral_norms(tiny, batches, loss="hinge")


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_conv_groupnorm_engines_agree(curvature):
    # Convolutions and GroupNorm under vmap(jvp(grad)) against eager double backward.
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3)).double().eval()
    x = torch.randn(2, 4, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 4))
    v = torch.randn(2, FlatParams(model).size, dtype=torch.float64)
    loop = BatchedHVP(model, curvature=curvature, engine="loop")(x, y, v)
    vmapped = BatchedHVP(model, curvature=curvature, engine="vmap")(x, y, v)
    err = ((loop - vmapped).abs().max() / loop.abs().max()).item()
    assert err < 1e-12, f"max rel err {err:.3e}"


def test_model_without_trainable_parameters_is_refused():
    frozen = _tiny_net().requires_grad_(False)
    with pytest.raises(InvalidArgumentError, match="trainable"):
        spectral_norms(frozen, _tiny_batches(count=1))
    with pytest.raises(InvalidArgumentError, match="nn.Module"):
        spectral_norms("model", _tiny_batches(count=1))


def test_compiled_product_matches_eager_and_reports_its_variant():
    # The variant that traces on this torch must run compiled (no silent eager fallback), and be exact.
    model, batches = _tiny_net().float(), [(x.float(), y) for x, y in _tiny_batches(count=2, ragged=4)]
    products = BatchedHVP(model, engine="vmap", compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback warns: fail on it rather than pass on eager
        try:
            got, info = spectral_norms(model, batches, chunk=2, products=products, return_info=True)
        except RuntimeWarning as exc:
            if "failed to trace" in str(exc) and _compiler_unavailable(exc):
                pytest.skip(f"torch.compile cannot build here: {exc}")
            raise
    assert info.engine == products.variant == DEFAULT_COMPILED
    want = spectral_norms(model, batches, chunk=2, engine="loop")
    assert torch.allclose(got, want, rtol=1e-4, atol=0)
    with pytest.raises(InvalidArgumentError, match="compile"):
        BatchedHVP(model, engine="loop", compile=True)
    with pytest.raises(InvalidArgumentError, match="compile"):
        BatchedHVP(model, engine="vmap", compile="jit")


def _compiler_unavailable(exc) -> bool:
    # inductor needs a working C++ compiler on the CPU; anything else is a kdfast failure
    return any(word in str(exc) for word in ("InvalidCxxCompiler", "CppCompileError", "No working C compiler"))


def test_failing_compile_traces_once_then_runs_eager_with_one_warning(monkeypatch):
    calls = []

    def broken_compile(fn, **kwargs):
        def traced(*args):
            calls.append(1)
            raise RuntimeError("simulated tracing failure")
        return traced
    monkeypatch.setattr(torch, "compile", broken_compile)
    model, batches = _tiny_net(), _tiny_batches(count=3, ragged=9)
    products = BatchedHVP(model, engine="vmap", compile="compile(vmap)")
    with pytest.warns(RuntimeWarning, match=r"compile\(vmap\) failed to trace") as record:
        got, info = spectral_norms(model, batches, chunk=2, products=products, return_info=True)
    assert len(calls) == 1 and len([w for w in record if "failed to trace" in str(w.message)]) == 1
    assert info.engine == products.variant == "vmap"  # says what ran
    assert torch.allclose(got, spectral_norms(model, batches, chunk=2), rtol=1e-5, atol=0)


def test_compiled_product_is_cached_per_model_and_used_for_one_shape_only(monkeypatch):
    traced_shapes = []

    def recording_compile(fn, **kwargs):
        def traced(weights, inputs, targets, vectors):
            traced_shapes.append(tuple(inputs.shape))
            return fn(weights, inputs, targets, vectors)
        return traced
    monkeypatch.setattr(torch, "compile", recording_compile)
    model = _tiny_net()
    batches = _tiny_batches(count=2, ragged=4)  # two shapes: the ragged one must not reach the compiled product
    first = BatchedHVP(model, engine="vmap", compile="compile(vmap)")
    spectral_norms(model, batches, chunk=2, products=first)
    second = BatchedHVP(model, engine="vmap", compile="compile(vmap)")
    assert second._compiled is first._compiled  # no second compile for the same model and settings
    assert set(traced_shapes) == {(2, 9, 5)}


@pytest.mark.gpu  # CUDA graphs need a CUDA device
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_captured_cuda_products_match_eager(curvature):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3)).cuda().eval()
    batches = [(torch.randn(4, 3, 6, 6, device="cuda"), torch.randint(0, 3, (4,), device="cuda")) for _ in range(5)]
    captured = BatchedHVP(model, curvature=curvature)
    got, info = spectral_norms(model, batches, chunk=2, products=captured, return_info=True)
    assert info.engine == "loop+cudagraph"
    eager = BatchedHVP(model, curvature=curvature, cuda_graphs=False)
    want = spectral_norms(model, batches, chunk=2, products=eager)
    assert torch.allclose(got, want, rtol=1e-4, atol=0)
    # a reused slot replays the build for its new batch: products equal fresh eager ones
    x, y = torch.stack([b[0] for b in batches[:2]]), torch.stack([b[1] for b in batches[:2]])
    v = torch.randn(2, captured.flat.size, device="cuda")
    assert torch.allclose(captured(x, y, v, keys=["a", "b"]), eager(x, y, v), rtol=1e-4, atol=1e-6)


def test_captured_slots_reload_static_buffers_in_any_order(monkeypatch):
    # The capture protocol on the CPU: a "replay" reruns the captured function eagerly, so what is checked is
    # the static-buffer bookkeeping (inputs copied in, the build replayed on a slot's reuse, outputs read).
    import sys
    monkeypatch.setattr(sys.modules["kdfast.hessian.hvp"], "_capture", lambda fn: (fn(), fn)[1])
    model, batches = _tiny_net(), _tiny_batches(count=5, ragged=3)
    captured = BatchedHVP(model)
    captured.cuda_graphs = True  # what the constructor sets on CUDA
    got, info = spectral_norms(model, batches, chunk=2, products=captured, return_info=True)
    assert info.engine == "loop+cudagraph"
    assert len(captured._spare) + len(captured._retained) <= 3  # two slots of one shape, one of the ragged shape
    assert torch.allclose(got, spectral_norms(model, batches, chunk=2), rtol=1e-6, atol=0)
    x, y = torch.stack([b[0] for b in batches[:2]]), torch.stack([b[1] for b in batches[:2]])
    v = torch.randn(2, captured.flat.size, dtype=torch.float64)
    want = BatchedHVP(model)(x, y, v)
    assert torch.allclose(captured(x, y, v, keys=["a", "b"]), want, rtol=1e-10, atol=1e-12)
    assert torch.allclose(captured(x.flip(0), y.flip(0), v.flip(0), keys=["c", "d"]), want.flip(0), rtol=1e-10,
                          atol=1e-12)  # both slots reloaded with the other's batch


def test_cuda_graphs_need_the_loop_engine_on_cuda():
    with pytest.raises(InvalidArgumentError, match="cuda_graphs"):
        BatchedHVP(_tiny_net(), cuda_graphs=True)


def test_start_vectors_are_drawn_on_the_device_in_the_working_dtype(monkeypatch):
    from kdfast.hessian import spectral
    drawn = []
    real = torch.randn

    def spy(*args, **kwargs):
        drawn.append((kwargs.get("dtype"), str(kwargs.get("device"))))
        return real(*args, **kwargs)
    monkeypatch.setattr(torch, "randn", spy)
    v = spectral._start_vector(10, 0, 3, torch.float32, torch.device("cpu"))
    assert drawn == [(torch.float32, "cpu")] and v.dtype == torch.float32
    assert torch.equal(v, spectral._start_vector(10, 0, 3, torch.float32, torch.device("cpu")))
    assert not torch.equal(v, spectral._start_vector(10, 0, 4, torch.float32, torch.device("cpu")))


def test_spectral_norms_stream_a_generator_with_mixed_shapes_in_order():
    model = _tiny_net()
    batches = _tiny_batches(count=2, ragged=4)
    batches.insert(1, batches.pop())  # the odd-shaped batch in the middle
    want = spectral_norms(model, batches, chunk=2)
    got = spectral_norms(model, (pair for pair in batches), chunk=2)
    assert torch.equal(got, want)
    with pytest.raises(InvalidArgumentError, match=r"batches\[1\]"):
        spectral_norms(model, [batches[0], batches[1][0]])


def test_bench_hessian_runs_the_baseline_first_and_keeps_its_budget(monkeypatch):
    # The benchmark on a tiny setting, so it cannot rot: baseline first, then kdfast, then the accuracy row,
    # each emitted as it is measured; a spent budget skips the rest with a note.
    import bench.perf.bench_hessian as bench
    monkeypatch.setitem(bench.SETTINGS, "smoke", bench.Setting("tiny-gn-cnn", batches=2, batch=4, side=8,
                                                               baseline_batches=2, rounds=1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        emitted = []
        rows = bench.run(device="cpu", smoke=True, emit=emitted.append)
        assert emitted == rows
        assert [(r["provider"], r["mode"]) for r in rows] == [
            ("sequential-power-eager", "full"), ("kdfast-loop", "full"), ("reference", "accuracy"),
            ("kdfast-vmap", "full")]
        base, loop = rows[0], rows[1]
        for r in (base, loop, rows[3]):
            assert r["batches_per_s"] > 0 and r["hvps_per_batch"] >= 1
        assert loop["speedup_vs"]["sequential-power-eager"] == pytest.approx(base["ms"] / loop["ms"])
        assert max(rows[2]["max_rel_err_by_provider"].values()) < 1e-3 and rows[3]["max_rel_err"] < 1e-3
        target = [t for t in bench.targets(rows) if "cpu" in t["what"]][0]
        assert target["measured"] == pytest.approx(loop["speedup_vs"]["sequential-power-eager"])
        assert target["met"] == (target["measured"] >= 3)
        assert [t["measured"] for t in bench.targets(rows) if "cuda" in t["what"]] == [None]
        spent = bench.run(device="cpu", smoke=True, budget_s=0.0)
        assert [(r["provider"], r["mode"]) for r in spent] == [
            ("sequential-power-eager", "full"), ("kdfast-loop", "full"), ("kdfast-vmap", "skipped")]
        assert spent[0]["batches"] == 1 and "budget" in spent[2]["note"]
    finally:
        torch.set_num_threads(threads)
