"""fit(..., sampler=ImportanceSampler(...)): LiPrune's stochastic pruning (Eq. 2) in training. The weighted epoch
gradient is unbiased (Monte Carlo against an explicit float64 per-example loop), epochs are redrawn from the seed,
a resumed run equals an uninterrupted one, and misuse raises."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdfast.errors import InvalidArgumentError
from kdfast.pruning.sampling import ImportanceSampler
from kdfast.training.fit import TrainRecipe, fit

N, D, C = 24, 4, 3


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=gen)
    return x, y


def _model(seed=1):
    torch.manual_seed(seed)
    return nn.Linear(D, C).double()


def _fit(model, x, y, sampler, epochs=3, batch_size=4, lr=0.5, **kw):
    recipe = TrainRecipe(epochs=epochs, batch_size=batch_size, lr=lr, momentum=0.0, weight_decay=0.0,
                         schedule="constant")
    return fit(model, torch.utils.data.TensorDataset(x, y), recipe, subset=sampler, progress=False, **kw)


def test_weighted_epoch_gradient_is_unbiased():
    # E[sum over an epoch's batches of the batch-mean weighted gradient] = (1/B) sum_i g_i over ALL examples:
    # the pruned epoch makes, in expectation, a full epoch's progress. lr tiny: the model stays put, so every
    # epoch is an independent draw of the same estimator.
    x, y = _data()
    model = _model()
    scores = torch.rand(N, dtype=torch.float64) ** 2 + 0.05  # skewed
    batch, fraction, epochs = 4, 1 / 3, 400  # 8 draws per epoch, 2 full batches
    per_example = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))]) for i in range(N)])
    expected = per_example.sum(0) / batch
    params = list(model.parameters())
    sums, current = [], [torch.zeros_like(p) for p in params]

    def grab(k):
        def hook(grad):
            current[k] += grad.detach()
        return hook
    hooks = [p.register_hook(grab(k)) for k, p in enumerate(params)]
    sampler = ImportanceSampler(scores, fraction, seed=3)
    assert len(sampler) % batch == 0

    def on_epoch(history):
        sums.append(torch.cat([c.reshape(-1) for c in current]))
        for c in current:
            c.zero_()
    _fit(model, x, y, sampler, epochs=epochs, batch_size=batch, lr=1e-300, on_epoch=on_epoch)
    for h in hooks:
        h.remove()
    order = torch.cat([p.reshape(-1) for p in model.parameters()]).numel()
    table = torch.stack(sums)
    assert table.shape == (epochs, order)
    mean, se = table.mean(0), table.std(0) / math.sqrt(epochs)
    z = ((mean - expected).abs() / se).max()
    assert z < 5, f"worst z {z:.2f}"
    # and a test that can fail: the unweighted draws are biased towards the high scores
    unweighted = (per_example * (scores / scores.sum() * len(sampler))[:, None]).sum(0) / batch
    assert ((unweighted - expected).abs() / se).max() > 8


def test_epochs_resample_deterministically_from_the_seed():
    x, y = _data()
    scores = torch.rand(N) + 0.1
    runs = []
    for seed in (0, 0, 1):
        model = _model()
        _fit(model, x, y, ImportanceSampler(scores, 0.5, seed=seed))
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])


def test_weights_enter_the_loss():
    # the epoch's train loss is the mean over its draws of w_i ce_i, w_i = 1 / (m p_i): replayed from the seed
    x, y = _data()
    model = _model()
    scores = torch.rand(N) + 0.2
    history = _fit(model, x, y, ImportanceSampler(scores, 0.5, seed=2), epochs=1, batch_size=12, lr=1e-300)
    replay = ImportanceSampler(scores, 0.5, seed=2)
    replay.set_epoch(0)
    draws = torch.tensor(list(replay))
    ce = nn.functional.cross_entropy(model(x[draws]), y[draws], reduction="none").detach()
    expected = float((replay.weights.double()[draws] * ce).mean())
    assert history[0]["train_loss"] == pytest.approx(expected, rel=1e-5)
    assert abs(expected - float(ce.mean())) > 1e-3  # the weights matter here


def test_resume_equals_an_uninterrupted_run_and_checks_the_sampler(tmp_path):
    x, y = _data()
    scores = torch.rand(N) + 0.1
    straight = _model()
    _fit(straight, x, y, ImportanceSampler(scores, 0.5, seed=4), epochs=4)
    ckpt = str(tmp_path / "ckpt.pt")
    first = _model()
    _fit(first, x, y, ImportanceSampler(scores, 0.5, seed=4), epochs=2, checkpoint_path=ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert state["sampler"]["epoch"] == 2 and state["sampler"]["seed"] == 4
    resumed = _model(seed=9)  # its weights come from the checkpoint
    history = _fit(resumed, x, y, ImportanceSampler(scores, 0.5, seed=4), epochs=4, checkpoint_path=ckpt,
                   resume=True)
    assert len(history) == 4
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(InvalidArgumentError, match="saved sampler differs"):
        _fit(_model(), x, y, ImportanceSampler(scores, 0.5, seed=5), epochs=5, checkpoint_path=ckpt, resume=True)
    with pytest.raises(InvalidArgumentError, match="with an importance sampler"):
        _fit(_model(), x, y, None, epochs=5, checkpoint_path=ckpt, resume=True)


def test_sampler_misuse_raises():
    x, y = _data()
    with pytest.raises(InvalidArgumentError, match="holds 5 scores but the dataset 24"):
        _fit(_model(), x, y, ImportanceSampler(torch.ones(5), 0.5))
    with pytest.raises(InvalidArgumentError, match="subset must be dataset indices .* or a kdfast.ImportanceSampler"):
        _fit(_model(), x, y, torch.utils.data.RandomSampler(range(N)))


# ------------------------------------------------------------------------------------------- the CLI
FAST = ["--model", "mlp", "--epochs", "1", "--batch-size", "128", "--quiet"]


def test_cli_stochastic_pruning_from_liprune_last_scores(tmp_path, capsys):
    import json

    import numpy as np

    from kdfast.cli.main import distill_main, score_main
    scores = tmp_path / "scores"
    assert score_main(["--method", "liprune-last", "--model", "mlp", "--train-epochs", "1", "--seeds", "1",
                       "--out", str(scores), "--quiet"]) == 0, capsys.readouterr().err
    assert (np.load(scores / "scores.npy") > 0).all()
    out = tmp_path / "run"
    argv = FAST + ["--train-teacher", "--teacher-epochs", "1", "--sampler", "lipschitz", "--scores", str(scores),
                   "--fraction", "0.3", "--out", str(out)]
    rc = distill_main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sampler"] == "lipschitz" and summary["num_kept"] == round(0.3 * summary["num_train"])
    assert summary["fraction"] == pytest.approx(0.3, abs=1e-3)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["sampler"]["epoch"] == 1
    # resuming the finished run gives the same student; resuming with another fraction is refused
    before = torch.load(out / "student.pt", weights_only=True)
    assert distill_main(argv + ["--resume"]) == 0
    after = torch.load(out / "student.pt", weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the job record refuses it before any work, naming the field (fit's own "saved sampler differs" check,
    # one level down, is tested above)
    assert distill_main([a if a != "0.3" else "0.5" for a in argv] + ["--epochs", "2", "--resume"]) == 1
    assert "--fraction: 0.3 in the run, 0.5 now" in capsys.readouterr().err


def test_cli_unbiased_correction_and_teacher_report(tmp_path, capsys):
    import json

    from kdfast.cli.main import distill_main
    out = tmp_path / "run"
    rc = distill_main(FAST + ["--train-teacher", "--teacher-epochs", "1", "--alpha", "0.5", "--temperature", "1",
                              "--correction", "unbiased", "--teacher-report", "--report-batches", "8",
                              "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((out / "teacher_report.json").read_text())
    for key in ("beta", "rho", "lambda_star", "noise_ratio", "student_sq", "teacher_sq", "cross"):
        assert isinstance(report[key], float), key
    assert 0 <= report["beta"] <= 1 and report["num_batches"] == 8
    assert json.loads((out / "summary.json").read_text())["correction"] == "unbiased"


@pytest.mark.parametrize("argv,match", [
    (["--sampler", "lipschitz"], "needs --scores DIR and --fraction"),
    (["--fraction", "0.3"], "go with --sampler"),
    (["--alpha", "0", "--correction", "unbiased"], "needs the teacher module"),
    (["--train-teacher", "--teacher-model", "cnn", "--correction", "unbiased"], "student's architecture"),
    (["--alpha", "0", "--teacher-report"], "needs the teacher module"),
    (["--alpha", "0", "--sampler", "lipschitz", "--scores", "s.npy", "--fraction", "0.3", "--val-fraction", "0.2"],
     "cannot hold out --val-fraction 0.2"),
])
def test_cli_variance_usage_errors(tmp_path, capsys, argv, match):
    from kdfast.cli.main import distill_main
    assert distill_main(FAST + argv + ["--out", str(tmp_path / "o")]) == 2
    assert match in capsys.readouterr().err


def test_cli_sampler_refuses_scores_that_are_not_positive(tmp_path, capsys):
    import numpy as np

    from kdfast.cli.main import distill_main
    from kdfast.data import load_dataset
    scores = np.ones(len(load_dataset("digits")), dtype=np.float32)
    scores[7] = 0.0
    np.save(tmp_path / "s.npy", scores)
    rc = distill_main(FAST + ["--alpha", "0", "--sampler", "lipschitz", "--scores", str(tmp_path / "s.npy"),
                              "--fraction", "0.3", "--out", str(tmp_path / "o")])
    assert rc == 1
    assert "1 scores that are <= 0 or not finite (first: example 7" in capsys.readouterr().err


def test_cli_sampler_checks_the_scores_data_and_content(tmp_path, capsys):
    # scores go through the job layer's reader (data identity), and their content joins the job identity
    import json

    import numpy as np

    from kdfast.cli.main import distill_main
    from kdfast.data import data_identity, load_dataset
    train = load_dataset("digits")
    folder = tmp_path / "scores"
    folder.mkdir()
    np.save(folder / "scores.npy", np.ones(len(train), dtype=np.float32))
    other = dict(data_identity(train), labels_fingerprint="0" * 64)
    (folder / "meta.json").write_text(json.dumps({"data": other}))
    argv = FAST + ["--alpha", "0", "--sampler", "lipschitz", "--scores", str(folder), "--fraction", "0.3",
                   "--out", str(tmp_path / "o")]
    assert distill_main(argv) == 1
    assert f"--scores {folder} was made from another data set" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before the job started
    (folder / "meta.json").write_text(json.dumps({"data": data_identity(train)}))
    assert distill_main(argv) == 0, capsys.readouterr().err
    np.save(folder / "scores.npy", np.linspace(1, 2, len(train), dtype=np.float32))
    assert distill_main(argv + ["--resume"]) == 1
    assert "--scores-sha256: " in capsys.readouterr().err
