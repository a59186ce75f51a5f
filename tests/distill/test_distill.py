"""distill_step against a hand-written step with the reference loss; the KD-weight schedule; optimal_alpha
on the self-distillation paper's kernel-ridge example against a dense grid search."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import kdfast
from kdfast.distill.setup import KDSetup
from kdfast.training.recipe import TrainRecipe
from kdfast.distill.step import DEFAULT_ALPHA_SCHEDULE, alpha_for_fraction, distill_step, optimal_alpha
from kdfast.errors import InvalidArgumentError
from kdfast.losses.reference import kd_loss_ref


def _net(d_in=7, width=16, classes=5):
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, classes))


def _reference_step(student, teacher_logits, x, y, alpha, temperature, weight, lr):
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    loss = kd_loss_ref(student(x), teacher_logits, y, alpha=alpha, temperature=temperature, weight=weight,
                       dtype=torch.float64)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def _max_rel_err(a: nn.Module, b: nn.Module, before: nn.Module) -> float:
    """Largest relative error of the parameter UPDATES (the parameters themselves would hide errors)."""
    worst = 0.0
    for pa, pb, p0 in zip(a.parameters(), b.parameters(), before.parameters()):
        da, db = (pa - p0).double(), (pb - p0).double()
        worst = max(worst, float((da - db).abs().max() / db.abs().max().clamp(min=1e-30)))
    return worst


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("source", ["module", "logits", "topk_logits"])
@pytest.mark.parametrize("weighted", [False, True])
def test_distill_step_matches_hand_written_step_with_reference_loss(alpha, source, weighted):
    B, C = 12, 5
    student = _net(classes=C)
    teacher = _net(classes=C)
    x = torch.randn(B, 7)
    y = torch.randint(0, C, (B,))
    weight = torch.rand(B) + 0.5 if weighted else None
    with torch.no_grad():  # confident teacher, so the soft targets are far from uniform
        teacher[2].weight.mul_(3)
        teacher[2].bias.mul_(3)
        t_logits = teacher(x)
    if source == "topk_logits":  # a top-k cache row: -inf outside the kept classes
        keep = t_logits.topk(2, dim=-1).indices
        t_logits = torch.full_like(t_logits, float("-inf")).scatter(1, keep, t_logits.gather(1, keep))
    ref = copy.deepcopy(student)
    before = copy.deepcopy(student)
    ref_loss = _reference_step(ref, t_logits, x, y, alpha, 3.0, weight, lr=0.3)

    opt = torch.optim.SGD(student.parameters(), lr=0.3, momentum=0.9, weight_decay=5e-4)
    kd = KDSetup(teacher=teacher if source == "module" else None, alpha=alpha, temperature=3.0)
    out = distill_step(student, x, y, opt, kd, teacher_logits=None if source == "module" else t_logits, weight=weight)
    assert math.isclose(float(out["loss"]), ref_loss, rel_tol=1e-5)
    err = _max_rel_err(student, ref, before)
    assert err < 1e-4, f"parameter updates differ: max rel err {err:.2e}"
    assert set(out) == {"loss", "ce", "kl", "el2n", "grad_norm", "correct", "margin"}
    assert out["correct"].shape == (B,)


def test_distill_step_puts_teacher_in_eval_mode_without_autograd():
    teacher = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    teacher.train()
    student = _net(d_in=4, classes=3)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    distill_step(student, torch.randn(6, 4), torch.randint(0, 3, (6,)), opt, KDSetup(teacher=teacher, alpha=0.7))
    assert not teacher.training
    assert all(p.grad is None for p in teacher.parameters())


class _Recorder:
    def __init__(self):
        self.calls = []

    def update(self, indices, correct):
        self.calls.append((indices.clone(), correct.clone()))


def test_distill_step_feeds_forgetting_tracker_with_indices_and_correct():
    student = _net(classes=4)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    x, y = torch.randn(9, 7), torch.randint(0, 4, (9,))
    idx = torch.randperm(100)[:9]
    rec = _Recorder()
    with torch.no_grad():
        expected = (student(x).argmax(-1) == y).float()
    distill_step(student, x, y, opt, indices=idx, forgetting=rec)
    assert len(rec.calls) == 1
    assert torch.equal(rec.calls[0][0], idx)
    assert torch.equal(rec.calls[0][1], expected)


def test_distill_step_bf16_autocast_runs_and_stays_close():
    student = _net(classes=5)
    ref = copy.deepcopy(student)
    x, y = torch.randn(16, 7), torch.randint(0, 5, (16,))
    t = torch.randn(16, 5)
    out = distill_step(student, x, y, torch.optim.SGD(student.parameters(), lr=0.1), KDSetup(), teacher_logits=t,
                       amp="bf16")
    out32 = distill_step(ref, x, y, torch.optim.SGD(ref.parameters(), lr=0.1), KDSetup(), teacher_logits=t)
    assert abs(float(out["loss"]) - float(out32["loss"])) < 0.05 * float(out32["loss"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(kd=KDSetup(alpha=0.5)), "needs a teacher"),
    (dict(amp="fp16"), "amp must be"),
    (dict(forgetting=_Recorder()), "forgetting needs indices"),
    (dict(forgetting=object(), indices=torch.arange(4)), "update"),
    (dict(indices=torch.arange(3)), "indices must be a tensor of shape"),
    (dict(kd=dict(teacher=None, alpha=0.5)), "kd must be a kdfast.KDSetup or None, got dict"),
])
def test_distill_step_errors_name_the_argument(kwargs, match):
    student = _net(d_in=2, classes=3)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(InvalidArgumentError, match=match):
        distill_step(student, torch.randn(4, 2), torch.randint(0, 3, (4,)), opt, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=1.5), r"alpha must be a number in \[0, 1\].*got 1.5"),
    (dict(alpha=True), "alpha must be a number in .*got True"),
    (dict(alpha=float("nan"), extrapolate=True), "alpha must be a finite number with extrapolate=True, got nan"),
    (dict(temperature=0.0), "temperature must be a finite number > 0, got 0.0"),
    (dict(temperature=float("inf")), "temperature must be a finite number > 0, got inf"),
    (dict(extrapolate=1), "extrapolate must be True or False, got 1"),
    (dict(teacher=lambda x: x), "teacher must be an nn.Module or None, got 'function'"),
    (dict(teacher=nn.Linear(2, 3), teacher_cache=object()), "not both"),
    (dict(kd_term=object(), teacher=nn.Linear(2, 3)), "kd_term must be a kdfast.distill.terms term"),
    (dict(correction="svrg"), "correction must be None, one of"),
    (dict(correction="unbiased"), "needs the teacher module"),
])
def test_kd_setup_checks_every_field_when_made(kwargs, match):
    with pytest.raises(InvalidArgumentError, match="KDSetup: .*" + match):
        KDSetup(**kwargs)


def test_kd_setup_reports_every_problem_and_its_identity_names_each_field():
    with pytest.raises(InvalidArgumentError, match="alpha must.*temperature must") as info:
        KDSetup(alpha=-1.0, temperature=-1.0)
    assert [p.name for p in info.value.problems] == ["alpha", "temperature"]
    teacher = nn.Linear(2, 3)
    identity = KDSetup(teacher=teacher, alpha=0.25, temperature=2.0).identity()
    from kdfast.models import model_fingerprint
    assert identity == {"teacher": model_fingerprint(teacher), "alpha": 0.25, "temperature": 2.0, "extrapolate": False,
                        "kd_term": None, "correction": None}


def test_distill_step_rejects_mismatched_batch():
    student = _net(d_in=2, classes=3)
    with pytest.raises(InvalidArgumentError, match="inputs hold 5 examples but targets 4"):
        distill_step(student, torch.randn(5, 2), torch.randint(0, 3, (4,)),
                     torch.optim.SGD(student.parameters(), lr=0.1))


# ------------------------------------------------------------------------------- alpha_for_fraction
def test_alpha_for_fraction_follows_the_paper_and_is_monotone():
    assert alpha_for_fraction(0.1) == pytest.approx(1.0)
    assert alpha_for_fraction(0.05) == pytest.approx(1.0)
    assert alpha_for_fraction(0.7) == pytest.approx(0.5)
    assert alpha_for_fraction(1.0) == pytest.approx(0.5)
    assert alpha_for_fraction(0.4) == pytest.approx(0.75)
    grid = [i / 1000 for i in range(1, 1001)]
    values = [alpha_for_fraction(f) for f in grid]
    assert all(b <= a for a, b in zip(values, values[1:]))
    assert all(0.0 <= v <= 1.0 for v in values)
    assert kdfast.alpha_for_fraction is alpha_for_fraction
    assert DEFAULT_ALPHA_SCHEDULE[0] == (0.1, 1.0)


def test_alpha_for_fraction_schedule_override():
    sched = [(0.2, 0.9), (0.5, 0.6), (0.9, 0.1)]
    assert alpha_for_fraction(0.1, schedule=sched) == pytest.approx(0.9)
    assert alpha_for_fraction(0.35, schedule=sched) == pytest.approx(0.75)
    assert alpha_for_fraction(0.7, schedule=sched) == pytest.approx(0.35)
    assert alpha_for_fraction(1.0, schedule=sched) == pytest.approx(0.1)
    assert alpha_for_fraction(0.3, schedule=[(0.5, 0.8)]) == pytest.approx(0.8)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.01, float("nan"), "0.5", None, True])
def test_alpha_for_fraction_rejects_bad_fraction(fraction):
    with pytest.raises(InvalidArgumentError, match=r"fraction must be a number in \(0, 1\]"):
        alpha_for_fraction(fraction)


@pytest.mark.parametrize("schedule, match", [
    ([], "at least one"),
    ([(0.1, 0.5), (0.5, 0.9)], "non-increasing"),
    ([(0.5, 0.9), (0.5, 0.4)], "strictly increasing"),
    ([(0.1, 1.2)], "alpha in"),
    ([(0.0, 0.5)], "fraction in"),
    ([(0.1,)], "pairs"),
])
def test_alpha_for_fraction_rejects_bad_schedule(schedule, match):
    with pytest.raises(InvalidArgumentError, match=match):
        alpha_for_fraction(0.3, schedule=schedule)


# ----------------------------------------------------------------------------------- optimal_alpha
def _rbf(a, b, gamma):
    return torch.exp(-gamma * (a[:, None] - b[None, :]) ** 2)


def _krr_fit_predict(x, targets, x_new, gamma, lam):
    """Kernel ridge regression, solved from scratch for each call (the grid search's independent fits)."""
    K = _rbf(x, x, gamma)
    coef = torch.linalg.solve(K + lam * torch.eye(len(x), dtype=x.dtype), targets)
    return _rbf(x_new, x, gamma) @ coef


def test_optimal_alpha_equals_dense_grid_search_on_the_papers_kernel_ridge_example():
    # Self-distillation paper, Sec. 4.5: X = {0, 0.1, ..., 1}, y = sin(2 pi x) + N(0, 0.5^2), RBF kernel with
    # gamma = 1/80, lambda = 0.2; validation on a fine grid of noisy draws of the same function.
    dt = torch.float64
    gamma, lam = 1 / 80, 0.2
    x = torch.linspace(0, 1, 11, dtype=dt)
    y = torch.sin(2 * math.pi * x) + 0.5 * torch.randn(11, dtype=dt)
    x_val = torch.rand(200, dtype=dt)
    y_val = torch.sin(2 * math.pi * x_val) + 0.5 * torch.randn(200, dtype=dt)
    y1_train = _krr_fit_predict(x, y, x, gamma, lam)           # step 1 on the training inputs: the teacher
    pred_labels = _krr_fit_predict(x, y, x_val, gamma, lam)     # ground truth only (paper's alpha = 1)
    pred_teacher = _krr_fit_predict(x, y1_train, x_val, gamma, lam)  # teacher only (paper's alpha = 0)
    w = optimal_alpha(y_val, pred_labels, pred_teacher)

    # Dense grid over the KD weight w (targets (1 - w) y + w y1, paper's alpha = 1 - w), a fresh fit each.
    # gamma = 1/80 on [0, 1] makes the kernel nearly flat and the fit over-smoothed, so the optimum lies far
    # below 0 (less regularisation than the ground-truth fit: the paper's alpha* > 1); search widely.
    grid = torch.linspace(-30.0, 30.0, 60001, dtype=dt)
    K = _rbf(x, x, gamma)
    Kinv = torch.linalg.inv(K + lam * torch.eye(11, dtype=dt))
    kval = _rbf(x_val, x, gamma)
    targets = (1 - grid)[:, None] * y[None] + grid[:, None] * y1_train[None]     # (G, 11)
    preds = targets @ Kinv.T @ kval.T                                            # (G, 200)
    mse = ((preds - y_val) ** 2).mean(-1)
    best = float(grid[mse.argmin()])
    spacing = float(grid[1] - grid[0])
    assert -30.0 < best < 30.0, "grid too narrow"
    assert abs(w - best) <= spacing, f"closed form {w:.6f} vs grid minimiser {best:.6f}"
    # the closed form is an exact minimiser: no grid point beats it
    pred_w = _krr_fit_predict(x, (1 - w) * y + w * y1_train, x_val, gamma, lam)
    assert float(((pred_w - y_val) ** 2).mean()) <= float(mse.min()) + 1e-12
    # and it is one minus the paper's alpha* of eq. (16)
    paper_alpha = 1 - ((pred_teacher - pred_labels) @ (y_val - pred_labels)) / (pred_teacher - pred_labels).square().sum()
    assert w == pytest.approx(1 - float(paper_alpha), rel=1e-12)


def test_optimal_alpha_clip_and_multi_output():
    y = torch.randn(30, 4, dtype=torch.float64)
    p1 = y + 0.3 * torch.randn(30, 4, dtype=torch.float64)
    p0 = p1 + 0.05 * (y - p1) + 0.01 * torch.randn(30, 4, dtype=torch.float64)  # optimum far above 1
    w = optimal_alpha(y, p1, p0)
    assert w > 1
    assert optimal_alpha(y, p1, p0, clip=True) == 1.0
    assert optimal_alpha(y, p1, 2 * p1 - p0, clip=True) == 0.0
    # Frobenius inner product = the flattened problem
    assert w == pytest.approx(optimal_alpha(y.reshape(-1), p1.reshape(-1), p0.reshape(-1)), rel=1e-12)


@pytest.mark.parametrize("args, match", [
    ((torch.ones(3), torch.ones(3), torch.ones(4)), "same non-empty shape"),
    ((torch.ones(0), torch.ones(0), torch.ones(0)), "same non-empty shape"),
    ((torch.ones(3), torch.tensor([1.0, float("nan"), 2.0]), torch.ones(3)), "pred_labels_only must be finite"),
    ((torch.randn(3), torch.ones(3), torch.ones(3)), "identical"),
    (("abc", torch.ones(3), torch.ones(3)), "y_val must be an array"),
])
def test_optimal_alpha_errors(args, match):
    with pytest.raises(InvalidArgumentError, match=match):
        optimal_alpha(*args)


# ------------------------------------------------------------------------------------------ fit
class _Pairs(torch.utils.data.Dataset):
    """A map-style dataset yielding (input, label int), like kdfast.data's."""

    def __init__(self, n=40, d=7, classes=5):
        self.x = torch.randn(n, d)
        self.targets = torch.randint(0, classes, (n,))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], int(self.targets[i])


