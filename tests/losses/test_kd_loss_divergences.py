"""kd_loss's divergence family (kl, reverse_kl, jsd), the mean's normalizer and the sparse TopKTeacher on every
backend that computes them, against the float64 oracle (kd_loss_ref / kd_stats_ref, built from the
definitions and dense logits: a renormalised top-k teacher as its dense logits, a tail one as k + 1 buckets).

Tolerances as in test_kd_loss.py: float32 results may differ from the float64 oracle by atol (relative to the
largest reference value) + rtol + k x the error of the same oracle run in float32 on the same inputs.
"""
from __future__ import annotations


import pytest
import torch

import kdfast
from kdfast import KDLoss, TopKTeacher, kd_loss
from kdfast.runtime.dispatch import triton_interpret
from kdfast.errors import InvalidArgumentError
from kdfast.losses.reference import DIVERGENCES, KD_STAT_NAMES, kd_loss_ref, kd_stats_ref

from _assertions import assert_close, max_abs_err
from _backends import require_backend as _require

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

EAGER_ERROR_FACTOR = 8
TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-6, 2 * 2.0 ** -8)}



@pytest.fixture(params=["tiled", "split"])
def triton_tiled(request, monkeypatch):
    """The Triton forward's tiled path on small C (16-wide tiles), and its row split over 4 programs."""
    _require("triton")
    from kdfast.losses import triton as kernels
    monkeypatch.setattr(kernels, "MAX_SINGLE_TILE", 16)
    monkeypatch.setattr(kernels, "TILE", 16)
    if request.param == "split":
        monkeypatch.setattr(kernels, "SPLIT", 4)
    return "triton"


def _inputs(N, C, dtype=torch.float32, scale=3.0, ignore_frac=0.25):
    s = (torch.randn(N, C) * scale).to(dtype)
    t = torch.randn(N, C) * scale
    y = torch.randint(0, C, (N,))
    y[torch.rand(N) < ignore_frac] = -100
    y[0] = int(torch.randint(0, C, ()))  # at least one row counts
    return s, t, y


def _topk(t, k, *, capture_T, missing):
    """The top k of the teacher logits t as a TopKTeacher captured at capture_T (random order within the k)."""
    logprobs, ids = torch.log_softmax(t.double() / capture_T, -1).topk(k, -1)
    perm = torch.argsort(torch.rand(ids.shape), -1)
    return TopKTeacher(ids.gather(-1, perm), logprobs.gather(-1, perm).float(), temperature=capture_T,
                       missing=missing)


def _magnitude(ref) -> float:
    finite = ref.detach().abs()[torch.isfinite(ref.detach())]
    return max(1.0, float(finite.max())) if finite.numel() else 1.0


def _oracle(s, t, y, go, dtype, **kw):
    leaf = s.detach().to(dtype).requires_grad_(True)
    t_d = t.to(dtype) if isinstance(t, torch.Tensor) else t
    loss = kd_loss_ref(leaf, t_d, y, dtype=dtype, **kw)
    (grad,) = torch.autograd.grad((loss * go.to(dtype)).sum(), leaf)
    stats = kd_stats_ref(leaf.detach(), t_d, y, alpha=kw["alpha"], temperature=kw["temperature"],
                         weight=kw.get("weight"), dtype=dtype, divergence=kw["divergence"], beta=kw["beta"])
    return loss.detach(), grad, stats


