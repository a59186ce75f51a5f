"""External per-example scores: a bare .npy in data set order, or a file keyed by example file name (as published
memorization / difficulty scores are), matched to a data set's file list.

    scores = load_score_file("scores.npy")                               # (N,) as stored
    scores = load_score_file("mem.csv", files=dataset.files)             # CSV with `file` and `score` columns
    scores = load_score_file("mem.npz", files=dataset.files)             # .npz with `files` and `scores` arrays

Matching a key to a data set file (paths relative to the data set's folder, '/' or '\\' separated):
1. the same path (after dropping a leading './');
2. otherwise, leniently, when it is unambiguous: with the last component's extension dropped, one path is a
   tail of the other (extra leading folders on either side, e.g. 'train/n014/x.JPEG' for 'n014/x.JPEG', or
   'x' for 'cls/x.png'); a folder named on both sides must agree, so 'dog/1.jpg' never scores 'cat/1.jpg'. The
   longest agreeing tail decides; a key whose tail fits several files, or two keys landing on one file (also
   'c/x' beside 'c/x.png'), are errors.
Every data set file needs a score: unmatched ones raise, listing the first few and the count. Keys that match
no file (a score file for a bigger set) are ignored and counted in the report.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

from kdfast.errors import InvalidArgumentError

KEYED_EXTENSIONS = (".csv", ".npz", ".parquet")
SHOW = 5  # names listed in an error before "... (N in all)"


class ScoreFileError(InvalidArgumentError):
    """A score file is unreadable, malformed, or does not fit the data set's files."""


@dataclass
class MatchReport:
    exact: int = 0      # data set files matched by their exact path
    lenient: int = 0    # matched by a unique tail without leading folders / extension
    ignored: int = 0    # keys of the score file that match no data set file


def is_keyed(path: str) -> bool:
    return str(path).lower().endswith(KEYED_EXTENSIONS)


def _listing(names) -> str:
    names = list(names)
    more = f", ... ({len(names)} in all)" if len(names) > SHOW else ""
    return ", ".join(repr(n) for n in names[:SHOW]) + more


def _read_csv(path: str) -> tuple[list[str], np.ndarray]:
    with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: Excel's "CSV UTF-8" starts with a BOM
        reader = csv.DictReader(fh)
        columns = {c.strip().lower(): c for c in (reader.fieldnames or [])}
        if "file" not in columns or "score" not in columns:
            raise ScoreFileError(f"score file {path}: a CSV needs a header with 'file' and 'score' columns, got "
                                 f"{reader.fieldnames}")
        keys, values = [], []
        for line, row in enumerate(reader, start=2):
            try:
                values.append(float(row[columns["score"]]))
            except (TypeError, ValueError):
                raise ScoreFileError(f"score file {path}, line {line}: score {row[columns['score']]!r} is not a "
                                     "number") from None
            keys.append(row[columns["file"]])
    return keys, np.asarray(values, dtype=np.float64)


def _read_parquet(path: str) -> tuple[list[str], np.ndarray]:
    """A scores.parquet (kdfast-score's, or any table with `key` and `score` columns)."""
    from kdfast.scoring.folder import read_scores_table
    keys, scores = read_scores_table(path, what=f"score file {path}")
    return keys.to_pylist(), scores


def _read_npz(path: str) -> tuple[list[str], np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        if "files" not in z or "scores" not in z:
            raise ScoreFileError(f"score file {path}: an .npz needs arrays 'files' and 'scores', got {sorted(z)}")
        files, scores = z["files"], z["scores"]
    if files.ndim != 1 or scores.ndim != 1 or len(files) != len(scores) or files.dtype.kind not in "US":
        raise ScoreFileError(f"score file {path}: 'files' must be 1-d strings and 'scores' 1-d numbers of the same "
                             f"length, got {files.dtype} {files.shape} and {scores.dtype} {scores.shape}")
    keys = [f.decode() if isinstance(f, bytes) else str(f) for f in files.tolist()]
    return keys, scores.astype(np.float64)


def _parts(path: str, *, stem: bool) -> tuple[str, ...]:
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if stem and parts:
        parts[-1] = os.path.splitext(parts[-1])[0]
    return tuple(parts)


def match_scores(keys, values, files, *, source: str = "scores") -> tuple[np.ndarray, MatchReport]:
    """Scores in the order of `files` from (key, value) pairs; see the module docstring for the rules."""
    values = np.asarray(values, dtype=np.float64)
    seen = set()
    for k in keys:
        norm = "/".join(_parts(k, stem=False))
        if norm in seen:
            raise ScoreFileError(f"{source}: file {k!r} appears more than once")
        seen.add(norm)
    position = {"/".join(_parts(f, stem=False)): i for i, f in enumerate(files)}
    out = np.full(len(files), np.nan)
    owner = {}  # data set index -> key that filled it
    report = MatchReport()
    pending = []
    for j, k in enumerate(keys):
        i = position.get("/".join(_parts(k, stem=False)))
        if i is None:
            pending.append(j)
        else:
            out[i], owner[i] = values[j], k
            report.exact += 1
    if pending:
        tails: dict[tuple, list[int]] = {}  # every file, matched exactly or not: a second key on it is an error
        whole: dict[tuple, list[int]] = {}  # files by their whole path: what a key with extra leading folders fits
        for i, f in enumerate(files):
            p = _parts(f, stem=True)
            whole.setdefault(p, []).append(i)
            for start in range(len(p)):
                tails.setdefault(p[start:], []).append(i)
        for j in pending:
            p = _parts(keys[j], stem=True)
            hits = next((found for s in range(len(p)) if (found := (whole if s else tails).get(p[s:]))), None)
            if hits is None:
                report.ignored += 1
                continue
            if len(hits) > 1:
                raise ScoreFileError(f"{source}: file {keys[j]!r} fits several data set files "
                                     f"({_listing(files[i] for i in hits)}); give fuller paths")
            i = hits[0]
            if i in owner:
                raise ScoreFileError(f"{source}: files {owner[i]!r} and {keys[j]!r} both match data set file "
                                     f"{files[i]!r}; give fuller paths")
            out[i], owner[i] = values[j], keys[j]
            report.lenient += 1
    missing = [files[i] for i in range(len(files)) if i not in owner]
    if missing:
        raise ScoreFileError(f"{source}: {len(missing)} of {len(files)} data set files have no score: "
                             f"{_listing(missing)}; is the score file for this data set and split?")
    return out, report


def load_score_file(path: str, *, files=None, return_report: bool = False):
    """Per-example scores from `path`: a .npy (returned as stored, `files` unused), or a keyed .csv / .npz
    matched to `files` (the data set's relative file paths, e.g. `load_dataset("folder", root=...).files`)."""
    if not os.path.isfile(path):
        raise ScoreFileError(f"score file {path} does not exist")
    if not is_keyed(path):
        try:
            scores = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ScoreFileError(f"cannot read score file {path}: {exc}") from None
        return (scores, MatchReport()) if return_report else scores
    if files is None:
        raise ScoreFileError(f"score file {path} is keyed by file name: pass the data set's files (an image-folder "
                             "data set's .files) to match it")
    try:
        keys, values = _read_csv(path) if path.lower().endswith(".csv") else \
            _read_parquet(path) if path.lower().endswith(".parquet") else _read_npz(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, ScoreFileError):
            raise
        raise ScoreFileError(f"cannot read score file {path}: {exc}") from None
    scores, report = match_scores(keys, values, list(files), source=f"score file {path}")
    return (scores, report) if return_report else scores
