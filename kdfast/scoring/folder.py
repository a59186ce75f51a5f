"""Score folders: one writer for `kdfast.score(out=)` and `kdfast-score`, one reader for their consumers.

A folder holds scores.npy, scores_per_model.npy (ensembles), batch_ids.npy (per-batch methods), scores.parquet
(the same rows keyed by example: columns `key` (kdfast.data.keys), `label` int64, `score` float32 (the mean),
`score_model0`, ... float32 (ensembles), `batch_id` int64 (per-batch methods)), meta.json (the method and the
data identity the scores were computed on) and files.txt (image folders); rows are scored into resumable chunks
(OUT/chunks/, or OUT/shards/ per shard of a sharded source) first. A bare .npy of scores in data set order also
reads, with nothing to check it against beyond its length.

    store = open_chunks(job, num_rows=N, width=K, rows_per_chunk=8192)     # write rows, resume after a kill
    scores, files = save_scores(job, per_model, dataset)                   # (K, N) -> scores.npy, ...
    finish_folder(job, score_meta(method, dataset, files, batch_size=256), store)   # meta.json, job complete

    scores, meta = load_scores("runs/digits-el2n")                 # no check
    scores, meta = read_scores("runs/digits-el2n", dataset)        # DataIdentityError when made for other data
"""
from __future__ import annotations

import os
import time
import warnings

import numpy as np

from kdfast.data.identity import DataIdentityError, check_identity
from kdfast.errors import InvalidArgumentError
from kdfast.data.keys import example_keys, has_keys
from kdfast.io.atomic import read_file_list, read_json, save_npy, write_json, write_parquet
from kdfast.io.chunks import ChunkStore

DIRECTION = "higher is harder"
DIGESTS_FILE = "digests.npy"


# ------------------------------------------------------------------------------------------- writing
def open_chunks(job, *, num_rows: int, width: int, rows_per_chunk: int, rank: int = 0) -> ChunkStore:
    """The job's resumable row store (OUT/chunks/): one row of `width` model scores per example."""
    return ChunkStore(job.path("chunks"), num_rows=num_rows, width=width, resume=True, rank=rank,
                      rows_per_chunk=rows_per_chunk)


def save_scores(job, per_model, data, *, batch_ids=None) -> tuple[np.ndarray, list[str]]:
    """Writes OUT/scores.npy (the mean over models), scores_per_model.npy (more than one model), batch_ids.npy
    (given) and scores.parquet (the rows keyed by `data`'s example keys); returns (scores float32 (N,), the files
    written). Without pyarrow, scores.parquet is left out with a warning, except for keyed sources (an error)."""
    per_model = np.asarray(per_model, dtype=np.float32)
    scores = per_model.mean(0) if len(per_model) > 1 else per_model[0]
    save_npy(job.path("scores.npy"), scores)
    files = ["scores.npy"]
    if len(per_model) > 1:
        save_npy(job.path("scores_per_model.npy"), per_model)
        files.append("scores_per_model.npy")
    if batch_ids is not None:
        save_npy(job.path("batch_ids.npy"), batch_ids)
        files.append("batch_ids.npy")
    try:
        keys = example_keys(data)
    except InvalidArgumentError:  # no pyarrow
        if has_keys(data):
            raise
        warnings.warn("scores.parquet (the scores keyed by example) not written: it needs pyarrow (pip install "
                      "'kdfast[data]')", stacklevel=2)
        return scores, files
    columns = {"key": keys}
    if hasattr(data, "targets"):
        columns["label"] = np.asarray(data.targets, dtype=np.int64)
    columns["score"] = scores
    if len(per_model) > 1:
        columns.update({f"score_model{k}": row for k, row in enumerate(per_model)})
    if batch_ids is not None:
        columns["batch_id"] = np.asarray(batch_ids, dtype=np.int64)
    write_parquet(job.path("scores.parquet"), columns)
    files.append("scores.parquet")
    return scores, files


def save_digests(job, digests) -> dict | None:
    """Writes OUT/digests.npy (int64 crc32 of the bytes each example was scored from, -1 for rows not read) when
    any row was read; returns meta.json's entry for it (the file and its sha256), else None."""
    from kdfast.data.digests import any_read, digests_sha256
    if not any_read(digests):
        return None
    save_npy(job.path(DIGESTS_FILE), np.asarray(digests, dtype=np.int64))
    return {"file": DIGESTS_FILE, "sha256": digests_sha256(digests),
            "num_read": int((np.asarray(digests) != -1).sum())}
def read_scores_table(path: str, *, what: str | None = None):
    """(keys, scores float64) of a scores.parquet: a kdfast-score folder's or a bare file with `key` and `score`
    columns (keys as a pyarrow string array, in the file's order)."""
    from kdfast.data.keys import import_pyarrow
    what = what or f"--scores {path}"
    file = os.path.join(path, "scores.parquet") if os.path.isdir(path) else path
    import_pyarrow(what)
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(file)
    except (OSError, pa.ArrowException) as exc:
        raise InvalidArgumentError(f"{what}: cannot read {file} ({exc})") from None
    if "key" not in table.column_names or "score" not in table.column_names:
        raise InvalidArgumentError(f"{what}: {file} needs columns 'key' and 'score', got {table.column_names}")
    keys, scores = table.column("key"), table.column("score")
    if not (pa.types.is_string(keys.type) or pa.types.is_large_string(keys.type)) or \
            not (pa.types.is_floating(scores.type) or pa.types.is_integer(scores.type)):
        raise InvalidArgumentError(f"{what}: {file}: 'key' must hold strings and 'score' numbers, got {keys.type} "
                                   f"and {scores.type}")
    return keys.combine_chunks().cast(pa.string()), scores.to_numpy().astype(np.float64)


