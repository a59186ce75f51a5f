"""wds:PATTERN and parquet:GLOB data sets: their index (keys, labels, order, shards), decoding against the image
folder they were made from, the index sidecars, identity, and every bad input's one-line error."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch

from _fake_datasets import write_image_folder
from kdfast.data import DataError, check_identity, data_identity, load_dataset
from kdfast.data.identity import DataIdentityError
from kdfast.data.make_shards import folder_key, main as make_shards_main, make_shards
from kdfast.data.shard_index import KeyList, Shard
from kdfast.errors import InvalidArgumentError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
wds = pytest.importorskip("webdataset")


def _png_bytes(seed, size=(9, 7)):
    from PIL import Image
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(1, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "photos"
    write_image_folder(root, per_class=4, size=(17, 12))
    nested = root / "dog" / "sub"
    nested.mkdir()
    (nested / "x.2.png").write_bytes(_png_bytes(7))  # a dot in the stem and a subfolder: one key all the same
    return root


def _write_tar(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def test_folder_key_escapes_what_webdataset_would_split():
    assert folder_key("dog/sub/x.2.png") == "dog%2Fsub%2Fx%2E2"
    assert folder_key("a%b/c.jpg") == "a%25b%2Fc"


def test_keylist_is_compact_and_finds_duplicates():
    keys = ["b", "a", "", "ab", "a", "zz"]
    kl = KeyList.from_strings(keys)
    assert len(kl) == 6 and [kl[i] for i in range(6)] == keys and kl[-1] == "zz" and kl[1:3] == ["a", ""]
    assert kl.first_duplicate() == (1, 4)
    assert KeyList.from_strings(["a", "ab", "b"]).first_duplicate() is None
    joined = KeyList.concat([KeyList.from_strings(["x"]), KeyList.from_arrow(pa.array(["y", "zz"]).slice(0, 2))])
    assert list(joined) == ["x", "y", "zz"] and joined.data.dtype == np.uint8
    assert list(kl.take([5, 2, 0, 3])) == ["zz", "", "b", "ab"] and len(kl.take([])) == 0


def test_first_duplicate_agrees_with_a_dict_over_keys_of_every_length():
    import random
    rng = random.Random(0)
    for _ in range(300):  # short alphabets and lengths 0..19 across the 8-byte words: many equal keys
        keys = [''.join(rng.choice("ab%/.é") for _ in range(rng.randrange(20))) for _ in range(rng.randrange(40))]
        seen, expected = {}, None
        for j, key in enumerate(keys):
            if key in seen:
                expected = (seen[key], j)
                break
            seen[key] = j
        keylist = KeyList.from_strings(keys)
        assert keylist.first_duplicate() == expected, keys
        assert keylist.take(np.arange(len(keys))[::-1]).first_duplicate() == (
            None if expected is None else KeyList.from_strings(keys[::-1]).first_duplicate())
    long = [f"n{c:08d}%2Fn{c:08d}_{i}" for c in range(50) for i in range(40)]
    assert KeyList.from_strings(long).first_duplicate() is None
    assert KeyList.from_strings(long + [long[777]]).first_duplicate() == (777, len(long))


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
def test_shards_index_and_load_equal_the_folder(folder, tmp_path, fmt):
    name = make_shards(str(folder), str(tmp_path / "shards"), shard_size=5, format=fmt, row_group_size=2)
    ref = load_dataset("folder", root=str(folder), image_size=8)
    data = load_dataset(name, image_size=8)
    assert data.name == fmt and data.files is None and len(data) == len(ref) == 13
    assert list(data.keys) == [folder_key(f) for f in ref.files]
    assert data.keys[12] == "emu%2Fimg3" and data.keys[8] == "dog%2Fsub%2Fx%2E2"
    assert torch.equal(data.targets, ref.targets) and data.num_classes == 3 and data.classes == ["cat", "dog", "emu"]
    ext = "tar" if fmt == "wds" else "parquet"
    assert [(os.path.basename(s.name), s.start, s.stop) for s in data.shards] == \
        [(f"shard-00000{k}.{ext}", 5 * k, min(5 * k + 5, 13)) for k in range(3)]
    assert all(isinstance(s, Shard) and s.size == os.path.getsize(s.name) for s in data.shards)
    for i in (12, 0, 8, 3, 7):  # out of order: the parquet reader changes row groups and files
        assert torch.equal(data.load(i), ref.load(i))
        x, y = data[i]
        assert torch.equal(x, ref.load(i)) and y == int(ref.targets[i])
    train = data.with_augment(True)
    assert train.augment is not None and data.augment is None and train.keys is data.keys
    assert train.load(3).shape == (3, 8, 8)


def test_parquet_as_hugging_face_writes_it(folder, tmp_path):
    """An Image feature column (struct {bytes, path}), no id column: keys are FILE:ROW; other column names."""
    ref = load_dataset("folder", root=str(folder), image_size=8)
    raw = [open(os.path.join(folder, f), "rb").read() for f in ref.files]
    image = pa.StructArray.from_arrays([pa.array(raw, pa.binary()), pa.array(ref.files)], names=["bytes", "path"])
    table = pa.table({"img": image, "y": pa.array(ref.targets.numpy(), pa.int32())})
    pq.write_table(table.slice(0, 6), tmp_path / "train-00000-of-00002.parquet", row_group_size=4)
    pq.write_table(table.slice(6), tmp_path / "train-00001-of-00002.parquet", row_group_size=4)
    data = load_dataset(f"parquet:{tmp_path}/train-*.parquet", image_size=8, image_column="img", label_column="y")
    assert data.keys[0] == "train-00000-of-00002.parquet:0" and data.keys[6] == "train-00001-of-00002.parquet:0"
    assert data.classes is None and data.num_classes == 3 and torch.equal(data.targets, ref.targets)
    assert all(torch.equal(data.load(i), ref.load(i)) for i in (5, 4, 12, 0))
    with pytest.raises(DataError, match=r"train-00000-of-00002.parquet has no columns 'image', 'label'; "
                                         r"its columns are img, y"):
        load_dataset(f"parquet:{tmp_path}/train-*.parquet")


def test_wds_json_labels_and_image_extension(tmp_path):
    samples = [{"__key__": f"s{i}", "png": _png_bytes(i), "webp": b"ignored", "json": json.dumps({"y": i % 2,
                "label": 5})} for i in range(4)]
    path = _write_tar(tmp_path / "a.tar", samples)
    data = load_dataset(f"wds:{path}", image_size=4, label_field="y", image_ext=".png", num_classes=3)
    assert data.targets.tolist() == [0, 1, 0, 1] and data.num_classes == 3 and list(data.keys) == ["s0", "s1", "s2",
                                                                                                     "s3"]
    assert load_dataset(f"wds:{path}", image_size=4).targets.tolist() == [5] * 4  # json "label" by default
    from PIL import Image
    from kdfast.data.imagefolder import image_tensor
    expected = image_tensor(Image.open(io.BytesIO(_png_bytes(2))).convert("RGB"), 4, 5)
    assert torch.equal(data.load(2), expected)


def test_sidecar_is_used_and_a_stale_one_rebuilt(folder, tmp_path, monkeypatch, caplog):
    import kdfast.data.wds_source as wds_source
    name = make_shards(str(folder), str(tmp_path / "shards"), shard_size=5)
    assert sorted(os.listdir(tmp_path / "shards"))[:2] == ["info.json", "shard-000000.tar"]
    scans = []
    real_scan = wds_source.scan_shard
    monkeypatch.setattr(wds_source, "scan_shard", lambda *a, **k: scans.append(a[0]) or real_scan(*a, **k))
    first = load_dataset(name, image_size=8)
    assert scans == []  # every index from its sidecar
    # rewrite shard 1 with other labels (a changed shard): its sidecar no longer fits and is not used
    shard = first.shards[1].name
    samples = [{"__key__": first.keys[i], "png": _png_bytes(i), "cls": 2} for i in range(5, 10)]
    _write_tar(shard, samples)
    os.utime(shard, ns=(1, 1))
    with caplog.at_level("WARNING", logger="kdfast.data"):
        again = load_dataset(name, image_size=8)
    assert scans == [shard] and again.targets[5:10].tolist() == [2] * 5
    assert f"1 shard index files no longer fit their shards (changed since indexed, copied without modification " \
           f"times, or other --image-ext/--label-field), e.g. {shard}.idx.npz" in caplog.text
    assert again.files_fingerprint != first.files_fingerprint
    with pytest.raises(DataIdentityError, match=r"keep.npy was made from another data set than 'wds' here "
                                                r"\(labels_fingerprint, files_fingerprint differ; 1 changed \(size or "
                                                f"modification time\\): {shard}\\)"):
        check_identity(data_identity(first), again, what="keep.npy")


def test_sidecar_reader_equals_np_load_and_rejects_a_corrupt_one(folder, tmp_path, monkeypatch):
    import kdfast.data.wds_source as wds_source
    from kdfast.data.shard_index import _read_index
    name = make_shards(str(folder), str(tmp_path / "shards"), shard_size=5)
    shard = str(tmp_path / "shards" / "shard-000001.tar")
    sidecar = shard + ".idx.npz"
    index = _read_index(sidecar, shard, wds_source.index_options(None, None))
    with np.load(sidecar) as z:  # numpy's own reader: the reference
        reference = {k: z[k] for k in z.files}
        assert json.loads(str(z["stamp"]))["name"] == "shard-000001.tar"
    for field, got in (("offsets", index.offsets), ("sizes", index.sizes), ("labels", index.labels),
                       ("key_data", index.keys.data), ("key_offsets", index.keys.offsets)):
        assert got.dtype == reference[field].dtype and np.array_equal(got, reference[field]), field
    assert len(index) == 5 and len(set(index.keys)) == 5
    scans = []
    real_scan = wds_source.scan_shard
    monkeypatch.setattr(wds_source, "scan_shard", lambda *a, **k: scans.append(a[0]) or real_scan(*a, **k))
    expected = load_dataset(name, image_size=8)
    assert scans == []
    # a compressed sidecar of the same arrays (numpy's reader) is used as it is
    np.savez_compressed(sidecar, **reference)  # (a name ending in .npz is kept as it is)
    assert list(load_dataset(name, image_size=8).keys) == list(expected.keys) and scans == []
    # one byte of the key bytes flipped: the CRC no longer fits, the shard is scanned, the keys stay right
    np.savez(sidecar, **reference)
    data = bytearray(open(sidecar, "rb").read())
    at = data.find(reference["key_data"].tobytes())
    assert at > 0
    data[at] ^= 1
    open(sidecar, "wb").write(bytes(data))
    again = load_dataset(name, image_size=8)
    assert scans == [shard] and list(again.keys) == list(expected.keys)
    assert again.targets.tolist() == expected.targets.tolist()


def test_a_pattern_naming_one_shard_twice_is_refused(tmp_path):
    path = _write_tar(tmp_path / "a.tar", [{"__key__": "k", "png": _png_bytes(0), "cls": 0}])
    os.symlink(path, tmp_path / "b.tar")  # another name of the same file
    for pattern in (f"{tmp_path}/{{a,a}}.tar", f"{tmp_path}/*.tar"):
        with pytest.raises(DataError, match=r"names shard .*b?\.tar twice"):
            load_dataset(f"wds:{pattern}")


def test_index_dir_caches_shards_without_sidecars(tmp_path, monkeypatch):
    import kdfast.data.wds_source as wds_source
    paths = [_write_tar(tmp_path / f"p-{k}.tar", [{"__key__": f"{k}-{i}", "png": _png_bytes(i), "cls": i % 2}
                                                  for i in range(3)]) for k in range(3)]
    scans = []
    real_scan = wds_source.scan_shard
    monkeypatch.setattr(wds_source, "scan_shard", lambda *a, **k: scans.append(a[0]) or real_scan(*a, **k))
    cache = tmp_path / "cache"
    first = load_dataset(f"wds:{tmp_path}/p-{{0..2}}.tar", index_dir=str(cache))
    assert scans == paths and len(os.listdir(cache)) == 3
    second = load_dataset(f"wds:{tmp_path}/p-*.tar", index_dir=str(cache))  # a glob: the same shards, sorted
    assert scans == paths and list(second.keys) == list(first.keys) == [f"{k}-{i}" for k in range(3) for i in range(3)]
    load_dataset(f"wds:{tmp_path}/p-*.tar")
    assert len(scans) == 6  # no sidecar, no index_dir: built in memory


def test_identity_records_the_shards(folder, tmp_path):
    name = make_shards(str(folder), str(tmp_path / "shards"), shard_size=5)
    data = load_dataset(name, image_size=8)
    identity = data_identity(data)
    assert identity["shards"] == [[s.name, s.stop - s.start, s.size, s.mtime_ns] for s in data.shards]
    assert identity["files_fingerprint"] == data.files_fingerprint
    check_identity(identity, load_dataset(name, image_size=8), what="x")  # the same shards pass


def test_a_subset_keeps_its_keys_and_the_shards(folder, tmp_path):
    from kdfast.data import LabeledSubset
    name = make_shards(str(folder), str(tmp_path / "shards"), shard_size=5)
    data = load_dataset(name, image_size=8)
    part = LabeledSubset(data, [7, 2, 11])
    assert list(part.keys) == [data.keys[i] for i in (7, 2, 11)] and part.shards == data.shards
    assert data_identity(part)["shards"] == data_identity(data)["shards"]


def test_encoded_items_for_the_batched_decoder(folder, tmp_path):
    from kdfast.data.gpu_decode import BatchPipeline
    name = make_shards(str(folder), str(tmp_path / "shards"), shard_size=5)
    data = load_dataset(name, image_size=8, decode="cpu")
    ref = load_dataset("folder", root=str(folder), image_size=8, decode="cpu")
    raw, label, index = data[0]
    assert raw.dtype == torch.uint8 and bytes(raw.numpy()) == open(folder / ref.files[0], "rb").read()
    assert (label, index) == (int(ref.targets[0]), 0) and torch.equal(data.load(0), ref.load(0))
    assert isinstance(data.batch_pipeline("cpu"), BatchPipeline)
    with pytest.raises(DataError, match=r"'cat%2Fimg1' in shard .*shard-000000.tar is not a JPEG file"):
        data[1]
    assert data.with_augment(True).augment is not None


def test_batched_jpeg_decoding_scores_like_the_folder(tmp_path):
    import kdfast
    from PIL import Image
    from kdfast.models import create_model
    rng = np.random.default_rng(3)
    for c in ("a", "b"):
        os.makedirs(tmp_path / "jpegs" / c)
        for i in range(3):
            Image.fromarray(rng.integers(1, 255, (10 + i, 13, 3), dtype=np.uint8)).save(tmp_path / "jpegs" / c /
                                                                                        f"{i}.jpg")
    name = make_shards(str(tmp_path / "jpegs"), str(tmp_path / "shards"), shard_size=4)
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=2, in_channels=3, image_size=8)
    folder = load_dataset("folder", root=str(tmp_path / "jpegs"), image_size=8, decode="cpu")
    shards = load_dataset(name, image_size=8, decode="cpu")
    expected = kdfast.score([model], folder, "el2n", batch_size=4, progress=False)
    got = kdfast.score([model], shards, "el2n", batch_size=4, progress=False)
    assert expected.std() > 0 and torch.equal(torch.as_tensor(got), torch.as_tensor(expected))


# ------------------------------------------------------------------------------------------------ bad input
def _one_line(excinfo):
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_truncated_tar_names_the_shard(tmp_path):
    path = _write_tar(tmp_path / "t.tar", [{"__key__": f"k{i}", "png": _png_bytes(i, (40, 40)), "cls": 0}
                                           for i in range(3)])
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)
    with pytest.raises(DataError, match=r"shard .*t.tar is not a readable tar file, truncated") as excinfo:
        load_dataset(f"wds:{path}")
    _one_line(excinfo)


@pytest.mark.parametrize("sample, message", [
    ({"__key__": "k1", "cls": 0}, r"sample 'k1' in shard .*b.tar has no image: it needs an image \(jpg, jpeg, png"),
    ({"__key__": "k1", "png": b"x"}, r"sample 'k1' in shard .*b.tar has no label \(a cls or json member\)"),
    ({"__key__": "k1", "png": b"x", "cls": "seven"}, r"sample 'k1' in shard .*b.tar: the label \(its cls member\) is "
                                                     r"b'seven', not an int"),
    ({"__key__": "k1", "png": b"x", "json": '{"label": 1.5}'}, r"the label \(field 'label' of its json member\) is "
                                                               r"1.5, not an int"),
    ({"__key__": "k0", "png": b"x", "cls": 1}, r"key 'k0' occurs twice in shard .*b.tar"),
])
def test_bad_samples(tmp_path, sample, message):
    path = _write_tar(tmp_path / "b.tar", [{"__key__": "k0", "png": b"x", "cls": 0}, {"__key__": "z", "png": b"y",
                                                                                       "cls": 1}, sample])
    with pytest.raises(DataError, match=message) as excinfo:
        load_dataset(f"wds:{path}")
    _one_line(excinfo)


def test_duplicate_key_across_shards_names_both(tmp_path):
    a = _write_tar(tmp_path / "a.tar", [{"__key__": "same", "png": b"x", "cls": 0}])
    b = _write_tar(tmp_path / "b.tar", [{"__key__": "other", "png": b"x", "cls": 0},
                                        {"__key__": "same", "png": b"x", "cls": 1}])
    with pytest.raises(DataError, match=f"key 'same' occurs in shards {a} and {b}") as excinfo:
        load_dataset(f"wds:{tmp_path}/{{a,b}}.tar")
    _one_line(excinfo)


def test_patterns_matching_nothing(tmp_path):
    with pytest.raises(DataError, match=r"the pattern '.*none-\*.tar' matches no file"):
        load_dataset(f"wds:{tmp_path}/none-*.tar")
    _write_tar(tmp_path / "x-1.tar", [{"__key__": "k", "png": b"x", "cls": 0}])
    with pytest.raises(DataError, match=r"shard .*x-2.tar \(from '.*x-\{1..2\}.tar'\) does not exist"):
        load_dataset(f"wds:{tmp_path}/x-{{1..2}}.tar")
    with pytest.raises(DataError, match=r"the pattern '.*\*.parquet' matches no file"):
        load_dataset(f"parquet:{tmp_path}/*.parquet")


def test_parquet_bad_labels_and_ids(tmp_path):
    pq.write_table(pa.table({"image": pa.array([b"a", b"b"]), "label": pa.array([0.0, 1.0])}), tmp_path / "f.parquet")
    with pytest.raises(DataError, match=r"the label column 'label' of .*f.parquet holds double, not int"):
        load_dataset(f"parquet:{tmp_path}/f.parquet")
    pq.write_table(pa.table({"image": pa.array([b"a", b"b"]), "label": pa.array([0, 1]), "id": ["u", "u"]}),
                   tmp_path / "g.parquet")
    with pytest.raises(DataError, match=r"key 'u' occurs twice in shard .*g.parquet"):
        load_dataset(f"parquet:{tmp_path}/g.parquet")
    pq.write_table(pa.table({"image": pa.array(["s", "t"]), "label": pa.array([0, 1])}), tmp_path / "h.parquet")
    with pytest.raises(DataError, match=r"column 'image' of .*h.parquet holds string, not image bytes"):
        load_dataset(f"parquet:{tmp_path}/h.parquet")
    with pytest.raises(DataError, match=r"h.parquet has no column 'key'; its columns are image, label"):
        load_dataset(f"parquet:{tmp_path}/h.parquet", id_column="key")


def test_undecodable_image_names_shard_and_key(tmp_path):
    path = _write_tar(tmp_path / "u.tar", [{"__key__": "good", "png": _png_bytes(0), "cls": 0},
                                           {"__key__": "bad", "png": b"not an image", "cls": 1}])
    data = load_dataset(f"wds:{path}", image_size=4)
    assert data.load(0).shape == (3, 4, 4)
    with pytest.raises(DataError, match=r"dataset 'wds': cannot read image 'bad' in shard .*u.tar "
                                        r"\(UnidentifiedImageError") as excinfo:
        data.load(1)
    _one_line(excinfo)


def test_options_belong_to_their_source(tmp_path):
    with pytest.raises(InvalidArgumentError, match="image_ext apply to wds:/parquet: shard data sets only"):
        load_dataset("digits", image_ext="png")
    with pytest.raises(InvalidArgumentError, match="image_column apply to parquet data sets, not wds"):
        load_dataset(f"wds:{tmp_path}/*.tar", image_column="img")


def test_make_shards_command_round_trips(folder, tmp_path, capsys):
    out = tmp_path / "pq"
    assert make_shards_main([str(folder), str(out), "--shard-size", "4", "--format", "parquet"]) == 0
    name = capsys.readouterr().out.strip()
    assert name == f"parquet:{out}/shard-*.parquet"
    info = json.loads((out / "info.json").read_text())
    assert info["classes"] == ["cat", "dog", "emu"] and info["num_examples"] == 13
    assert [s["num_examples"] for s in info["shards"]] == [4, 4, 4, 1]
    table = pq.read_table(out / "shard-000001.parquet")
    ref = load_dataset("folder", root=str(folder))
    assert table.column("image")[0].as_py() == open(folder / ref.files[4], "rb").read()  # bytes unchanged
    assert table.column("id").to_pylist() == [folder_key(f) for f in ref.files[4:8]]
    assert pq.ParquetFile(out / "shard-000000.parquet").metadata.row_group(0).num_rows == 4
    assert make_shards_main([str(folder), str(out)]) == 1
    assert "already holds shards" in capsys.readouterr().err


def test_shard_reads_record_digests_and_a_rewrite_keeping_size_and_mtime_is_caught(folder, tmp_path):
    import tarfile
    import zlib

    import kdfast
    from kdfast.data.digests import DigestMismatchError
    from kdfast.models import create_model
    from kdfast.scoring.folder import expect_score_digests
    name = make_shards(str(folder), str(tmp_path / "shards"), shard_size=5, format="wds")
    ref = load_dataset("folder", root=str(folder), image_size=8)
    data = load_dataset(name, image_size=8)
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=3, in_channels=3, image_size=8).eval()
    kdfast.score(model, data, "el2n", batch_size=4, progress=False, out=tmp_path / "run")
    recorded = np.load(tmp_path / "run" / "digests.npy")  # the crc32 of each original image file's bytes
    assert recorded.tolist() == [zlib.crc32((folder / f).read_bytes()) for f in ref.files]
    shard, key = data.shards[1].name, data.keys[7]
    st = os.stat(shard)
    with tarfile.open(shard) as tar:  # the image member of example 7 (shard 1's third), rewritten in place
        member = next(m for m in tar.getmembers() if m.name.startswith(f"{key}.") and not m.name.endswith(".cls"))
    with open(shard, "r+b") as fh:
        fh.seek(member.offset_data + member.size // 2)
        fh.write(b"\x00\x01\x02\x03")
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as before: the index stays valid
    again = load_dataset(name, image_size=8)
    check_identity(data_identity(data), again, what="the scores")  # the up-front check cannot see it
    expect_score_digests(str(tmp_path / "run"), again)
    again.load(3)  # an untouched example reads as before
    with pytest.raises(DigestMismatchError) as info:
        again.load(7)
    assert f"{key}" in str(info.value) and "--scores" in str(info.value) and len(str(info.value).splitlines()) == 1
