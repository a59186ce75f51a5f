"""Unbiased self-distillation (Eq. 16) and the Eq. 14-15 report, against float64 references: exact expectations
over every mini-batch of a small problem (enumerated), explicit per-example autograd loops, and the values the
paper gives at the optimum."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from kdfast.distill.step import distill_step
from kdfast.errors import InvalidArgumentError
from kdfast.distill.setup import KDSetup
from kdfast.training.fit import TrainRecipe, fit
from kdfast.distill.variance_reduction import noise_terms, teacher_gradient, teacher_report

N, D, C = 8, 5, 3


def _problem(n=N, d=D, c=C, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=gen)
    return x, y


def _linear(seed, d=D, c=C):
    torch.manual_seed(seed)
    return nn.Linear(d, c).double()


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 7), nn.Tanh(), nn.Linear(7, C)).double()


def _flat_grad(model, x, y):
    """Float64 gradient of the mean cross-entropy by plain autograd (the independent reference)."""
    loss = nn.functional.cross_entropy(model(x), y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


def _expected_step_gradient(student, teacher, x, y, batch, *, alpha, temperature, correction):
    """Exact expectation over every batch of `batch` distinct examples of the gradient distill_step applies."""
    opt = torch.optim.SGD(student.parameters(), lr=0.0)  # lr 0: the step leaves the student where it is
    total, count = 0, 0
    for pick in itertools.combinations(range(x.shape[0]), batch):
        pick = list(pick)
        distill_step(student, x[pick], y[pick], opt, KDSetup(teacher=teacher, alpha=alpha, temperature=temperature,
                                                             correction=correction))
        total = total + torch.cat([p.grad.reshape(-1) for p in student.parameters()])
        count += 1
    return total / count


def test_corrected_step_is_unbiased_for_softmax_regression_at_temperature_one():
    x, y = _problem()
    student, teacher = _linear(1), _linear(2)
    alpha = 0.6
    full_student, full_teacher = _flat_grad(student, x, y), _flat_grad(teacher, x, y)
    correction = teacher_gradient(teacher, (x, y))
    corrected = _expected_step_gradient(student, teacher, x, y, 2, alpha=alpha, temperature=1.0,
                                        correction=correction)
    plain = _expected_step_gradient(student, teacher, x, y, 2, alpha=alpha, temperature=1.0, correction=None)
    assert torch.allclose(corrected, full_student, atol=1e-12, rtol=0), (corrected - full_student).abs().max()
    # the uncorrected step is biased, by exactly -alpha grad f(theta) (Prop. 1): a bias that the test can see
    assert (plain - full_student).norm() > 0.05 * full_student.norm()
    assert torch.allclose(plain, full_student - alpha * full_teacher, atol=1e-12, rtol=0)


def test_corrected_step_is_unbiased_at_the_teacher_for_any_model_and_temperature():
    x, y = _problem(seed=3)
    teacher = _mlp(4)
    student = copy.deepcopy(teacher)
    alpha, temperature = 0.7, 4.0
    full = _flat_grad(teacher, x, y)
    # batches of 4: kd_loss's 1/B is a float32 scalar, exact for powers of two
    corrected = _expected_step_gradient(student, teacher, x, y, 4, alpha=alpha, temperature=temperature,
                                        correction=teacher_gradient(teacher, (x, y)))
    plain = _expected_step_gradient(student, teacher, x, y, 4, alpha=alpha, temperature=temperature,
                                    correction=None)
    assert torch.allclose(corrected, full, atol=1e-12, rtol=0)
    assert torch.allclose(plain, (1 - alpha) * full, atol=1e-12, rtol=0)


def test_teacher_gradient_matches_autograd_on_a_dataset_and_a_subset():
    x, y = _problem(n=11)
    teacher = _mlp(5)
    dataset = torch.utils.data.TensorDataset(x, y)
    keep = torch.tensor([0, 3, 4, 9])
    got = teacher_gradient(teacher, dataset, indices=keep, batch_size=3)
    flat = torch.cat([g.reshape(-1) for g in got.grads])
    assert torch.allclose(flat, _flat_grad(teacher, x[keep], y[keep]), atol=1e-13, rtol=0)
    assert got.num_examples == 4 and got.loss == pytest.approx(
        float(nn.functional.cross_entropy(teacher(x[keep]), y[keep]).detach()))


def test_correction_refuses_another_parameter_space():
    x, y = _problem()
    student, other = _linear(1), _mlp(2)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(InvalidArgumentError, match="parameter space"):
        distill_step(student, x, y, opt, KDSetup(teacher=other, alpha=0.5, correction=teacher_gradient(other, (x, y))))
    with pytest.raises(InvalidArgumentError, match="TeacherGradient"):
        distill_step(student, x, y, opt, KDSetup(teacher=other, alpha=0.5, correction="unbiased"))
    data = torch.utils.data.TensorDataset(x.float(), y)
    with pytest.raises(InvalidArgumentError, match="parameter space"):
        fit(_linear(1).float(), data, TrainRecipe(epochs=1),
            KDSetup(teacher=_mlp(2).float(), alpha=0.5, correction="unbiased"), progress=False)
    with pytest.raises(InvalidArgumentError, match="needs the teacher module"):
        KDSetup(teacher=None, alpha=0.0, correction="unbiased")
    with pytest.raises(InvalidArgumentError, match="correction must be"):
        KDSetup(teacher=_linear(2).float(), alpha=0.5, correction="svrg")


@pytest.mark.parametrize("given", ["unbiased", "TeacherGradient"])
def test_fit_with_correction_follows_the_corrected_steps(given):
    # fit(correction=...) = a hand loop of distill_step with the teacher's full gradient (full batches, so the
    # loader's order does not matter)
    x, y = _problem(n=16)
    data = torch.utils.data.TensorDataset(x, y)
    teacher = _linear(7)
    student, manual = _linear(8), _linear(8)
    fit(student, data, TrainRecipe(epochs=3, batch_size=16, lr=0.3, momentum=0.0, weight_decay=0.0, schedule="constant"),
        KDSetup(teacher=teacher, alpha=0.8, temperature=1.0,
                correction=given if given == "unbiased" else teacher_gradient(teacher, data)), progress=False)
    kd = KDSetup(teacher=teacher, alpha=0.8, temperature=1.0, correction=teacher_gradient(teacher, (x, y)))
    opt = torch.optim.SGD(manual.parameters(), lr=0.3)
    for _ in range(3):
        distill_step(manual, x, y, opt, kd)
    moved = False
    for a, b, c in zip(student.parameters(), manual.parameters(), _linear(8).parameters()):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
        moved |= not torch.allclose(a, c)
    assert moved


def test_resume_checks_the_correction(tmp_path):
    # the correction is part of fit's run record: a checkpoint of a corrected run is not resumed without it, nor
    # with another teacher gradient
    from kdfast.io import JobMismatchError
    x, y = _problem(n=16)
    data = torch.utils.data.TensorDataset(x, y)
    teacher, ckpt = _linear(7), str(tmp_path / "ckpt.pt")
    recipe = TrainRecipe(epochs=2, batch_size=16, lr=0.3, schedule="constant")

    def run(correction, **kw):
        kd = KDSetup(teacher=teacher, alpha=0.8, temperature=1.0, correction=correction)
        return fit(_linear(8), data, recipe, kd, progress=False, **{"checkpoint_path": ckpt, **kw})

    run("unbiased")
    assert run("unbiased", resume=True)[-1]["epoch"] == 2
    with pytest.raises(JobMismatchError, match="correction: 'unbiased' then, None now"):
        run(None, resume=True)
    ckpt2 = str(tmp_path / "ckpt2.pt")
    run(teacher_gradient(teacher, data), checkpoint_path=ckpt2)
    run(teacher_gradient(teacher, data), checkpoint_path=ckpt2, resume=True)
    with pytest.raises(JobMismatchError, match="correction: "):
        run(teacher_gradient(_linear(9), data), checkpoint_path=ckpt2, resume=True)


# ------------------------------------------------------------------------------------------- the report
def _enumerated_moments(student, teacher, x, y, batch):
    """E over every batch of `batch` distinct examples of ||a||², ||b||², <a, b> (a, b: batch gradients)."""
    rows = []
    for pick in itertools.combinations(range(x.shape[0]), batch):
        pick = list(pick)
        a, b = _flat_grad(student, x[pick], y[pick]), _flat_grad(teacher, x[pick], y[pick])
        rows.append(torch.stack([a @ a, b @ b, a @ b]))
    return torch.stack(rows)


@pytest.mark.parametrize("make", [_linear, _mlp], ids=["linear", "mlp"])
def test_exact_report_matches_enumeration_over_all_batches(make):
    x, y = _problem(n=9, seed=11)
    student, teacher = make(1), make(2)
    batch, lr = 3, 0.05
    rows = _enumerated_moments(student, teacher, x, y, batch)
    ss, tt, st = rows.mean(0).tolist()
    g = _flat_grad(teacher, x, y)
    rep = teacher_report(student, teacher, (x, y), lr=lr, batch_size=batch, method="exact")
    for key, value in (("student_sq", ss), ("teacher_sq", tt), ("cross", st), ("teacher_full_sq", float(g @ g))):
        assert rep[key] == pytest.approx(value, rel=1e-10, abs=1e-14), key
    # Eq. 14 against a direct minimisation of N(λ) = λ²||g||² + γ E||a - λ b||² over the enumerated batches
    lams = torch.linspace(-2, 2, 40001, dtype=torch.float64)
    n_of = lams ** 2 * float(g @ g) + lr * (ss - 2 * lams * st + lams ** 2 * tt)
    assert rep["lambda_star"] == pytest.approx(float(lams[n_of.argmin()]), abs=2e-4)
    assert rep["noise_ratio"] == pytest.approx(float(n_of.min()) / (lr * ss), rel=1e-6)
    # Eq. 15's identity with App. C's beta and rho
    eq15 = 1 - rep["rho"] ** 2 * (1 - rep["beta"]) / (1 + rep["beta"] / lr)
    assert rep["noise_ratio"] == pytest.approx(eq15, rel=1e-10)
    assert 0 <= rep["beta"] <= 1


def test_minibatch_report_is_within_its_monte_carlo_error():
    # squared-norm moments exact (per-example norms), the cross moment Monte Carlo with a 5-standard-error band
    x, y = _problem(n=10, seed=12)
    student, teacher = _mlp(3), _mlp(4)
    batch, k = 3, 400
    rows = _enumerated_moments(student, teacher, x, y, batch)
    mean, sd = rows.mean(0), rows.std(0, unbiased=False)
    rep = teacher_report(student, teacher, (x, y), lr=0.1, batch_size=batch, num_batches=k, seed=1)
    assert rep["student_sq"] == pytest.approx(float(mean[0]), rel=1e-10)
    assert rep["teacher_sq"] == pytest.approx(float(mean[1]), rel=1e-10)
    assert abs(rep["cross"] - float(mean[2])) <= 5 * float(sd[2]) / math.sqrt(k)
    assert rep["stderr"]["cross"] == pytest.approx(float(sd[2]) / math.sqrt(k), rel=0.25)
    assert rep["cross"] != pytest.approx(float(mean[2]), rel=1e-8)  # it is an estimate


def test_report_at_the_optimum_gives_the_papers_limits():
    # θ = x* (a converged float64 solve): ρ = 1, β = 0, λ* = 1, N(λ*) = 0 (Sec. 4.2)
    x, y = _problem(n=40, d=4, c=3, seed=2)
    model = _linear(0, d=4)
    params = list(model.parameters())  # random labels: not separable, so the CE has a finite minimiser
    for _ in range(5):
        opt = torch.optim.LBFGS(params, lr=1, max_iter=500, tolerance_grad=1e-15, tolerance_change=0,
                                history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    g = _flat_grad(model, x, y)
    assert g.norm() < 1e-8, f"the solve did not converge: ||grad|| = {g.norm():.3g}"
    rep = teacher_report(model, copy.deepcopy(model), (x, y), lr=0.1, batch_size=5, method="exact")
    assert rep["beta"] == pytest.approx(0, abs=1e-12)
    assert rep["rho"] == pytest.approx(1, abs=1e-9)
    assert rep["lambda_star"] == pytest.approx(1, abs=1e-9)
    assert rep["noise_ratio"] == pytest.approx(0, abs=1e-9)


def test_noise_terms_of_a_useless_teacher():
    # uncorrelated gradients: λ* = 0 and no reduction
    out = noise_terms(2.0, 3.0, 0.0, 1.0, 0.1)
    assert out["lambda_star"] == 0 and out["noise_ratio"] == 1 and out["rho"] == 0
    assert out["beta"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(lr=0), "lr"), (dict(lr=0.1, batch_size=0), "batch_size"), (dict(lr=0.1, method="bootstrap"), "method"),
    (dict(lr=0.1, num_batches=1), "num_batches"), (dict(lr=0.1, batch_size=99), "exceeds"),
])
def test_report_rejects_bad_arguments(kwargs, needle):
    x, y = _problem()
    with pytest.raises(InvalidArgumentError, match=needle):
        teacher_report(_linear(1), _linear(2), (x, y), **kwargs)


def test_report_refuses_another_parameter_space():
    x, y = _problem()
    with pytest.raises(InvalidArgumentError, match="parameter space"):
        teacher_report(_linear(1), _mlp(2), (x, y), lr=0.1)
