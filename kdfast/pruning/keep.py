"""Keep files (kdfast-prune's output): sorted int64 dataset indices in KEEP.npy, and KEEP.npy.json beside it
recording what was kept from what, including the data identity of the scores (labels and file lists).

    write_keep("keep.npy", keep, record)                  # record: {"data": data_identity, "files_list": ...}
    write_keep("keep.npy", keep, record, files=dataset.files)   # + keep.npy.files.txt (keyed score files)
    keep, record = read_keep("keep.npy", dataset)         # DataIdentityError when made for other data
    record.update(write_keep_digests("keep.npy", digests))  # before write_keep: KEEP.npy.digests.npy
    expect_keep_digests("keep.npy", record, dataset)      # reads of changed files raise DigestMismatchError

A bare .npy (no record) is still accepted: nothing is known to check it against, so read_keep warns once.

Keyed keep lists (for keyed sources: webdataset, Parquet) are KEEP.parquet with columns `key` (string, the
example keys of kdfast.data.keys) and `index` (int64, the position in the data set the list was made from), sorted
by index, with the same KEEP.parquet.json record. Reading one finds the kept examples by key (exact match), so a
keyed subset or another order of the source gets its own positions:

    write_keep("keep.parquet", keep, record, keys=example_keys(dataset))
    keep, record = read_keep("keep.parquet", subset)      # KeyMatchError for unknown or repeated keys
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from kdfast.data.identity import DataIdentityError, check_identity
from kdfast.errors import InvalidArgumentError, first_names
from kdfast.data.keys import example_keys, import_pyarrow, key_positions
from kdfast.io.atomic import read_file_list, read_json, save_npy, write_file_list, write_json, write_parquet


def is_keyed_keep(path: str) -> bool:
    return str(path).lower().endswith(".parquet")


def write_keep(path: str, keep, record: dict, *, files: list[str] | None = None, keys=None) -> None:
    """`files`: the data set's file list when no other copy is recorded (record["files_list"]): written to
    KEEP.files.txt and recorded, so a later mismatch names the files that differ. `keys`: every example's key
    (kdfast.data.keys), for a keyed keep list (KEEP.parquet)."""
    keep = np.asarray(keep, dtype=np.int64)
    if files is not None:
        write_file_list(f"{path}.files.txt", files)
        record = {**record, "files_list": os.path.abspath(f"{path}.files.txt")}
    if is_keyed_keep(path):
        if keys is None:
            raise InvalidArgumentError(f"keep file {path}: a keyed keep list needs the data set's example keys")
        write_parquet(path, {"key": keys.take(import_pyarrow(path).array(keep)), "index": keep})
    else:
        save_npy(path, keep)
    write_json(f"{path}.json", record)


def _read_keyed_keep(path: str, dataset, what: str) -> np.ndarray:
    """The data set positions of a keyed keep list's keys, sorted (found by key: KeyMatchError when unknown)."""
    pa = import_pyarrow(what)
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise InvalidArgumentError(f"{what}: cannot read it ({exc})") from None
    if "key" not in table.column_names or table.num_rows == 0 or not pa.types.is_string(table.schema.field("key").type):
        raise InvalidArgumentError(f"{what} must hold a non-empty string 'key' column (a keyed keep list of "
                                   f"kdfast-prune), got {', '.join(f'{f.name} ({f.type})' for f in table.schema)} "
                                   f"with {table.num_rows} rows")
    keys = table.column("key").combine_chunks()
    return np.sort(key_positions(keys, example_keys(dataset), what=what))


def _check_kept_shards(record: dict, dataset, what: str) -> None:
    """A keyed keep list serves any subset or order of its source, but the shards it was made from must not have
    changed since: a shard of the same (base) name must hold as many examples, of the same size and mtime."""
    recorded, current = (record.get("data") or {}).get("shards"), getattr(dataset, "shards", None)
    if not recorded or current is None:
        return
    # compared whole: a shard cut by --limit (its whole example count recorded last) is the same file
    then = {os.path.basename(name): [rest[-1] if len(rest) > 3 else rest[0], *rest[1:3]] for name, *rest in recorded}
    changed = [s.name for s in current if then.get(os.path.basename(s.name), None) not in
               (None, [s.whole or s.stop - s.start, s.size, s.mtime_ns])]
    if changed:
        raise DataIdentityError(f"{what} was made before {len(changed)} of its shards changed (examples, size or "
                                f"modification time): {first_names(changed)}; prune again from fresh scores")


def read_keep(path: str, dataset, *, what: str | None = None):
    """(indices int64, record or {}) of the keep file `path`, checked against `dataset`: a keep.npy by the data
    identity it records, a keyed keep.parquet by its keys (the kept examples found by key)."""
    what = what or f"keep file {path}"
    if is_keyed_keep(path):
        keep = _read_keyed_keep(path, dataset, what)
        record = read_json(f"{path}.json") if os.path.isfile(f"{path}.json") else {}
        _check_kept_shards(record, dataset, what)
        return keep, record
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
