"""The job layer: runs with a recorded identity, resumable chunk and shard storage and atomic file writes.

    from kdfast.io import Job, ChunkStore, write_json, save_npy
"""
from kdfast.io.atomic import (atomic_write, read_json, save_npy, save_npz, save_torch, write_json, write_parquet,
                              write_text)
from kdfast.io.chunks import ChunkStore
from kdfast.io.errors import IncompleteStoreError, JobError, JobExistsError, JobLockedError, JobMismatchError
from kdfast.io.job import NON_IDENTITY, Job, job_identity
from kdfast.io.shards import ShardStore

__all__ = ["Job", "ChunkStore", "ShardStore", "NON_IDENTITY", "job_identity", "JobError", "JobExistsError",
           "JobLockedError", "JobMismatchError", "IncompleteStoreError", "atomic_write", "read_json", "save_npy",
           "save_npz", "save_torch", "write_json", "write_parquet", "write_text"]