def check(s, t, y, *, backend, alpha=0.4, temperature=2.0, reduction="mean", divergence="kl", beta=0.5,
          normalizer=None, weight=None, go=None):
    """kd_loss (loss, stats, backward with upstream go) against the float64 oracle; returns (loss, grad)."""
    kw = dict(alpha=alpha, temperature=temperature, reduction=reduction, divergence=divergence, beta=beta,
              weight=weight, normalizer=normalizer)
    if go is None:
        go = torch.rand(y.shape) + 0.5 if reduction == "none" else torch.rand(()) + 0.5
    ref_loss, ref_grad, ref_stats = _oracle(s, t, y, go, torch.float64, **kw)
    e_loss, e_grad, e_stats = _oracle(s, t, y, go, torch.float32, **kw)
    leaf = s.detach().clone().requires_grad_(True)
    loss, stats = kd_loss(leaf, t, y, backend=backend, return_stats=True, **kw)
    loss.backward(go)
    atol, rtol = TOL[s.dtype]
    if backend == "triton" and triton_interpret() and s.dtype == torch.bfloat16:
        rtol = 2 * 2.0 ** -7  # the interpreter truncates fp32 -> bf16
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert_close("loss", loss, ref_loss, atol=1e-6 * _magnitude(ref_loss), rtol=1e-5,
                 budget=EAGER_ERROR_FACTOR * max_abs_err(e_loss, ref_loss))
    assert leaf.grad.dtype == s.dtype
    assert_close("grad", leaf.grad, ref_grad, atol=atol * _magnitude(ref_grad), rtol=rtol,
                 budget=EAGER_ERROR_FACTOR * max_abs_err(e_grad, ref_grad))
    assert set(stats) == set(KD_STAT_NAMES)
    for name in KD_STAT_NAMES:
        assert_close(f"stats[{name}]", stats[name], ref_stats[name], atol=1e-6 * _magnitude(ref_stats[name]),
                     rtol=1e-5, budget=EAGER_ERROR_FACTOR * max_abs_err(e_stats[name], ref_stats[name]))
    return loss, leaf.grad


# ------------------------------------------------------------------------------------- dense teachers
# (id, N, C, alpha, temperature, weighted)
CASES = [
    ("typical", 16, 100, 0.4, 4.0, False),
    ("odd_C_weighted", 7, 37, 0.3, 1.0, True),
    ("C1", 5, 1, 0.5, 4.0, False),
    ("pure_kd_hot", 6, 20, 1.0, 0.5, False),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_divergence_matches_float64_reference(backend, case, divergence, reduction):
    _, N, C, alpha, temperature, weighted = case
    s, t, y = _inputs(N, C)
    weight = torch.rand(N) + 0.5 if weighted else None
    check(s, t, y, backend=backend, alpha=alpha, temperature=temperature, reduction=reduction,
          divergence=divergence, beta=0.3, weight=weight)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_triton_tiled_path(triton_tiled, divergence):
    """Pass 1b (the divergence's extra read of the row) and the sparse teacher's fix-up on the tiled path."""
    s, t, y = _inputs(6, 37)
    t[1, 20:] = float("-inf") if divergence != "reverse_kl" else 0.0
    check(s, t, y, backend=triton_tiled, divergence=divergence, beta=0.7, reduction="none")
    for missing, k in (("renorm", 4), ("tail", 7), ("renorm", 37)):
        if divergence == "reverse_kl" and missing == "renorm" and k < 37:
            continue  # refused (test_topk_teacher_matches_float64_reference)
        check(s, _topk(t, k, capture_T=2.0, missing=missing), y, backend=triton_tiled, divergence=divergence,
              reduction="mean", normalizer=3.0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergence_bf16_student(backend, divergence):
    s, t, y = _inputs(6, 50, dtype=torch.bfloat16)
    check(s, t.bfloat16(), y, backend=backend, divergence=divergence, reduction="sum")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergence_hostile_logits(backend, divergence):
    """+-1e4 logits, -inf teacher entries (kl and jsd: finite; jsd with a class 0 for both), a -inf student
    entry under a teacher that has mass there (kl: infinite row with a finite gradient)."""
    s, t, y = _inputs(8, 40, ignore_frac=0.0)
    s[0], t[0] = s[0].sign() * 1e4, -t[0].sign() * 1e4
    s[1, :20] = 1e4
    s[2] = -1e4
    if divergence != "reverse_kl":  # reverse_kl's -inf teacher entries: test_reverse_kl_infinite_rows
        t[3, ::3] = float("-inf")
        t[4, :39] = float("-inf")
        s[5, 7], t[5, 7] = float("-inf"), float("-inf")  # p = q = 0: m = 0 must add 0 to the jsd, not NaN
        s[6, 9] = float("-inf")
    y[6] = 3
    loss, grad = check(s, t, y, backend=backend, temperature=1.0, reduction="none", divergence=divergence)
    if divergence == "jsd":
        assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad).all())


