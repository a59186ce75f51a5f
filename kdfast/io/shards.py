"""Resumable per-shard row storage for sharded sources (webdataset, Parquet): the shard is the unit of work and of
commit, so a resumed or multi-rank job rescores only whole shards that never landed.

    store = ShardStore("runs/x/shards", shards=data.shards, width=K, keys=example_keys(data), labels=labels)
    for i in store.todo(my_shards):            # shard indices not committed yet (stale temporaries removed)
        for indices, values in work(i):        # batches inside shard i, in index order; values (n, K) float32
            store.write(indices, values, digests)   # the shard's file lands when its last row arrives
    table = store.gather()                     # (N, K) in shard order; every shard present, its keys unchanged

Shard i's rows are committed as `{i:06d}.npz` (atomic, kdfast/io/atomic.py) with arrays `keys` (str, its
examples' keys), `labels` (int64), `values` (float32, (rows, K)) and `digests` (int64 content digests of the bytes
each row was computed from, kdfast.data.digests; -1 where not known): a kill at any moment leaves whole shards only.
`store.json` records K and the shards (name, start, stop, size, mtime_ns, and the whole example count of a shard cut
by --limit); reopening with others raises
JobMismatchError, and gather() refuses a shard file whose keys are not the data set's keys of that shard.
"""
from __future__ import annotations

import glob
import os
import shutil

import numpy as np

from kdfast.errors import DataError
from kdfast.io.atomic import read_json, save_npz, write_json
from kdfast.io.errors import IncompleteStoreError, JobMismatchError


def _shard_fields(shard) -> list:
    cut = [] if getattr(shard, "whole", None) is None else [int(shard.whole)]  # a cut shard is not the whole one
    return [str(shard.name), int(shard.start), int(shard.stop), int(shard.size), int(shard.mtime_ns)] + cut


class ShardStore:
    def __init__(self, directory: str, *, shards, width: int, keys, labels):
        self.directory, self.width = os.fspath(directory), int(width)
        self.shards, self.keys, self.labels = list(shards), keys, np.asarray(labels, dtype=np.int64)
        self._starts = np.array([s.start for s in self.shards], dtype=np.int64)
        settings = {"width": self.width, "shards": [_shard_fields(s) for s in self.shards]}
        record = os.path.join(self.directory, "store.json")
        if os.path.exists(record):
            stored = read_json(record)
            if stored != settings:
                changed = [f"shard {i} ({a[0]})" for i, (a, b) in enumerate(zip(stored.get("shards", []),
                                                                                 settings["shards"])) if a != b]
                raise JobMismatchError(
                    f"{self.directory} holds shards of another job (width {stored.get('width')} then, {self.width} "
                    f"now; {len(stored.get('shards', []))} shards then, {len(self.shards)} now"
                    + (f"; changed: {', '.join(changed[:5])}" if changed else "")
                    + "); repeat its settings, or overwrite it (--overwrite)", [])
        else:
            os.makedirs(self.directory, exist_ok=True)
            write_json(record, settings)
        self._pending: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # shard -> (values, seen, digests)

    def path(self, i: int) -> str:
        return os.path.join(self.directory, f"{i:06d}.npz")

    def todo(self, indices) -> list[int]:
        """The shards among `indices` (this rank's) not committed yet; empty shards are committed at once."""
        left = []
        for i in indices:
            for tmp in glob.glob(f"{self.path(i)}.tmp*"):
                os.remove(tmp)  # a shard that was being written when the job died: its rows are recomputed
            if os.path.exists(self.path(i)):
                continue
            if self.shards[i].stop == self.shards[i].start:
                self._commit(i, np.empty((0, self.width), dtype=np.float32), np.empty(0, dtype=np.int64))
            else:
                left.append(i)
        return left

    def write(self, indices, values, digests=None) -> None:
        """Rows of one shard (a batch never crosses a shard boundary) and their content digests (None: not known);
        commits the shard once all its rows came."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        vals = np.asarray(values, dtype=np.float32).reshape(len(idx), self.width)
        i = int(np.searchsorted(self._starts, idx[0], side="right")) - 1
        start, stop = self.shards[i].start, self.shards[i].stop
        if idx.min() < start or idx.max() >= stop:
            raise ValueError(f"ShardStore.write: rows {idx.min()}..{idx.max()} cross shard {i} [{start}, {stop})")
        rows, seen, read = self._pending.setdefault(i, (np.empty((stop - start, self.width), np.float32),
                                                        np.zeros(stop - start, bool), np.full(stop - start, -1)))
        rows[idx - start], seen[idx - start] = vals, True
        if digests is not None:
            read[idx - start] = np.asarray(digests, dtype=np.int64).reshape(len(idx))
        if seen.all():
            del self._pending[i]
            self._commit(i, rows, read)

    def _commit(self, i: int, rows: np.ndarray, digests: np.ndarray) -> None:
        start, stop = self.shards[i].start, self.shards[i].stop
        save_npz(self.path(i), keys=np.asarray(self.keys.slice(start, stop - start).to_pylist(), dtype=str),
                 labels=self.labels[start:stop], values=rows, digests=digests.astype(np.int64))

    def close(self) -> None:
        """Nothing is buffered across calls but shards whose rows have not all come (a failed batch)."""
        self._pending.clear()

    def gather(self) -> np.ndarray:
        """(N, width) float32 of every shard; IncompleteStoreError naming the missing shards, DataError when a
        shard file holds other keys than the data set's examples of that shard (a shard replaced meanwhile)."""
        missing = [s.name for i, s in enumerate(self.shards) if not os.path.exists(self.path(i))]
        if missing:
            raise IncompleteStoreError(f"{self.directory}: {len(missing)} of {len(self.shards)} shards were never "
                                       f"scored (first: {missing[0]}); run again with resume=True (--resume)")
        out = np.empty((len(self.labels), self.width), dtype=np.float32)
        for i, s in enumerate(self.shards):
            with np.load(self.path(i)) as z:
                keys, values = z["keys"], z["values"]
            if keys.tolist() != self.keys.slice(s.start, s.stop - s.start).to_pylist():
                raise DataError(f"{self.path(i)}: its keys are not those of shard {s.name} now; the shard changed "
                                "since it was scored (score again with --overwrite)")
            out[s.start:s.stop] = values
        return out

    def digests(self) -> np.ndarray:
        """(N,) int64: the content digests committed with the shards on disk, -1 where none are known."""
        return shard_digests(self.directory, len(self.labels))

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def shard_digests(directory: str, num_rows: int) -> np.ndarray:
    """(num_rows,) int64 content digests of the shards committed under `directory` (-1 where none), read without
    opening the store (nothing is made): the shard bounds come from its store.json."""
    out = np.full(int(num_rows), -1, dtype=np.int64)
    record = os.path.join(directory, "store.json")
    if not os.path.isfile(record):
        return out
    for i, (_, start, stop, *_) in enumerate(read_json(record)["shards"]):
        path = os.path.join(directory, f"{i:06d}.npz")
        if stop <= num_rows and os.path.isfile(path):
            with np.load(path) as z:
                if "digests" in z.files:
                    out[start:stop] = z["digests"]
    return out
