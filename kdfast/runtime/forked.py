"""A call run in a forked child while this process goes on: its return value, or the exception it raised, comes
back pickled through a pipe. For work that would hold the GIL beside this process's own (a folder's walk, a score
file's read), so both cores work.

    reading = Forked(read_score_file, path)     # the child starts at once
    listing = list_image_folder(...)            # meanwhile, here
    keys, values = reading.result()             # the child's value, or its exception raised here

It forks only where that is safe: POSIX, torch not imported (its threads would not be carried over) and no other
thread in this process (locks another thread holds stay held in the child). Otherwise, and when the child dies
without an answer, the call runs in this process when its result is asked for (`fell_back` says so). `nice`
lowers the child's priority, so that it takes the CPU this process leaves. `close()` stops a child whose result is
no longer wanted.
"""
from __future__ import annotations

import os
import pickle
import signal
import sys
import threading


def can_fork() -> bool:
    return hasattr(os, "fork") and "torch" not in sys.modules and threading.active_count() == 1


def die_with_parent() -> None:
    """Linux: this (forked) process is killed with its parent (a killed command leaves no child running)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass


class Forked:
    """fn(*args, **kwargs) in a forked child (see the module docstring)."""

    def __init__(self, fn, *args, nice: int = 0, **kwargs):
        self._call, self._pid, self._fd, self.fell_back = (fn, args, kwargs), None, None, False
        if not can_fork():
            return
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: call, send, exit without running the parent's exit handlers
            code = 1
            try:
                os.close(read_fd)
                die_with_parent()
                os.nice(nice)
                try:
                    answer = (True, fn(*args, **kwargs))
                except Exception as exc:  # raised in the parent, as the call would have
                    answer = (False, exc)
                with os.fdopen(write_fd, "wb") as pipe:
                    pickle.dump(answer, pipe, protocol=pickle.HIGHEST_PROTOCOL)
                code = 0
            finally:
                os._exit(code)
        os.close(write_fd)
        self._pid, self._fd = pid, read_fd

    @property
    def forked(self) -> bool:
        """True while a child runs the call (its result not yet taken)."""
        return self._pid is not None

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs the call."""
        return self._pid

    def result(self):
        if self._pid is not None:
            answer = None
            try:
                with os.fdopen(self._fd, "rb") as pipe:
                    answer = pickle.load(pipe)
            except (EOFError, OSError, pickle.UnpicklingError):
                pass  # the child died (killed, out of memory) or sent what cannot be read: the call runs here
            finally:
                self._reap()
            if answer is not None:
                ok, value = answer
                if not ok:
                    raise value
                return value
            self.fell_back = True
        fn, args, kwargs = self._call
        return fn(*args, **kwargs)

    def close(self) -> None:
        """Kills the child if its result was not taken."""
        if self._pid is not None:
            try:
                os.kill(self._pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.close(self._fd)
            self._reap()

    def _reap(self) -> None:
        try:
            os.waitpid(self._pid, 0)
        except ChildProcessError:
            pass
        self._pid = None
