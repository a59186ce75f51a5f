"""Backend discovery and dispatch through kd_loss, the fallback without kdfast._C, and direct checks of the C++
kernels (kdfast._C.kd_loss_fwd / kd_loss_bwd) against the float64 run of the "torch" backend's contract.

The op-level suite (every backend through kd_loss and autograd) is tests/test_kd_loss.py; the checks here call
the extension directly, so they also cover what the op never passes it (in-place into a strided student,
rows wider than C, the argument checks of the binding).
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kdfast
from kdfast.runtime.dispatch import BACKEND_NAMES, ENV_VAR, backends
from kdfast.errors import BackendUnavailableError, InvalidArgumentError
from kdfast.losses.reference import KD_STAT_NAMES, kd_loss_fwd_torch

from _assertions import assert_close, max_abs_err

kd_ops = importlib.import_module("kdfast.losses.kd_loss")  # the module: kdfast.losses.kd_loss is also the function
IGNORE = -100
# The C++ kernels may be EAGER_FACTOR times less accurate than eager fp32 PyTorch (the "torch" backend's
# contract run in fp32 on the same inputs), plus a relative error REL_FLOOR always allowed (a few fp32 ulp). The
# gradient comes back rounded to the student's dtype: half an ulp of it, GRAD_RTOL, is allowed on top.
EAGER_FACTOR = 4
REL_FLOOR = 2e-6
GRAD_RTOL = {torch.float32: REL_FLOOR, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _cpp():
    reason = backends()["cpp"]
    if reason != "available":
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the C++ backend must be built in CI: {reason}")
        pytest.skip(f"C++ backend unavailable: {reason}")
    from kdfast import _C
    return _C


def _contract(dtype, student, teacher, target, weight, reduction, alpha, temperature):
    """The kernels' contract (the "torch" backend) computed in `dtype` on the same, already rounded, inputs."""
    t = None if teacher is None else teacher.to(dtype)
    return kd_loss_fwd_torch(student.to(dtype), t, target, weight, alpha, temperature, IGNORE, reduction, True, True)


def _fwd(student, teacher, target, weight=None, alpha=0.5, temperature=4.0, reduction=0, need_grad=True,
         return_stats=True, grad_out=None, validate=False):
    return _cpp().kd_loss_fwd(student, teacher, target, weight, alpha, temperature, IGNORE, reduction, need_grad,
                              return_stats, grad_out, validate)


def check_outputs(outputs, student, teacher, target, weight, reduction, alpha, temperature):
    """Loss (rows or reduced), gradient (rows with a label in [0, C)) and every statistic against the float64
    contract."""
    rows, grad, stats = outputs
    args = (student, teacher, target, weight, reduction, alpha, temperature)
    ref, eager = _contract(torch.float64, *args), _contract(torch.float32, *args)
    ok = (target >= 0) & (target < student.shape[1])
    checks = [("rows", rows, ref[0], eager[0], REL_FLOOR),
              ("grad", grad[ok], ref[1][ok], eager[1][ok], GRAD_RTOL[grad.dtype])]
    checks += [(name, stats[k], ref[2][k], eager[2][k], REL_FLOOR) for k, name in enumerate(KD_STAT_NAMES)]
    for name, x, expected, x_eager, rtol in checks:
        assert_close(name, x, expected, rtol=rtol, budget=EAGER_FACTOR * max_abs_err(x_eager, expected))


