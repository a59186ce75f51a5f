"""Keep files (kdfast-prune's output): sorted int64 dataset indices in KEEP.npy, and KEEP.npy.json beside it
recording what was kept from what, including the data identity of the scores (labels and file lists).

    write_keep("keep.npy", keep, record)                  # record: {"data": data_identity, "files_list": ...}
    write_keep("keep.npy", keep, record, files=dataset.files)   # + keep.npy.files.txt (keyed score files)
    keep, record = read_keep("keep.npy", dataset)         # DataIdentityError when made for other data
    record.update(write_keep_digests("keep.npy", digests))  # before write_keep: KEEP.npy.digests.npy
    expect_keep_digests("keep.npy", record, dataset)      # reads of changed files raise DigestMismatchError

A bare .npy (no record) is still accepted: nothing is known to check it against, so read_keep warns once.
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from kdfast.data.identity import DataIdentityError, check_identity
from kdfast.errors import InvalidArgumentError
from kdfast.io.atomic import read_file_list, read_json, save_npy, write_file_list, write_json


def write_keep(path: str, keep, record: dict, *, files: list[str] | None = None) -> None:
    """`files`: the data set's file list when no other copy is recorded (record["files_list"]): written to
    KEEP.files.txt and recorded, so a later mismatch names the files that differ."""
    if files is not None:
        write_file_list(f"{path}.files.txt", files)
        record = {**record, "files_list": os.path.abspath(f"{path}.files.txt")}
    save_npy(path, np.asarray(keep, dtype=np.int64))
    write_json(f"{path}.json", record)


def read_keep(path: str, dataset, *, what: str | None = None):
    """(indices int64, record or {}) of the keep file `path`, checked against `dataset`."""
    what = what or f"keep file {path}"
    try:
        keep = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"{what}: cannot read it ({exc})") from None
    n = len(dataset)
    if keep.ndim != 1 or keep.size == 0 or keep.dtype.kind not in "iu":
        raise InvalidArgumentError(f"{what} must hold a non-empty 1-d integer array, got {keep.dtype} {keep.shape}")
    if keep.min() < 0 or keep.max() >= n or len(np.unique(keep)) != len(keep):
        raise DataIdentityError(f"{what} must hold distinct indices in [0, {n}) ({dataset.name} has {n} examples); "
                                "was it made for another data set or split?")
    record = read_json(f"{path}.json") if os.path.isfile(f"{path}.json") else {}
    identity = record.get("data") or ({"labels_fingerprint": record["labels_fingerprint"]}
                                      if record.get("labels_fingerprint") else None)
    if identity is None:
        warnings.warn(f"{what} has no record ({path}.json) saying which data it was made for, so it cannot be "
                      "checked against this data set; kdfast-prune writes one", stacklevel=2)
    else:
        files_list = record.get("files_list")
        recorded_files = read_file_list(files_list) if files_list and os.path.isfile(files_list) else None
        check_identity(identity, dataset, what=what, recorded_files=recorded_files)
    return keep.astype(np.int64), record


def write_keep_digests(path: str, digests) -> dict:
    """KEEP.digests.npy: the content digests of the data the keep file was made from (the scores' digests.npy);
    returns the record's entry for it ({} when none are known)."""
    from kdfast.data.digests import any_read, digests_sha256
    if not any_read(digests):
        return {}
    save_npy(f"{path}.digests.npy", np.asarray(digests, dtype=np.int64))
    return {"digests": {"file": os.path.abspath(f"{path}.digests.npy"), "sha256": digests_sha256(digests)}}


def expect_keep_digests(path: str, record: dict, dataset, *, what: str | None = None) -> None:
    """Every later read of `dataset`'s files must give the bytes the keep file's scores were computed from
    (DigestMismatchError naming the file otherwise); nothing for keep files without digests."""
    from kdfast.data.digests import digests_sha256, expect_digests
    entry, what = record.get("digests"), what or f"keep file {path}"
    if not entry:
        return
    try:
        digests = np.load(entry["file"], allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"{what}: cannot read its content digests {entry['file']} ({exc}); prune "
                                   "again") from None
    if digests_sha256(digests) != entry["sha256"]:
        raise DataIdentityError(f"{what}: {entry['file']} is not the digests file its record names (sha256 "
                                "differs); prune again")
    expect_digests(dataset, digests, what=f"the scores behind {what}",
                   hint="score and prune again, or restore the file")
