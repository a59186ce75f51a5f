"""kdfast-prune and kdfast-distill end to end on digits (tiny epochs): files, stdout, exit codes, resume,
teacher checkpoints and caches, and every error path."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch

from kdfast.cli.main import distill_main, main, prune_main
from kdfast.data import labels_fingerprint, load_dataset
from kdfast.distill.step import alpha_for_fraction
from kdfast.pruning.selection import prune


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture()
def scores_dir(tmp_path, digits):
    folder = tmp_path / "scores"
    folder.mkdir()
    scores = torch.rand(len(digits)).numpy().astype(np.float32)
    np.save(folder / "scores.npy", scores)
    meta = {"method": "el2n", "dataset": "digits", "split": "train", "num_examples": len(digits),
            "labels_fingerprint": labels_fingerprint(digits.targets)}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder, scores


def _one_error_line(err, prog):
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error:"), err
    return lines[0]


# ------------------------------------------------------------------------------------------- prune
def test_prune_class_balanced_moderate_from_a_score_folder(scores_dir, digits, tmp_path, capsys):
    folder, scores = scores_dir
    out = tmp_path / "sel" / "keep.npy"
    rc = prune_main(["--scores", str(folder), "--fraction", "0.3", "--mode", "moderate", "--class-balanced",
                     "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    keep = np.load(out)
    expected = prune(scores, 0.3, "moderate", labels=digits.targets, class_balanced=True).numpy()
    assert keep.dtype == np.int64 and np.array_equal(keep, expected)
    assert f"kept {len(expected)} of {len(digits)} examples" in captured.out
    assert "per class: 0: " in captured.out
    record = json.loads((tmp_path / "sel" / "keep.npy.json").read_text())
    assert record["num_kept"] == len(expected) and record["labels_fingerprint"] == labels_fingerprint(digits.targets)


def test_prune_bare_npy_with_labels_file_and_umbrella(tmp_path, capsys):
    scores = np.random.default_rng(0).random(50).astype(np.float32)
    labels = np.arange(50) % 5
    np.save(tmp_path / "s.npy", scores)
    np.save(tmp_path / "y.npy", labels)
    rc = main(["prune", "--scores", str(tmp_path / "s.npy"), "--fraction", "0.2", "--mode", "ccs", "--class-balanced",
               "--labels", str(tmp_path / "y.npy"), "--ccs-strata", "3", "--out", str(tmp_path / "k.npy"), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.err == ""
    keep = np.load(tmp_path / "k.npy")
    assert np.array_equal(np.bincount(labels[keep]), [2] * 5)


def test_prune_summarises_many_classes_in_one_short_line(tmp_path, capsys):
    labels = np.arange(1000) % 50
    np.save(tmp_path / "s.npy", np.random.default_rng(0).random(1000).astype(np.float32))
    np.save(tmp_path / "y.npy", labels)
    rc = prune_main(["--scores", str(tmp_path / "s.npy"), "--fraction", "0.5", "--class-balanced", "--labels",
                     str(tmp_path / "y.npy"), "--out", str(tmp_path / "k.npy"), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("per class"))
    assert line == "per class (50 classes): min 10 (class 0), median 10, max 10 (class 0)" and len(line) < 120


@pytest.mark.parametrize("argv, code, match", [
    (["--fraction", "0"], 2, r"--fraction must be in \(0, 1\]"),
    (["--fraction", "0.5", "--ccs-beta", "1"], 2, r"--ccs-beta must be in \[0, 1\)"),
    (["--fraction", "0.5", "--mode", "medium"], 2, "invalid choice: 'medium'"),
    (["--fraction", "0.5", "--out", "keep.txt"], 2, "--out must name a .npy file"),
    (["--fraction", "0.5", "--labels", "missing.npy"], 2, "--labels missing.npy does not exist"),
])
def test_prune_usage_errors(scores_dir, tmp_path, capsys, argv, code, match):
    folder, _ = scores_dir
    base = ["--scores", str(folder), "--out", str(tmp_path / "k.npy")]
    rc = prune_main(base + argv)
    line = _one_error_line(capsys.readouterr().err, "kdfast-prune")
    assert rc == code
    assert __import__("re").search(match, line), line


def test_prune_failures(tmp_path, digits, capsys):
    np.save(tmp_path / "nan.npy", np.array([0.1, np.nan, 0.3], dtype=np.float32))
    (tmp_path / "empty").mkdir()
    bad_meta = tmp_path / "other"
    bad_meta.mkdir()
    np.save(bad_meta / "scores.npy", np.random.rand(len(digits)).astype(np.float32))
    (bad_meta / "meta.json").write_text(json.dumps({"dataset": "digits", "labels_fingerprint": "0" * 64}))
    cases = [
        (["--scores", str(tmp_path / "nan.npy"), "--fraction", "0.5"], 1, "index 1 holds nan"),
        (["--scores", str(tmp_path / "empty"), "--fraction", "0.5"], 1, "holds no scores.npy"),
        (["--scores", str(tmp_path / "nan.npy"), "--fraction", "0.5", "--class-balanced"], 2, "needs labels"),
        (["--scores", str(bad_meta), "--fraction", "0.5", "--class-balanced"], 1, "labels_fingerprint differ"),
        (["--scores", str(tmp_path / "none.npy"), "--fraction", "0.5"], 2, "does not exist"),
    ]
    for argv, code, match in cases:
        rc = prune_main(argv + ["--out", str(tmp_path / "k.npy")])
        line = _one_error_line(capsys.readouterr().err, "kdfast-prune")
        assert rc == code and match in line, (argv, rc, line)


def test_prune_never_overwrites_its_input_nor_writes_into_a_job_folder(scores_dir, tmp_path, capsys):
    from kdfast.io import Job
    folder, scores = scores_dir
    np.save(tmp_path / "y.npy", np.arange(len(scores)) % 10)
    job = Job.start(tmp_path / "ref", "score", {"method": "el2n"})
    np.save(tmp_path / "ref" / "scores.npy", scores)
    job.complete()
    job.release()
    cases = [
        (["--scores", str(folder), "--out", str(folder / "scores.npy")], "would overwrite the input --scores file"),
        (["--scores", str(folder / "scores.npy"), "--out", str(folder / "scores.npy")], "would overwrite the input"),
        (["--scores", str(folder), "--class-balanced", "--labels", str(tmp_path / "y.npy"), "--out",
          str(tmp_path / "y.npy")], "would overwrite the input --labels file"),
        (["--scores", str(tmp_path / "ref"), "--out", str(tmp_path / "ref" / "scores.npy")], "would overwrite"),
        (["--scores", str(folder), "--out", str(tmp_path / "ref" / "keep.npy")], "inside the kdfast run folder"),
        (["--scores", str(folder), "--out", str(tmp_path / "ref" / "sub" / "keep.npy")], "inside the kdfast run"),
    ]
    for argv, match in cases:
        rc = prune_main(argv + ["--fraction", "0.5"])
        line = _one_error_line(capsys.readouterr().err, "kdfast-prune")
        assert rc == 2 and match in line, (argv, rc, line)
    assert np.array_equal(np.load(folder / "scores.npy"), scores) and np.load(tmp_path / "ref" / "scores.npy").dtype \
        == np.float32
    assert not (tmp_path / "ref" / "keep.npy").exists() and not (tmp_path / "ref" / "sub").exists()


# ----------------------------------------------------------------------------------------- distill
FAST = ["--model", "mlp", "--epochs", "1", "--batch-size", "128", "--quiet"]


def _metrics(folder):
    with open(folder / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_distill_trains_teacher_then_student_on_kept_subset_and_resumes(tmp_path, digits, capsys):
    keep = prune(torch.rand(len(digits)), 0.2, "random").numpy()
    np.save(tmp_path / "keep.npy", keep)
    out = tmp_path / "run"
    argv = FAST + ["--train-teacher", "--teacher-epochs", "2", "--keep", str(tmp_path / "keep.npy"),
                   "--out", str(out)]
    rc = distill_main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for name in ("student.pt", "checkpoint.pt", "metrics.csv", "accuracy.png", "job.json", "summary.json",
                 "teacher/teacher.pt", "teacher/metrics.csv"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    f = len(keep) / len(digits)
    assert summary["num_kept"] == len(keep) and summary["alpha"] == pytest.approx(alpha_for_fraction(f))
    assert f"alpha = {alpha_for_fraction(f):.3g}" in captured.out and "eval acc" in captured.out
    assert len(_metrics(out)) == 1 and len(_metrics(out / "teacher")) == 2
    assert float(_metrics(out / "teacher")[-1]["eval_acc"]) > 0.5  # the teacher learned something
    # rerunning into the same folder needs --resume; a finished run resumes to the same student
    assert distill_main(argv) == 1
    assert "already holds a distill run" in capsys.readouterr().err
    before = torch.load(out / "student.pt", weights_only=True)
    assert distill_main(argv + ["--resume"]) == 0
    after = torch.load(out / "student.pt", weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(_metrics(out)) == 1


def test_distill_with_teacher_checkpoint_other_architecture_and_cache(tmp_path, digits, capsys):
    from kdfast.models import create_model, model_fingerprint
    from kdfast.distill.teacher_cache import TeacherCache
    torch.manual_seed(0)
    teacher = create_model("cnn", num_classes=10, in_channels=1, image_size=8).eval()
    torch.save(teacher.state_dict(), tmp_path / "t.pt")
    rc = distill_main(FAST + ["--teacher", str(tmp_path / "t.pt"), "--teacher-model", "cnn", "--alpha", "0.7",
                              "--out", str(tmp_path / "a")])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["alpha"] == 0.7
    # the same teacher from a cache of its logits
    for name, fp in (("good", model_fingerprint(teacher)), ("bad", "f" * 64)):
        writer = TeacherCache.create(tmp_path / name, num_examples=len(digits), num_classes=10,
                                     dataset_fingerprint=labels_fingerprint(digits.targets), teacher_fingerprint=fp)
        with torch.no_grad():
            x = torch.stack([digits[i][0] for i in range(len(digits))])
            writer.write(torch.arange(len(digits)), teacher(x))
        writer.close()
    rc = distill_main(FAST + ["--teacher", str(tmp_path / "t.pt"), "--teacher-model", "cnn", "--teacher-cache",
                              str(tmp_path / "good"), "--out", str(tmp_path / "b")])
    assert rc == 0, capsys.readouterr().err
    rc = distill_main(FAST + ["--teacher", str(tmp_path / "t.pt"), "--teacher-model", "cnn", "--teacher-cache",
                              str(tmp_path / "bad"), "--out", str(tmp_path / "c")])
    line = _one_error_line(capsys.readouterr().err, "kdfast-distill")
    assert rc == 1 and "another teacher" in line
    # a checkpoint of another architecture is a clear failure
    rc = distill_main(FAST + ["--teacher", str(tmp_path / "t.pt"), "--out", str(tmp_path / "d")])
    line = _one_error_line(capsys.readouterr().err, "kdfast-distill")
    assert rc == 1 and "does not fit" in line
    assert not (tmp_path / "d").exists()  # nothing left to block the corrected command
    rc = distill_main(FAST + ["--teacher", str(tmp_path / "t.pt"), "--teacher-model", "cnn", "--out",
                              str(tmp_path / "d")])
    assert rc == 0, capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--alpha", "0.5"], "distills from a teacher: pass --teacher PATH"),
    (["--alpha", "2"], r"--alpha must be a number in \[0, 1\].*got 2.0"),
    (["--alpha", "x"], r"--alpha must be a number in \[0, 1\] or 'auto', got 'x'"),
    (["--alpha", "0", "--temperature", "0"], "--temperature must be a finite number > 0, got 0.0"),
    (["--alpha", "0", "--milestones", "5,x"], "--milestones must be comma-separated"),
    (["--alpha", "0", "--milestones", "9,3"], r"--milestones must be non-decreasing positive epochs.*got \(9, 3\)"),
    (["--alpha", "0", "--epochs", "0", "--lr", "-1"],
     "--epochs must be a positive integer, got 0; --lr must be a finite number > 0, got -1.0"),
    (["--alpha", "0", "--momentum", "-1"], "--momentum must be a finite number >= 0, got -1.0"),
    (["--alpha", "0", "--teacher-fraction", "0"], r"--teacher-fraction must be a number in \(0, 1\]"),
    (["--alpha", "0", "--schedule", "step", "--recipe", "digits"], "schedule='step' needs milestones"),
    (["--alpha", "0", "--alpha-schedule", "0.1-1"], "--alpha-schedule must look like"),
    (["--teacher", "nope.pt", "--train-teacher"], "give --teacher or --train-teacher, not both"),
    (["--teacher", "nope.pt"], "--teacher nope.pt does not exist"),
    (["--alpha", "0", "--keep", "nope.npy"], "--keep nope.npy does not exist"),
    (["--alpha", "0", "--dataset", "cifar10", "--data-root", ".", "--teacher-cache", ".", "--augment"],
     "--teacher-cache needs --no-augment"),
    (["--alpha", "0", "--dataset", "cifar10"], "--dataset cifar10 needs --data-root"),
    (["--alpha", "0", "--model", "vgg"], "model must be one of mlp, cnn"),
])
def test_distill_usage_errors(tmp_path, capsys, argv, match):
    rc = distill_main(argv + ["--out", str(tmp_path / "o")])
    line = _one_error_line(capsys.readouterr().err, "kdfast-distill")
    assert rc == 2 and __import__("re").search(match, line), line


def test_distill_reports_every_problem_at_once(tmp_path, capsys):
    rc = distill_main(["--alpha", "2", "--epochs", "0", "--temperature", "0", "--out", str(tmp_path / "o")])
    line = _one_error_line(capsys.readouterr().err, "kdfast-distill")
    assert rc == 2 and "--alpha" in line and "--epochs" in line and "--temperature" in line


def test_distill_keep_file_errors(tmp_path, digits, capsys):
    np.save(tmp_path / "far.npy", np.array([0, len(digits)]))
    np.save(tmp_path / "float.npy", np.array([0.5, 1.5]))
    np.save(tmp_path / "ok.npy", np.arange(10))
    (tmp_path / "ok.npy.json").write_text(json.dumps({"labels_fingerprint": "0" * 64}))
    for name, match in (("far", "distinct indices in"), ("float", "integer array"), ("ok", "another data set")):
        rc = distill_main(FAST + ["--alpha", "0", "--keep", str(tmp_path / f"{name}.npy"),
                                  "--out", str(tmp_path / name)])
        line = _one_error_line(capsys.readouterr().err, "kdfast-distill")
        assert rc == 1 and match in line, line


def test_distill_recipe_defaults_and_milestone_scaling():
    import argparse

    from kdfast.cli import distill
    sub = argparse.ArgumentParser().add_subparsers()
    parser = distill.add_parser(sub)
    resolved = distill.resolve(parser.parse_args(["--dataset", "cifar100", "--data-root", ".", "--alpha", "0",
                                                  "--out", "/nonexistent/x"]))
    recipe = resolved.recipe
    assert recipe == distill.RECIPES["cifar"]
    assert (recipe.lr, recipe.batch_size, recipe.epochs, recipe.schedule, recipe.milestones) == (0.05, 64, 240, "step",
                                                                                                 (150, 180, 210))
    assert resolved.args.model == "resnet32" and resolved.args.augment is True
    assert resolved.args.epochs is None  # the options stay as given; the job's record holds the recipe's values
    config = resolved.config()
    assert (config["epochs"], config["milestones"], config["num_workers"]) == (240, (150, 180, 210), 0)
    recipe = distill.resolve(parser.parse_args(["--dataset", "cifar10", "--data-root", ".", "--alpha", "0", "--epochs",
                                                "24", "--out", "/nonexistent/x"])).recipe
    assert recipe.milestones == (15, 18, 21)
    recipe = distill.resolve(parser.parse_args(["--dataset", "cifar10", "--data-root", ".", "--alpha", "0", "--epochs",
                                                "24", "--milestones", "5,7", "--out", "/nonexistent/x"])).recipe
    assert recipe.milestones == (5, 7)  # given milestones are kept as they are
    recipe = distill.resolve(parser.parse_args(["--dataset", "imagenet", "--data-root", ".", "--alpha", "0",
                                                "--out", "/nonexistent/x"])).recipe
    assert (recipe.lr, recipe.batch_size, recipe.schedule) == (0.1, 128, "cosine")


def test_prune_whole_batches_of_a_liprune_run(tmp_path, capsys):
    """Every example carries its fixed batch's score; the round(f * B) batches with the largest scores are
    kept whole, ties to the lower batch id."""
    folder = tmp_path / "liprune"
    folder.mkdir()
    batch_ids = torch.randperm(50).numpy() % 7  # 7 batches of 7 or 8 examples, interleaved in data set order
    per_batch = np.array([0.5, 2.0, 1.0, 2.0, 0.1, 3.0, 0.7], dtype=np.float32)
    np.save(folder / "scores.npy", per_batch[batch_ids])
    np.save(folder / "batch_ids.npy", batch_ids)
    (folder / "meta.json").write_text(json.dumps({"method": "liprune"}))
    rc = prune_main(["--scores", str(folder), "--fraction", "0.4", "--whole-batches", "--out", str(tmp_path / "k.npy")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    keep = np.load(tmp_path / "k.npy")
    assert np.array_equal(keep, np.flatnonzero(np.isin(batch_ids, [5, 1, 3])))  # round(0.4 * 7) = 3 batches
    assert "whole batches of 7" in captured.out
    assert json.loads((tmp_path / "k.npy.json").read_text())["num_batches"] == 7

    rc = prune_main(["--scores", str(folder), "--fraction", "0.4", "--whole-batches", "--mode", "easy",
                     "--out", str(tmp_path / "k.npy")])
    assert rc == 2 and "--whole-batches" in _one_error_line(capsys.readouterr().err, "kdfast-prune")
    (folder / "batch_ids.npy").unlink()
    rc = prune_main(["--scores", str(folder), "--fraction", "0.4", "--whole-batches", "--out", str(tmp_path / "k.npy")])
    assert rc == 2 and "no batch_ids.npy" in _one_error_line(capsys.readouterr().err, "kdfast-prune")


# ------------------------------------------------------------------------------------ jobs and data identity
def test_distill_resume_with_another_alpha_is_refused(tmp_path, capsys):
    # problem 1: a run resumed with --alpha 0 used to continue with alpha 0 and report 0 for the whole run
    out = tmp_path / "run"
    argv = FAST + ["--train-teacher", "--teacher-epochs", "1", "--out", str(out)]
    assert distill_main(argv) == 0, capsys.readouterr().err
    first = (out / "summary.json").read_text()
    rc = distill_main(argv + ["--alpha", "0", "--temperature", "2", "--resume"])
    line = _one_error_line(capsys.readouterr().err, "kdfast-distill")
    assert rc == 1 and "--alpha: 'auto' in the run, 0.0 now" in line
    assert "--temperature: 4.0 in the run, 2.0 now" in line
    assert (out / "summary.json").read_text() == first and json.loads((out / "job.json").read_text())[
        "config"]["alpha"] == "auto"
    assert distill_main(argv + ["--alpha", "0", "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["alpha"] == 0.0


def _folder_argv(root):
    return ["--dataset", "folder", "--data-root", str(root), "--image-size", "8", "--model", "mlp"]


def test_renamed_folder_files_are_caught_by_prune_distill_and_the_teacher_cache(tmp_path, capsys):
    # problem 2: renaming files (labels unchanged) used to go unnoticed by every consumer of scores and keep files
    from _fake_datasets import write_image_folder

    from kdfast.cli.main import score_main
    root = tmp_path / "photos"
    write_image_folder(root, per_class=4, size=(10, 10))
    scores = tmp_path / "scores"
    rc = score_main(_folder_argv(root) + ["--train-epochs", "1", "--seeds", "1", "--save-logits", "--quiet",
                                          "--out", str(scores)])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((scores / "meta.json").read_text())
    assert meta["data"]["files_fingerprint"] == meta["files_fingerprint"] is not None
    keep = tmp_path / "keep.npy"
    assert prune_main(["--scores", str(scores), "--fraction", "0.5", "--class-balanced", "--out", str(keep)]) == 0
    record = json.loads((tmp_path / "keep.npy.json").read_text())
    assert record["data"]["files_fingerprint"] == meta["files_fingerprint"]
    assert record["files_list"] == str(scores / "files.txt")
    capsys.readouterr()
    # the same folder still works with the keep file and the cache
    student = _folder_argv(root) + ["--epochs", "1", "--quiet", "--no-augment"]
    assert distill_main(student + ["--keep", str(keep), "--alpha", "0", "--out", str(tmp_path / "ok")]) == 0
    capsys.readouterr()
    (root / "cat" / "img0.JPEG").rename(root / "cat" / "renamed0.JPEG")
    (root / "dog" / "img1.png").rename(root / "dog" / "zz1.png")
    rc = prune_main(["--scores", str(scores), "--fraction", "0.5", "--class-balanced", "--out",
                     str(tmp_path / "k2.npy")])
    line = _one_error_line(capsys.readouterr().err, "kdfast-prune")
    assert rc == 1 and "files_fingerprint" in line, line
    assert "2 files gone: cat/img0.JPEG, dog/img1.png; 2 new: cat/renamed0.JPEG, dog/zz1.png" in line, line
    rc = distill_main(student + ["--keep", str(keep), "--alpha", "0", "--out", str(tmp_path / "k")])
    line = _one_error_line(capsys.readouterr().err, "kdfast-distill")
    assert rc == 1 and f"--keep {keep} was made from another data set" in line and "2 files gone" in line, line
    assert not (tmp_path / "k").exists()  # refused before the job started
    rc = distill_main(student + ["--teacher-cache", str(scores / "teacher-logits"), "--out", str(tmp_path / "c")])
    line = _one_error_line(capsys.readouterr().err, "kdfast-distill")
    assert rc == 1 and "TeacherCache" in line and "2 new: cat/renamed0.JPEG, dog/zz1.png" in line, line


def test_a_bare_keep_file_still_works_with_a_warning(tmp_path, digits, capsys):
    np.save(tmp_path / "keep.npy", np.arange(0, len(digits), 3))
    assert distill_main(FAST + ["--alpha", "0", "--keep", str(tmp_path / "keep.npy"), "--out", str(tmp_path / "o")]) == 0
    warning = [ln for ln in capsys.readouterr().err.splitlines() if "cannot be checked" in ln]
    assert len(warning) == 1 and warning[0].startswith("kdfast-distill: warning: --keep ")


def test_folder_distillation_evaluates_on_a_stratified_held_out_share(tmp_path, capsys):
    # problem 5: an image folder has no test split; every epoch is now evaluated on a held-out share
    from _fake_datasets import write_image_folder

    from kdfast.data import stratified_split
    root = tmp_path / "photos"
    write_image_folder(root, per_class=6, size=(10, 10))
    out = tmp_path / "o"
    rc = distill_main(_folder_argv(root) + ["--epochs", "2", "--alpha", "0", "--val-fraction", "0.34", "--out",
                                            str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    data = load_dataset("folder", root=root, image_size=8)
    _, held = stratified_split(data.targets, 0.34, seed=0)
    assert summary["num_held_out"] == len(held) == 6 and summary["num_kept"] == 12
    assert np.bincount(data.targets[held].numpy()).tolist() == [2, 2, 2]
    assert len(summary["eval_acc_per_epoch"]) == 2 and summary["eval_acc"] == summary["eval_acc_per_epoch"][-1]
    assert "held-out 0.34 of train" in summary["eval"] and "on the held-out 0.34" in captured.out
    assert [float(r["eval_acc"]) for r in _metrics(out)] == summary["eval_acc_per_epoch"]
    # the default for folders holds out 10% (at least one example per class)
    rc = distill_main(_folder_argv(root) + ["--epochs", "1", "--alpha", "0", "--out", str(tmp_path / "d"),
                                            "--quiet"])
    assert rc == 0 and json.loads((tmp_path / "d" / "summary.json").read_text())["num_held_out"] == 3


def test_the_prune_help_example_prints_what_the_command_prints(scores_dir, tmp_path, capsys, monkeypatch):
    # the --help example promised 431 kept where the run keeps 419
    from kdfast.cli.prune import EPILOG
    lines = EPILOG.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.strip().startswith("kdfast-prune --scores runs/digits-el2n"))
    command, promised = lines[i].split(), lines[i + 1].strip()
    folder, _ = scores_dir
    (tmp_path / "runs").mkdir()
    os.symlink(folder, tmp_path / "runs" / "digits-el2n")
    monkeypatch.chdir(tmp_path)
    assert prune_main(command[1:]) == 0
    assert capsys.readouterr().out.splitlines()[0] == promised


def test_prune_checks_a_library_made_score_folder_like_a_cli_made_one(tmp_path, digits, capsys):
    # kdfast.score(out=) writes the same folder as kdfast-score: meta.json with the data identity included
    import kdfast
    from kdfast.data import LabeledSubset
    from kdfast.models import create_model
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=10, in_channels=1)
    scores = kdfast.score(model, digits, "el2n", progress=False, out=tmp_path / "lib", chunk_size=500)
    meta = json.loads((tmp_path / "lib" / "meta.json").read_text())
    assert (meta["method"], meta["direction"], meta["num_examples"]) == ("el2n", "higher is harder", len(digits))
    assert meta["labels_fingerprint"] == labels_fingerprint(digits.targets)
    assert meta["files"] == ["scores.npy", "scores.parquet"]
    assert sorted(os.listdir(tmp_path / "lib")) == ["job.json", "job.lock", "meta.json", "scores.npy",
                                                    "scores.parquet"]  # chunks dropped
    argv = ["--fraction", "0.3", "--mode", "hard", "--class-balanced", "--dataset", "digits"]
    rc = prune_main(["--scores", str(tmp_path / "lib"), *argv, "--out", str(tmp_path / "keep.npy")])
    assert rc == 0, capsys.readouterr().err
    expected = prune(scores, 0.3, "hard", labels=digits.targets, class_balanced=True).numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "keep.npy"), expected)
    # scores of the same number of examples with other labels: refused, as for a kdfast-score folder
    shuffled = LabeledSubset(digits, torch.randperm(len(digits), generator=torch.Generator().manual_seed(1)))
    kdfast.score(model, shuffled, "el2n", progress=False, out=tmp_path / "other")
    capsys.readouterr()
    rc = prune_main(["--scores", str(tmp_path / "other"), *argv, "--out", str(tmp_path / "k2.npy")])
    line = _one_error_line(capsys.readouterr().err, "kdfast-prune")
    assert rc == 1 and "labels_fingerprint differ" in line, line
