"""A run walks an image folder once: kdfast-score with training and kdfast-distill list each folder of the tree a
single time and take every image's size and mtime (the files fingerprint) from that listing, with no second
stat pass over the files (the training view and the job's identity reuse the scan)."""
from __future__ import annotations

import os

import pytest

from _fake_datasets import write_image_folder
from kdfast.cli.main import distill_main, score_main


@pytest.fixture
def walked(monkeypatch):
    """{"listed": folders os.scandir / os.listdir were called on (os.walk lists through os.scandir),
    "stat": paths os.stat was called on}."""
    calls = {"listed": [], "stat": []}

    def counted(real, kind):
        def call(path=".", *args, **kwargs):
            if not isinstance(path, int):  # a file descriptor (shutil.rmtree): not a path of the tree
                calls[kind].append(os.path.abspath(os.fsdecode(path)))
            return real(path, *args, **kwargs)
        return call
    monkeypatch.setattr(os, "scandir", counted(os.scandir, "listed"))
    monkeypatch.setattr(os, "listdir", counted(os.listdir, "listed"))
    monkeypatch.setattr(os, "stat", counted(os.stat, "stat"))
    return calls


def _under(paths, root):
    root = os.path.abspath(root)
    return sorted(os.path.relpath(p, root) for p in paths if p == root or p.startswith(root + os.sep))


@pytest.mark.parametrize("cli", ["score", "distill"])
def test_a_run_with_training_walks_the_image_folder_once(tmp_path, walked, capsys, cli):
    root = tmp_path / "photos"
    images = write_image_folder(root, classes=("cat", "dog"), per_class=4, size=(10, 10))
    walked["listed"].clear(), walked["stat"].clear()  # writing the images stat'ed them
    argv = ["--dataset", "folder", "--data-root", str(root), "--image-size", "8", "--model", "mlp", "--quiet",
            "--out", str(tmp_path / "out")]
    if cli == "score":
        rc = score_main(argv + ["--train-epochs", "1", "--seeds", "1"])
    else:
        rc = distill_main(argv + ["--epochs", "1", "--alpha", "0"])
    assert rc == 0, capsys.readouterr().err
    assert _under(walked["listed"], root) == [".", "cat", "dog"]
    assert not set(_under(walked["stat"], root)) & set(images)  # sizes and mtimes came from the listing
