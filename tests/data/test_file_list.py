"""FileList (paths in one byte buffer) behaves as the list of its paths; the files fingerprint follows every
path, size, mtime and the order; the scan keeps os.walk's order and takes each file's stat as it lists."""
from __future__ import annotations

import os

import numpy as np
import pytest

from kdfast.data.identity import FileList, file_stats, files_fingerprint
from kdfast.data.imagefolder import FOLDER_LAYOUT, scan_image_folder
from kdfast.io.atomic import read_file_list, write_file_list

PATHS = ["cat/a.jpg", "cat/sub/b.png", "dog/ü ñ.JPEG", "dog/x", "emu/" + "long" * 40 + ".jpg"]


def test_file_list_is_the_list_of_its_paths():
    files = FileList(PATHS, stats=np.arange(10).reshape(5, 2))
    assert len(files) == 5 and list(files) == PATHS and files == PATHS and PATHS == files
    assert [files[i] for i in range(-5, 5)] == PATHS + PATHS
    assert files[np.int64(2)] == PATHS[2] and files[1:4] == PATHS[1:4] and files[::-2] == PATHS[::-2]
    assert files[::-2].stats.tolist() == [[8, 9], [4, 5], [0, 1]]
    assert files.take([3, 0]) == [PATHS[3], PATHS[0]] and files.take([3, 0]).stats.tolist() == [[6, 7], [0, 1]]
    ascending = files.take([0, 2, 4])  # a subset: one byte mask instead of a slice per path
    assert ascending == PATHS[::2] and ascending.stats.tolist() == [[0, 1], [4, 5], [8, 9]]
    assert list(ascending.offsets) == [0, *np.cumsum([len(p.encode()) + 1 for p in PATHS[::2]])]
    assert files != PATHS[:4] and files != PATHS[::-1] and files == FileList(PATHS) and bool(files)
    assert not FileList([]) and FileList([]) == [] and "\n".join(files) == "\n".join(PATHS)
    assert set(files) == set(PATHS) and "dog/x" in files and files.index("dog/x") == 3
    with pytest.raises(IndexError):
        files[5]
    assert files.buffer == "".join(p + "\n" for p in PATHS).encode()  # files.txt's own format


def test_file_list_round_trips_through_files_txt(tmp_path):
    files = FileList(PATHS, stats=np.arange(10).reshape(5, 2))
    write_file_list(str(tmp_path / "files.txt"), files)
    assert (tmp_path / "files.txt").read_text(encoding="utf-8").splitlines() == PATHS
    back = read_file_list(str(tmp_path / "files.txt"))
    assert back == files and back.stats.tolist() == files.stats.tolist()
    write_file_list(str(tmp_path / "plain.txt"), ["a", "b/c"])  # a plain list: no stats beside it
    assert read_file_list(str(tmp_path / "plain.txt")) == ["a", "b/c"]
    assert not (tmp_path / "plain.txt.stat.npy").exists()


def _tree(root):
    for rel in ("cat/a.jpg", "cat/b.jpg", "dog/c.jpg"):
        os.makedirs(root / os.path.dirname(rel), exist_ok=True)
        (root / rel).write_bytes(b"x" * 10)