def test_reverse_kl_infinite_rows(backend):
    """reverse_kl where the teacher has probability 0 and the student not: that row's loss is +inf and its
    gradient NaN (defined, not refused: the check would need the teacher's values); other rows are exact."""
    s, t, y = _inputs(5, 12, ignore_frac=0.0)
    t[2, 4] = float("-inf")
    leaf = s.clone().requires_grad_(True)
    loss = kd_loss(leaf, t, y, backend=backend, reduction="none", divergence="reverse_kl")
    loss.sum().backward()
    assert loss[2].item() == float("inf") and bool(leaf.grad[2].isnan().all())
    keep = torch.tensor([0, 1, 3, 4])
    check(s[keep], t[keep], y[keep], backend=backend, reduction="none", divergence="reverse_kl")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergence_all_rows_ignored_give_zero_never_nan(backend, divergence):
    s, t, y = _inputs(4, 9)
    y[:] = -100
    for reduction, normalizer in (("mean", None), ("mean", 7.0), ("sum", None), ("none", None)):
        leaf = s.clone().requires_grad_(True)
        loss, stats = kd_loss(leaf, t, y, backend=backend, reduction=reduction, return_stats=True,
                              divergence=divergence, normalizer=normalizer)
        loss.sum().backward()
        assert bool((loss == 0).all()) and bool((leaf.grad == 0).all())
        assert all(bool((v == 0).all()) for v in stats.values())


# ----------------------------------------------------------------------------------------- normalizer
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_normalizer_divides_the_sum(backend, divergence):
    """normalizer replaces the mean's count: the oracle's sum / normalizer, value and gradient; upstream
    gradient random and exactly 1."""
    s, t, y = _inputs(12, 30)
    for go in (torch.rand(()) + 0.5, torch.tensor(1.0)):
        loss, grad = check(s, t, y, backend=backend, divergence=divergence, normalizer=37.0, go=go)
        total = kd_loss(s, t, y, backend=backend, alpha=0.4, temperature=2.0, divergence=divergence,
                        reduction="sum")
        assert_close("loss", loss, total / 37.0, atol=1e-6, rtol=1e-6)


def test_normalizer_module_per_call(backend):
    s, t, y = _inputs(6, 10)
    module = KDLoss(alpha=0.3, divergence="jsd", beta=0.7, backend=backend)
    ref = kd_loss_ref(s, t, y, alpha=0.3, divergence="jsd", beta=0.7, normalizer=4)
    assert_close("module loss", module(s, t, y, normalizer=4), ref, atol=1e-6, rtol=1e-5)
    assert "divergence='jsd'" in repr(module) and "beta=0.7" in repr(module)


