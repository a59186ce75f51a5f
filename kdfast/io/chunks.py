"""Resumable row storage for long jobs: rows keyed by dataset index, written in atomic chunk files.

    store = ChunkStore("runs/x/chunks", num_rows=N, width=K, resume=resume)
    todo = [b for b in batches if not store.done_mask()[b].all()]
    for indices, values in work(todo):     # values: (n, K) float32 rows of those dataset indices
        store.write(indices, values)       # buffered; a chunk file lands every `rows_per_chunk` rows or
    store.close()                          #   `seconds_per_chunk` seconds, always at a write boundary
    table = store.gather()                 # (N, K), every row present exactly once
    digests = store.digests()              # (N,) the content digests written with the rows (-1: none)

Each chunk is `rank{R:05d}-{seq:08d}.npz` (indices, values), written atomically (jobs/atomic.py), so a kill
at any moment (even SIGKILL) leaves only whole chunks: a resumed job skips the rows they hold and recomputes
the rest. Callers write whole batches, so resumed batches are the batches of an uninterrupted run and give
the same values. Distributed jobs: every rank opens the store with its `rank` and writes its own rows (files
never collide); after a barrier one rank gathers. `store.json` records the shape (and the optional `job`
settings); reopening with others raises JobMismatchError. The job that owns the store (jobs/job.py) checks
the whole configuration before; this check keeps a store safe on its own.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import time

import numpy as np

from kdfast.io.atomic import read_json, save_npz, write_json
from kdfast.io.errors import IncompleteStoreError, JobExistsError, JobMismatchError


class ChunkStore:
    def __init__(self, directory: str, *, num_rows: int, width: int, job: dict | None = None, resume: bool = False,
                 rank: int = 0, rows_per_chunk: int = 8192, seconds_per_chunk: float = 60.0):
        self.directory, self.num_rows, self.width, self.rank = os.fspath(directory), int(num_rows), int(width), \
            int(rank)
        self.rows_per_chunk, self.seconds_per_chunk = max(1, int(rows_per_chunk)), float(seconds_per_chunk)
        settings = json.loads(json.dumps({**(job or {}), "num_rows": self.num_rows, "width": self.width},
                                         default=str))
        record = os.path.join(self.directory, "store.json")
        if os.path.exists(record):
            if not resume:
                raise JobExistsError(f"{self.directory} holds chunks of an earlier run; pass resume=True (--resume) to "
                                     "finish it or overwrite it (--overwrite)")
            stored = read_json(record)
            diffs = [(k, stored.get(k), settings.get(k)) for k in sorted(set(stored) | set(settings))
                     if stored.get(k) != settings.get(k)]
            if diffs:
                raise JobMismatchError(
                    f"{self.directory} holds rows of another job ("
                    + "; ".join(f"{k}: {a!r} recorded, {b!r} now" for k, a, b in diffs)
                    + "); repeat its settings, or overwrite it (--overwrite)", diffs)
        else:
            os.makedirs(self.directory, exist_ok=True)
            write_json(record, settings)
        for tmp in glob.glob(os.path.join(self.directory, f"rank{self.rank:05d}-*.tmp*")):
            os.remove(tmp)  # a chunk that was being written when the job died: its rows are recomputed
        self._seq = 1 + max((self._seq_of(p) for p in self._chunk_paths(self.rank)), default=-1)
        self._indices, self._values, self._digests, self._buffered = [], [], [], 0
        self._last_flush = time.monotonic()

    def _chunk_paths(self, rank=None) -> list[str]:
        pattern = "rank*-*.npz" if rank is None else f"rank{rank:05d}-*.npz"
        return sorted(glob.glob(os.path.join(self.directory, pattern)))

    @staticmethod
    def _seq_of(path: str) -> int:
        return int(os.path.basename(path).split("-")[1].split(".")[0])

    def chunks(self):
        """Yields (indices, values) of every chunk on disk, all ranks."""
        for path in self._chunk_paths():
            with np.load(path) as z:
                yield z["indices"], z["values"]

    def digests(self) -> np.ndarray:
        """(N,) int64: the content digests written with the rows on disk (any rank), -1 where none are known."""
        return chunk_digests(self.directory, self.num_rows)

    def done_mask(self) -> np.ndarray:
        """(N,) bool: rows already on disk (any rank)."""
        done = np.zeros(self.num_rows, dtype=bool)
        for idx, _ in self.chunks():
            done[idx] = True
        return done

    def write(self, indices, values, digests=None) -> None:
        """`digests`: the content digests of the rows' data (kdfast.data.digests; None: -1, not known), kept in
        the same chunk file as the rows, so a row on disk always has the digest of the bytes it was computed from."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        vals = np.asarray(values, dtype=np.float32).reshape(len(idx), self.width)
        self._indices.append(idx)
        self._values.append(vals)
        self._digests.append(np.full(len(idx), -1, dtype=np.int64) if digests is None else
                             np.asarray(digests, dtype=np.int64).reshape(len(idx)))
        self._buffered += len(idx)
        if (self._buffered >= self.rows_per_chunk
                or time.monotonic() - self._last_flush >= self.seconds_per_chunk):
            self.flush()

    def flush(self) -> None:
        if not self._buffered:
            return
        path = os.path.join(self.directory, f"rank{self.rank:05d}-{self._seq:08d}.npz")
        save_npz(path, indices=np.concatenate(self._indices), values=np.concatenate(self._values),
                 digests=np.concatenate(self._digests))
        self._seq += 1
        self._indices, self._values, self._digests, self._buffered = [], [], [], 0
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()

    def gather(self) -> np.ndarray:
        """(N, width) float32 of all ranks' rows; IncompleteStoreError naming the count when rows are missing."""
        out = np.empty((self.num_rows, self.width), dtype=np.float32)
        seen = np.zeros(self.num_rows, dtype=bool)
        for idx, vals in self.chunks():
            out[idx] = vals
            seen[idx] = True
        if not seen.all():
            missing = np.flatnonzero(~seen)
            raise IncompleteStoreError(f"{self.directory}: {len(missing)} of {self.num_rows} rows were never written "
                                       f"(first: index {missing[0]}); run again with resume=True (--resume)")
        return out

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def chunk_digests(directory: str, num_rows: int) -> np.ndarray:
    """(num_rows,) int64 content digests kept in the chunk files under `directory` (-1 where none: rows not
    written, chunks of older versions), read without opening the store (no directory is made)."""
    out = np.full(int(num_rows), -1, dtype=np.int64)
    for path in sorted(glob.glob(os.path.join(directory, "rank*-*.npz"))):
        with np.load(path) as z:
            if "digests" in z.files:
                out[z["indices"]] = z["digests"]
    return out
