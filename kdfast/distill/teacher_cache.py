"""Teacher outputs for a whole data set, computed once and memory-mapped for later distillation.

    writer = TeacherCache.create("runs/t-cache", num_examples=N, num_classes=C,
                                 dataset_fingerprint=labels_fp, teacher_fingerprint=model_fp, topk=None)
    writer.write(indices, logits)          # any order, any batch size; rows written twice keep the last
    writer.close()                         # marks the cache complete (every row written)
    cache = TeacherCache.open("runs/t-cache", dataset_fingerprint=labels_fp, teacher_fingerprint=model_fp)
    logits = cache[indices]                # (B, C) float32 on the CPU
    teacher = cache.topk_rows(indices)     # top-k caches: a sparse kdfast.TopKTeacher (B rows of k), no B x C

Layout of the directory: `meta.json` (format, N, C, top-k, dtype, fingerprints, complete), `written.npy`
(N bools, so an interrupted writer can resume), and either `logits.npy` (N x C) or, for top-k caches,
`values.npy` (N x k), `classes.npy` (N x k int32) and `logsumexp.npy` (N float32: each full row's log-sum-exp,
so the mass outside the top k is known). Values are fp16 by default (logits lose ~1e-3 relative, far below what
a temperature-4 softmax resolves). A top-k row read densely (`cache[indices]`) is -inf outside its kept
classes, which the KD loss treats as probability 0: the student matches the teacher's renormalised top-k.
`topk_rows` gives the same teacher sparse (missing="renorm"), or with the mass outside the top k in one
extra bucket (missing="tail"; caches written before logsumexp.npy existed offer only "renorm").

Use the cache only where the student sees the same view of an example as the teacher did (no random
augmentation); the fingerprints make sure it belongs to this data set's labels and this teacher.

A cache of a keyed source (webdataset, Parquet: `create(..., keys=example_keys(data))`) also holds `keys.parquet`
(column `key`); `cache.for_dataset(subset)` then serves a keyed subset of that source (or another order of it),
its rows found by key:

    cache = TeacherCache.open("runs/t-cache").for_dataset(train)     # row i: the cached row of train's key i
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from kdfast.errors import InvalidArgumentError
from kdfast.io.atomic import read_file_list, save_npy, write_file_list, write_json, write_parquet
from kdfast.losses.topk_teacher import MISSING, TopKTeacher
from kdfast.runtime.checks import int_in_range, positive_int, require

FORMAT = "kdfast-teacher-cache/1"
STORE_DTYPES = ("float16", "float32")


class TeacherCacheMismatchError(InvalidArgumentError):
    """The cache was built from another data set or another teacher."""


def _meta_path(path):
    return os.path.join(path, "meta.json")


def _read_meta(path):
    try:
        with open(_meta_path(path)) as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise InvalidArgumentError(f"TeacherCache: no cache at {path!r} (expected {_meta_path(path)}); build one "
                                   "with TeacherCache.create or `kdfast-score --save-logits`") from None
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"TeacherCache: {_meta_path(path)} is not valid JSON ({exc})") from None
    if meta.get("format") != FORMAT:
        raise InvalidArgumentError(f"TeacherCache: {path!r} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _write_meta(path, meta):
    write_json(_meta_path(path), meta)  # atomic: a reader never sees half a file


def _check_fingerprints(path, meta, dataset_fingerprint, teacher_fingerprint):
    for what, given in (("dataset", dataset_fingerprint), ("teacher", teacher_fingerprint)):
        stored = meta[f"{what}_fingerprint"]
        if given is not None and given != stored:
            raise TeacherCacheMismatchError(
                f"TeacherCache: {path!r} was built from another {what} ({what}_fingerprint {stored[:16]}...), "
                f"not this one ({given[:16]}...); rebuild it for this {what}")


def _as_indices(indices, n):
    idx = torch.as_tensor(indices).reshape(-1)
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise InvalidArgumentError(f"TeacherCache: indices must be integers, got {idx.dtype}")
    idx = idx.to("cpu", torch.int64)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise InvalidArgumentError(f"TeacherCache: indices must lie in [0, {n}), got values in "
                                   f"[{int(idx.min())}, {int(idx.max())}]")
    return idx.numpy()


class TeacherCacheWriter:
    """Fills a cache row by row; `close()` marks it complete once every row is written."""

    def __init__(self, path, meta, arrays, written):
        self.path, self.meta, self._arrays, self._written = path, meta, arrays, written

    @property
    def num_written(self) -> int:
        return int(self._written.sum())

    def write(self, indices, logits, *, digests=None) -> None:
        """`digests`: the content digests of the rows' data (kdfast.data.digests.read_digests), kept in
        digests.npy so that training from the cache checks it reads the bytes the teacher saw."""
        n, c, k = self.meta["num_examples"], self.meta["num_classes"], self.meta["topk"]
        idx = _as_indices(indices, n)
        if not isinstance(logits, torch.Tensor) or logits.shape != (len(idx), c):
            raise InvalidArgumentError(f"TeacherCache.write: logits must be a ({len(idx)}, {c}) tensor (one row per "
                                       f"index), got {getattr(logits, 'shape', type(logits).__name__)}")
        rows = logits.detach().to("cpu", torch.float32)
        if k is None:
            self._arrays["logits"][idx] = rows.numpy()
        else:
            values, classes = rows.topk(k, dim=-1)
            self._arrays["values"][idx] = values.numpy()
            self._arrays["classes"][idx] = classes.to(torch.int32).numpy()
            if "logsumexp" in self._arrays:
                self._arrays["logsumexp"][idx] = rows.logsumexp(-1).numpy()
        if digests is not None and "digests" in self._arrays:
            self._arrays["digests"][idx] = np.asarray(digests, dtype=np.int64).reshape(len(idx))
        self._written[idx] = True

    def close(self) -> None:
        for array in (*self._arrays.values(), self._written):
            array.flush()
        missing = self.meta["num_examples"] - self.num_written
        if missing:
            raise InvalidArgumentError(f"TeacherCache.close: {missing} of {self.meta['num_examples']} rows were never "
                                       f"written to {self.path!r}; write them (TeacherCache.create(..., "
                                       "resume=True) reopens it) before using the cache")
        self.meta["complete"] = True
        _write_meta(self.path, self.meta)


class TeacherCache:
    """A read-only, memory-mapped teacher-logit cache; `cache[indices]` -> (B, C) float32 logits."""

    def __init__(self, path, meta, arrays, rows=None):
        self.path, self.meta, self._arrays = path, meta, arrays
        self._rows = rows  # a keyed view's cache row of each of its examples (for_dataset); None: all, in order

    @staticmethod
    def create(path, *, num_examples, num_classes, dataset_fingerprint, teacher_fingerprint, topk=None,
               dtype="float16", resume=False, files=None, files_fingerprint=None, labels=None,
               keys=None) -> TeacherCacheWriter:
        """A writer for a new cache at directory `path` (resume=True reopens an unfinished one).

        For file-backed data sets pass `files` (relative paths, index order) and their `files_fingerprint`
        (kdfast.data.data_identity): the cache keeps both, and check_dataset() then refuses a data set whose
        files differ, naming the first mismatched ones. `labels` (N ints, those `dataset_fingerprint` was taken
        from), kept as labels.npy, let check_dataset() name the examples whose labels differ. `keys` (a keyed
        source's example keys, kdfast.data.keys), kept as keys.parquet, let for_dataset() find rows by key.
        """
        require("TeacherCache.create", positive_int("num_examples", num_examples),
                positive_int("num_classes", num_classes))
        if topk is not None:
            require("TeacherCache.create", int_in_range("topk", topk, 1, num_classes,
                                                        f"None (full logits) or an integer in [1, {num_classes}]"))
        if dtype not in STORE_DTYPES:
            raise InvalidArgumentError(f"TeacherCache.create: dtype must be one of {STORE_DTYPES}, got {dtype!r}")
        for name, value in (("dataset_fingerprint", dataset_fingerprint), ("teacher_fingerprint", teacher_fingerprint)):
            if not isinstance(value, str) or not value:
                raise InvalidArgumentError(f"TeacherCache.create: {name} must be a non-empty string, got {value!r}")
        meta = {"format": FORMAT, "num_examples": num_examples, "num_classes": num_classes, "topk": topk,
                "dtype": dtype, "dataset_fingerprint": dataset_fingerprint,
                "teacher_fingerprint": teacher_fingerprint, "files_fingerprint": files_fingerprint, "complete": False,
                "logsumexp": topk is not None, "digests": True}
        if resume and os.path.exists(_meta_path(path)):
            stored = _read_meta(path)
            _check_fingerprints(path, stored, dataset_fingerprint, teacher_fingerprint)
            if any(stored[key] != meta[key] for key in ("num_examples", "num_classes", "topk", "dtype")):
                raise InvalidArgumentError(f"TeacherCache.create: resume=True found a cache at {path!r} with other "
                                           "settings (N, C, topk, dtype); remove it or create it elsewhere")
            return TeacherCacheWriter(path, stored, _open_arrays(path, stored, "r+"),
                                      np.load(os.path.join(path, "written.npy"), mmap_mode="r+"))
        if os.path.exists(_meta_path(path)):
            raise InvalidArgumentError(f"TeacherCache.create: a cache already exists at {path!r}; pass resume=True "
                                       "to finish it, or remove it")
        os.makedirs(path, exist_ok=True)
        arrays = _open_arrays(path, meta, "w+")
        if "digests" in arrays:
            arrays["digests"][:] = -1
        written = np.lib.format.open_memmap(os.path.join(path, "written.npy"), mode="w+", dtype=np.bool_,
                                            shape=(num_examples,))
        if files is not None:
            write_file_list(os.path.join(path, "files.txt"), files)
        if labels is not None:
            save_npy(os.path.join(path, "labels.npy"), np.asarray(torch.as_tensor(labels, dtype=torch.int64)))
        if keys is not None:
            if len(keys) != num_examples:
                raise InvalidArgumentError(f"TeacherCache.create: {len(keys)} keys for {num_examples} examples")
            write_parquet(os.path.join(path, "keys.parquet"), {"key": keys})
        _write_meta(path, meta)
        return TeacherCacheWriter(path, meta, arrays, written)

    @staticmethod
    def open(path, *, dataset_fingerprint=None, teacher_fingerprint=None) -> "TeacherCache":
        """Opens a complete cache; refuses one built from another data set or teacher than those given."""
        meta = _read_meta(path)
        _check_fingerprints(path, meta, dataset_fingerprint, teacher_fingerprint)
        if not meta.get("complete"):
            raise InvalidArgumentError(f"TeacherCache: {path!r} is incomplete (its writer never closed); finish it "
                                       "with TeacherCache.create(..., resume=True) or rebuild it")
        return TeacherCache(path, meta, _open_arrays(path, meta, "r"))

    def for_dataset(self, dataset) -> "TeacherCache":
        """This cache for `dataset`: itself, unless the cache holds keys (keys.parquet) and `dataset`, a keyed
        source, holds other keys or another order; then a view whose row i is the cached row of `dataset`'s
        i-th key (exact match; KeyMatchError naming the first unknown or repeated keys). check_dataset() checks
        a view's labels against the labels the cache recorded for those rows."""
        from kdfast.data.keys import example_keys, has_keys, key_positions
        file = os.path.join(self.path, "keys.parquet")
        if not os.path.isfile(file) or not has_keys(dataset):
            return self
        import pyarrow.parquet as pq
        cached, wanted = pq.read_table(file).column("key").combine_chunks(), example_keys(dataset)
        if cached.equals(wanted):
            return self
        rows = key_positions(wanted, cached, what=getattr(dataset, "name", None) or "the data set",
                             among=f"TeacherCache {str(self.path)!r}")
        return TeacherCache(self.path, self.meta, self._arrays, rows)

    def check(self, *, dataset_fingerprint=None, teacher_fingerprint=None) -> None:
        """Raises TeacherCacheMismatchError unless the cache was built from these (None: not checked)."""
        _check_fingerprints(self.path, self.meta, dataset_fingerprint, teacher_fingerprint)

    def check_dataset(self, dataset) -> None:
        """Raises TeacherCacheMismatchError unless the cache was built for `dataset`: its labels and, when the
        cache recorded one, its file list (the message then names the first mismatched files)."""
        from kdfast.data import check_identity, labels_fingerprint
        from kdfast.data.identity import DataIdentityError
        if self._rows is not None:  # a keyed view: its examples were found by key, their labels must agree
            labels_npy = os.path.join(self.path, "labels.npy")
            if os.path.isfile(labels_npy):
                recorded, now = np.load(labels_npy)[self._rows], dataset.targets.numpy()
                bad = np.flatnonzero(recorded != now)
                if len(bad):
                    raise TeacherCacheMismatchError(
                        f"TeacherCache {str(self.path)!r}: {len(bad)} of {len(now)} examples found by key have "
                        f"other labels than when it was built (first: index {bad[0]}, {recorded[bad[0]]} then, "
                        f"{now[bad[0]]} now); rebuild it for this data set")
            return
        try:
            _check_fingerprints(self.path, self.meta, labels_fingerprint(dataset.targets), None)
        except TeacherCacheMismatchError as exc:
            raise TeacherCacheMismatchError(f"{exc}{self._label_differences(dataset)}") from None
        if not self.meta.get("files_fingerprint"):
            return
        files_txt = os.path.join(self.path, "files.txt")
        recorded_files = read_file_list(files_txt) if os.path.isfile(files_txt) else None
        try:
            check_identity({"files_fingerprint": self.meta["files_fingerprint"]}, dataset,
                           what=f"TeacherCache {str(self.path)!r}", recorded_files=recorded_files)
        except DataIdentityError as exc:
            raise TeacherCacheMismatchError(str(exc)) from None

    def check_reads(self, dataset) -> None:
        """From now on every read of `dataset`'s files must give the bytes the cached rows were computed from
        (DigestMismatchError naming the file otherwise); nothing for caches without digests."""
        from kdfast.data.digests import any_read, expect_digests
        digests = self._arrays.get("digests")
        if digests is not None and self._rows is not None:  # a keyed view: the digests of its rows
            digests = np.asarray(digests)[self._rows]
        if digests is not None and any_read(digests):
            expect_digests(dataset, np.asarray(digests), what=f"the teacher cache {self.path}",
                           hint="rebuild the cache, or restore the file")

    def _label_differences(self, dataset, limit=5) -> str:
        """' (labels differ at ...)' naming the first examples (their files when recorded) whose recorded label
        differs from `dataset`'s, or '' when the cache kept no labels of the same length."""
        labels_npy, files_txt = os.path.join(self.path, "labels.npy"), os.path.join(self.path, "files.txt")
        if not os.path.isfile(labels_npy):
            return ""
        recorded, now = np.load(labels_npy), dataset.targets.numpy()
        if len(recorded) != len(now):
            return f" (it holds {len(recorded)} examples, the data set {len(now)})"
        files = read_file_list(files_txt) if os.path.isfile(files_txt) else None
        bad = np.flatnonzero(recorded != now)
        named = [f"{files[i] if files else f'index {i}'}: {recorded[i]} then, {now[i]} now" for i in bad[:limit]]
        return f" ({len(bad)} labels differ: {', '.join(named)}{', ...' if len(bad) > limit else ''})"

    @property
    def num_classes(self) -> int:
        return self.meta["num_classes"]

    @property
    def topk(self):
        return self.meta["topk"]

    def __len__(self) -> int:
        return self.meta["num_examples"] if self._rows is None else len(self._rows)

    def _cache_rows(self, indices) -> np.ndarray:
        idx = _as_indices(indices, len(self))
        return idx if self._rows is None else self._rows[idx]

    def __getitem__(self, indices) -> torch.Tensor:
        idx = self._cache_rows(indices)
        if self.topk is None:
            return torch.from_numpy(np.asarray(self._arrays["logits"][idx], dtype=np.float32))
        out = torch.full((len(idx), self.num_classes), float("-inf"))
        classes, values = self._topk(idx)
        return out.scatter_(1, classes, values)

    def _topk(self, idx):
        values = torch.from_numpy(np.asarray(self._arrays["values"][idx], dtype=np.float32))
        classes = torch.from_numpy(np.asarray(self._arrays["classes"][idx], dtype=np.int64))
        return classes, values

    def topk_rows(self, indices, *, missing="renorm", device=None) -> TopKTeacher:
        """The rows of a top-k cache as a sparse teacher (k ids and log-probabilities at temperature 1 per row,
        never expanded to C), on `device` (default CPU): what kd_loss, linear_kd_loss, distill_step and fit take
        as the teacher. missing="renorm": the teacher's top k renormalised (the teacher `cache[indices]` gives
        densely); "tail": the mass outside the top k in one extra bucket (kd_loss's temperature must then be 1)."""
        if self.topk is None:
            raise InvalidArgumentError(f"TeacherCache.topk_rows: {self.path!r} holds full logits (topk=None); read "
                                       "them with cache[indices]")
        if missing not in MISSING:
            raise InvalidArgumentError(f"TeacherCache.topk_rows: missing must be one of {MISSING}, got {missing!r}")
        if missing == "tail" and "logsumexp" not in self._arrays:
            raise InvalidArgumentError(f"TeacherCache.topk_rows: {self.path!r} was written without the rows' "
                                       "log-sum-exp, so the mass outside the top k is unknown: use missing='renorm' "
                                       "or rebuild the cache")
        idx = self._cache_rows(indices)
        classes, values = self._topk(idx)
        if missing == "tail":
            lse = torch.from_numpy(np.asarray(self._arrays["logsumexp"][idx], dtype=np.float32))
        else:
            lse = values.logsumexp(-1)
        logprobs = values - lse[:, None]
        # the subtraction can round a log-probability of ~0 just above it
        logprobs = logprobs.clamp_(max=0.0)
        return TopKTeacher(classes.to(device, non_blocking=True), logprobs.to(device, non_blocking=True),
                           missing=missing, validate=False)


def _open_arrays(path, meta, mode):
    n, c, k, dtype = meta["num_examples"], meta["num_classes"], meta["topk"], meta["dtype"]
    shapes = {"logits": ((n, c), dtype)} if k is None else {"values": ((n, k), dtype), "classes": ((n, k), "int32")}
    if k is not None and meta.get("logsumexp"):
        shapes["logsumexp"] = ((n,), "float32")
    if meta.get("digests"):  # content digests of each row's data, -1 where none was given
        shapes["digests"] = ((n,), "int64")
    arrays = {}
    for name, (shape, dt) in shapes.items():
        file = os.path.join(path, f"{name}.npy")
        if mode == "w+":
            arrays[name] = np.lib.format.open_memmap(file, mode="w+", dtype=dt, shape=shape)
        else:
            try:
                arrays[name] = np.load(file, mmap_mode=mode)
            except FileNotFoundError:
                raise InvalidArgumentError(f"TeacherCache: {file} is missing; the cache at {path!r} is damaged, "
                                           "rebuild it") from None
            if arrays[name].shape != shape:
                raise InvalidArgumentError(f"TeacherCache: {file} has shape {arrays[name].shape}, meta.json says "
                                           f"{shape}; the cache is damaged, rebuild it")
    return arrays
