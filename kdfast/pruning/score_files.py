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

Reading and matching use pyarrow (`pip install 'kdfast[data]'`): a reader (`_read_csv`, `_read_npz`) returns
(keys, values), keys a list of str or an Arrow string array; rule 1 is one vectorised lookup over every key and
file, rule 2 runs in Python for the keys left over only.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

from kdfast.data.identity import FileList
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


def _listing(names, total: int | None = None) -> str:
    """The first SHOW of `names` (of `total` in all, default len(names)), quoted."""
    names = list(names)
    total = len(names) if total is None else total
    more = f", ... ({total} in all)" if total > SHOW else ""
    return ", ".join(repr(n) for n in names[:SHOW]) + more


def _arrow():
    """(pyarrow, pyarrow.compute): keyed score files are read and matched with Arrow's vectorised kernels."""
    try:
        import pyarrow
        import pyarrow.compute
    except ImportError:
        raise ScoreFileError("score files keyed by file name need pyarrow: pip install 'kdfast[data]'") from None
    return pyarrow, pyarrow.compute


def _read_csv(path: str):
    """(keys, scores) of a CSV with `file` and `score` columns (any case, any others ignored)."""
    pa, _ = _arrow()
    from pyarrow import csv as pa_csv
    with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: Excel's "CSV UTF-8" starts with a BOM
        header = next(csv.reader([fh.readline()]), [])
    columns = {c.strip().lower(): c for c in header}
    if "file" not in columns or "score" not in columns:
        raise ScoreFileError(f"score file {path}: a CSV needs a header with 'file' and 'score' columns, got "
                             f"{header or None}")
    file_col, score_col = columns["file"], columns["score"]
    table = pa_csv.read_csv(  # Arrow skips the BOM itself
        path, parse_options=pa_csv.ParseOptions(newlines_in_values=True),
        convert_options=pa_csv.ConvertOptions(include_columns=[file_col, score_col], strings_can_be_null=False,
                                              column_types={file_col: pa.string(), score_col: pa.string()}))
    return table[file_col].combine_chunks(), _numbers(path, table[score_col].combine_chunks())


def _numbers(path: str, text) -> np.ndarray:
    """The score column as float64: Arrow's parse, else (spaces, '1_0', a bad value) Python's float() per value,
    which names the first value that is not a number."""
    pa, pc = _arrow()
    try:
        return pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        pass
    values = text.to_pylist()
    for line, value in enumerate(values, start=2):
        try:
            values[line - 2] = float(value)
        except ValueError:
            raise ScoreFileError(f"score file {path}, line {line}: score {value!r} is not a number") from None
    return np.asarray(values, dtype=np.float64)


def _read_parquet(path: str):
    """A scores.parquet (kdfast-score's, or any table with `key` and `score` columns): keys as an Arrow array."""
    from kdfast.scoring.folder import read_scores_table
    return read_scores_table(path, what=f"score file {path}")


def _read_npz(path: str):
    pa, _ = _arrow()
    with np.load(path, allow_pickle=False) as z:
        if "files" not in z or "scores" not in z:
            raise ScoreFileError(f"score file {path}: an .npz needs arrays 'files' and 'scores', got {sorted(z)}")
        files, scores = z["files"], z["scores"]
    if files.ndim != 1 or scores.ndim != 1 or len(files) != len(scores) or files.dtype.kind not in "US":
        raise ScoreFileError(f"score file {path}: 'files' must be 1-d strings and 'scores' 1-d numbers of the same "
                             f"length, got {files.dtype} {files.shape} and {scores.dtype} {scores.shape}")
    return pa.array(files).cast(pa.string()), scores.astype(np.float64)  # bytes keys: checked as UTF-8 here


def _parts(path: str, *, stem: bool) -> tuple[str, ...]:
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if stem and parts:
        parts[-1] = os.path.splitext(parts[-1])[0]
    return tuple(parts)


# paths that _parts changes: a backslash, an empty component (//, leading or trailing /) or a '.' component
_NOT_PLAIN = r"\\|//|^/|/$|(^|/)\.(/|$)"


def _strings(keys):
    """`keys` (a reader's: a list of str or an Arrow string array) as an Arrow large_string array."""
    pa, _ = _arrow()
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    if not isinstance(keys, pa.Array):
        keys = pa.array(list(keys), pa.large_string())
    return keys.cast(pa.large_string())


def _file_strings(files):
    """A data set's files as an Arrow large_string array, from a FileList's buffer without a per-file object."""
    pa, pc = _arrow()
    if not isinstance(files, FileList):
        return _strings(files)
    lines = pa.Array.from_buffers(pa.large_binary(), len(files),
                                  [None, pa.py_buffer(files.offsets), pa.py_buffer(files.buffer)])
    return pc.binary_slice(lines, 0, -1).cast(pa.large_string())  # each path less its newline


