"""Iterated self-distillation (Algorithm 1): the chain's closed-form weights against a grid optimum of independent
float64 kernel-ridge fits, its predictions against Theorem 4.1's closed form, clipping, bookkeeping, the network
chain on digits (files, split, resume), the extrapolated loss against its formula, the CLI, and every error."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

import kdfast
from kdfast.distill.setup import KDSetup
from kdfast.training.recipe import TrainRecipe
from kdfast.training.self_distill import self_distill
from kdfast.errors import InvalidArgumentError
from kdfast.losses.kd_loss import kd_loss
from kdfast.training.self_distill import RECORD_COLUMNS, kernel_ridge_chain, run_chain



# ------------------------------------------------------------------------------ kernel ridge problem
def _problem(n=11, m=60, outputs=None, seed=0):
    """The paper's Sec. 4.5 example (sin(2 pi x) + N(0, 0.5^2) on an 11-point grid), RBF kernel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(0, 1, n, dtype=torch.float64)
    xv = torch.rand(m, generator=g, dtype=torch.float64)
    shape = (n,) if outputs is None else (n, outputs)
    phase = 0.0 if outputs is None else torch.arange(outputs, dtype=torch.float64) / outputs
    f = (lambda t: torch.sin(2 * torch.pi * t)) if outputs is None else \
        (lambda t: torch.sin(2 * torch.pi * (t[:, None] + phase)))
    y = f(x) + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    yv = f(xv)
    kernel = lambda a, b: torch.exp(-80.0 * (a[:, None] - b[None]) ** 2)  # noqa: E731
    return kernel(x, x), kernel(xv, x), y, yv


def _ridge(K, K_val, target, lam):
    """An independent float64 kernel ridge fit (LU solve): (train, val) predictions."""
    coef = torch.linalg.solve(K + lam * torch.eye(K.shape[0], dtype=torch.float64), target)
    return K @ coef, K_val @ coef


def _grid_best(K, K_val, y, yv, teacher_train, lam, lo=-40.0, hi=40.0):
    """The KD weight minimising the validation squared error, by a dense grid then two finer ones."""
    def val_err(a):
        _, pv = _ridge(K, K_val, (1 - a) * y + a * teacher_train, lam)
        return float((pv - yv).square().sum())
    grid = torch.linspace(lo, hi, 8001, dtype=torch.float64)
    for width in (0.04, 0.0004, None):
        best = float(grid[int(torch.tensor([val_err(float(a)) for a in grid], dtype=torch.float64).argmin())])
        if width is not None:
            grid = torch.linspace(best - width / 2, best + width / 2, 401, dtype=torch.float64)
    return best


@pytest.mark.parametrize("outputs, lam", [(None, 0.2), (None, 0.02), (3, 0.1)])
def test_chain_weights_match_the_grid_optimum_of_independent_fits(outputs, lam):
    K, Kv, y, yv = _problem(outputs=outputs)
    records, fits = kernel_ridge_chain(K, Kv, y, yv, lam=lam, steps=5, extrapolate=True)
    assert len(records) == len(fits) == 5
    teacher = _ridge(K, Kv, y, lam)[0]
    outside = 0
    for r in records[1:]:
        best = _grid_best(K, Kv, y, yv, teacher, lam)
        assert r["alpha"] == r["alpha_optimal"] and not r["clipped"]
        assert abs(r["alpha"] - best) < 2e-6, (r["step"], r["alpha"], best)
        outside += not 0 <= r["alpha"] <= 1
        train, val = _ridge(K, Kv, (1 - r["alpha"]) * y + r["alpha"] * teacher, lam)
        torch.testing.assert_close(fits[r["step"] - 1]["train"], train, rtol=1e-9, atol=1e-10)
        assert abs(r["val_mse"] - float((val - yv).square().sum()) / yv.shape[0]) < 1e-9
        teacher = train
    if outputs is None and lam == 0.2:
        assert outside >= 1  # the paper's example: the optimum leaves [0, 1] (so the test sees extrapolation)


