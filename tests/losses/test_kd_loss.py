"""The fused KD loss on every backend against the float64 oracle (kd_loss_ref / kd_stats_ref).

Backends: "torch", "cpp" (kdfast._C), "triton" (CPU tensors under TRITON_INTERPRET=1, set by conftest when
no GPU is present: slow, so Triton cases stay small). Tolerances: the backends compute in float32 whatever
the input dtype, so each quantity may differ from the float64 oracle by k x the error of eager PyTorch in
float32 on the same inputs, plus the rounding of the output dtype (the gradient comes back in the student's
dtype); for fp16/bf16 the gradient must also be no worse than eager PyTorch computing in that dtype.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdfast
from kdfast import KDLoss, kd_loss
from kdfast.runtime.dispatch import triton_interpret
from kdfast.errors import BackendUnavailableError, InvalidArgumentError
from kdfast.losses.reference import KD_STAT_NAMES, kd_loss_ref, kd_stats_ref

from _assertions import assert_close, max_abs_err
from _backends import BACKENDS, cpu_unavailable_reason, require_backend as _require

kd_ops = importlib.import_module("kdfast.losses.kd_loss")  # the module: kdfast.losses.kd_loss is also the function

# The Triton interpreter computes with numpy, which warns about the NaN / -inf intermediates of ignored rows
# and masked columns; the kernels discard those by design (the outputs are checked below).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

EAGER_ERROR_FACTOR = 8  # k: a backend may be k times less accurate than eager float32 PyTorch
# dtype -> (atol relative to the largest reference value, rtol): in low precision the gradient is rounded
# twice, once stored by the forward and once rescaled by the backward, each within half an ulp (2^-8 for
# bf16's 8 significant bits, 2^-11 for fp16's 11)
DTYPE_TOL = {
    torch.float32: (1e-6, 1e-5),
    torch.bfloat16: (1e-6, 2 * 2.0 ** -8),
    torch.float16: (1e-6, 2 * 2.0 ** -11),
}


def _grad_tol(dtype, backend):
    """(atol, rtol, k_low): k_low bounds the gradient's relative norm error by k_low x eager PyTorch's in that
    dtype. The fused gradient is rounded twice (stored by the forward, rescaled by the backward) where eager
    PyTorch rounds once, and mean-reduced gradients over a large vocabulary are fp16 subnormals whose rounding
    steps are coarse: measured ratios reach 2.1 over 48 random draws, so k_low = 3."""
    atol, rtol = DTYPE_TOL[dtype]
    if backend == "triton" and triton_interpret() and dtype == torch.bfloat16:
        # the Triton interpreter truncates fp32 -> bf16 (a GPU rounds to nearest): an rms error of 0.58 ulp per
        # store against 0.29 for rounding, stored twice (forward, backward) where eager rounds once, i.e. ~2.8x
        # eager's error on average; on one row of 37 classes eager's own error can be lucky (measured 6x), so 8
        return atol, 2 * 2.0 ** -7, 8.0
    return atol, rtol, 3.0


# (student dtype, teacher dtype): the teacher may differ from the student
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)]


# ------------------------------------------------------------------------------------------ helpers
def _magnitude(ref) -> float:
    """Largest finite |value| (at least 1): absolute tolerances scale with the values compared."""
    finite = ref.detach().abs()[torch.isfinite(ref.detach())]
    return max(1.0, float(finite.max())) if finite.numel() else 1.0


def _rel_norm_err(x, ref) -> float:
    finite = torch.isfinite(ref)
    d = x.detach().double()[finite] - ref.detach().double()[finite]
    return float(d.norm() / ref.detach().double()[finite].norm().clamp(min=1e-30))




def _force_tiled_path(monkeypatch):
    """Forces the Triton forward's two-pass tiled path on small C (the one-tile cap is a module constant)."""
    from kdfast.losses import triton as kernels
    monkeypatch.setattr(kernels, "MAX_SINGLE_TILE", 16)
    monkeypatch.setattr(kernels, "TILE", 16)