def _normalised(paths):
    """'/'.join(_parts(p, stem=False)) of every path; only the few paths it changes go through Python."""
    pa, pc = _arrow()
    odd = pc.match_substring_regex(paths, _NOT_PLAIN).to_numpy(zero_copy_only=False)
    if not odd.any():
        return paths
    fixed = ["/".join(_parts(p, stem=False)) for p in paths.filter(pa.array(odd)).to_pylist()]
    return pc.replace_with_mask(paths, pa.array(odd), pa.array(fixed, pa.large_string()))


def _stems(paths):
    """The last component of every (normalised) path less its extension, as os.path.splitext drops it."""
    _, pc = _arrow()
    names = pc.replace_substring_regex(paths, r"^.*/", "")
    return pc.replace_substring_regex(names, r"^(\.*[^.].*)\.[^.]*$", r"\1")


def _raise_first_repeated(keys, norm_keys, source: str):
    seen = set()
    for key, norm in zip(keys.to_pylist(), norm_keys.to_pylist()):
        if norm in seen:
            raise ScoreFileError(f"{source}: file {key!r} appears more than once")
        seen.add(norm)


def match_scores(keys, values, files, *, source: str = "scores") -> tuple[np.ndarray, MatchReport]:
    """Scores in the order of `files` from (key, value) pairs; see the module docstring for the rules.

    `keys`: a list of str or an Arrow string array (what the readers return). Exact paths are matched in one
    vectorised pass (Arrow's hash lookup of the normalised keys among the files); only the keys left over go
    through the lenient rules, against the files whose name (less extension) one of them has."""
    pa, pc = _arrow()
    values = np.asarray(values, dtype=np.float64)
    keys = _strings(keys)
    norm_keys = _normalised(keys)
    norm_files = _normalised(_file_strings(files))
    position = pc.index_in(norm_keys, value_set=norm_files).fill_null(-1).to_numpy(zero_copy_only=False)
    exact = np.flatnonzero(position >= 0)
    pending = np.flatnonzero(position < 0)
    pending_keys = keys.take(pending).to_pylist() if len(pending) else []
    # a key given twice lands twice on one file, or twice among the keys left over (compared in Python: few)
    if np.bincount(position[exact], minlength=len(files)).max(initial=0) > 1 or \
            len(set(norm_keys.take(pending).to_pylist())) < len(pending):
        _raise_first_repeated(keys, norm_keys, source)
    out = np.full(len(files), np.nan)
    owner = np.full(len(files), -1, dtype=np.int64)  # data set index -> the key that filled it
    out[position[exact]], owner[position[exact]] = values[exact], exact
    report = MatchReport(exact=len(exact))
    if len(pending):
        names = {p[-1] for k in pending_keys if (p := _parts(k, stem=True))}
        # a key fits a file only when the names agree: the tails of the other files are never looked up
        near = np.flatnonzero(pc.is_in(_stems(norm_files), value_set=pa.array(sorted(names), pa.large_string()))
                              .to_numpy(zero_copy_only=False))
        tails: dict[tuple, list[int]] = {}  # every such file, matched exactly or not: a second key on it errs
        whole: dict[tuple, list[int]] = {}  # files by their whole path: what a key with extra leading folders fits
        for i, f in zip(near.tolist(), norm_files.take(near).to_pylist()):
            p = _parts(f, stem=True)
            whole.setdefault(p, []).append(i)
            for start in range(len(p)):
                tails.setdefault(p[start:], []).append(i)
        for j, key in zip(pending.tolist(), pending_keys):
            p = _parts(key, stem=True)
            hits = next((found for s in range(len(p)) if (found := (whole if s else tails).get(p[s:]))), None)
            if hits is None:
                report.ignored += 1
                continue
            if len(hits) > 1:
                raise ScoreFileError(f"{source}: file {key!r} fits several data set files "
                                     f"({_listing(files[i] for i in hits)}); give fuller paths")
            i = hits[0]
            if owner[i] >= 0:
                raise ScoreFileError(f"{source}: files {keys[int(owner[i])].as_py()!r} and {key!r} both match data "
                                     f"set file {files[i]!r}; give fuller paths")
            out[i], owner[i] = values[j], j
            report.lenient += 1
    missing = np.flatnonzero(owner < 0)
    if len(missing):
        raise ScoreFileError(f"{source}: {len(missing)} of {len(files)} data set files have no score: "
                             f"{_listing((files[i] for i in missing[:SHOW].tolist()), len(missing))}; is the score "
                             "file for this data set and split?")
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
    scores, report = match_scores(*read_score_file(path), files, source=f"score file {path}")
    return (scores, report) if return_report else scores


def read_score_file(path: str):
    """(keys, scores float64) of a keyed .csv / .npz / .parquet in the file's order (keys: an Arrow string array
    or a list of str), for match_scores."""
    if not os.path.isfile(path):
        raise ScoreFileError(f"score file {path} does not exist")
    try:
        return _read_csv(path) if path.lower().endswith(".csv") else \
            _read_parquet(path) if path.lower().endswith(".parquet") else _read_npz(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, ScoreFileError):
            raise
        raise ScoreFileError(f"cannot read score file {path}: {exc}") from None
