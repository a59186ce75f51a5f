"""TeacherCache: round trip (full and top-k, fp16 and fp32), resumable writer, refusal on fingerprint mismatch,
incomplete caches and bad arguments."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import kdfast
from kdfast.errors import InvalidArgumentError
from kdfast.distill.teacher_cache import TeacherCache, TeacherCacheMismatchError

N, C = 37, 11
FP = dict(dataset_fingerprint="d" * 64, teacher_fingerprint="t" * 64)


def _fill(path, logits, *, topk=None, dtype="float16", batch=8):
    writer = TeacherCache.create(path, num_examples=N, num_classes=C, topk=topk, dtype=dtype, **FP)
    order = torch.randperm(N)  # any order of rows
    for idx in order.split(batch):
        writer.write(idx, logits[idx])
    writer.close()


@pytest.mark.parametrize("dtype, tol", [("float16", 1e-3), ("float32", 0.0)])
def test_full_round_trip(tmp_path, dtype, tol):
    logits = torch.randn(N, C) * 8
    _fill(tmp_path / "c", logits, dtype=dtype)
    cache = TeacherCache.open(tmp_path / "c", **FP)
    idx = torch.tensor([5, 0, 36, 5, 17])
    got = cache[idx]
    assert got.dtype == torch.float32 and got.shape == (5, C)
    rel = float(((got - logits[idx]).abs() / logits[idx].abs().clamp(min=1e-3)).max())
    assert rel <= tol, f"max rel err {rel:.2e}"
    assert torch.equal(cache[np.arange(N)], cache[torch.arange(N)])
    assert len(cache) == N and cache.num_classes == C and cache.topk is None
    assert kdfast.TeacherCache is TeacherCache


def test_topk_round_trip_has_minus_inf_outside_kept_classes(tmp_path):
    logits = torch.randn(N, C) * 5
    _fill(tmp_path / "c", logits, topk=3, dtype="float32")
    got = TeacherCache.open(tmp_path / "c")[torch.arange(N)]
    top = logits.topk(3, dim=-1)
    expected = torch.full_like(logits, float("-inf")).scatter(1, top.indices, top.values)
    assert torch.equal(got, expected)
    # the KD loss treats -inf as probability 0: identical to distilling from the renormalised top-3
    s, y = torch.randn(N, C), torch.randint(0, C, (N,))
    loss = kdfast.kd_loss(s, got, y, alpha=1.0, temperature=2.0, backend="torch")
    q = torch.zeros(N, C).scatter(1, top.indices, torch.softmax(top.values.double() / 2.0, -1).float())
    ref = (q * (q.clamp(min=1e-30).log() - torch.log_softmax(s.double() / 2.0, -1))).sum(-1).mean() * 4.0
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)


def test_refuses_other_dataset_or_teacher(tmp_path):
    _fill(tmp_path / "c", torch.randn(N, C))
    with pytest.raises(TeacherCacheMismatchError, match="another dataset"):
        TeacherCache.open(tmp_path / "c", dataset_fingerprint="x" * 64)
    with pytest.raises(TeacherCacheMismatchError, match="another teacher"):
        TeacherCache.open(tmp_path / "c", teacher_fingerprint="y" * 64)
    cache = TeacherCache.open(tmp_path / "c")
    with pytest.raises(TeacherCacheMismatchError, match="another teacher"):
        cache.check(teacher_fingerprint="y" * 64)
    assert isinstance(TeacherCacheMismatchError("x"), InvalidArgumentError)


def test_incomplete_cache_is_refused_then_resumed(tmp_path):
    logits = torch.randn(N, C)
    writer = TeacherCache.create(tmp_path / "c", num_examples=N, num_classes=C, dtype="float32", **FP)
    writer.write(torch.arange(20), logits[:20])
    with pytest.raises(InvalidArgumentError, match="17 of 37 rows were never written"):
        writer.close()
    with pytest.raises(InvalidArgumentError, match="incomplete"):
        TeacherCache.open(tmp_path / "c")
    with pytest.raises(InvalidArgumentError, match="already exists"):
        TeacherCache.create(tmp_path / "c", num_examples=N, num_classes=C, **FP)
    with pytest.raises(InvalidArgumentError, match="other settings"):
        TeacherCache.create(tmp_path / "c", num_examples=N, num_classes=C, dtype="float16", resume=True, **FP)
    writer = TeacherCache.create(tmp_path / "c", num_examples=N, num_classes=C, dtype="float32", resume=True, **FP)
    assert writer.num_written == 20
    writer.write(torch.arange(20, N), logits[20:])
    writer.close()
    assert torch.equal(TeacherCache.open(tmp_path / "c")[torch.arange(N)], logits)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_examples=0), "num_examples must be a positive integer"),
    (dict(num_classes=2.5), "num_classes must be a positive integer"),
    (dict(topk=0), "topk must be None"),
    (dict(topk=C + 1), "topk must be None"),
    (dict(dtype="int8"), "dtype must be one of"),
    (dict(dataset_fingerprint=""), "dataset_fingerprint must be a non-empty string"),
    (dict(teacher_fingerprint=None), "teacher_fingerprint must be a non-empty string"),
])
def test_create_rejects_bad_arguments(tmp_path, kwargs, match):
    args = dict(num_examples=N, num_classes=C, **FP)
    args.update(kwargs)
    with pytest.raises(InvalidArgumentError, match=match):
        TeacherCache.create(tmp_path / "c", **args)


def test_write_and_read_reject_bad_indices_and_shapes(tmp_path):
    writer = TeacherCache.create(tmp_path / "c", num_examples=N, num_classes=C, **FP)
    with pytest.raises(InvalidArgumentError, match=r"indices must lie in \[0, 37\)"):
        writer.write(torch.tensor([0, 37]), torch.randn(2, C))
    with pytest.raises(InvalidArgumentError, match=r"logits must be a \(2, 11\) tensor"):
        writer.write(torch.tensor([0, 1]), torch.randn(2, C + 1))
    with pytest.raises(InvalidArgumentError, match="indices must be integers"):
        writer.write(torch.tensor([0.0, 1.0]), torch.randn(2, C))
    writer.write(torch.arange(N), torch.randn(N, C))
    writer.close()
    cache = TeacherCache.open(tmp_path / "c")
    with pytest.raises(InvalidArgumentError, match=r"indices must lie in \[0, 37\)"):
        cache[torch.tensor([-1])]


def test_open_reports_missing_damaged_or_foreign_caches(tmp_path):
    with pytest.raises(InvalidArgumentError, match="no cache at"):
        TeacherCache.open(tmp_path / "nothing")
    _fill(tmp_path / "c", torch.randn(N, C))
    os.remove(tmp_path / "c" / "logits.npy")
    with pytest.raises(InvalidArgumentError, match="damaged"):
        TeacherCache.open(tmp_path / "c")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "meta.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(InvalidArgumentError, match="format"):
        TeacherCache.open(tmp_path / "d")
    (tmp_path / "d" / "meta.json").write_text("{not json")
    with pytest.raises(InvalidArgumentError, match="not valid JSON"):
        TeacherCache.open(tmp_path / "d")


def test_check_dataset_names_the_files_that_differ(tmp_path):
    # a cache of an image folder is tied to its file list, not only to its labels
    from _fake_datasets import write_image_folder

    from kdfast.data import data_identity, load_dataset
    write_image_folder(tmp_path / "f")
    data = load_dataset("folder", root=tmp_path / "f", image_size=8)
    identity = data_identity(data)
    writer = TeacherCache.create(tmp_path / "c", num_examples=len(data), num_classes=3,
                                 dataset_fingerprint=identity["labels_fingerprint"], teacher_fingerprint="t" * 64,
                                 files=data.files, files_fingerprint=identity["files_fingerprint"])
    writer.write(torch.arange(len(data)), torch.randn(len(data), 3))
    writer.close()
    cache = TeacherCache.open(tmp_path / "c")
    cache.check_dataset(data)  # the same files
    (tmp_path / "f" / "emu" / "img2.JPEG").rename(tmp_path / "f" / "emu" / "img9.JPEG")  # same labels, other file
    renamed = load_dataset("folder", root=tmp_path / "f", image_size=8)
    assert torch.equal(renamed.targets, data.targets)
    with pytest.raises(TeacherCacheMismatchError, match=r"files_fingerprint differ; 1 files gone: emu/img2.JPEG; "
                                                        r"1 new: emu/img9.JPEG"):
        cache.check_dataset(renamed)
    with pytest.raises(TeacherCacheMismatchError, match="was built from another dataset"):
        cache.check_dataset(load_dataset("digits"))


def test_a_label_mismatch_names_the_examples_that_differ(tmp_path):
    from _fake_datasets import write_image_folder

    from kdfast.data import data_identity, load_dataset
    write_image_folder(tmp_path / "f")
    data = load_dataset("folder", root=tmp_path / "f", image_size=8)
    identity = data_identity(data)
    writer = TeacherCache.create(tmp_path / "c", num_examples=len(data), num_classes=3,
                                 dataset_fingerprint=identity["labels_fingerprint"], teacher_fingerprint="t" * 64,
                                 files=data.files, files_fingerprint=identity["files_fingerprint"], labels=data.targets)
    writer.write(torch.arange(len(data)), torch.randn(len(data), 3))
    writer.close()
    (tmp_path / "f" / "emu" / "img0.JPEG").rename(tmp_path / "f" / "dog" / "img9.JPEG")  # relabelled: emu -> dog
    (tmp_path / "f" / "emu" / "img1.png").rename(tmp_path / "f" / "dog" / "img8.png")
    moved = load_dataset("folder", root=tmp_path / "f", image_size=8)
    # index 6 and 7 held emu's first two images (label 2); they now hold dog's moved ones (label 1)
    with pytest.raises(TeacherCacheMismatchError, match=r"built from another dataset .* \(2 labels differ: "
                                                        r"emu/img0.JPEG: 2 then, 1 now, emu/img1.png: 2 then, 1 now\)"):
        TeacherCache.open(tmp_path / "c").check_dataset(moved)


# ------------------------------------------------------------------------------ keyed sources: rows by key
def _keyed_cache(path, data, logits, topk=None):
    from kdfast.data import labels_fingerprint
    from kdfast.data.keys import example_keys
    writer = TeacherCache.create(path, num_examples=len(data), num_classes=10, topk=topk, dtype="float32",
                                 dataset_fingerprint=labels_fingerprint(data.targets), teacher_fingerprint="t" * 64,
                                 labels=data.targets, keys=example_keys(data))
    writer.write(torch.arange(len(data)), logits)
    writer.close()
    return TeacherCache.open(path)


@pytest.mark.parametrize("topk", [None, 3])
def test_a_keyed_subset_in_another_order_gets_its_rows_by_key(tmp_path, topk):
    pytest.importorskip("pyarrow")
    from _fake_datasets import keyed_digits
    from kdfast.data import LabeledSubset
    data = keyed_digits()
    logits = torch.randn(len(data), 10, generator=torch.Generator().manual_seed(0)) * 4
    cache = _keyed_cache(tmp_path / "c", data, logits, topk)
    assert (tmp_path / "c" / "keys.parquet").is_file()
    assert cache.for_dataset(data) is cache  # the same keys in the same order: the cache itself
    order = torch.from_numpy(np.random.default_rng(5).permutation(len(data))[:50])
    subset = LabeledSubset(data, order)
    view = cache.for_dataset(subset)
    assert len(view) == 50
    view.check_dataset(subset)
    rows = torch.tensor([7, 0, 49, 13])
    np.testing.assert_array_equal(view[rows].numpy(), cache[order[rows]].numpy())
    if topk:
        a, b = view.topk_rows(rows), cache.topk_rows(order[rows])
        assert torch.equal(a.indices, b.indices) and torch.equal(a.logprobs, b.logprobs)
    else:
        np.testing.assert_array_equal(view[rows].numpy(), logits[order[rows]].numpy())
    # labels found by key must agree with those the cache recorded
    relabelled = LabeledSubset(data, order)
    relabelled.targets = (relabelled.targets + 1) % 10
    with pytest.raises(TeacherCacheMismatchError, match="50 of 50 examples found by key have other labels"):
        cache.for_dataset(relabelled).check_dataset(relabelled)


def test_keys_unknown_to_the_cache_are_named(tmp_path):
    pytest.importorskip("pyarrow")
    from _fake_datasets import keyed_digits
    from kdfast.data.keys import KeyMatchError
    data = keyed_digits()
    cache = _keyed_cache(tmp_path / "c", data, torch.randn(len(data), 10))
    other = keyed_digits(n=30, shard_sizes=(30,), seed=9)  # keys the cache never saw
    message = r"^keyed: 27 of 30 keys match no example of TeacherCache .*; was it made for another data set\?$"
    with pytest.raises(KeyMatchError, match=message):
        cache.for_dataset(other)


def test_fit_on_a_keyed_subset_through_the_view_equals_a_cache_built_for_that_subset(tmp_path):
    pytest.importorskip("pyarrow")
    from _fake_datasets import keyed_digits
    from kdfast.data import LabeledSubset
    from kdfast.models import create_model
    from kdfast.training.fit import fit
    from kdfast.training.recipe import TrainRecipe
    data = keyed_digits()
    logits = torch.randn(len(data), 10, generator=torch.Generator().manual_seed(1)) * 3
    order = torch.from_numpy(np.random.default_rng(6).permutation(len(data))[:64])
    subset = LabeledSubset(data, order)
    view = _keyed_cache(tmp_path / "whole", data, logits).for_dataset(subset)
    direct = _keyed_cache(tmp_path / "direct", subset, logits[order])  # its own keys, in the subset's order
    students = []
    for cache in (view, direct):
        torch.manual_seed(0)
        student = create_model("mlp", num_classes=10, in_channels=1, image_size=8)
        fit(student, subset, TrainRecipe(epochs=1, batch_size=16, lr=0.05, seed=0),
            kdfast.KDSetup(teacher_cache=cache, alpha=0.7, temperature=2.0), progress=False)
        students.append(student)
    for a, b in zip(*(s.parameters() for s in students)):
        assert torch.equal(a, b)
