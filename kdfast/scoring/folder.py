"""Score files (kdfast-score's output): a folder with scores.npy, meta.json (the data identity the scores were
computed on) and files.txt (image folders), or a bare .npy of scores in data set order.

    scores, meta = load_scores("runs/digits-el2n")                 # no check
    scores, meta = read_scores("runs/digits-el2n", dataset)        # DataIdentityError when made for other data

A bare .npy (no meta.json) carries nothing to check it against beyond its length.
"""
from __future__ import annotations

import os

import numpy as np

from kdfast.data.identity import DataIdentityError, check_identity
from kdfast.errors import InvalidArgumentError
from kdfast.io.atomic import read_file_list, read_json


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