@pytest.fixture(params=[*BACKENDS, "triton-tiled", "triton-split"])
def kernel_path(request, monkeypatch):
    """Every backend, plus the Triton kernel's tiled path (the others have no one-tile cap) and its row split
    (4 programs per row over 16-wide tiles, the last to finish combining them): the backend name."""
    backend, _, variant = request.param.partition("-")
    _require(backend)
    if variant:
        _force_tiled_path(monkeypatch)
    if variant == "split":
        from kdfast.losses import triton as kernels
        monkeypatch.setattr(kernels, "SPLIT", 4)
    return backend


def _inputs(shape, dtypes=(torch.float32, torch.float32), scale=3.0, ignore_frac=0.25, teacher=True):
    *lead, C = shape
    s = (torch.randn(shape) * scale).to(dtypes[0])
    t = (torch.randn(shape) * scale).to(dtypes[1]) if teacher else None
    y = torch.randint(0, C, tuple(lead))
    y[torch.rand(tuple(lead)) < ignore_frac] = -100
    return s, t, y


def _reference(s, t, y, go, *, dtype=torch.float64, **kw):
    """Loss, gradient (for upstream gradient go) and stats of the oracle computed in `dtype`."""
    leaf = s.detach().to(dtype).requires_grad_(True)
    t_d = None if t is None else t.to(dtype)
    w = kw.get("weight")
    loss = kd_loss_ref(leaf, t_d, y, dtype=dtype, **kw)
    (grad,) = torch.autograd.grad((loss * go.to(dtype)).sum(), leaf)
    stats = kd_stats_ref(leaf.detach(), t_d, y, alpha=kw["alpha"], temperature=kw["temperature"],
                         weight=w, dtype=dtype)
    return loss.detach(), grad, stats


def check_against_reference(s, t, y, *, backend, alpha, temperature, reduction, weight=None, go=None,
                            inplace=False, extrapolate=False):
    """Runs kd_loss (loss, stats, backward with upstream gradient go) and compares everything."""
    kw = dict(alpha=alpha, temperature=temperature, reduction=reduction, weight=weight)
    ref_loss, ref_grad, ref_stats = _reference(s, t, y, go, **kw)
    e_loss, e_grad, e_stats = _reference(s, t, y, go, dtype=torch.float32, **kw)

    leaf = s.detach().clone().requires_grad_(True)
    student = leaf * 1.0 if inplace else leaf  # in place needs a buffer the graph owns
    loss, stats = kd_loss(student, t, y, backend=backend, return_stats=True, inplace=inplace,
                          extrapolate=extrapolate, **kw)
    loss.backward(go)

    atol, rtol, k_low = _grad_tol(s.dtype, backend)
    f32_atol, f32_rtol = DTYPE_TOL[torch.float32]
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert_close("loss", loss, ref_loss, atol=f32_atol * _magnitude(ref_loss), rtol=f32_rtol,
                 budget=EAGER_ERROR_FACTOR * max_abs_err(e_loss, ref_loss))
    assert leaf.grad.dtype == s.dtype and leaf.grad.shape == s.shape
    assert_close("grad", leaf.grad, ref_grad, atol=atol * _magnitude(ref_grad), rtol=rtol,
                 budget=EAGER_ERROR_FACTOR * max_abs_err(e_grad, ref_grad))
    if s.dtype != torch.float32:  # no worse than eager PyTorch computing in the low precision itself
        _, low_grad, _ = _reference(s, t, y, go, dtype=s.dtype, **kw)
        err, eager_err = _rel_norm_err(leaf.grad, ref_grad), _rel_norm_err(low_grad, ref_grad)
        assert err <= k_low * eager_err + atol, \
            f"grad relative error {err:.3g} above {k_low} x eager PyTorch's in {s.dtype} ({eager_err:.3g})"
    if inplace:
        assert torch.equal(student.detach(), leaf.grad), "inplace: student_logits must hold the gradient"
    assert set(stats) == set(KD_STAT_NAMES)
    for name in KD_STAT_NAMES:
        assert stats[name].dtype == torch.float32 and stats[name].shape == (y.numel(),), name
        assert_close(f"stats[{name}]", stats[name], ref_stats[name], atol=f32_atol * _magnitude(ref_stats[name]),
                     rtol=f32_rtol, budget=EAGER_ERROR_FACTOR * max_abs_err(e_stats[name], ref_stats[name]))


