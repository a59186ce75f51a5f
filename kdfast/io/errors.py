"""Typed errors of the job layer; the command line turns each into one line and exit code 1."""
from __future__ import annotations

from kdfast.errors import KDFastError


class JobError(KDFastError, RuntimeError):
    """An output folder cannot take this job."""


class JobExistsError(JobError):
    """The folder holds another run's work and neither resume nor overwrite was asked for."""


class JobLockedError(JobError):
    """Another live process is running a job in the folder (it holds the folder's lock)."""


class JobMismatchError(JobError):
    """resume was asked for, but this invocation resolves to another job than the one in the folder.

    `differences` lists (field, recorded value, value now) for every differing field.
    """

    def __init__(self, message: str, differences: list[tuple[str, object, object]]):
        super().__init__(message)
        self.differences = differences


class IncompleteStoreError(JobError):
    """A chunk store misses rows that should have been written."""
