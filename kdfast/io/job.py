"""A run is a job: its resolved configuration is written to OUT/job.json before any work starts.

    job = Job.start(out, "score", config, data=data_identity(dataset), files=dataset.files,
                    resume=resume, overwrite=overwrite)
    with job:                          # a failure before any work product removes job.json again
        ... work, writing under job.out ...
        job.complete()                 # marks the run finished (resume then has nothing to do)

The job's identity is every configuration field except NON_IDENTITY (and the caller's extra ones: where it
runs, how loudly, how it is stored), plus the data identity (labels and, for image folders, file list
fingerprints) and the kdfast version. New options therefore join the identity without further code.
`resume=True` reopens a job only when the invocation resolves to the same identity and otherwise raises
JobMismatchError naming each differing field; `overwrite=True` clears the folder and starts afresh; without
either, a folder holding another run's work is refused (JobExistsError). A folder whose only content is a
job record (a run that failed or was killed before doing any work) never blocks a new run.

A live run holds an exclusive OS lock (a POSIX record lock, fcntl.lockf) on OUT/job.lock from before its checks
until it exits (the kernel drops it on any exit, SIGKILL included; being the process's own, not the open file's as
flock's is, it is not shared with the forked DataLoader workers, which outlive a killed run by seconds), so a
second process starting into the folder fails at once (JobLockedError, naming the holder's pid) instead of taking
a folder that holds only job.json for a failed start. Within one process the lock is re-entrant: the folder is
already this process's (which must not open and close OUT/job.lock itself: closing any descriptor of the file
drops a POSIX lock). A folder holding only what a start writes before job.json (the file list, its temporaries)
is a run killed while starting: it blocks nothing.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import sys
import time

from kdfast.io.atomic import read_file_list, read_json, write_file_list, write_json
from kdfast.io.errors import JobError, JobExistsError, JobLockedError, JobMismatchError

FORMAT = "kdfast-job/1"
JOB_FILE = "job.json"
FILES_FILE = "files.txt"
LOCK_FILE = "job.lock"
# fields that say where or how a job runs, not what it computes
NON_IDENTITY = frozenset({"resume", "overwrite", "num_workers", "quiet", "debug", "device", "out", "chunk_size",
                          "show", "top", "progress", "argv", "index_dir"})
# fields naming files or folders: `photos`, `photos/` and its absolute path are the same job
PATH_FIELDS = frozenset({"data_root", "keep", "teacher", "teacher_cache", "scores", "checkpoint"})
_OWN_FILES = frozenset({JOB_FILE, FILES_FILE, f"{FILES_FILE}.stat.npy", LOCK_FILE})
_LEGACY_MARKERS = ("config.json", "meta.json", "chunks", "checkpoint.pt")


def jsonable(value):
    """The JSON form of a value, so stored and fresh configurations compare equal (tuples are lists, ...)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _absolute(value):
    """A path field as an absolute, normalised path (each of a list of them); other values as they are."""
    if isinstance(value, (list, tuple)):
        return [_absolute(v) for v in value]
    return os.path.abspath(os.path.expanduser(value)) if isinstance(value, (str, os.PathLike)) else value


def job_identity(config: dict, data: dict | None = None, non_identity=()) -> dict:
    """What makes two runs the same job: the configuration minus the non-identity fields, the data, the code."""
    from kdfast._version import __version__
    skip = NON_IDENTITY | frozenset(non_identity)
    identity = {k: _absolute(v) if k in PATH_FIELDS else v for k, v in config.items()
                if k not in skip and not k.startswith("_")}
    identity["data"] = data
    identity["kdfast_version"] = __version__
    return jsonable(identity)


def _flatten(d: dict, prefix=""):
    for key, value in d.items():
        if isinstance(value, dict) and key == "data":
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def differences(recorded: dict, now: dict) -> list[tuple[str, object, object]]:
    """(field, recorded, now) for every field that differs; data fields are named data.<field>."""
    a, b = dict(_flatten(recorded)), dict(_flatten(now))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _has_work(folder: str) -> bool:
    """True when `folder` holds any file besides the job's own records (empty folders do not count)."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            if dirpath != folder or name not in _OWN_FILES:
                return True
    return False


def enclosing_job(path) -> str | None:
    """The nearest folder at or above `path` that holds a kdfast job (its job.json), or None: files written
    there would mix with that job's outputs."""
    folder = os.path.realpath(os.fspath(path))
    while True:
        if os.path.isfile(os.path.join(folder, JOB_FILE)):
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


# real path of a locked folder -> the open lock file that holds its lock (closing it releases the lock)
_HELD_LOCKS: dict = {}