def _hostile_batch(N, C, s_dtype, t_dtype):
    """Random logits (scale 3) with hostile rows: -inf teacher logits, an ignored row, labels above and below
    [0, C), a row of +-1e4 logits."""
    s = torch.randn(N, C) * 3
    t = torch.randn(N, C) * 3
    y = torch.randint(0, C, (N,))
    if C > 1:
        t[0, torch.randperm(C)[: C // 2]] = float("-inf")  # q = 0 there: contributes 0, never 0 * inf
    y[1] = IGNORE
    y[2], y[3] = C + 3, -5  # outside [0, C): NaN row, never a wild read
    s[4] = torch.randint(-1, 2, (C,)).float() * 1e4
    t[4] = torch.randint(-1, 2, (C,)).float() * 1e4
    return s.to(s_dtype), t.to(t_dtype), y


# ------------------------------------------------------------------------------------ discovery, dispatch
def test_backends_lists_every_backend_and_cpp_is_built():
    report = backends()
    assert tuple(report) == BACKEND_NAMES
    _cpp()
    assert report["cpp"] == "available"


def test_public_backends_stays_callable_once_its_module_is_imported():
    """Loading the ops (and the dispatcher module with them) must not rebind the public kdfast.backends."""
    code = "import kdfast, kdfast.losses.kd_loss; print(sorted(kdfast.backends()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(sorted(BACKEND_NAMES))


def _record_backend(monkeypatch):
    """Wraps every backend's forward (and the eager entries with their own autograd node, and the C++ backend's
    direct entry) so the test sees which one kd_loss ran."""
    used = []
    for table in (kd_ops._FORWARD, kd_ops._EAGER):
        for name, fwd in list(table.items()):
            def spy(*args, _name=name, _fwd=fwd):
                used.append(_name)
                return _fwd(*args)
            monkeypatch.setitem(table, name, spy)
    direct = kd_ops._eager_cpu_direct  # the C++ backend on inputs it takes as they are

    def spy_direct(*args):
        out = direct(*args)
        if out is not None:
            used.append("cpp")
        return out
    monkeypatch.setattr(kd_ops, "_eager_cpu_direct", spy_direct)
    return used


def _small_call(**kwargs):
    s = torch.randn(4, 5, requires_grad=True)
    return kdfast.kd_loss(s, torch.randn(4, 5), torch.randint(0, 5, (4,)), **kwargs)


def test_default_dispatch_runs_cpp_on_cpu_tensors(monkeypatch):
    _cpp()
    monkeypatch.delenv(ENV_VAR, raising=False)
    used = _record_backend(monkeypatch)
    _small_call().backward()
    assert used == ["cpp"]


def _direct_cases():
    s, t, y = torch.randn(6, 9) * 3, torch.randn(6, 9) * 3, torch.randint(0, 9, (6,))
    w = torch.rand(6) + 0.5
    return {  # name: (student, teacher, target, weight, whether the C++ entry takes them as they are)
        "plain": (s, t, y, None, True),
        "weighted": (s, t, y, w, True),
        "int32 labels": (s, t, y.int(), None, False),
        "(2, 3, C) logits": (s.reshape(2, 3, 9), t.reshape(2, 3, 9), y.reshape(2, 3), None, False),
        "class-strided student": (s.t().contiguous().t(), t, y, None, False),
        "float64 weight": (s, t, y, w.double(), False),
        "row-strided weight": (s, t, y, torch.rand(6, 2)[:, 0] + 0.5, True),
        "float64 teacher": (s, t.double(), y, None, False),
    }


@pytest.mark.parametrize("case", list(_direct_cases()))
def test_cpu_direct_entry_and_general_path_agree(case, monkeypatch):
    """The C++ backend takes plain CPU inputs directly (no Python checks or preparation); what it refuses goes
    the general way (a conversion, a copy, another backend) to the same answer as the reference backend."""
    _cpp()
    monkeypatch.delenv(ENV_VAR, raising=False)
    s, t, y, w, direct = _direct_cases()[case]
    taken = []
    entry = kd_ops._eager_cpu_direct
    monkeypatch.setattr(kd_ops, "_eager_cpu_direct", lambda *a: taken.append(entry(*a)) or taken[-1])
    results = []
    for backend in (None, "torch"):
        x = s.detach().clone().requires_grad_(True)
        loss, stats = kdfast.kd_loss(x, t, y, weight=w, alpha=0.4, temperature=3.0, return_stats=True,
                                     backend=backend)
        loss.backward()
        results.append((loss, x.grad, stats["grad_norm"]))
    assert (taken[0] is not None) == direct
    for name, got, ref in zip(("loss", "grad", "grad_norm"), *results):
        # fp32 against fp32 with other summation orders: an entry near zero may differ by an ulp of the tensor's
        # scale, so the allowance is relative to each entry plus a few ulps of the largest one
        assert_close(name, got, ref.to(got.dtype), rtol=1e-5, budget=1e-6 * float(ref.abs().max()))


def test_argument_and_environment_override_the_default(monkeypatch):
    _cpp()
    used = _record_backend(monkeypatch)
    monkeypatch.setenv(ENV_VAR, "torch")
    _small_call()
    _small_call(backend="cpp")  # the argument wins over the environment
    monkeypatch.setenv(ENV_VAR, "cpp")
    _small_call()
    assert used == ["torch", "cpp", "cpp"]


def test_unknown_backend_name_raises_naming_its_source(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(InvalidArgumentError, match=r"kd_loss: backend must be one of .*got 'fortran'"):
        _small_call(backend="fortran")
    monkeypatch.setenv(ENV_VAR, "fortran")
    with pytest.raises(InvalidArgumentError, match=rf"kd_loss: {ENV_VAR} must be one of .*got 'fortran'"):
        _small_call()


def test_unavailable_backend_raises_with_the_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: Triton can run")
    with pytest.raises(BackendUnavailableError, match=r"backend='triton' cannot run here: .*TRITON_INTERPRET"):
        _small_call(backend="triton")


def test_package_falls_back_to_torch_without_the_extension_or_a_compiler(tmp_path):
    """A fresh interpreter where importing kdfast._C fails and the first-use compile finds no compiler (CXX names
    none) still imports, says why "cpp" is unavailable, warns once (naming the cost and the fix) however many CPU
    calls fall back, runs kd_loss on the "torch" backend and refuses backend="cpp"."""
    code = textwrap.dedent(f"""
        import importlib.abc, sys, warnings

        class NoExtension(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "kdfast._C":
                    raise ImportError("blocked by the test: no compiled extension")
                return None

        sys.meta_path.insert(0, NoExtension())
        import torch, kdfast
        from kdfast.runtime.dispatch import backends, resolve_backend
        from kdfast.errors import BackendUnavailableError, SlowFallbackWarning
        s = torch.randn(3, 4, requires_grad=True)
        t, y = torch.randn(3, 4), torch.tensor([0, 3, 1])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = kdfast.kd_loss(s, t, y)
            assert resolve_backend(None, torch.device("cpu"), op="kd_loss") == "torch"
            kdfast.KDLoss()(s, t, y)
        slow = [str(w.message) for w in caught if issubclass(w.category, SlowFallbackWarning)]
        assert len(slow) == 1, slow
        assert "8-27x slower" in slow[0] and "install a C++ compiler" in slow[0], slow
        reason = backends()["cpp"]
        assert reason in slow[0], (reason, slow)
        assert "kdfast._C failed to import" in reason and "blocked by the test" in reason, reason
        assert "compiling the C++ sources on first use failed" in reason and "/nonexistent/c++" in reason, reason
        loss.backward()
        ref = kdfast.kd_loss(s.detach(), t, y, backend="torch")
        assert torch.equal(loss.detach(), ref) and s.grad is not None
        try:
            kdfast.kd_loss(s, t, y, backend="cpp")
        except BackendUnavailableError as exc:
            assert "backend='cpp' cannot run here" in str(exc), exc
        else:
            raise AssertionError("backend='cpp' ran without the extension")
        print("fallback ok")
    """)
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "KDFAST_CPP")}
    env.update(CXX="/nonexistent/c++", TORCH_EXTENSIONS_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "fallback ok"
    assert out.stderr.count("kdfast: compiling the C++ CPU kernels") == 1, out.stderr[-3000:]


# ------------------------------------------------------------------------------- the C++ kernels directly
# C = 7: narrower than a chunk; 9, 515: the last chunk overlaps the one before (515: across a sum block)
@pytest.mark.parametrize("C", [1, 2, 7, 9, 515, 1000, 50257])
@pytest.mark.parametrize("s_dtype,t_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float32), (torch.float32, torch.bfloat16)])
def test_cpp_forward_matches_float64_contract(C, s_dtype, t_dtype):
    _C = _cpp()
    N = 6 if C > 1000 else 16
    alpha, temperature = float(torch.empty(()).uniform_(0.05, 0.95)), float(torch.empty(()).uniform_(0.5, 20))
    s, t, y = _hostile_batch(N, C, s_dtype, t_dtype)
    w = torch.rand(N) + 0.5
    rows, grad, stats = _fwd(s, t, y, w, alpha, temperature)
    assert grad.dtype == s_dtype and grad.shape == (N, C) and grad.is_contiguous()
    assert rows.dtype == stats.dtype == torch.float32 and stats.shape == (6, N)
    check_outputs((rows, grad, stats), s, t, y, w, 0, alpha, temperature)
    ok = (y >= 0) & (y < C)  # in range and not ignored
    assert bool((grad[1] == 0).all()), "an ignored row must get a zero gradient"
    assert bool(grad[2:4].isnan().all()), "a row with a label outside [0, C) must be poisoned with NaN"
    if C == 1:  # softmax is 1 whatever the logits: nothing to learn, and no other logit to beat
        assert bool((grad[ok] == 0).all())
        assert bool((stats[5][ok] == float("inf")).all()) and bool((stats[4][ok] == 1).all())


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0, 4.0, 5.0, 8.0, 8.5, 9.0, 0.7, 2.5])
@pytest.mark.parametrize("C", [13, 100])
def test_cpp_forward_integer_and_fractional_temperatures(temperature, C):
    """An integer temperature up to 8 takes exp(s - m) as exp((s - m) / T)^T; any other computes it apart. Both
    against the float64 contract, with rows whose logits span the whole fp32 exponential range (gaps to the
    row maximum from 0 to 150, through the underflow near 87-104) on top of the hostile rows."""
    _cpp()
    s, t, y = _hostile_batch(16, C, torch.float32, torch.float32)
    s[5], t[5] = torch.linspace(0, -150, C), torch.linspace(-150, 0, C)
    s[6], t[6] = torch.linspace(-100, 0, C)[torch.randperm(C)], torch.linspace(-120, 0, C)[torch.randperm(C)]
    w = torch.rand(16) + 0.5
    check_outputs(_fwd(s, t, y, w, 0.6, temperature), s, t, y, w, 0, 0.6, temperature)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpp_gradient_rounds_to_low_precision_like_torch(dtype):
    """The kernel's own fp32 -> bf16/fp16 store rounds to nearest even exactly as torch does, overflow to inf
    and subnormals included: the same logits in fp32 then rounded by torch must give the same bits."""
    _C = _cpp()
    N, C = 12, 1000
    s, t, y = _hostile_batch(N, C, dtype, dtype)
    # fp16: large entries overflow to inf, small ones are subnormal; bf16: plain rounding, then subnormals
    # (the row weights scale the gradient)
    scales = (1e8, 3e-7) if dtype == torch.float16 else (1.0, 1e-38)
    for scale in scales:
        w = torch.full((N,), scale)
        _, grad, _ = _fwd(s, t, y, w, 0.5, 2.0, return_stats=False)
        _, grad32, _ = _fwd(s.float(), t.float(), y, w, 0.5, 2.0, return_stats=False)
        expected = grad32.to(dtype)
        same = (grad.view(torch.int16) == expected.view(torch.int16)) | (grad.isnan() & expected.isnan())
        assert bool(same.all()), f"{int((~same).sum())} entries rounded differently, e.g. got " \
                                 f"{grad[~same][:4].tolist()}, torch gives {expected[~same][:4].tolist()}"


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_cpp_forward_extreme_alpha_and_no_teacher(alpha):
    _C = _cpp()
    s, t, y = _hostile_batch(12, 300, torch.float32, torch.float32)
    teacher = None if alpha == 0 else t
    outputs = _fwd(s, teacher, y, None, alpha, 3.0)
    check_outputs(outputs, s, teacher, y, None, 0, alpha, 3.0)
    if teacher is None:
        ok = (y >= 0) & (y < 300)
        assert bool(outputs[2][1][ok].isnan().all()), "kl is NaN without a teacher"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_forward_in_place_into_a_strided_student(dtype):
    """Rows wider than C (row stride > C) for student, teacher and the gradient buffer; the gradient written
    over the student logits it is computed from."""
    _C = _cpp()
    N, C, pad = 9, 257, 11
    s, t, y = _hostile_batch(N, C, dtype, torch.float16)
    wide_t = torch.randn(N, C + pad).to(torch.float16)
    wide_t[:, :C] = t
    t = wide_t[:, :C]
    buf = torch.randn(N, C + pad).to(dtype)
    buf[:, :C] = s
    student = buf[:, :C]
    w = torch.rand(N)
    rows, grad, stats = _fwd(student, t, y, w, 0.4, 2.0, grad_out=student)
    assert grad.data_ptr() == student.data_ptr(), "the gradient must land in grad_out"
    check_outputs((rows, student, stats), s, t, y, w, 0, 0.4, 2.0)
    assert bool((student[1] == 0).all()) and bool(student[2:4].isnan().all())  # ignored and bad-label rows


def test_cpp_forward_leaves_row_padding_alone():
    _C = _cpp()
    N, C, pad = 5, 33, 7
    buf = torch.randn(N, C + pad)
    before = buf[:, C:].clone()
    y = torch.randint(0, C, (N,))
    y[0] = IGNORE
    _fwd(buf[:, :C], torch.randn(N, C), y, return_stats=False, grad_out=buf[:, :C])
    assert torch.equal(buf[:, C:], before)


def test_cpp_forward_optional_outputs_and_empty_batch():
    _C = _cpp()
    s, t, y = torch.randn(3, 7), torch.randn(3, 7), torch.tensor([1, 2, 3])
    rows, grad, stats = _fwd(s, t, y, need_grad=False, return_stats=False)
    rows_ref, _, _ = _contract(torch.float64, s, t, y, None, 0, 0.5, 4.0)
    assert_close("rows without grad or stats", rows, rows_ref, rtol=REL_FLOOR)
    assert grad is None and stats is None
    for reduction in (0, 1, 2):
        loss, grad, stats = _fwd(torch.randn(0, 7).half(), torch.randn(0, 7), torch.zeros(0, dtype=torch.int64),
                                 reduction=reduction)
        assert loss.shape == ((0,) if reduction == 0 else ()) and float(loss.sum()) == 0.0
        assert grad.shape == (0, 7) and grad.dtype == torch.float16 and stats.shape == (6, 0)


@pytest.mark.parametrize("reduction", [1, 2], ids=["sum", "mean"])
def test_cpp_forward_reduces_in_row_order_and_scales_the_gradient(reduction):
    """sum / mean inside the kernel: the loss is the float64 contract's, the gradient carries 1/n for the mean
    (n = rows not ignored), and the sum is the same bits whatever the thread count (row order)."""
    _C = _cpp()
    N, C = 64, 300
    s, t, y = torch.randn(N, C) * 3, torch.randn(N, C) * 3, torch.randint(0, C, (N,))
    y[::5] = IGNORE
    w = torch.rand(N) + 0.5
    outputs = _fwd(s, t, y, w, 0.3, 2.0, reduction=reduction)
    assert outputs[0].shape == ()
    check_outputs(outputs, s, t, y, w, reduction, 0.3, 2.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        again = _fwd(s, t, y, w, 0.3, 2.0, reduction=reduction)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(again[0], outputs[0]) and torch.equal(again[1], outputs[1])


def test_cpp_forward_validate_raises_before_writing_anything():
    _C = _cpp()
    s, t, y = torch.randn(5, 7), torch.randn(5, 7), torch.tensor([0, IGNORE, 7, 2, -1])
    before = s.clone()
    with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 7\) or ignore_index=-100; "
                                         r"row 2 has 7 \(2 bad rows in all\)"):
        _fwd(s, t, y, grad_out=s, validate=True)
    assert torch.equal(s, before), "a refused call must leave the in-place student alone"
    rows, _, _ = _fwd(s.clone(), t, y)  # without validate: NaN rows
    assert rows[[2, 4]].isnan().all() and rows[[0, 3]].isfinite().all() and rows[1] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["one", "scalar", "per_row"])