# -------------------------------------------------------------------------------------- top-k teachers
@pytest.mark.parametrize("k", [1, 5, 23], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("missing", ["renorm", "tail"])
def test_topk_teacher_matches_float64_reference(backend, missing, divergence, k):
    """C = 23: k = 1, a middle k and k = C; renorm captured at another temperature than the loss's."""
    s, t, y = _inputs(9, 23)
    teacher = _topk(t, k, capture_T=2.0 if missing == "tail" else 1.5, missing=missing)
    if divergence == "reverse_kl" and missing == "renorm" and k < 23:
        with pytest.raises(InvalidArgumentError, match="reverse_kl"):
            kd_loss(s, teacher, y, backend=backend, divergence=divergence, temperature=2.0)
        return
    for reduction in ("mean", "none"):
        check(s, teacher, y, backend=backend, divergence=divergence, temperature=2.0, reduction=reduction,
              beta=0.4, weight=torch.rand(9) + 0.5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_all_classes_renormalised_is_the_dense_teacher(backend, divergence):
    """k = C, renorm: the same loss, gradient and stats as the dense teacher whose logits are tau * logprobs."""
    s, t, y = _inputs(7, 16)
    teacher = _topk(t, 16, capture_T=3.0, missing="renorm")
    dense = torch.full_like(t, float("-inf")).scatter(1, teacher.indices, 3.0 * teacher.logprobs)
    out = []
    for tt in (teacher, dense):
        leaf = s.clone().requires_grad_(True)
        loss, stats = kd_loss(leaf, tt, y, backend=backend, divergence=divergence, return_stats=True)
        loss.backward()
        out.append((loss, leaf.grad, stats))
    assert_close("loss", out[0][0], out[1][0], atol=1e-6, rtol=1e-5)
    assert_close("grad", out[0][1], out[1][1], atol=1e-7, rtol=1e-5)
    for name in KD_STAT_NAMES:
        assert_close(f"stats[{name}]", out[0][2][name], out[1][2][name], atol=1e-6, rtol=1e-5)


def test_topk_teacher_bf16_and_3d(backend):
    s, t, y = _inputs(8, 30, dtype=torch.bfloat16)
    teacher = _topk(t.reshape(2, 4, 30), 6, capture_T=1.0, missing="tail")
    check(s.reshape(2, 4, 30), teacher, y.reshape(2, 4), backend=backend, temperature=1.0, divergence="jsd",
          reduction="none")


def test_topk_teacher_minus_inf_logprobs(backend):
    """-inf log-probabilities (classes of probability 0 inside the k) add 0; a tail teacher whose k classes
    hold all its mass has an empty tail bucket."""
    s, t, y = _inputs(6, 20)
    for missing in ("renorm", "tail"):
        teacher = _topk(t, 5, capture_T=1.0, missing=missing)
        teacher.logprobs[1, 2:] = float("-inf")
        teacher.logprobs[1, :2] = torch.log_softmax(teacher.logprobs[1, :2].double() * 0, -1).float()
        for divergence in ("kl", "jsd"):
            check(s, teacher, y, backend=backend, temperature=1.0, divergence=divergence, reduction="none")


def test_topk_teacher_gets_no_gradient_and_is_not_expanded(backend):
    """logprobs that require grad are read detached; the teacher's memory stays O(N k)."""
    s, t, y = _inputs(5, 40)
    teacher = _topk(t, 3, capture_T=1.0, missing="tail")
    teacher.logprobs.requires_grad_(True)
    leaf = s.clone().requires_grad_(True)
    kd_loss(leaf, teacher, y, backend=backend, temperature=1.0).backward()
    assert teacher.logprobs.grad is None and leaf.grad is not None
    assert repr(teacher) == "TopKTeacher(k=3, rows=(5,), temperature=1.0, missing='tail')"


# -------------------------------------------------------------------------------------------- bad input
def _bad_calls():
    s, t, y = torch.randn(4, 6), torch.randn(4, 6), torch.randint(0, 6, (4,))
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 0]])
    lp = torch.log(torch.full((4, 2), 0.3))
    tk = TopKTeacher(ids, lp)
    return [
        ("divergence", dict(divergence="kld")),
        ("beta", dict(divergence="jsd", beta=0.0)),
        ("beta", dict(beta=1.0)),
        ("beta", dict(beta="0.5")),
        ("normalizer", dict(normalizer=0)),
        ("normalizer", dict(normalizer=-3.0)),
        ("normalizer", dict(normalizer=float("nan"))),
        ("normalizer", dict(normalizer=5, reduction="sum")),
        ("normalizer", dict(normalizer=5, reduction="none")),
        ("TopKTeacher", dict(teacher_logits=TopKTeacher(ids[:3], lp[:3]))),
        ("k must be at most", dict(teacher_logits=TopKTeacher(torch.arange(7).repeat(4, 1), torch.full((4, 7),
                                                                                                      -2.0)))),
        ("below the number of classes 6", dict(teacher_logits=TopKTeacher(ids.clamp(max=3) + ids % 2 * 3, lp))),
        ("capture temperature", dict(teacher_logits=TopKTeacher(ids, lp, missing="tail"), temperature=2.0)),
        ("reverse_kl", dict(teacher_logits=tk, divergence="reverse_kl")),
    ], (s, t, y)


