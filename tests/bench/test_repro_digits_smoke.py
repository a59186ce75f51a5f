"""The digits reproductions end to end at a few SGD steps, so they cannot rot (their numbers mean nothing here)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("bench.repro.digits_kd", reason="the bench/ folder ships with the repository, not the package")
from bench.repro import digits_kd as repro_digits_kd  # noqa: E402


def test_repro_digits_kd_smoke(tmp_path, capsys):
    assert repro_digits_kd.main(["--smoke", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "digits_kd.md").read_text()
    assert "| random | KD a=auto |" in text and "- the best alpha grows as f shrinks: " in text and "commit " in text
    assert text.count("| holds |") + text.count("| undecidable |") + text.count("| does not hold |") == 54
    saved = json.loads((tmp_path / "digits_kd.json").read_text())
    assert len(saved["runs"]) == 2 and saved["size"]["steps"] == 8
    # the paper's setup by default: class-balanced random pruning, early-training scores, clean labels
    assert saved["size"]["random"] == "class-balanced" and saved["size"]["label_noise"] == 0.0
    assert saved["size"]["early_epochs"] is None and saved["runs"][0]["early_epochs"] == 1
    assert "Random pruning: class-balanced" in text and "after 1 passes over the data (early training)" in text
    assert (tmp_path / "digits_kd.png").stat().st_size > 0
    # the table rebuilds from the saved runs without training
    (tmp_path / "again").mkdir()
    assert repro_digits_kd.main(["--from-json", str(tmp_path / "digits_kd.json"), "--out",
                                 str(tmp_path / "again")]) == 0
    again = (tmp_path / "again" / "digits_kd.md").read_text()
    assert again.startswith(text.rstrip("\n")) and "; rendered from the saved runs at commit " in again


def test_repro_feature_kd_smoke(tmp_path):
    from bench.repro import feature_kd as repro_feature_kd
    assert repro_feature_kd.main(["--smoke", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "feature_kd.md").read_text()
    for setting in ("no KD (a = 0)", "KD (a = 0.667)", "KD + VID (a = 0.5, beta = 0.5)",
                    "KD + hint (a = 0.5, beta = 50)", "KD + AT (a = 0.5, beta = 500)"):
        assert f"| {setting} |" in text
    assert "at: student '9', teacher '9'" in text and "vid: student '12:in', teacher '12:in'" in text
    saved = json.loads((tmp_path / "feature_kd.json").read_text())
    assert len(saved["runs"]) == 2 and len(saved["runs"][0]["acc"]) == 20


def test_random_pruning_is_class_balanced_by_default():
    import torch
    from kdfast.data import load_dataset
    y = load_dataset("digits", split="train").targets
    import argparse
    parser = argparse.ArgumentParser()
    setup = repro_digits_kd.setup_flags(parser)
    assert setup(parser.parse_args([])) == {"random": "class-balanced", "early_epochs": None, "label_noise": 0.0}
    for f in (0.1, 0.3):
        counts = torch.bincount(y[repro_digits_kd.keep_random(y, f, 0, "class-balanced")], minlength=10)
        assert int(counts.max() - counts.min()) <= 1 and int(counts.sum()) == round(f * len(y))
        uniform = torch.bincount(y[repro_digits_kd.keep_random(y, f, 0, "uniform")], minlength=10)
        assert int(uniform.max() - uniform.min()) > 1  # the uniform draw is not balanced by construction


def test_noisy_labels_move_the_stated_share_to_other_classes():
    import torch
    y = torch.arange(500) % 10
    noisy = repro_digits_kd.noisy_labels(y, 0.2, seed=3)
    moved = noisy != y
    assert int(moved.sum()) == 100 and bool(((noisy >= 0) & (noisy < 10)).all())
    assert torch.equal(noisy, repro_digits_kd.noisy_labels(y, 0.2, seed=3))