class _SeenTracker:
    def __init__(self, n):
        self.seen = torch.zeros(n, dtype=torch.int64)

    def update(self, indices, correct):
        self.seen.index_add_(0, indices, torch.ones_like(indices))


def _recipe(**kw):
    return TrainRecipe(**{"epochs": 3, "batch_size": 8, "lr": 0.05, "seed": 3, **kw})


def _trained_online_and_from_cache(data, teacher, cache):
    """Two copies of one student after 2 epochs of fit: distilled from the teacher module, and from `cache`."""
    from kdfast.training.fit import fit
    init = _net()
    online, cached = copy.deepcopy(init), copy.deepcopy(init)
    fit(online, data, _recipe(epochs=2), KDSetup(teacher=teacher, alpha=0.8), progress=False)
    fit(cached, data, _recipe(epochs=2), KDSetup(teacher_cache=cache, alpha=0.8), progress=False)
    return online, cached


def test_fit_trains_on_the_kept_subset_and_feeds_dataset_indices():
    from kdfast.training.fit import fit
    data = _Pairs()
    keep = torch.tensor([1, 4, 5, 9, 20, 33, 39])
    tracker = _SeenTracker(len(data))
    history = fit(_net(), data, _recipe(), subset=keep, forgetting=tracker, eval_dataset=data, progress=False)
    expected = torch.zeros(len(data), dtype=torch.int64)
    expected[keep] = 3  # each kept example once per epoch, nothing else
    assert torch.equal(tracker.seen, expected)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert {"lr", "train_loss", "train_acc", "eval_loss", "eval_acc", "examples_per_s"} <= set(history[0])
    assert history[0]["lr"] == pytest.approx(0.05) and history[2]["lr"] < history[1]["lr"]  # cosine