def test_fingerprint_follows_size_mtime_name_and_order(tmp_path):
    root = tmp_path / "f"
    _tree(root)

    def fingerprint(files=("cat/a.jpg", "cat/b.jpg", "dog/c.jpg")):
        return files_fingerprint(str(root), FileList(files, folder=str(root)))
    base = fingerprint()
    assert fingerprint() == base == files_fingerprint(str(root), ["cat/a.jpg", "cat/b.jpg", "dog/c.jpg"])
    assert fingerprint(("cat/b.jpg", "cat/a.jpg", "dog/c.jpg")) != base  # order
    st = os.stat(root / "cat/a.jpg")
    os.utime(root / "cat/a.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert fingerprint() != base  # mtime
    os.utime(root / "cat/a.jpg", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint() == base
    (root / "cat/b.jpg").write_bytes(b"y" * 11)
    os.utime(root / "cat/b.jpg", ns=(st.st_atime_ns, os.stat(root / "cat/b.jpg").st_mtime_ns))
    changed_size = fingerprint()
    (root / "cat/b.jpg").write_bytes(b"x" * 10)
    os.utime(root / "cat/b.jpg", ns=(st.st_atime_ns, os.stat(root / "cat/b.jpg").st_mtime_ns))
    assert changed_size != fingerprint()  # size, at the same mtime
    before_rename = fingerprint()
    os.rename(root / "dog/c.jpg", root / "dog/d.jpg")
    assert fingerprint(("cat/a.jpg", "cat/b.jpg", "dog/d.jpg")) != before_rename  # name, same size and mtime
    # the scan's own stats give the fingerprint of stat'ing every file afterwards
    scan = scan_image_folder(str(root), "folder", FOLDER_LAYOUT)
    assert scan[1].stats.tolist() == file_stats(str(root), list(scan[1])).tolist()
    assert files_fingerprint(str(root), scan[1]) == files_fingerprint(str(root), list(scan[1]))


def _walk_reference(folder):
    """kdfast's former scan: os.walk per class folder, folders and files sorted, AppleDouble left out."""
    files, labels = [], []
    for label, cls in enumerate(sorted(e.name for e in os.scandir(folder) if e.is_dir())):
        for dirpath, dirnames, filenames in os.walk(os.path.join(folder, cls)):
            dirnames.sort()
            files += [os.path.relpath(os.path.join(dirpath, f), folder) for f in sorted(filenames)
                      if f.lower().endswith((".jpg", ".png")) and not f.startswith("._")]
            labels += [label] * (len(files) - len(labels))
    return files, labels


def test_scan_keeps_os_walk_order_nested_folders_and_links(tmp_path):
    root = tmp_path / "f"
    for rel in ("b/z.jpg", "b/a/y.png", "b/a/c/x.jpg", "b/a0/w.JPG", "b/0.jpg", "a/q.png", "a/._q.png",
                "a/notes.txt", "c/d/e/f.jpg"):
        os.makedirs(root / os.path.dirname(rel), exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    (root / "b" / "link").symlink_to(root / "c")  # a link below a class: not followed, as os.walk
    (root / "b" / "gone.jpg").symlink_to(root / "nowhere.jpg")  # a dangling link: listed, stat -1
    classes, files, labels = scan_image_folder(str(root), "folder", FOLDER_LAYOUT)
    ref_files, ref_labels = _walk_reference(str(root))
    assert classes == ["a", "b", "c"] and files == ref_files and labels.tolist() == ref_labels
    assert files.stats.tolist() == file_stats(str(root), ref_files).tolist()
    assert files.stats[files.index(os.path.join("b", "gone.jpg"))].tolist() == [-1, -1]


@pytest.mark.parametrize("shift", [0, 70_000, -3])  # 16-bit labels (a radix sort) and others
def test_stratified_split_draws_what_a_per_class_loop_draws(shift):
    import torch

    from kdfast.data.split import stratified_split
    gen = torch.Generator().manual_seed(0)
    targets = torch.tensor([5, 0, 9, 5, 5, 9, 0, 5, 9, 9, 2] * 13)[torch.randperm(143, generator=gen)] + shift
    train, held = stratified_split(targets, 0.3, seed=7)
    draw, expected = torch.Generator().manual_seed(7), []
    for c in torch.unique(targets).tolist():  # the former loop: one comparison pass per class, in label order
        members = torch.nonzero(targets == c).reshape(-1)
        k = min(max(int(round(0.3 * len(members))), 1), len(members) - 1)
        expected += members[torch.randperm(len(members), generator=draw)[:k]].tolist()
    assert held.tolist() == sorted(expected)
    assert sorted(train.tolist() + held.tolist()) == list(range(143))