def _upstream(reduction, y):
    """A random upstream gradient (never exactly 1): scalar, or one value per row for reduction='none'."""
    shape = y.shape if reduction == "none" else ()
    return torch.rand(shape) + 0.5


# ------------------------------------------------------------------------------- correctness tables
# (id, shape, alpha, temperature, reduction, weighted): every alpha in {0, 0.3, 1} and T in {1, 4, 20}
CASES = [
    ("typical", (16, 100), 0.3, 4.0, "mean", False),
    ("odd_C_weighted", (7, 1000), 0.3, 1.0, "sum", True),
    ("C1", (5, 1), 0.3, 4.0, "sum", False),
    ("C2_pure_kd", (8, 2), 1.0, 20.0, "none", False),
    ("N1_pure_ce", (1, 37), 0.0, 1.0, "mean", False),
    ("3d", (2, 3, 17), 1.0, 4.0, "none", True),
    ("gpt2_vocab", (2, 50257), 0.3, 20.0, "mean", False),
]


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}".replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_loss_grad_stats_match_float64_reference(backend, case, dtypes):
    _, shape, alpha, temperature, reduction, weighted = case
    s, t, y = _inputs(shape, dtypes)
    weight = torch.rand(y.shape) + 0.5 if weighted else None
    check_against_reference(s, t, y, backend=backend, alpha=alpha, temperature=temperature, reduction=reduction,
                            weight=weight, go=_upstream(reduction, y))


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}".replace("torch.", ""))
def test_triton_tiled_path_above_the_one_tile_cap(dtypes, monkeypatch):
    _require("triton")
    _force_tiled_path(monkeypatch)
    s, t, y = _inputs((6, 37), dtypes)
    check_against_reference(s, t, y, backend="triton", alpha=0.3, temperature=4.0, reduction="none",
                            weight=torch.rand(6) + 0.5, go=_upstream("none", y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inplace_writes_gradient_into_student(kernel_path, dtype):
    backend = kernel_path
    s, t, y = _inputs((6, 40), (dtype, dtype))
    check_against_reference(s, t, y, backend=backend, alpha=0.3, temperature=4.0, reduction="mean",
                            go=_upstream("mean", y), inplace=True)


def test_hostile_logits(kernel_path):
    """+-1e4 logits, -inf teacher logits (q = 0 must add 0, never NaN), a row with a single finite teacher."""
    backend = kernel_path
    s, t, y = _inputs((8, 40), ignore_frac=0.0)
    s[0], t[0] = s[0].sign() * 1e4, -t[0].sign() * 1e4
    s[1, :20] = 1e4
    s[2] = -1e4
    t[3, ::3] = float("-inf")
    t[4, :39] = float("-inf")
    t[5, :16] = float("-inf")  # a whole first tile of -inf on the tiled path
    y[0], y[4] = 3, 39
    check_against_reference(s, t, y, backend=backend, alpha=0.3, temperature=1.0, reduction="sum",
                            go=_upstream("sum", y))


def test_kernel_variants_without_stats_or_gradient_agree(kernel_path):
    """Stats off, and no gradient (student not requiring grad: the Triton kernel skips pass 2), give the
    same loss, gradient and stats as the fully checked variant with everything on."""
    backend = kernel_path
    s, t, y = _inputs((5, 40))
    kw = dict(alpha=0.3, temperature=4.0, reduction="sum", backend=backend)
    leaf_on, leaf_off = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    loss_on, stats_on = kd_loss(leaf_on, t, y, return_stats=True, **kw)
    loss_on.backward()
    loss_off = kd_loss(leaf_off, t, y, **kw)
    loss_off.backward()
    loss_nograd, stats_nograd = kd_loss(s, t, y, return_stats=True, **kw)
    assert_close("loss without stats", loss_off, loss_on, atol=1e-6, rtol=1e-6)
    assert_close("grad without stats", leaf_off.grad, leaf_on.grad, atol=1e-7, rtol=1e-6)
    assert_close("loss without gradient", loss_nograd, loss_on, atol=1e-6, rtol=1e-6)
    for name in KD_STAT_NAMES:
        assert_close(f"stats[{name}] without gradient", stats_nograd[name], stats_on[name], atol=1e-6, rtol=1e-6)
    assert_close("loss without gradient or stats", kd_loss(s, t, y, **kw), loss_on, atol=1e-6, rtol=1e-6)


def test_forward_writes_every_gradient_element(kernel_path):
    """The backends' forward contract with a NaN-poisoned grad_out (ignored rows included): every element
    is written, rows and stats match the reference."""
    backend = kernel_path
    s, t, y = _inputs((6, 37))
    grad_out = torch.full_like(s, float("nan"))
    rows, grad, stats = kd_ops._FORWARD[backend](s, t, y, None, 0.3, 4.0, -100, 0, True, True, grad_out, False)
    assert grad is grad_out or grad.data_ptr() == grad_out.data_ptr()
    ref_rows, ref_grad, ref_stats = _reference(s, t, y, torch.ones(6), alpha=0.3, temperature=4.0,
                                               reduction="none")
    assert_close("rows", rows, ref_rows, atol=1e-5, rtol=1e-5)
    assert_close("grad_out", grad_out, ref_grad, atol=1e-6, rtol=1e-5)
    for i, name in enumerate(KD_STAT_NAMES):
        assert_close(f"stats[{name}]", stats[i], ref_stats[name], atol=1e-5, rtol=1e-5)


def test_teacher_none_is_cross_entropy(backend):
    s, _, y = _inputs((6, 33))
    check_against_reference(s, None, y, backend=backend, alpha=0.0, temperature=4.0, reduction="sum",
                            go=_upstream("sum", y))
    _, stats = kd_loss(s, None, y, alpha=0.0, backend=backend, return_stats=True)
    valid = y != -100
    assert bool(stats["kl"][valid].isnan().all()) and bool((stats["kl"][~valid] == 0).all())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_give_zero_never_nan(backend, reduction):
    s, t, y = _inputs((4, 9), ignore_frac=1.0)
    leaf = s.clone().requires_grad_(True)
    loss, stats = kd_loss(leaf, t, y, backend=backend, reduction=reduction, return_stats=True)
    loss.sum().backward()
    assert bool((loss == 0).all()) and bool((leaf.grad == 0).all())
    assert all(bool((v == 0).all()) for v in stats.values())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(backend, reduction):
    s, t, y = _inputs((0, 7))
    leaf = s.clone().requires_grad_(True)
    loss, stats = kd_loss(leaf, t, y, backend=backend, reduction=reduction, return_stats=True)
    loss.sum().backward()
    assert loss.shape == ((0,) if reduction == "none" else ()) and loss.sum().item() == 0.0
    assert leaf.grad.shape == (0, 7) and all(v.shape == (0,) for v in stats.values())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_upstream_gradient_exactly_one(backend, reduction):
    """loss.backward() with exactly 1 (the backward's early exit) and an expanded per-row 1 for 'none'."""
    s, t, y = _inputs((6, 21))
    go = torch.ones(y.shape) if reduction == "none" else torch.tensor(1.0)
    check_against_reference(s, t, y, backend=backend, alpha=0.3, temperature=4.0, reduction=reduction, go=go)
    leaf = s.clone().requires_grad_(True)
    kd_loss(leaf, t, y, backend=backend, reduction=reduction).sum().backward()  # stride-0 ones for 'none'
    _, ref_grad, _ = _reference(s, t, y, go, alpha=0.5, temperature=4.0, reduction=reduction)
    assert_close("grad", leaf.grad, ref_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("count_in_kernel", [True, False], ids=["kernel_counts", "launcher_counts"])
def test_triton_mean_scale_counted_in_kernel_or_launcher(count_in_kernel, monkeypatch):
    """reduction='mean' on Triton: the kernel counts the labels for 1/n_valid (small N) or torch ops do."""
    _require("triton")
    from kdfast.losses import triton as kernels
    if not count_in_kernel:
        monkeypatch.setattr(kernels, "COUNT_VALID_MAX_ROWS", 2)
    s, t, y = _inputs((6, 9), ignore_frac=0.4)
    check_against_reference(s, t, y, backend="triton", alpha=0.3, temperature=4.0, reduction="mean",
                            go=_upstream("mean", y))


def test_backward_scales_in_place(backend):
    """The backward entry: grad *= grad_output for a scalar, per-row values (some exactly 1) and stride 0."""
    grad = torch.randn(5, 11)
    for go in (torch.tensor(1.0), torch.tensor(-2.5), torch.tensor([1.0, 2.0, 1.0, -0.5, 3.0]),
               torch.tensor(0.5).expand(5)):
        buf = grad.clone()
        kd_ops._BACKWARD[backend](buf, go)
        assert torch.equal(buf, grad * (go if go.dim() == 0 else go[:, None])), f"grad_output {go}"


def test_non_contiguous_inputs(backend):
    """Row-strided views (unit class stride, used as they are) and a transposed layout (copied)."""
    wide_s, wide_t, y = _inputs((6, 50))
    s, t = wide_s[:, 3:40], wide_t[:, 5:42]  # row stride 50
    y = y.clamp(max=36).masked_fill(y == -100, -100)
    check_against_reference(s, t, y, backend=backend, alpha=0.3, temperature=4.0, reduction="mean",
                            go=_upstream("mean", y))
    s_t = torch.randn(13, 2, 6).transpose(0, 2)  # (6, 2, 13), class stride 12
    t_t = torch.randn(6, 2, 13)
    y3 = torch.randint(0, 13, (6, 2))
    check_against_reference(s_t, t_t, y3, backend=backend, alpha=0.3, temperature=4.0, reduction="none",
                            go=_upstream("none", y3))


def test_module_matches_functional(backend):
    s, t, y = _inputs((6, 25))
    w = torch.rand(6) + 0.5
    crit = KDLoss(alpha=0.3, temperature=2.0, reduction="sum", ignore_index=-100, backend=backend)
    assert "distillation weight" in repr(crit)
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    crit(a, t, y, weight=w).backward()
    kd_loss(b, t, y, alpha=0.3, temperature=2.0, reduction="sum", weight=w, backend=backend).backward()
    assert_close("module loss grad", a.grad, b.grad)


def test_out_of_range_label_without_validation_is_nan_never_a_wild_read(backend):
    s, t, y = _inputs((4, 9), ignore_frac=0.0)
    y[1], y[2] = 9, -3
    rows, stats = kd_loss(s, t, y, backend=backend, reduction="none", validate=False, return_stats=True)
    assert bool(rows[[1, 2]].isnan().all()) and bool(rows[[0, 3]].isfinite().all())
    for name in ("ce", "kl", "el2n", "margin", "correct"):
        assert bool(stats[name][[1, 2]].isnan().all()), name


# -------------------------------------------------------------------------- alpha outside [0, 1]
@pytest.mark.parametrize("alpha", [-0.5, 1.7])
def test_alpha_outside_the_unit_interval_with_extrapolate(kernel_path, alpha):
    """extrapolate=True: the same per-row formula for any finite alpha, on every backend."""
    s, t, y = _inputs((6, 30))
    check_against_reference(s, t, y, backend=kernel_path, alpha=alpha, temperature=2.0, reduction="mean",
                            go=_upstream("mean", y), extrapolate=True)


def test_alpha_outside_the_unit_interval_needs_extrapolate():
    s, t, y = _inputs((3, 5))
    for alpha in (-0.5, 1.7):
        with pytest.raises(InvalidArgumentError, match=r"alpha must be a number in \[0, 1\].*extrapolate=True"):
            kd_loss(s, t, y, alpha=alpha)
    for alpha in (float("inf"), float("nan")):
        with pytest.raises(InvalidArgumentError, match="alpha must be a finite number"):
            kd_loss(s, t, y, alpha=alpha, extrapolate=True)
    crit = KDLoss(alpha=1.7, extrapolate=True)
    assert_close("module extrapolates", crit(s, t, y), kd_loss_ref(s, t, y, alpha=1.7), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------- non-finite logits
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_non_finite_logits_have_one_semantics_on_every_backend(kernel_path, alpha):
    """-inf is a legal logit (an impossible class); NaN / +inf / no finite logit make a student row undefined
    (NaN everywhere but correct = 0) and a teacher row's kl NaN (and its loss and gradient unless alpha == 0).
    Every backend matches the float64 reference, NaN for NaN and inf for inf."""
    nan, inf = float("nan"), float("inf")
    s, t, y = _inputs((10, 20), ignore_frac=0.0)
    s[0, 3], s[1, 5], s[2] = nan, inf, -inf
    s[3, y[3]] = -inf  # the label impossible: infinite ce, finite gradient
    s[4, ::3] = -inf  # impossible classes the teacher supports: infinite kl, finite gradient
    s[4, y[4]] = 1.0
    t[5, 2], t[6, 7], t[7] = nan, inf, -inf
    t[8, ::2] = -inf
    go = _upstream("none", y)
    check_against_reference(s, t, y, backend=kernel_path, alpha=alpha, temperature=2.0, reduction="none", go=go)
    leaf = s.clone().requires_grad_(True)
    rows, stats = kd_loss(leaf, t, y, alpha=alpha, temperature=2.0, reduction="none", backend=kernel_path,
                          return_stats=True)
    rows.backward(go)
    undefined_student = [0, 1, 2]
    assert rows[undefined_student].isnan().all() and leaf.grad[undefined_student].isnan().all()
    assert (stats["correct"][undefined_student] == 0).all()
    for name in ("ce", "kl", "el2n", "grad_norm", "margin"):
        assert stats[name][undefined_student].isnan().all(), name
    assert torch.isinf(stats["ce"][3]) and leaf.grad[3].isfinite().all()
    bad_teacher = [5, 6, 7]
    assert stats["kl"][bad_teacher].isnan().all() and stats["ce"][bad_teacher].isfinite().all()
    assert bool(rows[bad_teacher].isnan().all()) == (alpha != 0)
    assert bool(leaf.grad[bad_teacher].isnan().all()) == (alpha != 0)
    assert bool(torch.isinf(rows[4])) == (alpha != 0) and torch.isinf(stats["kl"][4])
    assert rows[[8, 9]].isfinite().all() and leaf.grad[[4, 8, 9]].isfinite().all()


def test_validate_default_checks_labels_on_cpu(backend):
    """validate=None checks on CPU tensors (free for the C++ kernel); validate=False leaves NaN rows."""
    s, t, y = _inputs((4, 9), ignore_frac=0.0)
    y[2] = 9
    with pytest.raises(InvalidArgumentError, match=r"row 2 has 9 \(1 bad rows in all\)"):
        kd_loss(s, t, y, backend=backend)
    assert kd_loss(s, t, y, backend=backend, validate=False).isnan()


def test_second_backward_through_same_graph_raises(backend):
    s, t, y = _inputs((3, 5))
    leaf = s.clone().requires_grad_(True)
    loss = kd_loss(leaf, t, y, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


# --------------------------------------------------------------------------------- dispatch, compile
def test_env_override_selects_backend(monkeypatch):
    s, t, y = _inputs((3, 5))
    seen = []
    for name in ("torch", "triton"):
        if cpu_unavailable_reason(name):
            continue
        real = kd_ops._FORWARD[name]
        monkeypatch.setitem(kd_ops._FORWARD, name,
                            lambda *a, _real=real, _name=name, **kw: (seen.append(_name), _real(*a, **kw))[1])
        monkeypatch.setenv("KDFAST_BACKEND", name)
        kd_loss(s, t, y)
    assert seen == [n for n in ("torch", "triton") if not cpu_unavailable_reason(n)]
    monkeypatch.setenv("KDFAST_BACKEND", "cuda")
    with pytest.raises(InvalidArgumentError, match="KDFAST_BACKEND"):
        kd_loss(s, t, y)


@pytest.mark.parametrize("compiled_backend", ["torch", "cpp"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph_training_step(reduction, compiled_backend):
    """A compiled step with default arguments (no graph breaks: the host-side label check is skipped while
    tracing) gives the eager gradients; CPU, aot_eager (the op and its autograd, not codegen)."""
    _require(compiled_backend)
    torch._dynamo.reset()
    model = torch.nn.Linear(8, 5)
    x, t, y = torch.randn(6, 8), torch.randn(6, 5), torch.randint(0, 5, (6,))
    y[2] = -100
    w = torch.rand(6) + 0.5

    def step(x, t, y, w):
        loss, stats = kd_loss(model(x), t, y, alpha=0.3, temperature=2.0, reduction=reduction, weight=w,
                              backend=compiled_backend, return_stats=True)
        return loss.sum(), stats["el2n"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (step, compiled):
        model.zero_grad()
        loss, el2n = fn(x, t, y, w)
        loss.backward()
        grads.append((loss.detach(), el2n, model.weight.grad.clone()))
    for name, a, b in zip(("loss", "el2n", "weight.grad"), grads[0], grads[1]):
        assert_close(f"compiled {name}", b, a, atol=1e-6, rtol=1e-5)
    torch._dynamo.reset()


def test_inplace_under_torch_compile_raises_instead_of_being_ignored():
    torch._dynamo.reset()
    s, t, y = _inputs((4, 5))

    def step(s, t, y):
        return kd_loss(s * 1.0, t, y, inplace=True, backend="torch")

    with pytest.raises(Exception, match="inplace=True cannot be honoured under torch.compile"):
        torch.compile(step, fullgraph=True, backend="aot_eager")(s.requires_grad_(True), t, y)
    torch._dynamo.reset()


def test_triton_kernels_compile_for_hopper_without_spills():
    """The interpreter runs the kernels' Python; this compiles them for sm_90 (ptxas, no GPU) and reads the
    cubins: every variant must compile and fit its registers (a stack frame means spills)."""
    pytest.importorskip("triton")
    pytest.importorskip("bench.perf.kernel_resources", reason="bench/ ships with the repository, not the package")
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # the interpreter's functions cannot be compiled
    done = subprocess.run([sys.executable, "-m", "bench.perf.kernel_resources", "--quick"], capture_output=True,
                          text=True, env=env, cwd=Path(__file__).resolve().parents[2], timeout=300)
    if "ptxas" in done.stderr and done.returncode:
        pytest.skip(f"no ptxas with this triton: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 9 and all("STACK=  0" in line for line in lines), done.stdout
    # the pipelined tiled variant's shared memory fits one block of an sm_90 SM (227 KB)
    shared = [int(line.split("SHARED=")[1]) for line in lines if "SHARED=" in line]
    assert shared and max(shared) <= 227 * 1024, done.stdout


# ------------------------------------------------------------------------------------------ bad input
def _bad_calls():
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.randint(0, 5, (4,))
    return [
        ("student_logits", dict(student_logits=torch.ones(4, 5, dtype=torch.int64))),
        ("student_logits", dict(student_logits=torch.tensor(1.0), target=torch.tensor(0))),
        ("student_logits", dict(student_logits=[[1.0, 2.0]])),
        ("alpha", dict(alpha=-0.1)),
        ("alpha", dict(alpha=1.5)),
        ("alpha", dict(alpha="0.5")),
        ("temperature", dict(temperature=0.0)),
        ("temperature", dict(temperature=-1.0)),
        ("temperature", dict(temperature=float("inf"))),
        ("reduction", dict(reduction="avg")),
        ("target", dict(target=y.float())),
        ("target", dict(target=y[:3])),
        ("target", dict(target=torch.tensor([0, 5, 1, 2]))),
        ("target", dict(target=torch.tensor([0, -1, 1, 2]))),
        ("target", dict(student_logits=torch.randn(2, 2, 5), teacher_logits=torch.randn(2, 2, 5),
                        target=torch.tensor([[0, -100], [7, 2]]))),
        ("teacher_logits", dict(teacher_logits=None)),
        ("teacher_logits", dict(teacher_logits=torch.randn(4, 6))),
        ("teacher_logits", dict(teacher_logits=torch.randn(5, 5))),
        ("teacher_logits", dict(teacher_logits=t.long())),
        ("weight", dict(weight=torch.rand(3))),
        ("weight", dict(weight=torch.ones(4, dtype=torch.int64))),
        ("backend", dict(backend="cuda")),
        ("inplace", dict(inplace=True)),
    ], (s, t, y)


@pytest.mark.parametrize("index", range(len(_bad_calls()[0])), ids=[f"{a}-{i}" for i, (a, _) in
                                                                     enumerate(_bad_calls()[0])])
@pytest.mark.parametrize("backend", ["torch", None], ids=["torch", "default"])  # default: the C++ direct entry
def test_bad_input_raises_naming_the_argument(index, backend):
    calls, (s, t, y) = _bad_calls()
    argument, override = calls[index]
    kwargs = dict(student_logits=s, teacher_logits=t, target=y, alpha=0.5, temperature=4.0, backend=backend)
    kwargs.update(override)
    with pytest.raises(InvalidArgumentError, match=argument):
        kd_loss(kwargs.pop("student_logits"), kwargs.pop("teacher_logits"), kwargs.pop("target"), **kwargs)


@pytest.mark.parametrize("argument,kwargs", [
    ("alpha", dict(alpha=2.0)), ("alpha", dict(alpha=float("nan"), extrapolate=True)),
    ("reduction", dict(reduction="avg")), ("temperature", dict(temperature=0)),
    ("backend", dict(backend="fortran")), ("ignore_index", dict(backend="fortran", ignore_index="x")),
    ("extrapolate", dict(extrapolate="yes")), ("validate", dict(validate="always")),
    ("inplace", dict(inplace=1.5)), ("return_stats", dict(return_stats="yes")),
])
def test_bad_module_configuration_raises_at_construction(argument, kwargs):
    with pytest.raises(InvalidArgumentError, match=argument):
        KDLoss(**kwargs)


def test_float64_needs_the_torch_backend():
    s, t, y = _inputs((3, 5))
    with pytest.raises(BackendUnavailableError, match="float64"):
        kd_loss(s.double(), t, y, backend="cpp" if cpu_unavailable_reason("triton") else "triton")
    ref = kd_loss_ref(s.double(), t, y)
    assert_close("float64 loss", kd_loss(s.double(), t.double(), y), ref, atol=1e-6, rtol=1e-6)


def test_public_api_exposes_the_loss():
    assert kdfast.kd_loss is kd_loss and kdfast.KDLoss is KDLoss
