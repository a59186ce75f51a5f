"""Resumable row storage for long jobs: rows keyed by dataset index, written in atomic chunk files.

    store = ChunkStore("runs/x/chunks", num_rows=N, width=K, job={...settings...}, resume=args.resume)
    todo = [b for b in batches if not store.done_mask()[b].all()]
    for indices, values in work(todo):     # values: (n, K) float32 rows of those dataset indices
        store.write(indices, values)       # buffered; a chunk file lands every `rows_per_chunk` rows or
    store.close()                          #   `seconds_per_chunk` seconds, always at a write boundary
    table = store.gather()                 # (N, K), every row present exactly once

Each chunk is `rank{R:05d}-{seq:08d}.npz` (indices, values), written to a temporary name and renamed, so a
kill at any moment (even SIGKILL) leaves only whole chunks: a resumed job skips the rows they hold and
recomputes the rest. Callers write whole batches, so resumed batches are the batches of an uninterrupted
run and give the same values. Distributed jobs: every rank opens the store with its `rank` and writes its
own rows (files never collide); after a barrier one rank gathers. `job.json` records the settings; resuming
with other settings is refused.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import time

import numpy as np

from .common import CliError, write_json_atomic


class ChunkStore:
    def __init__(self, directory: str, *, num_rows: int, width: int, job: dict, resume: bool = False, rank: int = 0,
                 rows_per_chunk: int = 8192, seconds_per_chunk: float = 60.0):
        self.directory, self.num_rows, self.width, self.rank = directory, int(num_rows), int(width), int(rank)
        self.rows_per_chunk, self.seconds_per_chunk = max(1, int(rows_per_chunk)), float(seconds_per_chunk)
        job = json.loads(json.dumps({**job, "num_rows": self.num_rows, "width": self.width}, default=str))
        job_path = os.path.join(directory, "job.json")
        if os.path.exists(job_path):
            if not resume:
                raise CliError(f"{directory} holds chunks of an earlier run; pass --resume to finish it or --overwrite "
                               "to start over")
            with open(job_path) as f:
                stored = json.load(f)
            changed = sorted(k for k in set(stored) | set(job) if stored.get(k) != job.get(k))
            if changed:
                raise CliError(f"--resume: the run in {directory} used other settings ({', '.join(changed)} differ); "
                               "repeat its command line, or pass --overwrite to start over")
        else:
            os.makedirs(directory, exist_ok=True)
            write_json_atomic(job_path, job)
        for tmp in glob.glob(os.path.join(directory, f"rank{self.rank:05d}-*.tmp*")):
            os.remove(tmp)  # a chunk that was being written when the job died: its rows are recomputed
        self._seq = 1 + max((self._seq_of(p) for p in self._chunk_paths(self.rank)), default=-1)
        self._indices, self._values, self._buffered = [], [], 0
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

    def done_mask(self) -> np.ndarray:
        """(N,) bool: rows already on disk (any rank)."""
        done = np.zeros(self.num_rows, dtype=bool)
        for idx, _ in self.chunks():
            done[idx] = True
        return done

    def write(self, indices, values) -> None:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        vals = np.asarray(values, dtype=np.float32).reshape(len(idx), self.width)
        self._indices.append(idx)
        self._values.append(vals)
        self._buffered += len(idx)
        if (self._buffered >= self.rows_per_chunk
                or time.monotonic() - self._last_flush >= self.seconds_per_chunk):
            self.flush()

    def flush(self) -> None:
        if not self._buffered:
            return
        path = os.path.join(self.directory, f"rank{self.rank:05d}-{self._seq:08d}.npz")
        tmp = f"{path}.tmp{os.getpid()}"  # not *.npz: readers never see a half-written chunk
        with open(tmp, "wb") as f:
            np.savez(f, indices=np.concatenate(self._indices), values=np.concatenate(self._values))
        os.replace(tmp, path)
        self._seq += 1
        self._indices, self._values, self._buffered = [], [], 0
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()

    def gather(self) -> np.ndarray:
        """(N, width) float32 of all ranks' rows; CliError naming the count when rows are missing."""
        out = np.empty((self.num_rows, self.width), dtype=np.float32)
        seen = np.zeros(self.num_rows, dtype=bool)
        for idx, vals in self.chunks():
            out[idx] = vals
            seen[idx] = True
        if not seen.all():
            missing = np.flatnonzero(~seen)
            raise CliError(f"{self.directory}: {len(missing)} of {self.num_rows} rows were never written (first: "
                           f"index {missing[0]}); run again with --resume")
        return out

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
