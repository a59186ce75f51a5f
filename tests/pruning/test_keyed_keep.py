"""Keyed keep lists: kdfast-prune writes keep.parquet (key, index) for keyed sources, from a score folder or a bare
scores.parquet matched exactly by key; read_keep and kdfast-distill find the kept examples by key in any subset or
order of the source; unknown or repeated keys fail in one line; keep.npy works as before."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

import kdfast
from _fake_datasets import keyed_digits, write_image_folder
from kdfast.cli.main import distill_main, prune_main
from kdfast.data import LabeledSubset, load_dataset
from kdfast.data.identity import DataIdentityError
from kdfast.data.keys import KeyMatchError
from kdfast.errors import InvalidArgumentError
from kdfast.models import create_model
from kdfast.pruning.keep import read_keep

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _model(seed):
    torch.manual_seed(seed)
    return create_model("mlp", num_classes=10, in_channels=1, image_size=8).eval()


@pytest.fixture()
def keyed_run(tmp_path):
    """A score folder of a keyed source (kdfast.score(out=) on the fake keyed digits) and its data."""
    data = keyed_digits()
    scores = kdfast.score(_model(1), data, "el2n", batch_size=32, progress=False, out=tmp_path / "run").numpy()
    return tmp_path / "run", data, scores


def _prune(argv, capsys):
    code = prune_main(argv)
    return code, capsys.readouterr().err


def test_a_keyed_score_folder_gives_a_keyed_keep_list(keyed_run, tmp_path, capsys):
    run, data, scores = keyed_run
    out = tmp_path / "keep.parquet"
    code, err = _prune(["--scores", str(run), "--fraction", "0.25", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    table = pq.read_table(out)
    assert table.column_names == ["key", "index"] and table.column("index").type == "int64"
    expected = np.sort(np.argsort(-scores, kind="stable")[:30])  # hard: the 30 highest scores
    np.testing.assert_array_equal(table.column("index").to_numpy(), expected)
    assert table.column("key").to_pylist() == [data.keys[i] for i in expected]
    record = json.loads((tmp_path / "keep.parquet.json").read_text())
    assert record["keyed"] is True and record["num_kept"] == 30 and record["data"]["num_examples"] == 120
    # a keep.npy would be found by position, which a keyed source does not promise: refused, in one line
    code, err = _prune(["--scores", str(run), "--fraction", "0.25", "--out", str(tmp_path / "k.npy")], capsys)
    assert code == 2 and "keyed source" in err and "--out" in err and f"{tmp_path / 'k.parquet'}" in err
    assert not (tmp_path / "k.npy").exists()


def test_read_keep_finds_the_kept_examples_by_key_in_a_subset_in_another_order(keyed_run, tmp_path, capsys):
    run, data, _ = keyed_run
    out = tmp_path / "keep.parquet"
    assert _prune(["--scores", str(run), "--fraction", "0.25", "--out", str(out), "--quiet"], capsys)[0] == 0
    kept_keys = pq.read_table(out).column("key").to_pylist()
    keep, record = read_keep(str(out), data)
    assert [data.keys[i] for i in keep] == kept_keys and record["keyed"] is True
    order = np.random.default_rng(1).permutation(120)
    shuffled = LabeledSubset(data, order)
    keep, _ = read_keep(str(out), shuffled)
    assert np.all(np.diff(keep) > 0) and sorted(data.keys[order[i]] for i in keep) == sorted(kept_keys)
    missing = LabeledSubset(data, [i for i in order if data.keys[i] != kept_keys[3]])
    with pytest.raises(KeyMatchError) as info:
        read_keep(str(out), missing, what="--keep keep.parquet")
    assert str(info.value) == (f"--keep keep.parquet: 1 of 30 keys match no example of the data set: "
                               f"{kept_keys[3]!r}; was it made for another data set?")
    pq.write_table(pa.table({"key": kept_keys[:3] + kept_keys[:1], "index": [0, 1, 2, 3]}), tmp_path / "dup.parquet")
    with pytest.raises(KeyMatchError, match=r"dup.parquet: 1 keys appear more than once"):
        read_keep(str(tmp_path / "dup.parquet"), data)
    pq.write_table(pa.table({"key": [1, 2], "index": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(InvalidArgumentError) as info:
        read_keep(str(tmp_path / "ints.parquet"), data, what="--keep ints.parquet")
    assert str(info.value) == ("--keep ints.parquet must hold a non-empty string 'key' column (a keyed keep list of "
                               "kdfast-prune), got key (int64), index (int64) with 2 rows")


def test_a_keyed_keep_list_refuses_a_shard_changed_since_and_names_it(keyed_run, tmp_path, capsys):
    run, data, _ = keyed_run
    out = tmp_path / "keep.parquet"
    assert _prune(["--scores", str(run), "--fraction", "0.25", "--out", str(out), "--quiet"], capsys)[0] == 0
    assert len(read_keep(str(out), data)[0]) == 30  # the same shards: accepted
    shard = data.shards[2]
    data.shards[2] = shard._replace(mtime_ns=shard.mtime_ns + 1)  # the same keys, the shard rewritten since
    with pytest.raises(DataIdentityError) as info:
        read_keep(str(out), LabeledSubset(data, range(119, -1, -1)), what="--keep keep.parquet")
    assert str(info.value) == ("--keep keep.parquet was made before 1 of its shards changed (examples, size or "
                               f"modification time): {shard.name}; prune again from fresh scores")


def test_a_bare_scores_parquet_is_matched_exactly_to_a_keyed_dataset(tmp_path, capsys, monkeypatch):
    data = keyed_digits()
    values = np.random.default_rng(2).standard_normal(120)
    order = np.random.default_rng(3).permutation(120)  # the file's own order, and keys of other examples too
    keys = [data.keys[i] for i in order] + ["other/1", "other/2"]
    pq.write_table(pa.table({"key": keys, "score": np.r_[values[order], 9.0, 9.0]}), tmp_path / "mem.parquet")
    monkeypatch.setattr("kdfast.data.load_dataset", lambda name, **kw: data)
    argv = ["--scores", str(tmp_path / "mem.parquet"), "--dataset", "fake", "--fraction", "0.1", "--mode", "easy"]
    code, err = _prune([*argv, "--out", str(tmp_path / "keep.parquet")], capsys)
    assert code == 0, err
    table = pq.read_table(tmp_path / "keep.parquet")
    expected = np.sort(np.argsort(values, kind="stable")[:12])
    np.testing.assert_array_equal(table.column("index").to_numpy(), expected)
    assert table.column("key").to_pylist() == [data.keys[i] for i in expected]
    pq.write_table(pa.table({"key": keys[5:], "score": np.r_[values[order[5:]], 9.0, 9.0]}), tmp_path / "few.parquet")
    code, err = _prune(["--scores", str(tmp_path / "few.parquet"), *argv[2:], "--out", str(tmp_path / "k2.parquet")],
                       capsys)
    assert code == 1 and "5 of 120 keys match no example of score file" in err and len(err.strip().splitlines()) == 1


def test_a_bare_scores_parquet_still_matches_an_image_folder_by_file(tmp_path, capsys):
    files = write_image_folder(tmp_path / "imgs", per_class=2)
    values = np.arange(6, dtype=np.float64)[::-1]
    pq.write_table(pa.table({"key": [f.replace("\\", "/") for f in files], "score": values}), tmp_path / "s.parquet")
    code, err = _prune(["--scores", str(tmp_path / "s.parquet"), "--dataset", "folder", "--data-root",
                        str(tmp_path / "imgs"), "--fraction", "0.5", "--out", str(tmp_path / "keep.npy"), "--quiet"],
                       capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "keep.npy"), [0, 1, 2])  # the 3 highest scores


def test_distill_trains_on_a_keyed_keep_list_as_on_the_same_keep_npy(tmp_path, capsys):
    """digits: keep.parquet (keys = indices as text) from a score folder; kdfast-distill --keep takes it and
    trains the student on the very examples of the keep.npy pruned from the same scores."""
    data = load_dataset("digits")
    kdfast.score(_model(1), data, "el2n", batch_size=256, progress=False, out=tmp_path / "run")
    for name in ("keep.npy", "keep.parquet"):
        assert _prune(["--scores", str(tmp_path / "run"), "--fraction", "0.2", "--out", str(tmp_path / name),
                       "--quiet"], capsys)[0] == 0
    np.testing.assert_array_equal(pq.read_table(tmp_path / "keep.parquet").column("index").to_numpy(),
                                  np.load(tmp_path / "keep.npy"))
    students = []
    for name in ("keep.npy", "keep.parquet"):
        code = distill_main(["--alpha", "0", "--model", "mlp", "--epochs", "1", "--keep", str(tmp_path / name),
                             "--out", str(tmp_path / f"d-{name}"), "--quiet"])
        assert code == 0, capsys.readouterr().err
        students.append(torch.load(tmp_path / f"d-{name}" / "student.pt", weights_only=True))
        summary = json.loads((tmp_path / f"d-{name}" / "summary.json").read_text())
        assert summary["num_kept"] == len(np.load(tmp_path / "keep.npy"))
    a, b = (s.get("model", s) for s in students)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_distill_data_finds_a_keyed_keep_list_in_another_order_of_the_source(keyed_run, tmp_path, capsys,
                                                                                   monkeypatch):
    from kdfast.pipelines.distill import load_distill_data
    run, data, _ = keyed_run
    assert _prune(["--scores", str(run), "--fraction", "0.25", "--out", str(tmp_path / "keep.parquet"),
                   "--quiet"], capsys)[0] == 0
    kept_keys = set(pq.read_table(tmp_path / "keep.parquet").column("key").to_pylist())
    order = np.random.default_rng(4).permutation(120)
    reordered = LabeledSubset(data, order)
    monkeypatch.setattr("kdfast.data.load_dataset", lambda name, **kw: reordered)
    cfg = types.SimpleNamespace(image_size=None, dataset="digits", data_root=None, augment=False,
                                keep=str(tmp_path / "keep.parquet"), sampler=None, val_fraction=None, seed=0)
    loaded = load_distill_data(cfg)
    assert {data.keys[order[i]] for i in loaded.keep} == kept_keys and loaded.fraction == 0.25