def test_fit_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    from kdfast.training.fit import fit
    data = _Pairs()
    teacher = _net()
    init = _net()
    whole = copy.deepcopy(init)
    kd = KDSetup(teacher=teacher, alpha=0.5)
    fit(whole, data, _recipe(schedule="step", milestones=(2,)), kd, progress=False)
    part = copy.deepcopy(init)
    ckpt = tmp_path / "run" / "last.pt"
    fit(part, data, _recipe(epochs=3, schedule="step", milestones=(2,)), kd, checkpoint_path=ckpt, progress=False)
    # simulate a kill after epoch 2: rerun 2 epochs from scratch into a checkpoint, then resume to 3
    killed = copy.deepcopy(init)
    ckpt2 = tmp_path / "run" / "killed.pt"
    hist2 = fit(killed, data, _recipe(epochs=2, schedule="step", milestones=(2,)), kd, checkpoint_path=ckpt2,
                progress=False)
    resumed = _net()
    hist3 = fit(resumed, data, _recipe(epochs=3, schedule="step", milestones=(2,)), kd, checkpoint_path=ckpt2,
                resume=True, progress=False)
    assert hist3[:2] == hist2 and len(hist3) == 3
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(whole.parameters(), part.parameters()):
        assert torch.equal(a, b)


def test_fit_with_teacher_cache_equals_online_teacher_and_refuses_another_dataset(tmp_path):
    from kdfast.data import labels_fingerprint
    from kdfast.distill.teacher_cache import TeacherCache, TeacherCacheMismatchError
    from kdfast.training.fit import fit
    data = _Pairs()
    teacher = _net()
    for name, fp in (("ok", labels_fingerprint(data.targets)), ("other", labels_fingerprint(data.targets + 1))):
        writer = TeacherCache.create(tmp_path / name, num_examples=40, num_classes=5, dtype="float32",
                                     dataset_fingerprint=fp, teacher_fingerprint="t")
        with torch.no_grad():
            writer.write(torch.arange(40), teacher(data.x))
        writer.close()
    online, cached = _trained_online_and_from_cache(data, teacher, TeacherCache.open(tmp_path / "ok"))
    for a, b in zip(online.parameters(), cached.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(TeacherCacheMismatchError, match="another dataset"):
        fit(_net(), data, _recipe(epochs=1), KDSetup(teacher_cache=TeacherCache.open(tmp_path / "other"), alpha=0.8),
            progress=False)


def test_fit_reads_a_topk_cache_sparse(tmp_path, monkeypatch):
    """A top-k cache reaches the loss as a TopKTeacher, never as dense rows; with k = C (the whole teacher) the
    run equals the online teacher's."""
    from kdfast.data import labels_fingerprint
    from kdfast.distill.teacher_cache import TeacherCache
    data = _Pairs()
    teacher = _net()
    writer = TeacherCache.create(tmp_path / "k", num_examples=40, num_classes=5, topk=5, dtype="float32",
                                 dataset_fingerprint=labels_fingerprint(data.targets), teacher_fingerprint="t")
    with torch.no_grad():
        writer.write(torch.arange(40), teacher(data.x))
    writer.close()

    def dense_read(self, indices):
        raise AssertionError("fit expanded a top-k cache to dense rows")

    monkeypatch.setattr(TeacherCache, "__getitem__", dense_read)
    online, cached = _trained_online_and_from_cache(data, teacher, TeacherCache.open(tmp_path / "k"))
    for a, b in zip(online.parameters(), cached.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=0), "epochs must be a positive integer, got 0"),
    (dict(epochs=2.0), "epochs must be a positive integer, got 2.0"),
    (dict(batch_size=True), "batch_size must be a positive integer, got True"),
    (dict(lr=-1.0), "lr must be a finite number > 0, got -1.0"),
    (dict(lr=float("inf")), "lr must be a finite number > 0, got inf"),
    (dict(momentum=-0.5), "momentum must be a finite number >= 0, got -0.5"),
    (dict(weight_decay=float("nan")), "weight_decay must be a finite number >= 0, got nan"),
    (dict(schedule="linear"), "schedule must be one of"),
    (dict(schedule="step"), "needs milestones"),
    (dict(schedule="step", milestones=(3, 2)), "milestones must be non-decreasing positive epochs"),
    (dict(precision="fp16"), "precision must be one of"),
    (dict(seed=1.5), "seed must be an integer, got 1.5"),
    (dict(num_workers=-1), "num_workers must be an integer >= 0, got -1"),
])
def test_train_recipe_checks_every_field_when_made(kwargs, match):
    with pytest.raises(InvalidArgumentError, match="TrainRecipe: .*" + match):
        _recipe(**kwargs)


