"""kdfast-score end to end: outputs, ensembles, folders, forgetting, logits, resume after SIGKILL, every error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import kdfast
from _fake_datasets import write_cifar, write_image_folder
from _processes import checkpoint, kill_when
from kdfast.cli.main import main, score_main
from kdfast.data import labels_fingerprint, load_dataset
from kdfast.errors import InvalidArgumentError
from kdfast.models import create_model, file_sha256, load_checkpoint


def _run(argv, capsys):
    code = score_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_default_command_trains_scores_and_writes_runs_digits_el2n(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run([], capsys)
    assert code == 0, err
    run = tmp_path / "runs" / "digits-el2n"
    assert "output -> runs/digits-el2n" in err and "-> runs/digits-el2n" in out
    scores, per_model = np.load(run / "scores.npy"), np.load(run / "scores_per_model.npy")
    meta = json.loads((run / "meta.json").read_text())
    data = load_dataset("digits")
    assert scores.dtype == np.float32 and scores.shape == (1397,) and per_model.shape == (3, 1397)
    np.testing.assert_allclose(scores, per_model.mean(0), rtol=1e-6)
    assert meta["method"] == "el2n" and meta["direction"] == "higher is harder" and meta["seeds"] == [0, 1, 2]
    assert meta["labels_fingerprint"] == labels_fingerprint(data.targets) and meta["num_examples"] == 1397
    assert meta["epochs"] == 3 and meta["torch_version"] == torch.__version__ and meta["images_per_s"] > 0
    assert [c["sha256"] for c in meta["checkpoints"]] == [file_sha256(run / "models" / f"seed{s}.pt") for s in range(3)]
    assert not (run / "chunks").exists() and (run / "job.json").exists()
    # the kept checkpoints reproduce the scores
    models = [load_checkpoint(create_model("cnn", num_classes=10, in_channels=1), run / "models" / f"seed{s}.pt")
              for s in range(3)]
    _, again = kdfast.score(models, data, "el2n", progress=False, return_per_model=True)
    np.testing.assert_allclose(per_model, again.numpy(), rtol=1e-5, atol=1e-6)
    assert "score histogram by class" in out and "hardest 10 examples" in out
    hardest = int(np.argmax(scores))
    assert f" {hardest} " in out.split("hardest 10 examples:")[1].splitlines()[2]


def test_checkpoint_ensemble_matches_the_api(tmp_path, capsys):
    a, b = checkpoint(tmp_path / "a.pt", seed=1), checkpoint(tmp_path / "b.pt", seed=2)
    out_dir = tmp_path / "run"
    code, out, err = _run(["--checkpoint", str(tmp_path / "a.pt"), "--checkpoint", str(tmp_path / "b.pt"),
                           "--method", "grand-last", "--limit", "150", "--batch-size", "64", "--out", str(out_dir),
                           "--quiet", "--top", "3"], capsys)
    assert code == 0, err
    # --quiet: no progress; the untrained checkpoints are at chance, which is worth a warning all the same
    assert err.count("did not learn") == 2 and all(ln.startswith("kdfast-score: warning: model ") for ln in err.splitlines())
    data = torch.utils.data.Subset(load_dataset("digits"), range(150))
    mean, per = kdfast.score([a, b], data, "grand-last", progress=False, return_per_model=True)
    np.testing.assert_allclose(np.load(out_dir / "scores_per_model.npy"), per.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.load(out_dir / "scores.npy"), mean.numpy(), rtol=1e-6)
    meta = json.loads((out_dir / "meta.json").read_text())
    assert meta["checkpoints"][1]["sha256"] == file_sha256(tmp_path / "b.pt") and meta["seeds"] is None
    assert "hardest 3 examples" in out
    # each scoring model's accuracy in eval mode, the mode it scores in
    x = torch.stack([data[i][0] for i in range(150)])
    y = torch.as_tensor([data[i][1] for i in range(150)])
    for k, model in enumerate((a, b)):
        with torch.no_grad():
            expected = (model.eval()(x).argmax(1) == y).double().mean().item()
        assert f"model {k + 1}: eval-mode accuracy {expected:.4f} on the 150 scored examples" in out
        assert meta["checkpoints"][k]["eval_acc"] == pytest.approx(expected, abs=1e-12)


def test_trained_models_report_eval_mode_accuracy_not_the_training_mode_one(tmp_path, capsys):
    # a BatchNorm CNN: train-mode accuracy during training and eval-mode accuracy differ; the latter is reported
    code, out, err = _run(["--model", "cnn", "--limit", "200", "--seeds", "1", "--train-epochs", "1", "--out",
                           str(tmp_path / "r"), "--quiet"], capsys)
    assert code == 0, err
    model = load_checkpoint(create_model("cnn", num_classes=10, in_channels=1), tmp_path / "r" / "models" / "seed0.pt")
    data = load_dataset("digits")
    x = torch.stack([data[i][0] for i in range(200)])
    with torch.no_grad():
        expected = (model.eval()(x).argmax(1) == data.targets[:200]).double().mean().item()
    assert f"model 1: eval-mode accuracy {expected:.4f}" in out


def test_folder_dataset_writes_file_list_and_show_grid(tmp_path, capsys):
    files = write_image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "dog" / "readme.txt").write_text("not an image")
    checkpoint(tmp_path / "m.pt", name="resnet8", num_classes=3, in_channels=3)
    out_dir = tmp_path / "run"
    code, out, err = _run(["--dataset", "folder", "--data-root", str(tmp_path / "imgs"), "--model", "resnet8",
                           "--checkpoint", str(tmp_path / "m.pt"), "--image-size", "16", "--num-workers", "2",
                           "--show", "2", "--method", "loss", "--out", str(out_dir)], capsys)
    assert code == 0, err
    assert (out_dir / "files.txt").read_text().splitlines() == files
    assert (out_dir / "show.png").stat().st_size > 1000
    assert "files.txt" in json.loads((out_dir / "meta.json").read_text())["files"]
    assert any(f in out for f in files)  # the hardest list names files
    # class names in the histogram, skipped files counted, show.png's path printed
    histogram = out.split("score histogram by class")[1].split("hardest")[0]
    assert [ln.split()[0] for ln in histogram.splitlines()[2:]] == ["cat", "dog", "emu"]
    assert "(1 non-image files skipped, e.g. dog/readme.txt)" in err
    assert f"wrote {out_dir / 'show.png'}" in out


def test_forgetting_is_tracked_while_training(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, _, err = _run(["--method", "forgetting", "--limit", "120", "--train-epochs", "3", "--seeds", "2",
                         "--model", "mlp", "--out", str(out_dir), "--quiet"], capsys)
    assert code == 0, err
    per = np.load(out_dir / "scores_per_model.npy")
    for s in range(2):
        np.testing.assert_array_equal(per[s], np.load(out_dir / "models" / f"seed{s}.forgetting.npy"))
    assert per.shape == (2, 120) and np.all((per >= 0) & (per <= 1) | np.isinf(per))  # 3 presentations


def test_random_needs_no_model_and_is_seeded(tmp_path, capsys):
    code, _, err = _run(["--method", "random", "--seed", "7", "--out", str(tmp_path / "r"), "--quiet"], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "r" / "scores.npy"), kdfast.scoring.random_scores(1397, 7).numpy())
    assert not (tmp_path / "r" / "models").exists()


def test_save_logits_writes_a_teacher_cache(tmp_path, capsys):
    model = checkpoint(tmp_path / "t.pt").eval()
    code, _, err = _run(["--checkpoint", str(tmp_path / "t.pt"), "--limit", "70", "--batch-size", "32",
                         "--save-logits", "--out", str(tmp_path / "run"), "--quiet"], capsys)
    assert code == 0, err
    from kdfast.models import model_fingerprint
    from kdfast.distill.teacher_cache import TeacherCache
    data = load_dataset("digits")
    cache = TeacherCache.open(str(tmp_path / "run" / "teacher-logits"),
                              dataset_fingerprint=labels_fingerprint(data.targets[:70]),
                              teacher_fingerprint=model_fingerprint(model))
    with torch.no_grad():
        want = model(data.images[:70])
    torch.testing.assert_close(cache[torch.arange(70)], want, rtol=2e-3, atol=2e-3)  # fp16 storage


def test_save_logits_topk_writes_a_sparse_teacher_cache(tmp_path, capsys):
    model = checkpoint(tmp_path / "t.pt").eval()
    code, _, err = _run(["--checkpoint", str(tmp_path / "t.pt"), "--limit", "70", "--batch-size", "32",
                         "--save-logits", "--topk", "3", "--out", str(tmp_path / "run"), "--quiet"], capsys)
    assert code == 0, err
    from kdfast.distill.teacher_cache import TeacherCache
    cache = TeacherCache.open(str(tmp_path / "run" / "teacher-logits"))
    assert cache.topk == 3
    with torch.no_grad():
        want = torch.log_softmax(model(load_dataset("digits").images[:70]), -1).topk(3, -1)
    teacher = cache.topk_rows(torch.arange(70), missing="tail")
    assert torch.equal(teacher.indices, want.indices)
    torch.testing.assert_close(teacher.logprobs, want.values, rtol=2e-3, atol=2e-3)  # fp16 storage


def test_umbrella_command_runs_score(tmp_path, capsys):
    assert main(["score", "--method", "random", "--out", str(tmp_path / "u"), "--quiet"]) == 0
    assert (tmp_path / "u" / "scores.npy").exists()


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, capsys):
    checkpoint(tmp_path / "a.pt", seed=3)
    checkpoint(tmp_path / "b.pt", seed=4)
    # 60 batches of 8, a chunk after each: the kill lands after the first chunk, long before the last
    common = ["--checkpoint", str(tmp_path / "a.pt"), "--checkpoint", str(tmp_path / "b.pt"), "--limit", "480",
              "--batch-size", "8", "--chunk-size", "8", "--method", "el2n", "--quiet"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "kdfast.cli.score", *common, "--out", str(killed)],
                            stderr=subprocess.PIPE, text=True)
    kill_when(proc, killed / "chunks")
    assert not (killed / "meta.json").exists()
    chunks_before = len(os.listdir(killed / "chunks"))
    code, _, err = _run([*common, "--out", str(killed)], capsys)
    assert code == 1 and "--resume" in err  # an unfinished run is never silently overwritten
    code, _, err = _run([*common, "--out", str(killed), "--resume"], capsys)
    assert code == 0, err
    code, _, err = _run([*common, "--out", str(tmp_path / "whole")], capsys)
    assert code == 0, err
    for name in ("scores.npy", "scores_per_model.npy"):
        np.testing.assert_array_equal(np.load(killed / name), np.load(tmp_path / "whole" / name))
    assert chunks_before >= 1
    before = (killed / "meta.json").read_text()
    code, _, err = _run([c for c in common if c != "--quiet"] + ["--out", str(killed), "--resume"], capsys)
    assert code == 0 and "nothing to do" in err and (killed / "meta.json").read_text() == before


def test_resume_mid_training_keeps_the_forgetting_state(tmp_path, capsys):
    # 16 steps per epoch: after seed 1's first epoch, 64 steps remain for the kill to land in
    common = ["--method", "forgetting", "--model", "mlp", "--limit", "128", "--train-epochs", "5", "--seeds", "2",
              "--train-batch-size", "8", "--quiet"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "kdfast.cli.score", *common, "--out", str(killed)],
                            stderr=subprocess.PIPE, text=True)
    kill_when(proc, killed / "models", suffix="seed1.partial.pt")  # seed 0 done, seed 1 one epoch in
    assert (killed / "models" / "seed0.pt").exists() and not (killed / "models" / "seed1.pt").exists()
    code, _, err = _run([*common, "--out", str(killed), "--resume"], capsys)
    assert code == 0, err
    code, _, err = _run([*common, "--out", str(tmp_path / "whole")], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.load(killed / "scores_per_model.npy"),
                                  np.load(tmp_path / "whole" / "scores_per_model.npy"))
    for s in range(2):
        name = f"models/seed{s}.pt"
        assert file_sha256(killed / name) == file_sha256(tmp_path / "whole" / name)


def test_resume_with_other_settings_is_refused_naming_each_field(tmp_path, capsys):
    # a run killed after model 1, resumed with other epochs and lr, used to mix the two runs
    common = ["--model", "mlp", "--limit", "64", "--seeds", "2", "--train-batch-size", "16", "--quiet"]
    out = tmp_path / "run"
    code, _, err = _run([*common, "--train-epochs", "2", "--out", str(out)], capsys)
    assert code == 0, err
    (out / "meta.json").unlink()  # as if killed before the end: seed 0's model is on disk
    (out / "models" / "seed1.pt").unlink()
    code, _, err = _run([*common, "--train-epochs", "3", "--lr", "0.2", "--out", str(out), "--resume"], capsys)
    assert code == 1 and "holds another job" in err
    assert "--lr: 0.05 in the run, 0.2 now" in err and "--train-epochs: 2 in the run, 3 now" in err
    assert not (out / "models" / "seed1.pt").exists() and not (out / "meta.json").exists()  # nothing ran
    job = json.loads((out / "job.json").read_text())
    assert job["identity"]["train_epochs"] == 2 and job["config"]["lr"] == 0.05  # the record is the first run's
    code, _, err = _run([*common, "--train-epochs", "3", "--lr", "0.2", "--out", str(out), "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((out / "meta.json").read_text())["epochs"] == 3


def test_a_failed_start_leaves_nothing_that_blocks_the_corrected_rerun(tmp_path, capsys):
    # a bad checkpoint used to leave config.json behind, so the fixed command was refused
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"nope": torch.zeros(1)}}, bad)
    out = tmp_path / "run"
    code, _, err = _run(["--checkpoint", str(bad), "--out", str(out), "--quiet"], capsys)
    assert code == 1 and "does not fit" in err or "checkpoint" in err
    assert not out.exists()
    checkpoint(tmp_path / "a.pt")
    code, _, err = _run(["--checkpoint", str(tmp_path / "a.pt"), "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    # the same into a folder that existed before: only the job record was written, and it is gone again
    out2 = tmp_path / "existing"
    out2.mkdir()
    code, _, err = _run(["--checkpoint", str(bad), "--out", str(out2), "--quiet"], capsys)
    assert code == 1 and out2.exists() and not list(out2.iterdir())


@pytest.mark.parametrize("argv, code, message", [
    # argparse quotes the choices on some Python versions and not on others
    (["--dataset", "mnist"], 2, ("invalid choice: 'mnist' (choose from ", "digits", "cifar10", "imagenet")),
    (["--method", "entropy"], 2, ("invalid choice: 'entropy' (choose from ", "el2n", "grand-last", "forgetting")),
    (["--model", "vgg"], 2, ("model must be one of mlp, cnn", "resnet110", "wrn40_2", "resnet50", "torchvision:NAME or "
                             "timm:NAME, got 'vgg'")),
    (["--model", "torchvision:vgg99"], 2, "torchvision.models has no constructor 'vgg99'"),
    (["--model", "torchvision:resnet50:IMAGENET1K_V2"], 2, "kdfast never downloads weights"),
    (["--num-classes", "0"], 2, "--num-classes must be a positive integer, got 0"),
    (["--dataset", "cifar10"], 2, "--dataset cifar10 needs --data-root"),
    (["--batch-size", "0", "--seeds", "0"], 2, "--seeds must be a positive integer, got 0; --batch-size must be a positive integer, got 0"),
    (["--train-epochs", "0", "--lr", "0"], 2,  # the training recipe's own checks, in the flags' names
     "--train-epochs must be a positive integer, got 0; --lr must be a finite number > 0, got 0.0"),
    (["--checkpoint", "nope.pt"], 2, "--checkpoint nope.pt does not exist"),
    (["--checkpoint", "{ck}", "--train-epochs", "2"], 2, "give --checkpoint or --train-epochs/--seeds, not both"),
    (["--method", "forgetting", "--checkpoint", "{ck}"], 2, "forgetting is measured while training"),
    (["--save-logits"], 2, "--save-logits caches one model's logits"),
    (["--topk", "3", "--checkpoint", "{ck}"], 2, "--topk keeps the K largest logits of --save-logits' cache"),
    (["--topk", "11", "--save-logits", "--checkpoint", "{ck}"], 2, "--topk 11 keeps more logits than the 10 classes"),
    (["--method", "random", "--seeds", "2"], 2, "--method random uses no model"),
    (["--out", "{tmp}", "--overwrite"], 1, "holds no kdfast run; choose another folder"),
    (["--resume", "--overwrite"], 2, "give --resume or --overwrite, not both"),
    (["--device", "tpu:x"], 2, "--device must be like cpu, cuda or cuda:1"),
    (["--split", "val"], 2, "split for 'digits' must be one of train, test, all"),
    (["--dataset", "cifar10", "--data-root", "{tmp}/nowhere"], 1, "does not exist or is not a directory"),
    (["--dataset", "cifar10", "--data-root", "{tmp}"], 1, "expected ROOT/cifar-10-batches-py"),
    (["--dataset", "cifar10", "--data-root", "{cifar}", "--seeds", "1"], 1, "label 10 at index 1 is outside [0, 10)"),
    (["--dataset", "folder", "--data-root", "{broken}", "--model", "resnet8", "--checkpoint", "{ck3}",
      "--image-size", "8", "--num-workers", "1"], 1, "cannot read image"),
    (["--checkpoint", "{wrong}"], 1, "does not fit model"),
])
def test_every_error_is_one_line_with_its_exit_code(tmp_path, capsys, monkeypatch, argv, code, message):
    monkeypatch.chdir(tmp_path)
    checkpoint(tmp_path / "ck.pt")
    checkpoint(tmp_path / "wrong.pt", name="mlp")
    checkpoint(tmp_path / "ck3.pt", name="resnet8", num_classes=3, in_channels=3)
    write_cifar(tmp_path / "cifar", n=3, labels=[1, 10, 2])
    write_image_folder(tmp_path / "broken")
    (tmp_path / "broken" / "emu" / "img2.JPEG").write_bytes(b"garbage")
    fill = {"ck": str(tmp_path / "ck.pt"), "wrong": str(tmp_path / "wrong.pt"), "ck3": str(tmp_path / "ck3.pt"),
            "tmp": str(tmp_path), "cifar": str(tmp_path / "cifar"), "broken": str(tmp_path / "broken")}
    argv = [a.format(**fill) for a in argv]
    got, out, err = _run(argv + ([] if "--out" in argv else ["--out", str(tmp_path / "o")]) + ["--quiet"], capsys)
    assert got == code and out == ""
    assert all(m in err for m in ((message,) if isinstance(message, str) else message)), err
    assert len(err.strip().splitlines()) == 1 and err.startswith("kdfast-score: error: "), err
    assert "Traceback" not in err and "DataError:" not in err  # worker errors arrive unwrapped


def test_debug_prints_the_traceback(tmp_path, capsys):
    code, _, err = _run(["--dataset", "cifar10", "--data-root", str(tmp_path), "--debug", "--out", str(tmp_path / "o")],
                        capsys)
    assert code == 1 and "Traceback" in err and err.strip().endswith(err.strip().splitlines()[-1])


def test_env_prints_a_paste_ready_report(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    import re
    assert out.startswith("```") and out.rstrip().endswith("```") and "backend torch" in out
    assert re.search(rf"^torch +{re.escape(torch.__version__)}$", out, re.M)


def test_umbrella_without_a_command_is_a_usage_error(capsys):
    assert main([]) == 2 and "a command is required" in capsys.readouterr().err


def test_liprune_is_wired_through_liprune_batch_scores(tmp_path, capsys, monkeypatch):
    """The CLI's part of `--method liprune`: call liprune_batch_scores per model, write scores and batch ids."""
    import types
    calls = []

    def liprune_batch_scores(model, dataset, batch_size, *, seed=0, device=None, progress=True, **kw):
        calls.append((len(dataset), batch_size, seed, str(device)))
        n = len(dataset)
        batch_ids = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) // batch_size
        first = next(model.parameters()).detach().flatten()[0].abs().item()
        return (batch_ids.float() + first).float(), batch_ids  # each example carries its batch's value

    monkeypatch.setitem(sys.modules, "kdfast.scoring.liprune",
                        types.SimpleNamespace(liprune_batch_scores=liprune_batch_scores))
    checkpoint(tmp_path / "a.pt", seed=1)
    checkpoint(tmp_path / "b.pt", seed=2)
    code, _, err = _run(["--method", "liprune", "--checkpoint", str(tmp_path / "a.pt"), "--checkpoint",
                         str(tmp_path / "b.pt"), "--batch-size", "50", "--limit", "200", "--seed", "5",
                         "--out", str(tmp_path / "run"), "--quiet"], capsys)
    assert code == 0, err
    assert calls == [(200, 50, 5, "cpu")] * 2
    ids = np.load(tmp_path / "run" / "batch_ids.npy")
    per = np.load(tmp_path / "run" / "scores_per_model.npy")
    assert sorted(np.bincount(ids)) == [50] * 4 and per.shape == (2, 200)
    np.testing.assert_allclose(per[0] - ids, per[0][0] - ids[0], rtol=0, atol=1e-6)
    api = kdfast.score(load_checkpoint(create_model("cnn", num_classes=10, in_channels=1), tmp_path / "a.pt"),
                       torch.utils.data.Subset(load_dataset("digits"), range(200)), "liprune", batch_size=50, seed=5,
                       progress=False)
    np.testing.assert_array_equal(api.numpy(), per[0])


