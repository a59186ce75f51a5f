"""Content digests of the bytes a file-backed data set actually reads, checked against artifacts as they are read.

The up-front files fingerprint (data/identity.py) stats every file: a file rewritten with its old size and mtime
restored passes it. The bytes are read anyway when scoring and training, so the image readers crc32 them as they
read them (one pass over bytes already in memory) into the data set's DigestTable: one int64 per example, -1 for
not read yet, in shared memory so the DataLoader workers that read (fork or spawn) fill the main process's table
without changing the (input, label) items.

    table = DigestTable(len(files))                  # made by the data set, shared by its views (with_augment)
    table.record(index, raw_bytes, path)             # in the reader: DigestMismatchError when it disagrees
    digests = read_digests(dataset)                  # (N,) int64 in dataset order (-1: unread), None without files
    expect_digests(dataset, digests, what="--scores runs/s", hint="rescore or restore the file")

Artifacts (score folders, keep files, teacher caches, checkpoints and job folders) record the digests of the rows
they were made from; their consumers expect them, so a same-size, same-mtime replacement fails the moment its
bytes are read, naming the file and the artifact, in the worker and so in the main process, before its data is
used. A row read twice by one data set object with other bytes fails as well (the file changed during the run).
What neither check sees: a file changed and changed back between two reads, or rows no consumer reads again.
"""
from __future__ import annotations

import hashlib
import zlib

import numpy as np

from kdfast.errors import DataError, InvalidArgumentError

UNREAD = -1


class DigestMismatchError(DataError):
    """A file's bytes differ from those an artifact (scores, keep file, cache, checkpoint) was made from."""


class DigestTable:
    """crc32 of the bytes last read for each example (UNREAD before), in shared memory, plus the digests that
    artifacts expect. Expectations set after a persistent loader's workers started are not seen by them: set them
    before the loaders that read start (fit and the jobs do)."""

    def __init__(self, num_examples: int):
        import torch  # here: reading and checking recorded digests (kdfast-prune) needs no torch
        self.values = torch.full((int(num_examples),), UNREAD, dtype=torch.int64).share_memory_()
        self.expected: list[tuple[np.ndarray, str, str]] = []  # (digests by row, artifact, what to do)
        self._rows = self.values.numpy()  # a numpy view of the shared memory: a row write costs no tensor op

    def __getstate__(self):  # the tensor travels as shared memory (spawned workers); the view is rebuilt
        return {"values": self.values, "expected": self.expected}

    def __setstate__(self, state):
        self.values, self.expected = state["values"], state["expected"]
        self._rows = self.values.numpy()

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, index: int, data: bytes, name: str) -> int:
        """Records crc32(`data`) as row `index`'s digest, after checking it against the expected ones and this
        table's earlier read of the row; DigestMismatchError naming `name` (the file) when one differs."""
        digest = zlib.crc32(data)
        for expected, what, hint in self.expected:
            if UNREAD != expected[index] != digest:
                raise DigestMismatchError(f"{name} changed since {what} read it (crc32 {int(expected[index]):08x} "
                                          f"then, {digest:08x} now, {len(data)} bytes); {hint}")
        earlier = self._rows[index]
        if UNREAD != earlier != digest:
            raise DigestMismatchError(f"{name} changed while this run was reading it (crc32 {int(earlier):08x} at "
                                      f"its first read, {digest:08x} now); restore it and run again")
        self._rows[index] = digest
        return digest

    def expect(self, digests: np.ndarray, what: str, hint: str) -> None:
        """Every later read of a row must give `digests[row]` (UNREAD rows: anything); replaces what the same
        artifact (`what`) set before, so a data set used by several runs keeps one copy per artifact."""
        self.expected = [e for e in self.expected if e[1] != what] + [(np.asarray(digests, dtype=np.int64), what,
                                                                        hint)]


def table_rows(dataset):
    """(DigestTable, rows of the table at the dataset's positions or None for all of them in order) of a data
    set, through Subsets (LabeledSubset is one); (None, None) for data sets that read no files."""
    import torch
    rows = None
    while isinstance(dataset, torch.utils.data.Subset):
        here = getattr(dataset, "_digest_rows", None)
        if here is None:  # a Subset's indices are a list: converted once, not per batch
            here = dataset._digest_rows = np.asarray(dataset.indices, dtype=np.int64)
        rows = here if rows is None else here[rows]
        dataset = dataset.dataset
    table = getattr(dataset, "digests", None)
    return (table, rows) if isinstance(table, DigestTable) else (None, None)


def read_digests(dataset, indices=None) -> np.ndarray | None:
    """(N,) int64 digests of the rows `dataset` has read so far (UNREAD for the others), in dataset order, or those
    at the dataset positions `indices`; None for data sets that read no files."""
    table, rows = table_rows(dataset)
    if table is None:
        return None
    at = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    return table._rows[at if rows is None else rows[at]].copy()


def expect_digests(dataset, digests, *, what: str, hint: str) -> None:
    """From now on a read of example i of `dataset` whose digest is not `digests[i]` (dataset order, UNREAD: not
    known) raises DigestMismatchError naming the file and `what` (the artifact), then `hint`. Nothing to do for
    digests None or a data set that reads no files."""
    table, rows = table_rows(dataset)
    if table is None or digests is None:
        return
    digests = np.asarray(digests).reshape(-1)
    if len(digests) != len(dataset):
        raise InvalidArgumentError(f"{what}: holds {len(digests)} content digests, expected {len(dataset)} (one per "
                                   "example); was it made for another data set?")
    if rows is not None:
        full = np.full(len(table), UNREAD, dtype=np.int64)
        full[rows] = digests
        digests = full
    table.expect(digests, what, hint)


def merge_digests(*parts) -> np.ndarray | None:
    """One digest per row from several records of the same rows: the first known one (None parts skipped)."""
    parts = [np.asarray(p, dtype=np.int64) for p in parts if p is not None]
    if not parts:
        return None
    out = parts[0].copy()
    for part in parts[1:]:
        out = np.where(out == UNREAD, part, out)
    return out


def digests_sha256(digests) -> str:
    """sha256 hex of the digests as little-endian int64: the one value meta.json records for a digests file."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(digests), dtype="<i8").tobytes()).hexdigest()


def any_read(digests) -> bool:
    return digests is not None and bool((np.asarray(digests) != UNREAD).any())