def test_cpp_backward_scales_the_gradient_in_place(dtype, kind):
    _C = _cpp()
    N, C = 7, 40
    buf = torch.randn(N, C + 3).to(dtype)
    grad = buf[:, :C]  # a strided gradient (the in-place mode writes into a strided student)
    before = grad.double().clone()
    g_out = {"one": torch.tensor(1.0), "scalar": torch.rand(()) * 3, "per_row": torch.randn(N)}[kind]
    _C.kd_loss_bwd(grad, g_out)
    expected = before * (g_out.double() if g_out.dim() == 0 else g_out.double()[:, None])
    assert_close("scaled grad", grad, expected, rtol=GRAD_RTOL[dtype])


def _bad_cpp_calls():
    s, t, y = torch.randn(4, 6), torch.randn(4, 6), torch.randint(0, 6, (4,))
    ok = dict(student=s, teacher=t, target=y, weight=None, reduction=0, grad_out=None)
    return [
        ("student", dict(ok, student=s.double()), "student must be float32, float16 or bfloat16"),
        ("student", dict(ok, student=torch.randn(6, 4).t()), "student must have unit class stride"),
        ("student", dict(ok, student=s[0]), r"student must have shape \(N, C\)"),
        ("teacher", dict(ok, teacher=torch.randn(4, 5)), r"teacher must have shape \(4, 6\)"),
        ("target", dict(ok, target=y.int()), "target must be a"),
        ("weight", dict(ok, weight=torch.rand(3)), "weight must be a"),
        ("reduction", dict(ok, reduction=3), r"reduction must be 0 \(none\), 1 \(sum\) or 2 \(mean\)"),
        ("grad_out", dict(ok, grad_out=torch.empty(4, 6, dtype=torch.float16)), "grad_out must have the student"),
    ]


@pytest.mark.parametrize("arg,kwargs,message", _bad_cpp_calls(), ids=[c[0] + str(i) for i, c in
                                                                      enumerate(_bad_cpp_calls())])
def test_cpp_forward_rejects_bad_arguments_naming_them(arg, kwargs, message):
    _C = _cpp()
    with pytest.raises(ValueError, match=message):
        _C.kd_loss_fwd(kwargs["student"], kwargs["teacher"], kwargs["target"], kwargs["weight"], 0.5, 4.0, IGNORE,
                       kwargs["reduction"], True, True, kwargs["grad_out"], False)
