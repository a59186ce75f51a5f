"""Atomic file writes: every file kdfast writes lands whole or not at all.

Each helper writes a temporary sibling `<path>.tmp<pid>` (a name no reader globs for) and renames it over
`path`, so a kill at any moment (even SIGKILL) leaves either the previous file or the new one, never half.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import IO

import numpy as np

from kdfast.data.identity import FileList, as_file_list


def atomic_write(path: str, write: Callable[[IO], None], *, mode: str = "wb") -> str:
    """Calls write(fh) on a temporary file beside `path`, then renames it to `path`; returns `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_json(path: str, obj) -> str:
    def dump(fh):
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
    return atomic_write(path, dump, mode="w")


def write_text(path: str, text: str) -> str:
    return atomic_write(path, lambda fh: fh.write(text), mode="w")


def save_npy(path: str, array) -> str:
    return atomic_write(path, lambda fh: np.save(fh, np.asarray(array), allow_pickle=False))


def save_npz(path: str, **arrays) -> str:
    return atomic_write(path, lambda fh: np.savez(fh, **arrays))


def write_parquet(path: str, columns: dict, *, what: str | None = None) -> str:
    """A Parquet table of `columns` (name -> pyarrow or numpy array, in order), written atomically."""
    from kdfast.data.keys import import_pyarrow
    pa = import_pyarrow(what or f"writing {path}")
    import pyarrow.parquet as pq
    table = pa.table({name: values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
                      for name, values in columns.items()})
    return atomic_write(path, lambda fh: pq.write_table(table, fh))


def save_torch(path: str, obj) -> str:
    import torch
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def _stats_path(path: str) -> str:
    return f"{path}.stat.npy"


def write_file_list(path: str, files) -> str:
    """A data set's relative file paths, one a line (and, for a FileList, their sizes and mtimes beside it in
    PATH.stat.npy): what a later identity mismatch names the differing files from. A FileList's buffer is
    already this format: written as it is."""
    files = as_file_list(files)
    stats = files.stats
    if stats is not None:
        save_npy(_stats_path(path), stats)
    return atomic_write(path, lambda fh: fh.write(files.buffer))


def read_file_list(path: str) -> FileList:
    with open(path, "rb") as fh:
        data = fh.read()
    files = FileList.from_lines(data)
    stats = np.load(_stats_path(path)) if os.path.isfile(_stats_path(path)) else None
    if stats is not None and len(stats) == len(files):
        files = FileList.from_buffer(files.buffer, files.offsets, stats=stats)
    return files


def read_json(path: str):
    with open(path) as fh:
        return json.load(fh)