def test_chain_training_predictions_follow_theorem_4_1():
    """Eq. 6: y(tau) = (sum_i a_i eta(i+1, tau) P^(tau-i+1) + eta(2, tau) P^tau) y with P = K (K + lam I)^-1, in
    the paper's weights a = 1 - kdfast's alpha."""
    K, Kv, y, yv = _problem(seed=3)
    lam = 0.2
    records, fits = kernel_ridge_chain(K, Kv, y, yv, lam=lam, steps=6, extrapolate=True)
    P = K @ torch.linalg.inv(K + lam * torch.eye(len(y), dtype=torch.float64))
    paper = {r["step"]: 1 - r["alpha"] for r in records}

    def eta(i, tau):
        out = 1.0
        for j in range(i, tau + 1):
            out *= 1 - paper[j]
        return out
    for tau in range(2, 7):
        M = sum(paper[i] * eta(i + 1, tau) * torch.linalg.matrix_power(P, tau - i + 1) for i in range(2, tau + 1))
        M = M + eta(2, tau) * torch.linalg.matrix_power(P, tau)
        torch.testing.assert_close(fits[tau - 1]["train"], M @ y, rtol=1e-8, atol=1e-9)


def test_clipping_records_the_optimum_and_uses_its_clip():
    K, Kv, y, yv = _problem()
    free, _ = kernel_ridge_chain(K, Kv, y, yv, lam=0.2, steps=2, extrapolate=True)
    clipped, _ = kernel_ridge_chain(K, Kv, y, yv, lam=0.2, steps=2)
    best = free[1]["alpha_optimal"]
    assert not 0 <= best <= 1  # this example's step-2 optimum extrapolates
    assert clipped[1]["alpha_optimal"] == best and clipped[1]["clipped"]
    assert clipped[1]["alpha"] == min(1.0, max(0.0, best))
    assert clipped[1]["val_mse"] > free[1]["val_mse"]  # the unclipped optimum is the better one


def test_chain_bookkeeping_counts_fits_and_fills_records():
    calls = []

    def fit(teacher, alpha, auxiliary):
        calls.append((teacher, alpha, auxiliary))
        return len(calls)  # a "model" is the fit's number; predictions below depend on it

    def predict(model):
        return torch.tensor([float(model), -float(model)])

    y_val = torch.tensor([10.0, -10.0])
    seen = []
    records, last = run_chain(fit, predict, y_val, steps=4, on_step=lambda s, m, r: seen.append((s, m)))
    assert len(calls) == 2 * (4 - 1) + 1 and [c[2] for c in calls] == [False, True, False] * 1 + [True, False] * 2
    assert calls[0] == (None, 0.0, False)
    assert [s for s, _ in seen] == [1, 2, 3, 4] and last == seen[-1][1] == len(calls)
    chain_models = [m for _, m in seen]
    # each step's teacher (auxiliary and final fit) is the previous chain member
    assert [c[0] for c in calls[1:]] == [chain_models[0]] * 2 + [chain_models[1]] * 2 + [chain_models[2]] * 2
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[0]["alpha"] == 0.0
    assert all(r["alpha_optimal"] is not None for r in records[1:])
    # fixed weight: one fit per step, no optimum
    calls.clear()
    records, _ = run_chain(fit, predict, y_val, steps=3, alpha=0.25)
    assert [(c[1], c[2]) for c in calls] == [(0.0, False), (0.25, False), (0.25, False)]
    assert [r["alpha"] for r in records] == [0.0, 0.25, 0.25] and records[2]["alpha_optimal"] is None
    calls.clear()
    assert len(run_chain(fit, predict, y_val, steps=1)[0]) == 1 and len(calls) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(steps=True), "steps must be an integer >= 1"),
    (dict(steps=2.0), "steps must be an integer >= 1"),
    (dict(steps=2, alpha="best"), "alpha must be 'optimal' or a finite number"),
    (dict(steps=2, alpha=float("nan")), "alpha must be 'optimal' or a finite number"),
    (dict(steps=2, alpha=1.5), r"alpha=1.5 lies outside \[0, 1\]; pass extrapolate=True"),
])
def test_chain_argument_errors(kwargs, match):
    K, Kv, y, yv = _problem()
    with pytest.raises(InvalidArgumentError, match=match):
        kernel_ridge_chain(K, Kv, y, yv, lam=0.2, **kwargs)