def _lock_folder(out: str) -> bool:
    """Takes the exclusive lock on `out` for this process; False when it held it already; JobLockedError when
    another live process holds it."""
    key = os.path.realpath(out)
    if key in _HELD_LOCKS:
        return False
    fh = open(os.path.join(out, LOCK_FILE), "a+")
    try:
        fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            fh.close()
            raise
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise JobLockedError(f"output folder {out} is in use by a running kdfast job (pid {holder}); wait for it to "
                             "finish, stop it, or choose another folder") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    _HELD_LOCKS[key] = fh
    return True


def _unlock_folder(out: str) -> None:
    fh = _HELD_LOCKS.pop(os.path.realpath(out), None)
    if fh is not None:
        fh.close()


_TEMPORARY = re.compile(r"\.tmp\d+$")  # jobs/atomic.py's `<path>.tmp<pid>`


def _remove_temporaries(out: str) -> list[str]:
    """Removes the half-written temporary files a killed run left (no live run writes: the folder is locked)."""
    removed = []
    for dirpath, _, filenames in os.walk(out):
        for name in filenames:
            if _TEMPORARY.search(name):
                os.remove(os.path.join(dirpath, name))
                removed.append(os.path.relpath(os.path.join(dirpath, name), out))
    return removed


def _failed_start(out: str) -> bool:
    """True when `out` holds no job record and nothing but the files a start writes before it (the file list, its
    stats, the lock, their temporaries): a run killed while starting, which must not block the next one."""
    return not os.path.exists(os.path.join(out, JOB_FILE)) and \
        all(_TEMPORARY.sub("", entry.name) in _OWN_FILES and entry.is_file() for entry in os.scandir(out))


def _refuse_inputs_inside(out: str, config: dict, label) -> None:
    """JobError when clearing `out` would delete one of the job's inputs (a path field pointing into it)."""
    inside = os.path.realpath(out) + os.sep
    for field in sorted(PATH_FIELDS & set(config)):
        value = config[field]
        for path in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(path, (str, os.PathLike)) and os.path.realpath(path).startswith(inside):
                raise JobError(f"overwrite (--overwrite) would delete the input {label(field)} {path}, which lies "
                               f"inside the output folder {out}; move it out first or choose another folder")


def _clear_folder(out: str) -> None:
    """Removes everything in `out` but its lock file (which this process holds)."""
    for entry in os.scandir(out):
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.remove(entry.path)


