"""kdfast-score / kdfast-distill on wds:PATTERN and parquet:GLOB: the same scores as the image folder the shards
were made from (same seed, same training), resume refusing changed shards by name, and the shard options' checks."""
from __future__ import annotations

import os

import numpy as np
import pytest

from _fake_datasets import write_image_folder
from kdfast.cli.main import main
from kdfast.data.make_shards import make_shards

pytest.importorskip("pyarrow")
pytest.importorskip("webdataset")

TINY = ["--model", "mlp", "--image-size", "8", "--train-epochs", "2", "--seeds", "1", "--quiet"]


@pytest.fixture
def shards(tmp_path):
    root = tmp_path / "photos"
    write_image_folder(root, per_class=4, size=(17, 12))
    return (str(root), make_shards(str(root), str(tmp_path / "wds"), shard_size=5),
            make_shards(str(root), str(tmp_path / "pq"), shard_size=5, format="parquet", row_group_size=3))


def _score(capsys, *args):
    code = main(["score", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_scores_equal_the_folder_bitwise(shards, tmp_path, capsys):
    root, wds_name, pq_name = shards
    runs = {}
    for label, data, workers in (("folder", ["--dataset", "folder", "--data-root", root], "2"),
                                 ("wds", ["--dataset", wds_name], "2"),  # forked workers reopen the shards
                                 ("parquet", ["--dataset", pq_name], "2")):
        code, _, err = _score(capsys, *data, *TINY, "--num-workers", workers, "--out", str(tmp_path / "runs" / label))
        assert code == 0, err
        runs[label] = np.load(tmp_path / "runs" / label / "scores.npy")
    assert runs["folder"].std() > 0
    np.testing.assert_array_equal(runs["wds"], runs["folder"])
    np.testing.assert_array_equal(runs["parquet"], runs["folder"])


def test_resume_refuses_changed_shards_naming_them(shards, tmp_path, capsys):
    _, wds_name, _ = shards
    out = str(tmp_path / "run")
    args = ["--dataset", wds_name, "--method", "random", "--out", out, "--quiet"]
    assert _score(capsys, *args)[0] == 0
    changed = os.path.join(tmp_path, "wds", "shard-000001.tar")
    os.utime(changed, ns=(10**18, 10**18))
    code, _, err = _score(capsys, *args, "--resume")
    assert code == 1 and "data.shards: 1 changed (size or modification time): " + changed in err, err
    glob_name = f"wds:{tmp_path}/wds/shard-*.tar"
    out2 = str(tmp_path / "run2")
    assert _score(capsys, "--dataset", glob_name, "--method", "random", "--out", out2, "--quiet")[0] == 0
    os.remove(os.path.join(tmp_path, "wds", "shard-000002.tar"))
    code, _, err = _score(capsys, "--dataset", glob_name, "--method", "random", "--out", out2, "--quiet", "--resume")
    assert code == 1 and "data.shards: 1 shards gone: " + os.path.join(tmp_path, "wds", "shard-000002.tar") in err


def test_index_dir_caches_the_index_outside_the_job(tmp_path, capsys, monkeypatch):
    import io
    import webdataset as wds
    from PIL import Image
    import kdfast.data.wds_source as wds_source
    png = io.BytesIO()
    Image.new("RGB", (6, 6), (9, 90, 200)).save(png, format="PNG")
    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        for i in range(4):
            sink.write({"__key__": f"k{i}", "png": png.getvalue(), "cls": i % 2})
    scans = []
    real_scan = wds_source.scan_shard
    monkeypatch.setattr(wds_source, "scan_shard", lambda *a, **k: scans.append(a[0]) or real_scan(*a, **k))
    args = ["--dataset", f"wds:{tmp_path}/a.tar", "--method", "random", "--out", str(tmp_path / "run"), "--quiet"]
    assert _score(capsys, *args, "--index-dir", str(tmp_path / "idx"))[0] == 0
    assert len(scans) == 1 and len(os.listdir(tmp_path / "idx")) == 1
    # a resume with another (or no) cache folder is the same job; the cached index is read, not rebuilt
    assert _score(capsys, *args, "--index-dir", str(tmp_path / "idx"), "--resume")[0] == 0 and len(scans) == 1


@pytest.mark.parametrize("args, message", [
    (["--dataset", "folder", "--data-root", ".", "--image-ext", "png"], "--image-ext goes with --dataset wds:..."),
    (["--dataset", "wds:x.tar", "--id-column", "key"], "--id-column goes with --dataset parquet:..."),
    (["--dataset", "parquet:x", "--index-dir", "d"], "--index-dir goes with --dataset wds:..."),
    (["--dataset", "wds:"], "'wds:' needs a pattern"),
    (["--dataset", "pets"], "choose from digits, cifar10, cifar100, svhn, imagenet, folder, wds:PATTERN"),
])
def test_shard_options_are_checked(args, message, capsys):
    code, _, err = _score(capsys, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_data_errors_are_one_line(tmp_path, capsys):
    code, _, err = _score(capsys, "--dataset", f"parquet:{tmp_path}/*.parquet", "--out", str(tmp_path / "r"))
    assert code == 1 and "matches no file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_prune_and_distill_from_shards(shards, tmp_path, capsys):
    _, wds_name, pq_name = shards
    run = str(tmp_path / "scores")
    assert _score(capsys, "--dataset", pq_name, *TINY, "--save-logits", "--out", run)[0] == 0
    keep = str(tmp_path / "keep.parquet")  # a keyed source: its subsets are found by key
    assert main(["prune", "--scores", run, "--fraction", "0.5", "--class-balanced", "--out", keep]) == 0
    code = main(["distill", "--dataset", pq_name, "--model", "mlp", "--image-size", "8", "--epochs", "1", "--keep",
                 keep, "--teacher-cache", os.path.join(run, "teacher-logits"), "--no-augment", "--quiet", "--out",
                 str(tmp_path / "student")])
    assert code == 0, capsys.readouterr().err
    assert os.path.isfile(tmp_path / "student" / "student.pt")


@pytest.mark.parametrize("decode", [None, "cpu"])
def test_show_draws_shard_images(shards, decode):
    from PIL import Image
    from kdfast.cli.summary import _displayable
    from kdfast.data import load_dataset
    root, wds_name, _ = shards
    data = load_dataset(wds_name, image_size=8, decode=decode)
    picture = _displayable(data, 1)  # the image as stored (a PNG, which the batched decoder would refuse)
    with Image.open(os.path.join(root, "cat", "img1.png")) as img:
        expected = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    np.testing.assert_array_equal(picture, expected)
