"""An image folder's walk (runtime/folder_walk.py) in a process forked before torch is imported, so that the
walk and kdfast-score's imports and model set-up overlap (a thread would not: the walk holds the GIL).

`prefetch_walk` forks the child, which walks and sends its FolderWalk back through a pipe as a small pickled
header (classes, skipped files, the walk's warnings or its DataError) and the raw arrays (paths buffer, offsets,
stats): no pickling of a Python object per file. `take_prefetched_walk` (called by the scan with the same
arguments) reads it once; the warnings are issued then, in this process, and a DataError is raised here as the
walk would have. A child that died or failed otherwise gives None, with a note: the caller walks in-process.
"""
from __future__ import annotations

import os
import pickle
import struct
import sys
import warnings

import numpy as np

from kdfast.runtime.folder_walk import FolderWalk, walk_image_folder
from kdfast.runtime.forked import die_with_parent
from kdfast.errors import DataError

_HEADER = struct.Struct("<Q")  # the pickled header's length
_pending: dict = {}  # (folder, name, layout, drop_empty_classes) -> (child pid, read end of its pipe)


def prefetch_walk(folder: str, name: str, layout: str, *, drop_empty_classes: bool = False) -> bool:
    """Starts the walk of `folder` in a forked child (POSIX only; never in a process that has imported torch,
    whose threads a fork would not carry); True when started."""
    if not hasattr(os, "fork") or "torch" in sys.modules:
        return False
    key = (folder, name, layout, drop_empty_classes)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: walk, send, exit without running the parent's exit handlers
        code = 1
        try:
            os.close(read_fd)
            die_with_parent()
            os.nice(5)  # the walk (and its split helper) yields to the parent's imports, the critical path
            _send(write_fd, *key)
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    _pending[key] = (pid, read_fd)
    return True


def take_prefetched_walk(folder: str, name: str, layout: str, *, drop_empty_classes: bool = False):
    """The FolderWalk prefetched for these arguments (taken once; its warnings issued now, its DataError raised
    now), or None when there is none or its child failed (a note says so)."""
    started = _pending.pop((folder, name, layout, drop_empty_classes), None)
    if started is None:
        return None
    pid, read_fd = started
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            head = _read_exact(pipe, _HEADER.size)
            header = pickle.loads(_read_exact(pipe, _HEADER.unpack(head)[0]))
            if "failed" in header:
                raise ChildProcessError(header["failed"])
            if "files" in header:
                n = header["files"]
                buffer = bytes(_read_exact(pipe, header["bytes"]))
                offsets = np.frombuffer(_read_exact(pipe, 8 * (n + 1)), dtype=np.int64)
                stats = np.frombuffer(_read_exact(pipe, 16 * n), dtype=np.int64).reshape(n, 2)
    except (OSError, EOFError, pickle.UnpicklingError, ChildProcessError) as exc:
        print(f"note: the prefetched walk of {folder} failed ({type(exc).__name__}: {exc}); walking it here",
              file=sys.stderr, flush=True)
        return None
    finally:
        _reap(pid)
    for category, message in header["warnings"]:  # all read: a fallback walk cannot warn a second time
        warnings.warn(message, category, stacklevel=4)  # where the in-process walk points: the scan's caller
    if "error" in header:
        raise DataError(header["error"])
    return FolderWalk(header["classes"], buffer, offsets, stats, header["counts"], header["skipped"])


def _send(fd: int, folder: str, name: str, layout: str, drop_empty_classes: bool) -> None:
    walk = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            walk = walk_image_folder(folder, name, layout, drop_empty_classes=drop_empty_classes, split=True)
            header = {"classes": walk.classes, "counts": walk.counts, "skipped": walk.skipped,
                      "files": len(walk.offsets) - 1, "bytes": len(walk.buffer)}
        except DataError as exc:
            header = {"error": str(exc)}
        except Exception as exc:  # the parent walks again, in-process, and reports what that gives
            header = {"failed": f"{type(exc).__name__}: {exc}"}
    header["warnings"] = [(w.category, str(w.message)) for w in caught]
    head = pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
    with os.fdopen(fd, "wb") as pipe:
        pipe.write(_HEADER.pack(len(head)) + head)
        if "files" in header:
            for part in (walk.buffer, walk.offsets, np.ascontiguousarray(walk.stats, dtype=np.int64)):
                pipe.write(memoryview(part).cast("B"))


def _read_exact(pipe, n: int) -> bytearray:
    out = bytearray(n)
    view, got = memoryview(out), 0
    while got < n:
        k = pipe.readinto(view[got:])
        if not k:
            raise EOFError(f"the walk's child ended after {got} of {n} bytes")
        got += k
    return out


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
