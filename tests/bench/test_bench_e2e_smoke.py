"""The end-to-end scoring benchmark on tiny CPU settings through the runner, so it cannot rot: its JPEG folder
is written once and reused, every ceiling and e2e row is recorded with its stages and ratios."""
from __future__ import annotations

import pytest

pytest.importorskip("bench.run", reason="the bench/ folder ships with the repository, not the package")
import bench.perf.bench_e2e as bench_e2e  # noqa: E402
from bench.common import read_rows  # noqa: E402
from bench.run import main  # noqa: E402


def test_e2e_smoke_rows_stages_and_cached_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_e2e, "CACHE_ROOT", tmp_path / "cache")
    out, md = tmp_path / "results.jsonl", tmp_path / "RESULTS.md"
    assert main(["--smoke", "--only", "e2e", "--out", str(out), "--markdown", str(md)]) == 0
    rows = {r["provider"]: r for r in read_rows(out)}
    assert set(rows) == {"read", "receive-per-image", "receive-flat", "decode-batched", "decode-pil", "inference",
                         "fwd+bwd", "score-el2n", "score-grand", "e2e-el2n", "e2e-grand"}
    cfg = bench_e2e.SMOKE_CONFIGS["cnn-16px-b4"]
    for r in rows.values():
        assert r["op"] == "e2e" and r["device_type"] == "cpu" and r["decode_device"] == "cpu"
        assert 0 < r["p20"] <= r["ms"] <= r["p80"] and r["images_per_s"] > 0, r
        assert r["files"] == cfg.files and r["shape"] == f"{cfg.batch}x3x{cfg.crop}x{cfg.crop}"
    for name, ceiling in (("e2e-el2n", "min(decode, inference)"), ("e2e-grand", "score-grand")):
        r = rows[name]
        assert r["ceiling"] == ceiling and r["scores_finite"] and r["images_scored"] == cfg.files
        assert set(r["stages_ms"]) == {"read", "receive", "decode", "model", "loss"}
        assert r["ratio_to_ceiling"] == pytest.approx(r["images_per_s"] / r["ceiling_images_per_s"])
        assert r["ratio_to_floor"] == pytest.approx(1 / r["ratio_to_ceiling"])
    inference, decode = rows["inference"]["images_per_s"], rows["decode-batched"]["images_per_s_workers"]
    assert rows["e2e-el2n"]["ceiling_images_per_s"] == pytest.approx(min(inference, decode))
    assert rows["e2e-grand"]["ceiling_images_per_s"] == pytest.approx(rows["score-grand"]["images_per_s"])
    assert rows["receive-flat"]["ratio_to_per_image"] == pytest.approx(rows["receive-flat"]["ms"]
                                                                       / rows["receive-per-image"]["ms"])
    measured = {t["what"]: t for t in bench_e2e.targets(list(rows.values()))}
    assert len(measured) == 4 and all(t["measured"] is None for t in measured.values())  # smoke rows: no target
    assert "### e2e" in md.read_text()
    folder = bench_e2e.jpeg_folder(cfg)
    jpegs = sorted(folder.glob("train/*/*.JPEG"))
    assert len(jpegs) == cfg.files and (folder / "complete").exists()
    stamps = [p.stat().st_mtime_ns for p in jpegs]
    assert bench_e2e.jpeg_folder(cfg) == folder and [p.stat().st_mtime_ns for p in jpegs] == stamps  # reused


def test_e2e_budget_skips_what_is_left_and_rows_are_emitted(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_e2e, "CACHE_ROOT", tmp_path / "cache")
    emitted = []
    rows = bench_e2e.run(device="cpu", smoke=True, budget_s=0.0, emit=emitted.append)
    assert emitted == rows
    assert [r["provider"] for r in rows if r["mode"] == "skipped"] == ["e2e-el2n", "e2e-grand"]
    assert all(r["note"] == "budget spent" for r in rows if r["mode"] == "skipped")


def test_generated_jpegs_are_imagenet_like():
    """At 500x375 and quality 90 the generator lands near ImageNet's typical ~110 kB per file."""
    import io

    import numpy as np
    img = bench_e2e.natural_image(np.random.default_rng(1), 500, 375)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    assert img.size == (500, 375) and 80e3 < len(buf.getvalue()) < 140e3, len(buf.getvalue())
