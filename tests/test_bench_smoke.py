"""The benchmark runner on tiny CPU shapes, so it cannot rot: rows recorded, RESULTS.md generated. (The other
benchmark modules it runs have smoke tests of their own.)"""
from __future__ import annotations

import pytest

pytest.importorskip("bench.run", reason="the bench/ folder ships with the repository, not the package")
from bench.common import read_rows  # noqa: E402
from bench.run import main  # noqa: E402

ROW_FIELDS = {"op", "provider", "mode", "shape", "dtype", "device", "versions", "commit", "date", "command"}


def test_runner_records_rows_and_renders_markdown(tmp_path, capsys):
    out, md = tmp_path / "results.jsonl", tmp_path / "RESULTS.md"
    assert main(["--smoke", "--only", "kd_loss", "--out", str(out), "--markdown", str(md)]) == 0
    rows = read_rows(out)
    assert all(ROW_FIELDS <= set(r) for r in rows)
    checks = [r for r in rows if r["mode"] == "check"]
    assert checks and all(r["ok"] for r in checks)
    timed = {(r["provider"], r["mode"]) for r in rows if "ms" in r}
    for provider in ("kdfast", "kdfast-stats", "kdfast-inplace", "eager"):
        for mode in ("forward", "backward", "full"):
            assert (provider, mode) in timed
    for r in rows:
        if "ms" in r:
            assert 0 < r["p20"] <= r["ms"] <= r["p80"], r
    full = next(r for r in rows if r["provider"] == "kdfast" and r["mode"] == "full")
    assert full["ratio_to_floor"] > 0 and "eager" in full["speedup_vs"]
    text = md.read_text()
    assert "not yet measured on a GPU" in text and "| 16x50 | float32 | full | kdfast" in text
    # a second run appends; the table keeps the newest row of each measurement
    assert main(["--smoke", "--only", "kd_loss", "--out", str(out), "--markdown", str(md)]) == 0
    text2 = md.read_text()
    assert len(read_rows(out)) == 2 * len(rows) and text2.count("| 16x50 | float32 | full | kdfast (") == 1
    assert "kd_loss" in capsys.readouterr().out
    md.unlink()
    assert main(["--render-only", "--out", str(out), "--markdown", str(md)]) == 0 and md.read_text() == text2