def load_per_model(folder: str) -> np.ndarray:
    """(K, N) float32 scores of a finished folder (one row when it holds no scores_per_model.npy)."""
    path = os.path.join(folder, "scores_per_model.npy")
    return np.load(path) if os.path.isfile(path) else np.load(os.path.join(folder, "scores.npy"))[None]


def score_meta(method: str, data, files: list[str], **fields) -> dict:
    """meta.json: the method and direction, the data identity `read_scores` checks consumers against (labels
    and, for image folders, files), whether the source is keyed (its own example keys: consumers then match
    scores.parquet by key), the caller's `fields`, versions, the files and the time."""
    import torch

    from kdfast._version import __version__
    from kdfast.data.identity import data_identity
    identity = data_identity(data) if hasattr(data, "targets") else {"num_examples": len(data)}
    return {"method": method, "direction": DIRECTION, "labels_fingerprint": identity.get("labels_fingerprint"),
            "files_fingerprint": identity.get("files_fingerprint"), "data": identity, "num_examples": len(data),
            "keyed": has_keys(data), **fields, "kdfast_version": __version__, "torch_version": torch.__version__,
            "files": list(files),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def finish_folder(job, meta: dict, store: ChunkStore | None = None) -> None:
    """Writes OUT/meta.json, drops the chunks (their rows are in the .npy files now) and completes the job."""
    write_json(job.path("meta.json"), meta)
    if store is not None:
        store.remove()
    job.complete()


# ------------------------------------------------------------------------------------------- reading


def load_scores(path: str, *, what: str | None = None):
    """(scores, meta): a kdfast-score folder (scores.npy + meta.json) or a bare .npy file (meta {})."""
    what = what or f"--scores {path}"
    file, meta = path, {}
    if os.path.isdir(path):
        file = os.path.join(path, "scores.npy")
        if not os.path.isfile(file):
            raise InvalidArgumentError(f"{what}: the folder holds no scores.npy; is it a kdfast-score output folder? "
                                       "(an unfinished run: finish it with kdfast-score --resume)")
        if os.path.isfile(os.path.join(path, "meta.json")):
            meta = read_json(os.path.join(path, "meta.json"))
    try:
        return np.load(file, allow_pickle=False), meta
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"cannot read scores {file}: {exc}") from None


def labels_fingerprint_of(meta: dict) -> str | None:
    """The labels fingerprint recorded in meta.json (older versions named it dataset_fingerprint)."""
    for key in ("labels_fingerprint", "dataset_fingerprint"):
        if isinstance(meta.get(key), str):
            return meta[key]
    return None


def scores_identity(path: str, meta: dict):
    """(data identity the scores were computed on or None, absolute path of the files.txt beside them or None)."""
    fingerprint = labels_fingerprint_of(meta)
    identity = meta.get("data") or ({"labels_fingerprint": fingerprint} if fingerprint else None)
    files = os.path.join(path, "files.txt") if os.path.isdir(path) else None
    return identity, (os.path.abspath(files) if files and os.path.isfile(files) else None)


def read_scores(path: str, dataset, *, what: str | None = None, hint: str | None = None):
    """(scores float64 (N,), meta) of `path`, checked to be one score per example of `dataset` and, when the
    scores record their data identity, computed on `dataset` (labels, and for image folders the files)."""
    what = what or f"--scores {path}"
    scores, meta = load_scores(path, what=what)
    n = len(dataset)
    if scores.ndim != 1 or len(scores) != n:
        raise DataIdentityError(f"{what} holds {scores.shape} scores, expected ({n},) (one per example of "
                                f"{getattr(dataset, 'name', None) or 'the data set'})")
    identity, files = scores_identity(path, meta)
    check_identity(identity, dataset, what=what, recorded_files=read_file_list(files) if files else None,
                   **({"hint": hint} if hint else {}))
    return np.asarray(scores, dtype=np.float64), meta


def score_digests(path: str, meta: dict | None = None, *, what: str | None = None) -> np.ndarray | None:
    """The content digests a score folder recorded (digests.npy, checked against meta.json's sha256), or None
    (a bare .npy, a folder of an older version, data that reads no files)."""
    from kdfast.data.digests import digests_sha256
    entry = (meta if meta is not None else load_scores(path)[1]).get("digests") if os.path.isdir(path) else None
    if not entry:
        return None
    file = os.path.join(path, entry["file"])
    try:
        digests = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataIdentityError(f"{what or f'--scores {path}'}: cannot read its content digests {file} ({exc})") \
            from None
    if digests_sha256(digests) != entry["sha256"]:
        raise DataIdentityError(f"{what or f'--scores {path}'}: {file} is not the digests file meta.json records "
                                "(sha256 differs); it was changed after scoring: score again")
    return digests


def expect_score_digests(path: str, dataset, meta: dict | None = None, *, what: str | None = None) -> None:
    """Every later read of `dataset`'s files is checked against the bytes the scores in `path` were computed from
    (DigestMismatchError naming the file; see kdfast.data.digests)."""
    from kdfast.data.digests import expect_digests
    what = what or f"--scores {path}"
    expect_digests(dataset, score_digests(path, meta, what=what), what=what,
                   hint="score it again, or restore the file")