@pytest.mark.parametrize("args, match", [
    (dict(kd=KDSetup(alpha=0.5)), "needs a teacher or a teacher_cache"),
    (dict(recipe=dict(epochs=1)), "recipe must be a kdfast.TrainRecipe, got dict"),
    (dict(subset=torch.tensor([0, 40])), r"subset must lie in \[0, 40\)"),
    (dict(subset=torch.tensor([0.5])), "subset must be a non-empty 1-d integer array"),
    (dict(subset="all"), "subset must be dataset indices .* or a kdfast.ImportanceSampler, got str"),
])
def test_fit_errors_name_the_argument(args, match):
    from kdfast.training.fit import fit
    args = {"recipe": _recipe(epochs=1), **args}
    with pytest.raises(InvalidArgumentError, match=match):
        fit(_net(), _Pairs(), progress=False, **args)


def test_train_recipe_reports_every_problem_at_once_and_rescales_its_milestones():
    with pytest.raises(InvalidArgumentError, match="epochs must.*batch_size must"):
        TrainRecipe(epochs=0, batch_size=0)
    recipe = TrainRecipe(epochs=240, schedule="step", milestones=[150, 180, 210])
    assert recipe.milestones == (150, 180, 210) and recipe.rescaled(24).milestones == (15, 18, 21)
    assert recipe.rescaled(2).milestones == (1, 2, 2)  # MultiStepLR divides twice at a repeated epoch
    assert recipe.identity()["epochs"] is None and "num_workers" not in recipe.identity()


def test_bad_labels_raise_with_validate_and_give_nan_without():
    student = _net(d_in=2, classes=3)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 3, 2])
    with pytest.raises(InvalidArgumentError, match=r"row 2 has 3"):
        distill_step(student, x, y, opt, validate=True)
    out = distill_step(student, x, y, opt)
    assert torch.isnan(out["loss"])


def test_fit_validates_labels_in_its_first_epoch():
    from kdfast.training.fit import fit
    data = _Pairs()
    data.targets[7] = 5  # the net has 5 classes: 5 is out of range
    with pytest.raises(InvalidArgumentError, match="has 5"):
        fit(_net(), data, _recipe(epochs=1), progress=False)
