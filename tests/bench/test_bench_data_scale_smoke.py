"""bench_data_scale at a tiny size: every row measured from its child process, fields present, tree removed."""
from __future__ import annotations

import glob
import os
import tempfile

import pytest


@pytest.mark.slow
def test_data_scale_rows_at_a_small_tree():
    from bench.perf import bench_data_scale
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "kdfast-bench-data-scale-*")))
    emitted = []
    rows = bench_data_scale.run(device="cpu", sizes=(1500,), emit=emitted.append)
    assert rows == emitted
    by = {r["provider"]: r for r in rows}
    assert list(by) == ["walk", "imports", "score-first-batch", "prune-npy", "prune-class-balanced",
                        "prune-csv-cli", "prune-csv"]
    assert all(0 < by[p]["work_ms"] < by[p]["ms"] for p in list(by)[3:])
    assert all(r["files"] == 1500 and r["ms"] > 0 and r["op"] == "data_scale" for r in rows)
    assert by["score-first-batch"]["ratio_to_walk"] > 0 and "rss_above_imports_mib" in by["score-first-batch"]
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "kdfast-bench-data-scale-*"))) == before
    targets = bench_data_scale.targets(rows)
    assert len(targets) == 5 and all(t["measured"] is None for t in targets)  # targets are read at 1.28M files
