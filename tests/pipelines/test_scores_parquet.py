"""scores.parquet beside scores.npy for every source: kdfast-score and kdfast.score(out=) write the scores keyed
by example (digits: the index as text; image folders: the relative path), listed in meta.json; the .npy files and
their readers stay as they were."""
from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest
import torch

import kdfast
from _fake_datasets import write_image_folder
from _processes import checkpoint
from kdfast.cli.main import score_main
from kdfast.data import load_dataset
from kdfast.scoring.folder import load_scores, read_scores

pq = pytest.importorskip("pyarrow.parquet")


def _score(argv, capsys):
    code = score_main(argv)
    err = capsys.readouterr().err
    assert code == 0, err


def test_an_api_score_folder_holds_the_scores_keyed_by_index(tmp_path):
    data = torch.utils.data.Subset(load_dataset("digits"), range(100))
    data.targets = data.dataset.targets[:100]  # a labelled subset (what kdfast.data.LabeledSubset also gives)
    models = [checkpoint(tmp_path / f"{s}.pt", seed=s).eval() for s in (1, 2)]
    scores, per_model = kdfast.score(models, data, "el2n", batch_size=32, progress=False, out=tmp_path / "s",
                                     return_per_model=True)
    table = pq.read_table(tmp_path / "s" / "scores.parquet")
    assert table.column_names == ["key", "label", "score", "score_model0", "score_model1"]
    assert table.column("key").to_pylist() == [str(i) for i in range(100)]
    assert table.column("label").type == "int64" and table.column("label").to_pylist() == data.targets.tolist()
    assert all(table.column(c).type == "float" for c in ("score", "score_model0", "score_model1"))
    np.testing.assert_array_equal(table.column("score").to_numpy(), scores.numpy())
    for k in range(2):
        np.testing.assert_array_equal(table.column(f"score_model{k}").to_numpy(), per_model[k].numpy())
    # an independent reference: EL2N of the first model in float64
    with torch.no_grad():
        x = torch.stack([data[i][0] for i in range(100)]).double()
        p = models[0].double()(x).softmax(-1)
    np.testing.assert_allclose(table.column("score_model0").to_numpy(),
                               (p - torch.nn.functional.one_hot(data.targets, 10)).norm(dim=-1).numpy(), atol=1e-5)
    assert "scores.parquet" in json.loads((tmp_path / "s" / "meta.json").read_text())["files"]
    np.testing.assert_array_equal(load_scores(str(tmp_path / "s"))[0], scores.numpy())


def test_an_image_folder_run_keys_its_scores_by_relative_path(tmp_path, capsys):
    files = write_image_folder(tmp_path / "imgs", per_class=2)
    checkpoint(tmp_path / "m.pt", name="resnet8", num_classes=3, in_channels=3)
    _score(["--dataset", "folder", "--data-root", str(tmp_path / "imgs"), "--model", "resnet8", "--checkpoint",
            str(tmp_path / "m.pt"), "--image-size", "16", "--out", str(tmp_path / "run"), "--quiet"], capsys)
    table = pq.read_table(tmp_path / "run" / "scores.parquet")
    assert table.column_names == ["key", "label", "score"]  # one model: no per-model columns
    assert table.column("key").to_pylist() == [f.replace("\\", "/") for f in files]
    assert table.column("label").to_pylist() == [0, 0, 1, 1, 2, 2]
    folder = load_dataset("folder", root=str(tmp_path / "imgs"))
    scores, meta = read_scores(str(tmp_path / "run"), folder)  # the .npy reader still works and checks
    np.testing.assert_array_equal(table.column("score").to_numpy(), scores.astype(np.float32))
    assert "scores.parquet" in meta["files"] and meta["keyed"] is False


def test_a_per_batch_method_adds_the_batch_ids(tmp_path, capsys, monkeypatch):
    def liprune_batch_scores(model, dataset, batch_size, *, seed=0, device=None, progress=True, **kw):
        batch_ids = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)) // batch_size
        return batch_ids.float() * 0.5 + 1.0, batch_ids

    monkeypatch.setitem(sys.modules, "kdfast.scoring.liprune",
                        types.SimpleNamespace(liprune_batch_scores=liprune_batch_scores))
    checkpoint(tmp_path / "a.pt", seed=1)
    _score(["--method", "liprune", "--checkpoint", str(tmp_path / "a.pt"), "--batch-size", "25", "--limit", "100",
            "--out", str(tmp_path / "run"), "--quiet"], capsys)
    table = pq.read_table(tmp_path / "run" / "scores.parquet")
    assert table.column_names == ["key", "label", "score", "batch_id"]
    ids = np.load(tmp_path / "run" / "batch_ids.npy")
    np.testing.assert_array_equal(table.column("batch_id").to_numpy(), ids)
    np.testing.assert_array_equal(table.column("score").to_numpy(), (ids * 0.5 + 1.0).astype(np.float32))


def test_without_pyarrow_the_npy_files_are_written_and_the_parquet_left_out_with_a_warning(tmp_path, monkeypatch):
    from kdfast.errors import InvalidArgumentError

    def no_pyarrow(what):
        raise InvalidArgumentError(f"{what} needs pyarrow: pip install 'kdfast[data]'")
    monkeypatch.setattr("kdfast.data.keys.import_pyarrow", no_pyarrow)
    data = torch.utils.data.Subset(load_dataset("digits"), range(50))
    data.targets = data.dataset.targets[:50]
    with pytest.warns(UserWarning, match=r"scores.parquet .* not written: it needs pyarrow"):
        scores = kdfast.score(checkpoint(tmp_path / "m.pt").eval(), data, "el2n", progress=False,
                              out=tmp_path / "s")
    assert sorted(os.listdir(tmp_path / "s")) == ["job.json", "job.lock", "meta.json", "scores.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "s" / "scores.npy"), scores.numpy())
