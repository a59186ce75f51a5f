"""Example keys: the name of every example that outputs keyed by example (scores.parquet, keep.parquet, teacher
caches) are matched by, so a subset or another order of a source is found by key, not by position.

    keys = example_keys(dataset)                  # pyarrow string array, one key per example, index order
    rows = key_positions(wanted, keys, what="--keep keep.parquet")   # int64 positions of `wanted` in `keys`

A key is the source's own (`.keys`: a webdataset `__key__`, a Parquet key column), else an image folder's relative
path ('/' separated), else the index as text. Keys live in one pyarrow array (no Python object per example).
"""
from __future__ import annotations

import sys

import numpy as np

from kdfast.errors import DataError, InvalidArgumentError

SHOW = 5  # keys named in an error before "... (N in all)"


class KeyMatchError(DataError, InvalidArgumentError):
    """Keys that match no example, or that appear more than once."""


def import_pyarrow(what: str):
    """pyarrow, or a one-line error naming what needs it and the extra that installs it."""
    try:
        import pyarrow
        import pyarrow.compute  # noqa: F401  (the submodule is not imported with the package)
    except ImportError:
        raise InvalidArgumentError(f"{what} needs pyarrow: pip install 'kdfast[data]'") from None
    return pyarrow


def _parent(dataset):
    """(the data set below any Subsets, the parent indices of `dataset`'s examples or None)."""
    indices = None
    # a Subset exists only once torch is loaded: keyed files and listings are matched without importing it
    subset = getattr(sys.modules.get("torch.utils.data"), "Subset", None)
    while subset is not None and isinstance(dataset, subset):
        step = np.asarray(dataset.indices, dtype=np.int64)
        indices = step if indices is None else step[indices]
        dataset = dataset.dataset
    return dataset, indices


def has_keys(dataset) -> bool:
    """True for keyed sources (webdataset, Parquet): data sets with their own `.keys`, also through Subsets."""
    return getattr(_parent(dataset)[0], "keys", None) is not None


def example_keys(dataset):
    """The key of every example of `dataset` in index order, as a pyarrow string array (see the module docstring)."""
    pa = import_pyarrow("example keys")
    base, indices = _parent(dataset)
    own, files = getattr(base, "keys", None), getattr(base, "files", None)
    if own is not None:
        keys = own.combine_chunks() if isinstance(own, pa.ChunkedArray) else \
            own if isinstance(own, pa.Array) else pa.array(own, type=pa.string())
        keys = keys.cast(pa.string())
    elif files is not None:
        keys = pa.array([f.replace("\\", "/") for f in files], type=pa.string())
    else:
        keys = pa.array(np.arange(len(base)).astype(str), type=pa.string())
    if len(keys) != len(base):
        raise DataError(f"{getattr(base, 'name', 'the data set')}: {len(keys)} keys for {len(base)} examples")
    return keys if indices is None else keys.take(pa.array(indices))


def _listing(values) -> str:
    values = list(values)
    more = f", ... ({len(values)} in all)" if len(values) > SHOW else ""
    return ", ".join(repr(v) for v in values[:SHOW]) + more


def duplicate_keys(keys) -> list[str]:
    """The keys that appear more than once (each named once, in order of first appearance)."""
    pa = import_pyarrow("example keys")
    if len(pa.compute.unique(keys)) == len(keys):  # the common case, cheaper than counting every key
        return []
    counts = pa.compute.value_counts(keys)
    repeated = pa.compute.filter(counts.field("values"), pa.compute.greater(counts.field("counts"), 1))
    return repeated.to_pylist()


def key_positions(wanted, keys, *, what: str, among: str = "the data set") -> np.ndarray:
    """int64 positions in `keys` (the example keys of `among`) of each of `wanted` (those of `what`), by exact
    match; KeyMatchError (one line naming the first few and the count) when a key of `wanted` is unknown or
    appears twice, or when `keys` repeat (then no key names one example)."""
    pa = import_pyarrow(what)
    wanted = pa.array(wanted, type=pa.string()) if not isinstance(wanted, (pa.Array, pa.ChunkedArray)) else wanted
    for name, array in ((what, wanted), (among, keys)):
        repeated = duplicate_keys(array)
        if repeated:
            raise KeyMatchError(f"{name}: {len(repeated)} keys appear more than once: {_listing(repeated)}")
    positions = pa.compute.index_in(wanted, value_set=keys)
    if positions.null_count:
        unknown = pa.compute.filter(wanted, pa.compute.is_null(positions)).to_pylist()
        raise KeyMatchError(f"{what}: {len(unknown)} of {len(wanted)} keys match no example of {among}: "
                            f"{_listing(unknown)}; was it made for another data set?")
    return positions.to_numpy(zero_copy_only=False).astype(np.int64)