@pytest.mark.parametrize("index", range(len(_bad_calls()[0])), ids=[f"{a}-{i}" for i, (a, _) in
                                                                     enumerate(_bad_calls()[0])])
@pytest.mark.parametrize("backend_arg", ["torch", None], ids=["torch", "default"])
def test_bad_input_raises_one_line_naming_the_argument(index, backend_arg):
    calls, (s, t, y) = _bad_calls()
    argument, override = calls[index]
    kwargs = dict(student_logits=s, teacher_logits=t, target=y, temperature=1.0, backend=backend_arg)
    kwargs.update(override)
    with pytest.raises(InvalidArgumentError, match=argument) as info:
        kd_loss(kwargs.pop("student_logits"), kwargs.pop("teacher_logits"), kwargs.pop("target"), **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("argument,args,kwargs", [
    ("indices", (torch.ones(3, 2), torch.zeros(3, 2)), {}),
    ("indices", (torch.tensor(1), torch.tensor(0.0)), {}),
    ("indices", (torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 0)), {}),
    ("logprobs", (torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long)), {}),
    ("logprobs", (torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 3)), {}),
    ("logprobs", (torch.tensor([[0, 1]]), torch.tensor([[-0.1, 0.2]])), {}),
    ("logprobs", (torch.tensor([[0, 1]]), torch.tensor([[-0.1, float("nan")]])), {}),
    ("indices must be class ids >= 0", (torch.tensor([[0, -1]]), torch.tensor([[-0.1, -2.0]])), {}),
    ("distinct", (torch.tensor([[0, 1], [2, 2]]), torch.full((2, 2), -1.0)), {}),
    ("temperature", (torch.tensor([[0, 1]]), torch.full((1, 2), -1.0)), dict(temperature=0)),
    ("missing", (torch.tensor([[0, 1]]), torch.full((1, 2), -1.0)), dict(missing="drop")),
    ("validate", (torch.tensor([[0, 1]]), torch.full((1, 2), -1.0)), dict(validate="yes")),
])
def test_bad_topk_teacher_raises_one_line(argument, args, kwargs):
    with pytest.raises(InvalidArgumentError, match=argument) as info:
        TopKTeacher(*args, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("argument,kwargs", [
    ("divergence", dict(divergence="js")), ("beta", dict(divergence="jsd", beta=1.5)),
])
def test_bad_module_configuration_raises_at_construction(argument, kwargs):
    with pytest.raises(InvalidArgumentError, match=argument):
        KDLoss(**kwargs)


def test_public_api_exposes_the_topk_teacher():
    assert kdfast.TopKTeacher is TopKTeacher and "TopKTeacher" in kdfast.__all__


def test_torch_compile_fullgraph_with_topk_teacher_jsd_and_normalizer():
    """The traceable path: a TopKTeacher made inside the compiled function, jsd, a normalizer; value and
    gradient against the float64 oracle."""
    _require("cpp")
    s, t, y = _inputs(8, 20)
    teacher = _topk(t, 5, capture_T=2.0, missing="tail")

    def step(x, ids, logprobs, target):
        return kd_loss(x, TopKTeacher(ids, logprobs, temperature=2.0, missing="tail", validate=False), target,
                       temperature=2.0, divergence="jsd", normalizer=5.0, backend="cpp")

    leaf = s.clone().requires_grad_(True)
    loss = torch.compile(step, fullgraph=True)(leaf, teacher.indices, teacher.logprobs, y)
    loss.backward()
    ref_leaf = s.double().requires_grad_(True)
    ref = kd_loss_ref(ref_leaf, teacher, y, temperature=2.0, divergence="jsd", normalizer=5.0)
    ref.backward()
    assert_close("loss", loss, ref, atol=1e-6, rtol=1e-5)
    assert_close("grad", leaf.grad, ref_leaf.grad, atol=1e-7, rtol=1e-5)