def test_batched_jpeg_decode_matches_the_pil_path(tmp_path, capsys):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        os.makedirs(tmp_path / "imgs" / c)
        for i in range(5):  # smooth content, so JPEG keeps it close to what was drawn
            base = np.kron(rng.integers(0, 256, (5, 7, 3)), np.ones((8, 8, 1))).astype(np.uint8)
            Image.fromarray(base).save(tmp_path / "imgs" / c / f"img{i}.JPEG", quality=95)
    checkpoint(tmp_path / "m.pt", name="resnet8", num_classes=2, in_channels=3)
    runs = {}
    for decode in ("pil", "cpu"):
        out_dir = tmp_path / decode
        code, _, err = _run(["--dataset", "folder", "--data-root", str(tmp_path / "imgs"), "--model", "resnet8",
                             "--checkpoint", str(tmp_path / "m.pt"), "--image-size", "32", "--decode", decode,
                             "--method", "el2n", "--out", str(out_dir), "--quiet"], capsys)
        assert code == 0, err
        runs[decode] = np.load(out_dir / "scores.npy")
    # the batched decoder is within one 8-bit level of PIL's eval view per pixel
    np.testing.assert_allclose(runs["cpu"], runs["pil"], rtol=2e-2, atol=1e-3)


def test_decode_on_a_data_set_without_image_files_is_a_usage_error(tmp_path, capsys):
    code, _, err = _run(["--decode", "cpu", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "decode" in err and len(err.strip().splitlines()) == 1, err


def test_models_are_checked_on_a_held_out_split_recorded_in_meta(tmp_path, capsys):
    code, out, err = _run(["--model", "mlp", "--limit", "300", "--seeds", "1", "--train-epochs", "2", "--out",
                           str(tmp_path / "r"), "--quiet"], capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    held = meta["held_out"]
    assert held["fraction"] == 0.05 and held["num_examples"] == len(held["indices"]) == 15  # 5% of each class
    assert meta["warnings"] == [] and "held out: " in out
    check = meta["checkpoints"][0]
    data = load_dataset("digits")
    model = load_checkpoint(create_model("mlp", num_classes=10, in_channels=1), tmp_path / "r" / "models" / "seed0.pt")
    with torch.no_grad():
        right = (model.eval()(torch.stack([data[i][0] for i in range(300)])).argmax(1) == data.targets[:300]).double()
    trained = np.setdiff1d(np.arange(300), held["indices"])
    assert check["held_out_acc"] == pytest.approx(right[held["indices"]].mean().item(), abs=1e-12)
    assert check["train_acc"] == pytest.approx(right[trained].mean().item(), abs=1e-12)
    # a diverging run: warned on stderr and in meta.json
    code, out, err = _run(["--model", "mlp", "--limit", "300", "--seeds", "1", "--train-epochs", "2", "--lr", "1000",
                           "--out", str(tmp_path / "d"), "--quiet"], capsys)
    assert code == 0, err
    notes = json.loads((tmp_path / "d" / "meta.json").read_text())["warnings"]
    assert any("the training loss diverged" in n for n in notes) and any("did not learn" in n for n in notes)
    assert all(f"kdfast-score: warning: {n}" in err for n in notes)
    code, _, err = _run(["--method", "forgetting", "--holdout-fraction", "0.1", "--out", str(tmp_path / "f")], capsys)
    assert code == 2 and "takes no --holdout-fraction" in err


def test_memorising_and_diverging_curves_are_named():
    from kdfast.pipelines.score import diverged_warnings, learning_warnings, memorised_warnings
    assert memorised_warnings([1.0, 0.9], [0.4, 0.8]) == [
        "model 1: held-out accuracy 0.400 is far below its accuracy 1.000 on the examples it trained on; it memorised "
        "them rather than learned (fewer epochs, augmentation or more data may help)"]
    assert diverged_warnings([[2.3, 1.1, 0.7]], 10) == []
    assert "nan at epoch 2" in diverged_warnings([[2.3, float("nan")]], 10)[0]
    assert "30 at epoch 3" in diverged_warnings([[2.3, 1.0, 30.0]], 100)[0]  # 30 x its best, below 10 ln 100
    history = [{"train_loss": 1.1, "train_acc": 0.33, "eval_loss": 1.1, "eval_acc": 0.333},
               {"train_loss": 1.0, "train_acc": 0.34, "eval_loss": 6.4e6, "eval_acc": 0.333}]
    notes = learning_warnings(history, np.array([0, 1, 2] * 10), 3, "teacher")
    assert [n.split(":")[1].split("(")[0].strip() for n in notes] == [
        "the held-out loss diverged", "held-out accuracy 0.333 is at the majority-class share 0.333; it did not learn"]


def test_the_eval_accuracy_pass_resumes_after_sigkill(tmp_path, capsys):
    checkpoint(tmp_path / "a.pt", seed=3)
    common = ["--checkpoint", str(tmp_path / "a.pt"), "--limit", "480", "--batch-size", "8", "--chunk-size", "8",
              "--method", "loss", "--quiet"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "kdfast.cli.score", *common, "--out", str(killed)],
                            stderr=subprocess.PIPE, text=True)
    kill_when(proc, killed / "accuracy-chunks")
    assert not (killed / "chunks").exists()  # killed in the accuracy pass, before scoring
    chunks = sorted(f for f in os.listdir(killed / "accuracy-chunks") if f.endswith(".npz"))
    code, _, err = _run([*common, "--out", str(killed), "--resume"], capsys)
    assert code == 0, err
    code, _, err = _run([*common, "--out", str(tmp_path / "whole")], capsys)
    assert code == 0, err
    meta, whole = (json.loads((folder / "meta.json").read_text()) for folder in (killed, tmp_path / "whole"))
    assert meta["checkpoints"][0]["eval_acc"] == whole["checkpoints"][0]["eval_acc"] and chunks
    np.testing.assert_array_equal(np.load(killed / "scores.npy"), np.load(tmp_path / "whole" / "scores.npy"))
    assert not (killed / "accuracy-chunks").exists()


def test_a_second_run_into_a_live_runs_folder_fails_at_once_naming_its_pid(tmp_path, capsys):
    common = ["--model", "mlp", "--limit", "256", "--seeds", "1", "--train-epochs", "50", "--train-batch-size", "8",
              "--quiet", "--out", str(tmp_path / "conc")]
    proc = subprocess.Popen([sys.executable, "-m", "kdfast.cli.score", *common, "--lr", "0.01"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "conc" / "job.json").exists() and time.time() < deadline:
            time.sleep(0.01)
        for extra in ([], ["--resume"], ["--overwrite"]):
            code, _, err = _run([*common, "--lr", "0.02", *extra], capsys)
            assert code == 1 and f"is in use by a running kdfast job (pid {proc.pid})" in err, err
            assert len(err.strip().splitlines()) == 1
        assert json.loads((tmp_path / "conc" / "job.json").read_text())["identity"]["lr"] == 0.01
        assert proc.poll() is None  # the live run goes on
    finally:
        proc.kill()
        proc.wait()

def test_grand_on_a_torchvision_model_by_name_with_weights_from_a_checkpoint(tmp_path, capsys):
    """kdfast-score --model torchvision:vit_b_16 --method grand: every parameter through rules or use capture."""
    write_image_folder(tmp_path / "imgs")
    torch.manual_seed(0)
    model = create_model("torchvision:vit_b_16", num_classes=3, image_size=16)  # one 16x16 patch + class token
    torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, tmp_path / "w.pt")  # smaller file
    out_dir = tmp_path / "run"
    code, out, err = _run(["--dataset", "folder", "--data-root", str(tmp_path / "imgs"), "--model",
                           "torchvision:vit_b_16", "--method", "grand", "--checkpoint", str(tmp_path / "w.pt"),
                           "--image-size", "16", "--batch-size", "4", "--num-workers", "0", "--out", str(out_dir),
                           "--quiet"], capsys)
    assert code == 0, err
    scores = np.load(out_dir / "scores.npy")
    assert scores.shape == (9,) and np.isfinite(scores).all() and (scores > 0).all()
    assert json.loads((out_dir / "meta.json").read_text())["method"] == "grand"
    # the head sized apart from the data: a 5-output checkpoint scoring the 3-class folder
    torch.save(create_model("torchvision:vit_b_16", num_classes=5, image_size=16).state_dict(), tmp_path / "w5.pt")
    code, _, err = _run(["--dataset", "folder", "--data-root", str(tmp_path / "imgs"), "--model", "torchvision:vit_b_16",
                         "--num-classes", "5", "--method", "el2n", "--checkpoint", str(tmp_path / "w5.pt"),
                         "--image-size", "16", "--num-workers", "0", "--out", str(tmp_path / "run5"), "--quiet"], capsys)
    assert code == 0, err


def test_timm_models_by_name():
    pytest.importorskip("timm")
    model = create_model("timm:vit_tiny_patch16_224", num_classes=3, image_size=32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert create_model("timm:resnet18", num_classes=4, image_size=32).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    with pytest.raises(InvalidArgumentError, match="timm has no model 'nope_net'"):
        create_model("timm:nope_net", num_classes=3)


def test_timm_absent_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(InvalidArgumentError, match=r"needs timm, an optional extra: pip install 'kdfast\[models\]'"):
        create_model("timm:resnet18", num_classes=3)