class Job:
    def __init__(self, out: str, record: dict, created_folder: bool, owner: bool = True):
        self.out, self.record, self._created_folder, self._owner = out, record, created_folder, owner

    @classmethod
    def attach(cls, out) -> "Job":
        """The job another process started in `out` (torchrun's other ranks); it never cleans up the folder."""
        return cls(os.fspath(out), read_json(os.path.join(out, JOB_FILE)), created_folder=False, owner=False)

    @classmethod
    def start_on_main(cls, out, kind: str, config: dict, **kwargs) -> "Job":
        """Job.start on the main rank (the one that checks, clears or creates `out`), then Job.attach on torchrun's
        other ranks once it has; in one process, Job.start."""
        from kdfast.runtime import distributed
        job = cls.start(out, kind, config, **kwargs) if distributed.is_main() else None
        distributed.barrier()
        return job if job is not None else cls.attach(out)

    @property
    def kind(self) -> str:
        return self.record["kind"]

    @property
    def finished(self) -> bool:
        return self.record.get("status") == "complete"

    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    @classmethod
    def start(cls, out, kind: str, config: dict, *, data: dict | None = None, files: list[str] | None = None,
              resume: bool = False, overwrite: bool = False, non_identity=(), label=None) -> "Job":
        """Opens OUT for the job `kind` with the resolved `config` (JSON-able), or raises a JobError.

        `data` is the data identity (kdfast.data.data_identity); `files` the data set's file list, kept as
        OUT/files.txt so a later mismatch can name the files that differ. `label(field)` names a field in
        messages (the command line passes one giving its --flag); default: the field itself.
        """
        if resume and overwrite:
            raise JobError(f"{kind}: give resume or overwrite, not both")
        out = os.fspath(out)
        label = label or (lambda field: field)
        identity = job_identity(config, data, non_identity)
        record_path = os.path.join(out, JOB_FILE)
        holder = enclosing_job(os.path.dirname(os.path.abspath(out)))
        if holder is not None:
            raise JobError(f"output folder {out} lies inside the kdfast run folder {holder}, whose files belong to "
                           "that run; choose a folder outside it")
        created = not os.path.isdir(out)
        if not created and set(os.listdir(out)) - {LOCK_FILE} and not os.path.exists(record_path) and \
                not _failed_start(out) and not any(os.path.exists(os.path.join(out, m)) for m in _LEGACY_MARKERS):
            raise JobError(f"output folder {out} is not empty and holds no kdfast run; choose another "
                           "folder (nothing there was changed)")
        os.makedirs(out, exist_ok=True)
        locked_here = _lock_folder(out)  # before reading the folder: a live run's job.json is not a failed start
        try:
            if overwrite:
                _refuse_inputs_inside(out, config, label)
            return cls._open(out, kind, config, identity, record_path, created, files=files, resume=resume,
                             overwrite=overwrite, label=label)
        except BaseException:
            if locked_here:
                _unlock_folder(out)
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise

    @classmethod
    def _open(cls, out, kind, config, identity, record_path, created, *, files, resume, overwrite, label) -> "Job":
        if _failed_start(out):  # killed before its job record: nothing of it to keep
            _remove_temporaries(out)
        elif set(os.listdir(out)) - {LOCK_FILE}:
            if not os.path.exists(record_path) and not overwrite:
                raise JobExistsError(f"output folder {out} holds a run without a job record (made by an older "
                                     "kdfast), which cannot be checked for resuming; pass overwrite (--overwrite) "
                                     "to replace it, or choose another folder")
            if overwrite:
                _clear_folder(out)
            elif _has_work(out):
                recorded = read_json(record_path)
                other_kind = recorded.get("format") != FORMAT or recorded.get("kind") != kind
                if not resume and other_kind:  # resuming cannot finish another command's run: no --resume hint
                    raise JobExistsError(f"output folder {out} already holds a {recorded.get('kind')} run, not a "
                                         f"{kind} run; choose another folder or pass overwrite (--overwrite) to "
                                         "replace it")
                if not resume:
                    raise JobExistsError(f"output folder {out} already holds a {recorded.get('kind')} run; pass "
                                         "resume (--resume) to finish it or overwrite (--overwrite) to replace it")
                if other_kind:
                    raise JobMismatchError(f"{out} holds a {recorded.get('kind')!r} run, not a {kind!r} run; choose "
                                           "another folder or pass overwrite (--overwrite)",
                                           [("kind", recorded.get("kind"), kind)])
                diffs = differences(recorded["identity"], identity)
                if diffs:
                    raise JobMismatchError(cls._mismatch_message(out, diffs, label, files), diffs)
                _remove_temporaries(out)
                return cls(out, recorded, created_folder=False)
            # else: only a job record, from a start that failed or was killed before any work: start afresh
        if files is not None:
            write_file_list(os.path.join(out, FILES_FILE), files)
        record = {"format": FORMAT, "kind": kind, "status": "running", "identity": identity,
                  "config": jsonable(config), "argv": sys.argv,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json(record_path, record)
        return cls(out, record, created_folder=created)

    @staticmethod
    def _mismatch_message(out, diffs, label, files):
        from kdfast.data.identity import describe_file_mismatch
        parts = []
        for field, old, new in diffs:
            name = label(field) if not field.startswith("data.") else field
            if field == "data.shards":  # a long list: name the shards that differ
                from kdfast.data.shard_index import describe_shard_mismatch
                parts.append(f"{name}: {describe_shard_mismatch(old, new)}")
                continue
            parts.append(f"{name}: {old!r} in the run, {new!r} now")
        text = (f"resume: {out} holds another job; it differs in " + "; ".join(parts))
        recorded_files = os.path.join(out, FILES_FILE)
        if files is not None and any(f == "data.files_fingerprint" for f, _, _ in diffs) and \
                os.path.isfile(recorded_files):
            text += f" ({describe_file_mismatch(read_file_list(recorded_files), files)})"
        return text + ". Repeat the run's arguments, or pass --overwrite (overwrite=True) to start afresh"

    def complete(self, **info) -> None:
        """Marks the job finished (after its outputs are written)."""
        self.record.update(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info)
        write_json(self.path(JOB_FILE), jsonable(self.record))

    def abandon_if_empty(self) -> None:
        """Removes the job record (and the folder, if the job created it) when no work was written."""
        if os.path.isdir(self.out) and not _has_work(self.out):
            self.release()
            if self._created_folder:
                shutil.rmtree(self.out, ignore_errors=True)
            else:
                for name in _OWN_FILES:
                    if os.path.exists(self.path(name)):
                        os.remove(self.path(name))

    def release(self) -> None:
        """Drops this process's lock on the folder (process exit does the same)."""
        if self._owner:
            _unlock_folder(self.out)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and self._owner:
            self.abandon_if_empty()
        self.release()
        return False