def test_kernel_ridge_chain_shape_and_ridge_errors():
    K, Kv, y, yv = _problem()
    with pytest.raises(InvalidArgumentError, match=r"K must be \(11, 11\) and K_val \(m, 11\)"):
        kernel_ridge_chain(K[:5], Kv, y, yv, lam=0.2, steps=2)
    with pytest.raises(InvalidArgumentError, match="lam must be a finite number > 0"):
        kernel_ridge_chain(K, Kv, y, yv, lam=0.0, steps=2)


# ----------------------------------------------------------------------------------- network chain
class _Data(torch.utils.data.Dataset):
    """A small separable 3-class problem with one noisy label in five."""

    def __init__(self, n=120, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.arange(n) % 3
        centres = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
        self.x = centres[self.targets] + torch.randn(n, 2, generator=g)
        flip = torch.rand(n, generator=g) < 0.2
        self.targets = torch.where(flip, (self.targets + 1) % 3, self.targets)
        self.num_classes = 3

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], int(self.targets[i])


def _mlp():
    return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3))


def test_self_distill_records_split_files_and_resume(tmp_path):
    data, test = _Data(), _Data(60, seed=1)
    kw = dict(steps=3, eval_dataset=test, val_fraction=0.25)
    result = self_distill(_mlp, data, TrainRecipe(epochs=3, batch_size=16, lr=0.05, seed=4), out=str(tmp_path), **kw)
    assert kdfast.self_distill is self_distill
    assert len(result.records) == 3 and [r["step"] for r in result.records] == [1, 2, 3]
    assert len(result.val_indices) == 30 and len(result.train_indices) == 90
    assert not set(result.val_indices.tolist()) & set(result.train_indices.tolist())
    for r in result.records[1:]:
        assert r["alpha"] == min(1.0, max(0.0, r["alpha_optimal"])) and r["clipped"] == (r["alpha"] != r["alpha_optimal"])
    for r in result.records:
        assert 0 <= r["val_acc"] <= 1 and 0 <= r["eval_acc"] <= 1 and r["val_mse"] > 0
    # the recorded validation accuracy is the returned last model's
    with torch.no_grad():
        pred = result.model(data.x[result.val_indices]).argmax(1)
    assert abs(float((pred == data.targets[result.val_indices]).double().mean()) - result.records[-1]["val_acc"]) < 1e-12
    saved = json.loads((tmp_path / "self_distill.json").read_text())
    assert saved == json.loads(json.dumps(result.records))
    with open(tmp_path / "self_distill.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == RECORD_COLUMNS and [int(r["step"]) for r in rows] == [1, 2, 3]
    for step in (1, 2, 3):
        assert (tmp_path / f"step{step}" / "student.pt").is_file()
    assert (tmp_path / "step2" / "teacher_only" / "checkpoint.pt").is_file()
    assert not (tmp_path / "step1" / "teacher_only").exists()
    # resume from the finished checkpoints: no training, the same chain
    again = self_distill(_mlp, data, TrainRecipe(epochs=3, batch_size=16, lr=0.05, seed=4), out=str(tmp_path),
                         resume=True, **kw)
    assert [r["alpha"] for r in again.records] == [r["alpha"] for r in result.records]
    assert [r["val_acc"] for r in again.records] == [r["val_acc"] for r in result.records]


def test_self_distill_fixed_weight_and_given_validation_indices():
    data = _Data()
    val = torch.arange(0, 120, 4)
    result = self_distill(_mlp, data, TrainRecipe(epochs=1, batch_size=32), steps=2, alpha=0.5, val_indices=val)
    assert torch.equal(result.val_indices, val) and len(result.train_indices) == 90
    assert [r["alpha"] for r in result.records] == [0.0, 0.5] and result.records[1]["alpha_optimal"] is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "self_distill: steps must be an integer >= 1"),
    (dict(steps=2, alpha=-0.5), r"alpha=-0.5 lies outside \[0, 1\]; pass extrapolate=True"),
    (dict(steps=2, val_fraction=0.0), r"val_fraction must be a number in \(0, 1\)"),
    (dict(steps=2, val_fraction=1.0), r"val_fraction must be a number in \(0, 1\)"),
    (dict(steps=2, val_fraction=0.001), "leaves 0 for validation and 120 for training; both must be non-empty"),
    (dict(steps=2, indices=[3], val_fraction=0.5), "leaves 0 for validation and 1 for training"),
    (dict(steps=2, val_indices=torch.arange(120)), "val_indices hold every one of the 120 training examples"),
    (dict(steps=2, val_indices=torch.tensor([0, 500])), r"indices must lie in \[0, 120\)"),
    (dict(steps=2, recipe=dict(epochs=1)), "self_distill: recipe must be a kdfast.TrainRecipe, got dict"),
])
def test_self_distill_errors(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        self_distill(_mlp, _Data(), **{"recipe": TrainRecipe(epochs=1), **kwargs})


def test_self_distill_model_fn_must_be_callable():
    with pytest.raises(InvalidArgumentError, match=r"model_fn must be a callable returning a fresh model \(every fit starts from one\), got Sequential"):
        self_distill(_mlp(), _Data(), TrainRecipe(epochs=1), steps=2)


# ------------------------------------------------------------------------------- extrapolated loss
def test_kd_setup_refuses_alpha_outside_unit_interval_without_opt_in():
    with pytest.raises(InvalidArgumentError, match=r"alpha must be a number in \[0, 1\].*any finite value with "
                                                   "extrapolate=True"):
        KDSetup(teacher=_mlp(), alpha=1.5)
    with pytest.raises(InvalidArgumentError, match="alpha must be a finite number with extrapolate=True"):
        KDSetup(teacher=_mlp(), alpha=float("inf"), extrapolate=True)
    assert KDSetup(teacher=_mlp(), alpha=1.5, extrapolate=True).alpha == 1.5


def test_fit_checkpoint_records_extrapolate(tmp_path):
    """extrapolate joins fit's run identity: resuming a checkpoint with the opt-in changed is another run."""
    from kdfast.io import JobMismatchError
    from kdfast.training.fit import fit
    kw = dict(checkpoint_path=str(tmp_path / "c.pt"), progress=False)
    recipe, teacher = TrainRecipe(epochs=1, batch_size=32), _mlp()
    fit(_mlp(), _Data(), recipe, KDSetup(teacher=teacher, alpha=0.5), **kw)
    with pytest.raises(JobMismatchError, match="extrapolate: False then, True now"):
        fit(_mlp(), _Data(), recipe, KDSetup(teacher=teacher, alpha=0.5, extrapolate=True), resume=True, **kw)


def _formula(student, teacher, y, alpha, T):
    """(1 - a) CE + a T^2 KL(softmax(t/T) || softmax(s/T)), mean over rows, float64."""
    s, t = student.double(), teacher.double()
    ce = torch.nn.functional.cross_entropy(s, y, reduction="none")
    logp_t, logp_s = torch.log_softmax(t / T, dim=1), torch.log_softmax(s / T, dim=1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(1)
    return ((1 - alpha) * ce + alpha * T * T * kl).mean()


@pytest.mark.parametrize("alpha", [-0.7, 1.6])
def test_extrapolated_step_follows_the_formula(alpha):
    from kdfast.distill.step import distill_step
    torch.manual_seed(0)
    student, teacher = _mlp().double(), _mlp().double()
    x, y = torch.randn(16, 2, dtype=torch.float64), torch.randint(0, 3, (16,))
    ref = _mlp().double()
    ref.load_state_dict(student.state_dict())
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    out = distill_step(student, x, y, opt, KDSetup(teacher=teacher, alpha=alpha, temperature=2.0, extrapolate=True))
    expected = _formula(ref(x), teacher(x).detach(), y, alpha, 2.0)
    assert abs(float(out["loss"]) - float(expected)) < 1e-6 * abs(float(expected))  # the loss value is fp32
    expected.backward()
    with torch.no_grad():
        for p, q in zip(student.parameters(), ref.parameters()):
            torch.testing.assert_close(p - q, -0.1 * q.grad, rtol=1e-5, atol=1e-9)  # the update, not the weights


def test_local_formula_reduces_to_kd_loss_inside_the_unit_interval():
    """The float64 formula above is the one kd_loss implements (checked where kd_loss accepts alpha)."""
    torch.manual_seed(1)
    s, t, y = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 4, (9,))
    for alpha in (0.0, 0.3, 1.0):
        expected = float(_formula(s, t, y, alpha, 3.0))
        assert abs(float(kd_loss(s, t, y, alpha=alpha, temperature=3.0)) - expected) < 1e-6 * abs(expected)


def test_self_distill_extrapolates_only_when_asked():
    result = self_distill(_mlp, _Data(), TrainRecipe(epochs=2, batch_size=16, seed=1), steps=3, extrapolate=True)
    for r in result.records[1:]:
        assert r["alpha"] == r["alpha_optimal"] and not r["clipped"]


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_chain_on_digits(tmp_path, capsys):
    from kdfast.cli.main import distill_main
    out = tmp_path / "chain"
    rc = distill_main(["--steps", "2", "--alpha", "optimal", "--temperature", "1", "--epochs", "1", "--model", "mlp",
                       "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "step 1: alpha = 0, val acc" in captured.out and "step 2: alpha = " in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and len(summary["records"]) == 2 and summary["alpha_range"] == "clip"
    # the weights are chosen on the job's held-out share (stratified, seeded by --seed); the rest trains
    from kdfast.data import load_dataset, stratified_split
    _, held = stratified_split(load_dataset("digits").targets, 0.1, seed=0)
    assert summary["num_val"] == len(held) and summary["num_train"] == 1397 - summary["num_val"]
    assert (out / "student.pt").is_file() and (out / "self_distill.csv").is_file()
    assert "eval_acc" in summary["records"][1] and summary["eval"].startswith("test split")
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "complete" and job["identity"]["steps"] == 2 and job["identity"]["alpha"] == "optimal"
    # a second run into the same folder needs --resume (or --overwrite), like every job
    argv = ["--steps", "2", "--alpha", "optimal", "--temperature", "1", "--epochs", "1", "--model", "mlp",
            "--out", str(out), "--quiet"]
    rc = distill_main(argv)
    assert rc == 1 and "already holds a distill run; pass resume (--resume)" in capsys.readouterr().err
    # --resume of a changed chain is refused, naming each changed chain flag; the same chain has nothing to do
    rc = distill_main([*argv, "--resume", "--steps", "3", "--alpha-range", "any"])
    err = capsys.readouterr().err
    assert rc == 1 and "--alpha-range: 'clip' in the run, 'any' now" in err and "--steps: 2 in the run, 3 now" in err
    before = (out / "summary.json").read_text()
    assert distill_main([*argv, "--resume"]) == 0 and (out / "summary.json").read_text() == before


@pytest.mark.parametrize("argv, match", [
    (["--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--alpha", "optimal"], "--alpha optimal chooses the weight of each distillation step: it needs --steps >= 2"),
    (["--steps", "3"], "--steps needs --alpha optimal or a fixed number"),
    (["--steps", "3", "--alpha", "1.5"], r"--alpha must be a number in \[0, 1\].*got 1.5"),
    (["--steps", "3", "--alpha", "best"], r"--alpha must be 'optimal' or a number in \[0, 1\]"),
    (["--steps", "3", "--alpha", "optimal", "--val-fraction", "1"], r"--val-fraction must be a number in \(0, 1\)"),
    (["--steps", "3", "--alpha", "optimal", "--train-teacher"], "cannot go with --train-teacher"),
])
def test_cli_chain_usage_errors(tmp_path, capsys, argv, match):
    from kdfast.cli.main import distill_main
    rc = distill_main([*argv, "--epochs", "1", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error:" in err
    import re
    assert re.search(match, err), err
