"""bench_data_scale at a tiny size: every row measured from its child process, fields present, tree removed."""
from __future__ import annotations

import glob
import os
import tempfile

import pytest


@pytest.mark.slow
def test_data_scale_rows_at_a_small_tree(tmp_path, monkeypatch):
    from bench.perf import bench_data_scale
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its own temp folder: other runs' trees do not count
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "kdfast-bench-data-scale-*")))
    emitted = []
    rows = bench_data_scale.run(device="cpu", sizes=(1500,), emit=emitted.append)
    assert rows == emitted
    by = {r["provider"]: r for r in rows}
    assert list(by) == ["walk", "imports", "score-first-batch", "prune-npy", "prune-class-balanced",
                        "prune-csv-cli", "prune-csv", "wds-convert", "wds-score-first-batch", "wds-score-random",
                        "wds-prune", "wds-prune-class-balanced"]
    prunes = ["prune-npy", "prune-class-balanced", "prune-csv-cli", "prune-csv", "wds-prune",
              "wds-prune-class-balanced"]
    assert all(0 < by[p]["work_ms"] < by[p]["ms"] for p in prunes)
    assert all(r["files"] == 1500 and r["ms"] > 0 and r["op"] == "data_scale" for r in rows)
    for p in ("score-first-batch", "wds-score-first-batch"):
        assert by[p]["ratio_to_walk"] == pytest.approx(by[p]["ms"] / by["walk"]["ms"])
        assert "rss_above_imports_mib" in by[p]
    assert by["wds-convert"]["shards"] == 2 and by["wds-convert"]["shards_mib"] > 0  # 1000 examples a shard
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "kdfast-bench-data-scale-*"))) == before
    targets = bench_data_scale.targets(rows)
    assert len(targets) == 9 and all(t["measured"] is None for t in targets)  # targets are read at 1.28M files
    at_scale = [{**r, "files": bench_data_scale.IMAGENET_TRAIN} for r in rows]
    measured = {t["what"]: t["measured"] for t in bench_data_scale.targets(at_scale)}
    assert measured["kdfast-prune class-balanced from a keyed score folder of wds shards (1.28M rows)"] == \
        by["wds-prune-class-balanced"]["ms"]
    assert measured["start to first batch of kdfast-score on wds shards vs the walk of the same-size tree (1.28M "
                    "examples)"] == by["wds-score-first-batch"]["ratio_to_walk"]
