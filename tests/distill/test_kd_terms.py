"""Feature-distillation terms (hint, vid, at): float64 re-implementations of each formula, gradient checks,
shape errors naming layers and shapes, hooks removed, and the terms inside distill_step, fit and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

import kdfast
from kdfast.errors import InvalidArgumentError
from kdfast.distill.terms import KD_TERMS, make_kd_term
from kdfast.distill.terms.at import AT
from kdfast.distill.terms.hint import Hint
from kdfast.distill.terms.vid import VID
from kdfast.models import create_model

LAYERS = {"student_layer": "s.layer", "teacher_layer": "t.layer"}


def _np(t):
    return t.detach().cpu().numpy().astype(np.float64)


# ------------------------------------------------------------------ float64 references, one per formula
def _linear_ref(mod, x):  # x (D,) or (C, H, W): nn.Linear or 1x1 conv applied per position
    w, b = _np(mod.weight), _np(mod.bias)
    if x.ndim == 1:
        return np.array([sum(w[o, i] * x[i] for i in range(x.shape[0])) + b[o] for o in range(w.shape[0])])
    out = np.zeros((w.shape[0],) + x.shape[1:])
    for o in range(w.shape[0]):
        for h in range(x.shape[1]):
            for q in range(x.shape[2]):
                out[o, h, q] = sum(w[o, i, 0, 0] * x[i, h, q] for i in range(x.shape[0])) + b[o]
    return out


def hint_ref(term, fs, ft):
    return np.array([np.mean((_linear_ref(term.proj, s) - t) ** 2) for s, t in zip(_np(fs), _np(ft))])


def vid_ref(term, fs, ft):
    lin = [m for m in term.mean if isinstance(m, (nn.Linear, nn.Conv2d))]
    var = np.log1p(np.exp(_np(term.log_scale))) + term.eps  # softplus, by hand
    out = []
    for s, t in zip(_np(fs), _np(ft)):
        mu = _linear_ref(lin[2], np.maximum(_linear_ref(lin[1], np.maximum(_linear_ref(lin[0], s), 0)), 0))
        v = var.reshape((-1,) + (1,) * (t.ndim - 1))
        out.append(np.mean(np.log(np.sqrt(v)) + (t - mu) ** 2 / (2 * v)))
    return np.array(out)


def at_ref(fs, ft):
    out = []
    for s, t in zip(_np(fs), _np(ft)):
        maps = []
        for f in (s, t):
            a = np.array([[sum(f[c, h, q] ** 2 for c in range(f.shape[0])) / f.shape[0] for q in range(f.shape[2])]
                          for h in range(f.shape[1])]).reshape(-1)
            maps.append(a / np.sqrt(np.sum(a ** 2)))
        out.append(np.mean((maps[0] - maps[1]) ** 2))
    return np.array(out)


CASES = [  # (term class, student feature shape, teacher feature shape, reference)
    (Hint, (5, 7), (5, 4), hint_ref),
    (Hint, (3, 3, 2, 3), (3, 5, 2, 3), hint_ref),
    (VID, (4, 6), (4, 3), vid_ref),
    (VID, (3, 2, 2, 3), (3, 4, 2, 3), vid_ref),
    (AT, (3, 2, 3, 2), (3, 5, 3, 2), lambda term, fs, ft: at_ref(fs, ft)),
]


@pytest.mark.parametrize("cls,s_shape,t_shape,ref", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_per_example_loss_matches_float64_reference(cls, s_shape, t_shape, ref):
    torch.manual_seed(0)
    term = cls(s_shape, t_shape, beta=1.0, **LAYERS).double()
    if cls is VID:  # a non-uniform variance, so the per-channel weighting is exercised
        term.log_scale.data = torch.randn_like(term.log_scale)
    fs, ft = torch.randn(s_shape, dtype=torch.float64), torch.randn(t_shape, dtype=torch.float64)
    got = term.per_example(fs, ft)
    np.testing.assert_allclose(got.detach().numpy(), ref(term, fs, ft), rtol=1e-10, atol=1e-12)
    w = torch.rand(s_shape[0], dtype=torch.float64)
    term.beta = 2.5
    total = float(term(fs, ft, w).detach())
    assert total == pytest.approx(2.5 * float(np.mean(_np(w) * ref(term, fs, ft))), rel=1e-10)


@pytest.mark.parametrize("cls,s_shape,t_shape,ref", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_gradients_pass_gradcheck(cls, s_shape, t_shape, ref):
    torch.manual_seed(1)
    term = cls(s_shape, t_shape, beta=1.5, **LAYERS).double()
    names, params = zip(*term.named_parameters()) if any(True for _ in term.parameters()) else ((), ())
    fs = torch.randn(s_shape, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(t_shape, dtype=torch.float64)
    w = torch.rand(s_shape[0], dtype=torch.float64)

    def f(fs, *p):
        return functional_call(term, dict(zip(names, p)), (fs, ft, w))
    inputs = (fs, *[p.detach().clone().requires_grad_(True) for p in params])
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_teacher_features_get_no_gradient():
    term = Hint((2, 3), (2, 3), **LAYERS)
    fs, ft = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    term(fs, ft).backward()
    assert fs.grad is not None and ft.grad is None


def test_hint_without_projection_is_eq2_feature_matching():
    fs, ft = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    term = Hint((4, 6), (4, 6), project=False, beta=3.0, **LAYERS)
    assert list(term.parameters()) == []
    assert float(term(fs, ft)) == pytest.approx(3.0 * float(((fs - ft) ** 2).sum()) / 24, rel=1e-12)


def test_vid_starts_at_init_var():
    term = VID((2, 4), (2, 5), init_var=3.0, **LAYERS)
    torch.testing.assert_close(term.variance(), torch.full((5,), 3.0), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------- shape errors
@pytest.mark.parametrize("cls,s_shape,t_shape,options,why", [
    (Hint, (2, 8), (2, 4, 3, 3), {}, "both (B, D) vectors or both (B, C, H, W)"),
    (Hint, (2, 4, 2, 2), (2, 4, 3, 3), {}, "spatial sizes differ"),
    (Hint, (2, 8), (2, 4), {"project": False}, "shapes must be equal"),
    (VID, (2, 4, 3), (2, 4, 3), {}, "both (B, D) vectors or both (B, C, H, W)"),
    (VID, (2, 4, 2, 2), (2, 4, 4, 4), {}, "spatial sizes differ"),
    (AT, (2, 8), (2, 8), {}, "attention maps need (B, C, H, W)"),
    (AT, (2, 4, 4, 4), (2, 4, 2, 2), {}, "spatial sizes H x W differ"),
])
def test_unmatchable_shapes_raise_naming_layers_and_shapes(cls, s_shape, t_shape, options, why):
    with pytest.raises(InvalidArgumentError) as err:
        cls(s_shape, t_shape, **options, **LAYERS)
    msg = str(err.value)
    assert why in msg and "'s.layer'" in msg and "'t.layer'" in msg
    assert f"(B, {', '.join(map(str, s_shape[1:]))})" in msg and f"(B, {', '.join(map(str, t_shape[1:]))})" in msg


def test_features_of_another_size_than_built_for_raise():
    term = Hint((2, 3), (2, 3), **LAYERS)
    with pytest.raises(InvalidArgumentError, match="built for student 's.layer'"):
        term(torch.randn(2, 4), torch.randn(2, 3))


# --------------------------------------------------------------------------- models, hooks, the step
def _pair(student="cnn", teacher="cnn"):
    torch.manual_seed(0)
    s = create_model(student, num_classes=10, in_channels=1, image_size=8)
    t = create_model(teacher, num_classes=10, in_channels=1, image_size=8)
    return s, t


def test_default_layers_are_head_inputs_and_last_spatial_stage():
    s, t = _pair("mlp", "cnn")
    x = torch.randn(2, 1, 8, 8)
    term = make_kd_term("vid", s, t, x)
    assert (term.student_layer, term.teacher_layer) == ("5:in", "12:in")
    assert term.student_shape == (256,) and term.teacher_shape == (32,)
    s, t = _pair()
    term = make_kd_term("at", s, t, x)
    assert (term.student_layer, term.teacher_layer) == ("9", "9") and term.student_shape == (32, 4, 4)
    with pytest.raises(InvalidArgumentError, match="no layer with a .B, C, H, W. output"):
        make_kd_term("at", create_model("mlp", num_classes=10, in_channels=1, image_size=8), t, x)


def test_make_kd_term_errors():
    s, t = _pair()
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(InvalidArgumentError, match="name must be one of at, hint, vid"):
        make_kd_term("fsp", s, t, x)
    with pytest.raises(InvalidArgumentError, match="student layer 'nope' is not a module of Sequential; expected one "
                                                   "of 0, 1, 2"):
        make_kd_term("hint", s, t, x, student_layer="nope")
    with pytest.raises(InvalidArgumentError, match="needs? the teacher's features|nn.Modules"):
        make_kd_term("hint", s, None, x)
    with pytest.raises(InvalidArgumentError, match="hint: cannot match student layer '9' of shape \\(B, 32, 4, 4\\) "
                                                   "to teacher layer '12:in' of shape \\(B, 32\\)"):
        make_kd_term("hint", s, t, x, student_layer="9")
    assert sorted(KD_TERMS) == ["at", "hint", "vid"]


def test_probe_leaves_modes_and_batchnorm_statistics_alone():
    s, t = _pair()
    s.train()
    before = s[1].running_mean.clone()
    make_kd_term("vid", s, t, torch.randn(3, 1, 8, 8))
    assert s.training and s[1].training and torch.equal(s[1].running_mean, before)


@pytest.mark.parametrize("name", ["hint", "vid", "at"])
def test_distill_step_adds_the_term_trains_its_parameters_and_removes_hooks(name):
    s, t = _pair()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    term = make_kd_term(name, s, t, x[:1], beta=0.7)
    params_before = [p.detach().clone() for p in term.parameters()]
    opt = torch.optim.SGD([*s.parameters(), *term.parameters()], lr=0.1)
    s.train()
    # the expected loss, computed by hand on a copy of the student before the step
    import copy
    s_copy, term_copy = copy.deepcopy(s), copy.deepcopy(term)
    feats = {}
    hs = dict(s_copy.named_modules())[term.student_layer.removesuffix(":in")].register_forward_hook(
        lambda m, i, o: feats.__setitem__("s", i[0] if term.student_layer.endswith(":in") else o))
    ht = dict(t.named_modules())[term.teacher_layer.removesuffix(":in")].register_forward_hook(
        lambda m, i, o: feats.__setitem__("t", i[0] if term.teacher_layer.endswith(":in") else o))
    t.eval()
    with torch.no_grad():
        t_logits = t(x)
    expected = kdfast.kd_loss(s_copy(x), t_logits, y, alpha=0.5, temperature=4.0) + term_copy(feats["s"], feats["t"])
    hs.remove()
    ht.remove()
    out = kdfast.distill_step(s, x, y, opt, kdfast.KDSetup(teacher=t, alpha=0.5, kd_term=term))
    assert float(out["loss"]) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(out["kd_term"]) == pytest.approx(float(term_copy(feats["s"], feats["t"]).detach()), rel=1e-5)
    assert all(not m._forward_hooks for m in [*s.modules(), *t.modules()])
    assert all(not torch.equal(a, b) for a, b in zip(params_before, term.parameters()))


def test_distill_step_feature_term_alone_and_without_teacher_module():
    s, t = _pair()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    term = make_kd_term("hint", s, t, x[:1])
    opt = torch.optim.SGD([*s.parameters(), *term.parameters()], lr=0.1)
    out = kdfast.distill_step(s, x, y, opt, kdfast.KDSetup(teacher=t, alpha=0.0, kd_term=term))  # CE + hint only
    assert float(out["kd_term"]) > 0
    with pytest.raises(InvalidArgumentError, match="needs an online teacher module"):
        kdfast.KDSetup(alpha=0.5, kd_term=term)  # per-batch teacher_logits hold no features


def test_fit_trains_the_term_and_resumes_it(tmp_path):
    from kdfast.data import load_dataset
    from kdfast.training.fit import fit
    data = load_dataset("digits")
    s, t = _pair()
    term = make_kd_term("vid", s, t, data[0][0][None])
    ckpt = tmp_path / "ck.pt"
    keep = torch.arange(64)
    recipe = kdfast.TrainRecipe(epochs=1, batch_size=32)
    history = fit(s, data, recipe, kdfast.KDSetup(teacher=t, alpha=0.5, kd_term=term), subset=keep,
                  checkpoint_path=str(ckpt), progress=False)
    assert len(history) == 1 and "kd_term" in torch.load(ckpt, weights_only=True)
    fresh_s, _ = _pair()
    fresh = make_kd_term("vid", fresh_s, t, data[0][0][None])
    fit(fresh_s, data, recipe, kdfast.KDSetup(teacher=t, alpha=0.5, kd_term=fresh), subset=keep,
        checkpoint_path=str(ckpt), resume=True, progress=False)  # nothing left to train: state restored
    for a, b in zip(term.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(InvalidArgumentError, match="needs an online teacher"):
        kdfast.KDSetup(teacher_cache=object(), alpha=0.5, kd_term=term)


def test_fit_resume_refuses_another_term(tmp_path):
    # the term joins fit's run identity: its name, beta and layers are checked before any state is loaded
    from kdfast.data import load_dataset
    from kdfast.io import JobMismatchError
    from kdfast.training.fit import fit
    data = load_dataset("digits")
    s, t = _pair()
    recipe = kdfast.TrainRecipe(epochs=1, batch_size=32)
    args = dict(subset=torch.arange(64), progress=False, checkpoint_path=str(tmp_path / "ck.pt"))

    def kd(term=None):
        return kdfast.KDSetup(teacher=t, alpha=0.5, kd_term=term)

    fit(s, data, recipe, kd(make_kd_term("hint", s, t, data[0][0][None])), **args)
    with pytest.raises(JobMismatchError, match="kd_term") as info:
        fit(s, data, recipe, kd(make_kd_term("hint", s, t, data[0][0][None], beta=5.0)), resume=True, **args)
    assert [f for f, _, _ in info.value.differences] == ["kd_term"]
    assert info.value.differences[0][1]["beta"] == 100.0 and info.value.differences[0][2]["beta"] == 5.0
    with pytest.raises(JobMismatchError, match="kd_term"):
        fit(s, data, recipe, kd(), resume=True, **args)  # the checkpoint's term state would be silently dropped
    with pytest.raises(JobMismatchError, match="kd_term"):
        fit(s, data, recipe, kd(make_kd_term("vid", s, t, data[0][0][None])), resume=True, **args)


def test_cli_kd_term_options_resolve_into_the_job_identity(tmp_path):
    import argparse

    from kdfast.cli import distill
    from kdfast.cli.common import flag
    from kdfast.io import Job, JobMismatchError

    parser = distill.add_parser(argparse.ArgumentParser().add_subparsers())

    def resolved(*argv):
        return distill.resolve(parser.parse_args(["--train-teacher", "--out", str(tmp_path / "run"), *argv])).config()

    config = resolved("--kd-term", "hint", "--kd-layers", "12.in:9")
    assert (config["kd_term"], config["kd_beta"], config["kd_layers"]) == ("hint", 100.0, ("12:in", "9"))
    assert resolved()["kd_term"] == "logit" and resolved()["kd_beta"] is None
    Job.start(tmp_path / "run", "distill", config, label=flag)
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"work")
    with pytest.raises(JobMismatchError, match=r"--kd-beta: 100.0 in the run, 1.0 now.*--kd-term: 'hint' in the "
                                               r"run, 'vid' now") as info:
        Job.start(tmp_path / "run", "distill", resolved("--kd-term", "vid", "--kd-layers", "12.in:9"), resume=True,
                  label=flag)
    assert {f for f, _, _ in info.value.differences} == {"kd_term", "kd_beta"}
    assert Job.start(tmp_path / "run", "distill", resolved("--kd-term", "hint", "--kd-beta", "100", "--kd-layers",
                                                           "12.in:9"), resume=True, label=flag).record["config"] \
        == Job.start(tmp_path / "run", "distill", config, resume=True).record["config"]
    for argv, match in ((("--kd-term", "at", "--teacher-cache", str(tmp_path)), "cannot go with --teacher-cache"),
                        (("--kd-beta", "2"), "--kd-beta goes with --kd-term hint|vid|at"),
                        (("--kd-term", "at", "--kd-beta", "-1"), "--kd-beta must be a finite number >= 0"),
                        (("--kd-term", "at", "--kd-layers", "9"), "--kd-layers must be STUDENT_LAYER:TEACHER_LAYER")):
        with pytest.raises(distill.UsageError, match=match):
            resolved(*argv)


def test_cli_kd_term(tmp_path, capsys):
    from kdfast.cli.main import distill_main
    np.save(tmp_path / "keep.npy", np.arange(0, 1397, 10))
    out = tmp_path / "run"
    rc = distill_main(["--train-teacher", "--keep", str(tmp_path / "keep.npy"), "--epochs", "1", "--kd-term", "at",
                       "--kd-beta", "50", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kd_term"] == {"name": "at", "beta": 50.0, "student_layer": "9", "teacher_layer": "9"}
    assert "kd_term at" in captured.out
    rc = distill_main(["--alpha", "0", "--kd-term", "vid", "--out", str(tmp_path / "x")])
    assert rc == 2 and "--kd-term vid distills from a teacher's features" in capsys.readouterr().err


def test_cli_kd_term_is_refused_under_torchrun_before_any_work(tmp_path, capsys, monkeypatch):
    from kdfast.runtime import distributed
    from kdfast.cli.main import distill_main
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    rc = distill_main(["--train-teacher", "--kd-term", "hint", "--out", str(tmp_path / "run")])
    assert rc == 2 and "run on one process, not under torchrun" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["hint", "vid", "at"])
def test_bf16_autocast_features_are_compared_in_fp32(name):
    import copy
    s, t = _pair()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    term = make_kd_term(name, s, t, x[:1])
    values = {}
    for amp in (None, "bf16"):
        s2, term2 = copy.deepcopy(s), copy.deepcopy(term)
        opt = torch.optim.SGD([*s2.parameters(), *term2.parameters()], lr=0.0)
        out = kdfast.distill_step(s2, x, y, opt, kdfast.KDSetup(teacher=t, alpha=0.5, kd_term=term2), amp=amp)
        values[amp] = out["kd_term"]
    assert values["bf16"].dtype == torch.float32
    assert float(values["bf16"]) == pytest.approx(float(values[None]), rel=0.1)  # bf16 features: ~3 digits
