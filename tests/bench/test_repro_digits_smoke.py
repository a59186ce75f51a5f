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
    assert text.count("| holds |") + text.count("| within noise |") + text.count("| reversed |") == 39
    saved = json.loads((tmp_path / "digits_kd.json").read_text())
    assert len(saved["runs"]) == 2 and saved["size"]["steps"] == 8
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
