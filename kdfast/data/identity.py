"""Data identity: what ties an artifact (scores, keep files, teacher caches, jobs) to one data set.

    identity = data_identity(dataset)   # {"name", "num_examples", "num_classes", "labels_fingerprint",
                                        #  "files_fingerprint" (file-backed data sets, else None)}
    check_identity(recorded, dataset, what="--keep keep.npy", recorded_files=[...])   # DataIdentityError

The labels fingerprint catches another data set or split; the files fingerprint (sha256 of every relative
path, file size and modification time in ns, in index order: FILES_FINGERPRINT_FORMAT) catches renamed, moved,
added or replaced files of an image folder even when the labels stay the same, a replacement of the same size
included. The sizes and mtimes come from the folder scan's own stat of each file (no second pass); a file
rewritten with its old mtime restored passes it. An artifact made from a listing of names alone (kdfast-prune's
keep file from a score file keyed by file name, data/folder_listing.py) records `file_names_fingerprint` instead:
the paths in their order, checked the same way.

A data set's paths are a FileList: a read-only sequence of str over one UTF-8 byte buffer (each path ended by a
newline, files.txt's own format) with int64 offsets and an (N, 2) int64 `.stats` of sizes and mtimes, so 1.28M
ImageNet paths take ~50 MB instead of ~150 MB of Python strings.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np

from kdfast.errors import DataError, first_names
from kdfast.runtime.arrays import to_numpy

# what files_fingerprint hashes, in this order: this tag, the N + 1 path offsets (int64 little-endian), the
# newline-ended UTF-8 paths, the (N, 2) sizes and mtime_ns (int64 little-endian, row-major)
FILES_FINGERPRINT_FORMAT = b"kdfast-files-v2\n"
# what file_names_fingerprint hashes: this tag, the offsets and the paths as above (no stats)
FILE_NAMES_FINGERPRINT_FORMAT = b"kdfast-file-names-v1\n"


class DataIdentityError(DataError):
    """An artifact was made from another data set (other labels, other files) than the one given."""


def labels_fingerprint(targets) -> str:
    """sha256 hex of the labels as little-endian int64: ties scores and caches to one labelling of one data set."""
    arr = np.ascontiguousarray(to_numpy(targets).astype(np.int64, copy=False), dtype="<i8")
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


def _encode(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")  # surrogateescape: os.fsdecode's undecodable file-name bytes


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class FileList(Sequence):
    """A data set's relative file paths (a read-only sequence of str) with each file's (size, mtime_ns) in
    `.stats`: taken by the scan, or from disk once (on first use) when only `folder` is given, or as recorded
    beside a stored list, so a mismatch can name the files.

    Held as `buffer` (every path UTF-8 encoded and ended by a newline) and `offsets` (int64, N + 1: path i is
    buffer[offsets[i]:offsets[i + 1] - 1]). Equal to any sequence of the same strings."""

    def __init__(self, files=(), *, folder: str | None = None, stats: np.ndarray | None = None):
        if isinstance(files, FileList):
            buffer, offsets = files.buffer, files.offsets
        else:
            encoded = [_encode(f) + b"\n" for f in files]
            buffer = b"".join(encoded)
            offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
            np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=offsets[1:])
        self._init(buffer, offsets, folder, stats)

    def _init(self, buffer: bytes, offsets: np.ndarray, folder, stats) -> None:
        self.buffer, self.offsets, self.folder, self._stats = buffer, offsets, folder, stats

    @classmethod
    def from_buffer(cls, buffer: bytes, offsets: np.ndarray, *, folder: str | None = None,
                    stats: np.ndarray | None = None) -> "FileList":
        """A FileList over newline-ended paths already joined in `buffer` (no copy)."""
        out = cls.__new__(cls)
        out._init(buffer, np.asarray(offsets, dtype=np.int64), folder, stats)
        return out

    @classmethod
    def from_lines(cls, data: bytes, **kwargs) -> "FileList":
        """The paths of `data`, one a line (a newline ends the last one too when missing)."""
        if data and not data.endswith(b"\n"):
            data += b"\n"
        ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10) + 1
        return cls.from_buffer(data, np.concatenate([[0], ends]).astype(np.int64), **kwargs)

    @property
    def stats(self) -> np.ndarray | None:
        if self._stats is None and self.folder is not None:
            self._stats = file_stats(self.folder, self)
        return self._stats

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(range(len(self))[index])
        n = len(self)
        i = int(index) + n if int(index) < 0 else int(index)  # int(): numpy and torch integers index too
        if not 0 <= i < n:
            raise IndexError(f"FileList index {index} out of range ({n} files)")
        return _decode(self.buffer[self.offsets[i]:self.offsets[i + 1] - 1])

    def __iter__(self):
        bounds = self.offsets.tolist()
        buffer = self.buffer
        return (_decode(buffer[a:b - 1]) for a, b in zip(bounds, bounds[1:]))

    def take(self, indices) -> "FileList":
        """The paths (and stats) at `indices`, in that order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        starts, ends = self.offsets[idx], self.offsets[idx + 1]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
        if len(idx) > 1 and bool((idx[1:] > idx[:-1]).all()):  # ascending (a subset): one mask over the bytes
            lines = np.zeros(len(self), dtype=bool)
            lines[idx] = True
            joined = np.frombuffer(self.buffer, np.uint8)[np.repeat(lines, np.diff(self.offsets))].tobytes()
        else:
            buffer = self.buffer
            joined = b"".join(buffer[a:b] for a, b in zip(starts.tolist(), ends.tolist()))
        return FileList.from_buffer(joined, offsets, folder=self.folder,
                                    stats=None if self._stats is None else self._stats[idx])

    def __eq__(self, other):
        if isinstance(other, FileList):
            return self.buffer == other.buffer and np.array_equal(self.offsets, other.offsets)
        if isinstance(other, (list, tuple, Sequence)) and not isinstance(other, (str, bytes)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # mutable-list semantics: not hashable

    def __repr__(self) -> str:
        head = ", ".join(repr(f) for f in self.take(range(min(3, len(self)))))
        return f"FileList([{head}{', ...' if len(self) > 3 else ''}], {len(self)} files)"

    def tolist(self) -> list[str]:
        return list(self)


def as_file_list(files, folder: str | None = None) -> FileList:
    """`files` as a FileList (itself when it is one)."""
    return files if isinstance(files, FileList) else FileList(files, folder=folder)


def files_fingerprint(folder: str, files) -> str:
    """sha256 hex over FILES_FINGERPRINT_FORMAT: every relative path, size in bytes and mtime_ns, in index
    order (the stats of a FileList taken once, else stat'ed here); one pass over the buffers, no per-file work."""
    files = as_file_list(files, folder)
    stats = files.stats if files.stats is not None else file_stats(folder, files)
    h = hashlib.sha256(FILES_FINGERPRINT_FORMAT)
    h.update(np.ascontiguousarray(files.offsets, dtype="<i8").data)
    h.update(files.buffer)
    h.update(np.ascontiguousarray(stats, dtype="<i8").data)
    return h.hexdigest()


def file_names_fingerprint(files) -> str:
    """sha256 hex over FILE_NAMES_FINGERPRINT_FORMAT: every relative path, in index order (no stats)."""
    files = as_file_list(files)
    h = hashlib.sha256(FILE_NAMES_FINGERPRINT_FORMAT)
    h.update(np.ascontiguousarray(files.offsets, dtype="<i8").data)
    h.update(files.buffer)
    return h.hexdigest()


def data_identity(dataset) -> dict:
    """The identity of a kdfast data set (see the module docstring), or of bare labels (an int array); JSON-able.
    A listing of file names alone (`names_only`, data/folder_listing.py) gives `file_names_fingerprint` in place
    of `files_fingerprint`."""
    if not hasattr(dataset, "targets"):
        return {"name": None, "num_examples": len(dataset), "num_classes": None,
                "labels_fingerprint": labels_fingerprint(dataset), "files_fingerprint": None}
    identity = {"name": getattr(dataset, "name", None), "num_examples": len(dataset),
                "num_classes": getattr(dataset, "num_classes", None),
                "labels_fingerprint": labels_fingerprint(dataset.targets)}
    if getattr(dataset, "names_only", False):
        identity["file_names_fingerprint"] = file_names_fingerprint(dataset.files)
    else:
        identity["files_fingerprint"] = dataset_files_fingerprint(dataset)
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
    old, new = set(recorded), set(current)
    gone, added = [f for f in recorded if f not in new], [f for f in current if f not in old]
    if gone or added:
        return "; ".join(part for part in (f"{len(gone)} files gone: {first_names(gone, limit)}" if gone else "",
                                           f"{len(added)} new: {first_names(added, limit)}" if added else "") if part)
    moved = [f"index {i}: {a} then, {b} now" for i, (a, b) in enumerate(zip(recorded, current)) if a != b]
    if moved:
        return f"{len(moved)} files at other positions: {first_names(moved, limit)}"
    old_stats, new_stats = getattr(recorded, "stats", None), getattr(current, "stats", None)
    if old_stats is None or new_stats is None:
        return "the same file names, but file sizes or modification times differ: files were replaced"
    changed = [current[i] for i in (old_stats != new_stats).any(1).nonzero()[0]]
    return f"{len(changed)} files replaced or modified (size or modification time differs): " \
           f"{first_names(changed, limit)}"


def check_identity(recorded: dict | None, dataset, *, what: str, recorded_files: list[str] | None = None,
                   hint: str = "rebuild it from this data set, or point it at the data it was made from") -> None:
    """Raises DataIdentityError unless `dataset` is the data set `recorded` (a data_identity dict) describes.

    Fields missing from `recorded` (older artifacts) are not checked. The message names the artifact (`what`),
    the differing fields and, for file lists, the first mismatched files when `recorded_files` is given.
    """
    if not recorded:
        return
    now = data_identity(dataset)
    if "file_names_fingerprint" in recorded:  # made from a listing of names: the names and their order are checked
        files = getattr(dataset, "files", None)
        now["file_names_fingerprint"] = None if files is None else file_names_fingerprint(files)
    problems = []
    for key in ("num_examples", "labels_fingerprint", "files_fingerprint", "file_names_fingerprint"):
        old = recorded.get(key)
        if old is None and key == "files_fingerprint" and now.get(key) is None:
            continue
        if key in recorded and old != now.get(key):
            problems.append(key)
    if not problems:
        return
    here = f"{dataset.name!r} here" if getattr(dataset, "name", None) else "these labels"
    text = f"{what} was made from another data set than {here} ({', '.join(problems)} differ"
    if "files_fingerprint" in problems or "file_names_fingerprint" in problems:
        if recorded_files is not None and getattr(dataset, "files", None) is not None:
            text += "; " + describe_file_mismatch(recorded_files, dataset.files)
        elif recorded.get("shards") is not None and now.get("shards") is not None:  # shard data sets name shards
            from kdfast.data.shard_index import describe_shard_mismatch
            text += "; " + describe_shard_mismatch(recorded["shards"], now["shards"])
        elif "labels_fingerprint" not in problems:
            text += "; the image files were renamed, moved, added or replaced"
    raise DataIdentityError(f"{text}); {hint}")
