"""Data identity: what ties an artifact (scores, keep files, teacher caches, jobs) to one data set.

    identity = data_identity(dataset)   # {"name", "num_examples", "num_classes", "labels_fingerprint",
                                        #  "files_fingerprint" (file-backed data sets, else None)}
    check_identity(recorded, dataset, what="--keep keep.npy", recorded_files=[...])   # DataIdentityError

The labels fingerprint catches another data set or split; the files fingerprint (sha256 of every relative
path, file size and modification time in ns, in index order) catches renamed, moved, added or replaced files
of an image folder even when the labels stay the same, a replacement of the same size included. It is one
stat per file (cheap at any scale); a file rewritten with its old mtime restored passes it.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from kdfast.errors import DataError


class DataIdentityError(DataError):
    """An artifact was made from another data set (other labels, other files) than the one given."""


def labels_fingerprint(targets) -> str:
    """sha256 hex of the labels as little-endian int64: ties scores and caches to one labelling of one data set."""
    arr = np.ascontiguousarray(torch.as_tensor(targets, dtype=torch.int64).cpu().numpy(), dtype="<i8")
    return hashlib.sha256(arr.tobytes()).hexdigest()


def file_stats(folder: str, files) -> np.ndarray:
    """(N, 2) int64: the size in bytes and mtime_ns of each file under `folder`; -1, -1 for a vanished one."""
    stats = np.full((len(files), 2), -1, dtype=np.int64)
    for i, rel in enumerate(files):
        try:
            st = os.stat(os.path.join(folder, rel))
        except OSError:
            continue  # a vanished file: the fingerprint changes, the consumer reports it
        stats[i] = st.st_size, st.st_mtime_ns
    return stats


class FileList(list):
    """A data set's relative file paths with each file's (size, mtime_ns) in `.stats`: taken from disk once (on
    first use) when `folder` is given, or as recorded beside a stored list, so a mismatch can name the files."""

    def __init__(self, files=(), *, folder: str | None = None, stats: np.ndarray | None = None):
        super().__init__(files)
        self.folder, self._stats = folder, stats

    @property
    def stats(self) -> np.ndarray | None:
        if self._stats is None and self.folder is not None:
            self._stats = file_stats(self.folder, self)
        return self._stats


def files_fingerprint(folder: str, files: list[str]) -> str:
    """sha256 hex over `relative path <TAB> size in bytes <TAB> mtime_ns` of every file, in index order (the
    stats of a FileList taken once, else stat'ed here)."""
    stats = getattr(files, "stats", None)
    stats = file_stats(folder, files) if stats is None else stats
    h = hashlib.sha256()
    for rel, (size, mtime) in zip(files, stats.tolist()):
        h.update(f"{rel}\t{size}\t{mtime}\n".encode())
    return h.hexdigest()


def data_identity(dataset) -> dict:
    """The identity of a kdfast data set (see the module docstring), or of bare labels (an int array); JSON-able."""
    if not hasattr(dataset, "targets"):
        return {"name": None, "num_examples": len(dataset), "num_classes": None,
                "labels_fingerprint": labels_fingerprint(dataset), "files_fingerprint": None}
    identity = {"name": getattr(dataset, "name", None), "num_examples": len(dataset),
                "num_classes": getattr(dataset, "num_classes", None),
                "labels_fingerprint": labels_fingerprint(dataset.targets),
                "files_fingerprint": dataset_files_fingerprint(dataset)}
    if getattr(dataset, "shards", None) is not None:  # shard data sets: the list, so a mismatch can name shards
        from kdfast.data.shard_index import shard_records
        identity["shards"] = shard_records(dataset.shards)
    return identity


def dataset_files_fingerprint(dataset) -> str | None:
    """The data set's files fingerprint (computed once per data set object), None when it has no files."""
    fingerprint = getattr(dataset, "files_fingerprint", None)
    if fingerprint is not None or getattr(dataset, "files", None) is None:
        return fingerprint
    return files_fingerprint(dataset.folder, dataset.files)


def describe_file_mismatch(recorded: list[str], current: list[str], limit: int = 5) -> str:
    """The first files that differ between two file lists, for error messages: files gone and new ones by
    name, else (the same names) the first positions that differ, else a note that sizes differ."""
    def first(names):
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        return ", ".join(names[:limit]) + more
    old, new = set(recorded), set(current)
    gone, added = [f for f in recorded if f not in new], [f for f in current if f not in old]
    if gone or added:
        return "; ".join(part for part in (f"{len(gone)} files gone: {first(gone)}" if gone else "",
                                           f"{len(added)} new: {first(added)}" if added else "") if part)
    moved = [f"index {i}: {a} then, {b} now" for i, (a, b) in enumerate(zip(recorded, current)) if a != b]
    if moved:
        return f"{len(moved)} files at other positions: {first(moved)}"
    old_stats, new_stats = getattr(recorded, "stats", None), getattr(current, "stats", None)
    if old_stats is None or new_stats is None:
        return "the same file names, but file sizes or modification times differ: files were replaced"
    changed = [current[i] for i in (old_stats != new_stats).any(1).nonzero()[0]]
    return f"{len(changed)} files replaced or modified (size or modification time differs): {first(changed)}"


def check_identity(recorded: dict | None, dataset, *, what: str, recorded_files: list[str] | None = None,
                   hint: str = "rebuild it from this data set, or point it at the data it was made from") -> None:
    """Raises DataIdentityError unless `dataset` is the data set `recorded` (a data_identity dict) describes.

    Fields missing from `recorded` (older artifacts) are not checked. The message names the artifact (`what`),
    the differing fields and, for file lists, the first mismatched files when `recorded_files` is given.
    """
    if not recorded:
        return
    now = data_identity(dataset)
    problems = []
    for key in ("num_examples", "labels_fingerprint", "files_fingerprint"):
        old = recorded.get(key)
        if old is None and key == "files_fingerprint" and now[key] is None:
            continue
        if key in recorded and old != now[key]:
            problems.append(key)
    if not problems:
        return
    here = f"{dataset.name!r} here" if getattr(dataset, "name", None) else "these labels"
    text = f"{what} was made from another data set than {here} ({', '.join(problems)} differ"
    if "files_fingerprint" in problems:
        if recorded_files is not None and getattr(dataset, "files", None) is not None:
            text += "; " + describe_file_mismatch(recorded_files, dataset.files)
        elif recorded.get("shards") is not None and now.get("shards") is not None:  # shard data sets name shards
            from kdfast.data.shard_index import describe_shard_mismatch
            text += "; " + describe_shard_mismatch(recorded["shards"], now["shards"])
        elif "labels_fingerprint" not in problems:
            text += "; the image files were renamed, moved, added or replaced"
    raise DataIdentityError(f"{text}); {hint}")
