"""Content digests of image-folder reads (kdfast.data.digests): the crc32 of each file's bytes, recorded by the
readers in a shared table that loader workers fill, checked against expected digests as the bytes are read."""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import torch
from _fake_datasets import replace_keeping_size_and_mtime, write_image_folder

from kdfast.data import LabeledSubset, load_dataset
from kdfast.data.digests import UNREAD, DigestMismatchError, read_digests


def _crc32s(root, files):
    """The independent reference: zlib.crc32 of each file's bytes, read here."""
    return np.array([zlib.crc32(open(os.path.join(root, f), "rb").read()) for f in files], dtype=np.int64)


def _read_all(data, num_workers=0, context=None):
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=num_workers,
                                         multiprocessing_context=context if num_workers else None)
    for _ in loader:
        pass


@pytest.mark.parametrize("num_workers,context", [(0, None), (2, "fork"), (2, "spawn")])
def test_reads_record_the_crc32_of_each_file_also_from_loader_workers(tmp_path, num_workers, context):
    root = tmp_path / "photos"
    files = write_image_folder(root, per_class=3, size=(24, 18))
    data = load_dataset("folder", root=root, image_size=8)
    assert (read_digests(data) == UNREAD).all()  # nothing read yet
    _read_all(data, num_workers, context)
    np.testing.assert_array_equal(read_digests(data), _crc32s(root, files))
    # a subset maps to the parent's rows; the augmented view shares the table (the same files)
    sub = LabeledSubset(data, [5, 1])
    np.testing.assert_array_equal(read_digests(sub), _crc32s(root, [files[5], files[1]]))
    assert data.with_augment(False).digests is data.digests


def test_the_byte_reader_of_batched_jpeg_decoding_records_them_too(tmp_path):
    root = tmp_path / "photos"
    write_image_folder(root, per_class=2, size=(24, 18))
    for path in list(root.rglob("*.png")):
        path.unlink()  # the batched decoder reads JPEG only
    data = load_dataset("folder", root=root, image_size=8, decode="cpu")
    for i in range(len(data)):
        data[i]
    np.testing.assert_array_equal(read_digests(data), _crc32s(root, data.files))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_same_size_same_mtime_replacement_fails_its_first_read_naming_the_file(tmp_path, num_workers):
    root = tmp_path / "photos"
    files = write_image_folder(root, per_class=3, size=(24, 18))
    recorded = _crc32s(root, files)
    replace_keeping_size_and_mtime(root / files[4])
    data = load_dataset("folder", root=root, image_size=8)
    assert data.files_fingerprint == load_dataset("folder", root=root).files_fingerprint  # stats unchanged
    sub = LabeledSubset(data, [4, 0])
    sub.expect_digests(recorded[[4, 0]], what="--scores runs/s", hint="rescore or restore the file")
    sub[1]  # an unchanged file reads fine
    with pytest.raises(DigestMismatchError, match=rf"{root / files[4]} changed since --scores runs/s read it .*"
                                                  "rescore or restore the file"):
        _read_all(sub, num_workers, "fork")


def test_a_file_that_changes_between_two_reads_of_one_run_fails(tmp_path):
    root = tmp_path / "photos"
    files = write_image_folder(root, per_class=2, size=(24, 18))
    data = load_dataset("folder", root=root, image_size=8)
    data[3]
    replace_keeping_size_and_mtime(root / files[3])
    data[2]
    with pytest.raises(DigestMismatchError, match=f"{files[3]} changed while this run was reading it"):
        data[3]


def test_unread_rows_and_other_data_sets_expect_nothing(tmp_path):
    root = tmp_path / "photos"
    files = write_image_folder(root, per_class=2, size=(24, 18))
    data = load_dataset("folder", root=root, image_size=8)
    expected = _crc32s(root, files)
    expected[1] = UNREAD
    replace_keeping_size_and_mtime(root / files[1])
    data.expect_digests(expected, what="x")
    for i in range(len(data)):
        data[i]
    digits = load_dataset("digits")
    digits.expect_digests(np.zeros(len(digits)), what="x")  # reads no files: nothing to check
    assert read_digests(digits) is None
