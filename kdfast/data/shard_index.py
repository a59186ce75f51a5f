"""What sharded data sets (WebDataset tars, Parquet files) share: the shard list, compact keys, per-shard indexes.

    shards = expand_shards("in1k-{000000..001281}.tar", "wds")   # brace expansion, then globs (sorted)
    index = cached_index(path, options, build, index_dir=None)   # ShardIndex: offsets, sizes, labels, keys

A shard's index is kept beside it as `<shard>.idx.npz` (make_shards writes these, like DALI's index files) or in
`index_dir`, each valid for the shard's name, size in bytes and mtime_ns and for the options that built it; a
stale or foreign one is rebuilt, never used. Keys are one byte buffer and end offsets (no Python object per
example). A data set's files fingerprint hashes its shards' base names, sizes and mtimes and every key, so an
artifact made from shards still matches them after the folder moves, and not after a shard changes.
"""
from __future__ import annotations

import glob
import hashlib
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from kdfast.errors import DataError, first_names

SOURCES = ("wds", "parquet")
# load_dataset's options of each source (refused for other data sets); commands pass them on from their options
SHARD_OPTIONS = {"wds": ("image_ext", "label_field", "index_dir"),
                 "parquet": ("image_column", "label_column", "id_column")}
INDEX_SUFFIX = ".idx.npz"
INDEX_FORMAT = "kdfast-shard-index/1"
_NPY_HEADER = re.compile(r"\{'descr': '([<>|=]?\w+)', 'fortran_order': (True|False), 'shape': \(([\d, ]*)\), \}\s*$")


def shard_source(name) -> str | None:
    """"wds" or "parquet" for a `wds:PATTERN` / `parquet:GLOB` data set name, else None."""
    kind, sep, rest = str(name).partition(":")
    return kind.lower() if sep and kind.lower() in SOURCES else None


class Shard(NamedTuple):
    """Examples [start, stop) of a data set come from the shard file `name` (the path as given or expanded);
    `whole` is the file's example count when only its first stop - start examples are used (a cut shard, see
    cut_shards), else None."""
    name: str
    start: int
    stop: int
    size: int
    mtime_ns: int
    whole: int | None = None


class KeyList(Sequence):
    """Example keys as one UTF-8 byte buffer and N + 1 offsets: `keys[i]` is a str, made on access."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data, self.offsets = np.asarray(data, dtype=np.uint8), np.asarray(offsets, dtype=np.int64)

    @classmethod
    def from_strings(cls, keys) -> "KeyList":
        encoded = [k.encode() for k in keys]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(k) for k in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets)

    @classmethod
    def from_arrow(cls, array) -> "KeyList":
        """From a pyarrow string array (chunked or not), without a Python object per key."""
        import pyarrow as pa
        import pyarrow.compute as pc
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        array = pc.cast(array, pa.large_string())
        offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset:array.offset + len(array) + 1]
        data = array.buffers()[2]
        data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, np.uint8)
        return cls(data[offsets[0]:offsets[-1]], offsets - offsets[0])

    @classmethod
    def concat(cls, parts: list["KeyList"]) -> "KeyList":
        if not parts:
            return cls(np.empty(0, np.uint8), np.zeros(1, np.int64))
        bases = np.cumsum([0] + [len(p.data) for p in parts[:-1]])
        offsets = np.concatenate([np.zeros(1, np.int64)] + [p.offsets[1:] + b for p, b in zip(parts, bases)])
        return cls(np.concatenate([p.data for p in parts]), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = int(index) + (len(self) if index < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"key index {index} out of range for {len(self)} keys")
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes().decode()

    def take(self, indices) -> "KeyList":
        """The keys at `indices`, in that order (one gather, no Python object per key)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        lengths = np.diff(self.offsets)[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        pos = np.repeat(self.offsets[idx] - offsets[:-1], lengths) + np.arange(offsets[-1])
        return KeyList(self.data[pos], offsets)

    def first_duplicate(self) -> tuple[int, int] | None:
        """(i, j), i < j, of two equal keys, or None: a 64-bit hash of every key (one vectorised pass per 8 bytes
        of the longest key), a sort of the hashes, and an exact comparison of the keys whose hashes collide."""
        n = len(self)
        if n < 2:
            return None
        starts, lengths = self.offsets[:-1], np.diff(self.offsets)
        data = np.concatenate([self.data, np.zeros(8, np.uint8)])
        windows = np.lib.stride_tricks.as_strided(data, shape=(len(data) - 7, 8), strides=(1, 1))  # 8 bytes on
        h = lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        for at in range(0, int(lengths.max()), 8):  # wrapping uint64 arithmetic over little-endian words
            word = windows[np.minimum(starts + at, len(data) - 8)].view("<u8")[:, 0]
            bits = np.clip(lengths - at, 0, 8).astype(np.uint64) * np.uint64(8)  # the key's bytes in the word
            mask = np.where(bits == 64, np.uint64(2**64 - 1), (np.uint64(1) << (bits % np.uint64(64))) - np.uint64(1))
            h = (h ^ (word & mask)) * np.uint64(0x100000001B3) + np.uint64(1)
        ordered = np.sort(h)
        if not (ordered[1:] == ordered[:-1]).any():  # no two hashes alike (the rule): no argsort needed
            return None
        order = np.argsort(h, kind="stable")
        same = np.flatnonzero(h[order][1:] == h[order][:-1])
        seen: dict[str, int] = {}
        for k in np.unique(np.concatenate([order[same], order[same + 1]])).tolist():  # ascending index
            key = self[k]
            if key in seen:
                return seen[key], k
            seen[key] = k
        return None


@dataclass
class ShardIndex:
    """One shard's examples in order: where each image is (byte offset and size in a tar; unused for Parquet),
    its label and its key."""
    offsets: np.ndarray
    sizes: np.ndarray
    labels: np.ndarray
    keys: KeyList

    def __len__(self) -> int:
        return len(self.labels)


def stat_shard(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def expand_shards(pattern: str, kind: str) -> list[str]:
    """The shard files of `pattern`: brace-expanded ({000000..001281}, {a,b}), each part a path or a glob
    (sorted); DataError when nothing matches or a brace-expanded path does not exist."""
    import braceexpand
    paths = []
    for part in braceexpand.braceexpand(os.path.expanduser(pattern)):
        if glob.has_magic(part):
            paths += sorted(glob.glob(part))
        elif not os.path.isfile(part):
            raise DataError(f"dataset {kind!r}: shard {part} (from {pattern!r}) does not exist")
        else:
            paths.append(part)
    if not paths:
        raise DataError(f"dataset {kind!r}: the pattern {pattern!r} matches no file")
    seen = set()
    again = [p for p, real in zip(paths, map(os.path.realpath, paths)) if real in seen or seen.add(real)]
    if again:
        raise DataError(f"dataset {kind!r}: the pattern {pattern!r} names shard {again[0]} twice")
    return paths


def _index_file(path: str, index_dir: str | None) -> str:
    if index_dir is None:
        return path + INDEX_SUFFIX
    where = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16]
    return os.path.join(index_dir, f"{os.path.basename(path)}.{where}{INDEX_SUFFIX}")


def write_atomic(path: str, data: bytes) -> None:
    """Writes `path` whole or not at all (kdfast.io.atomic's temporary-and-rename; io stands above data)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def save_index(file: str, shard: str, index: ShardIndex, options: dict) -> None:
    """Writes `index` of `shard` to `file`, stamped with the shard's base name, size, mtime and the options."""
    import io
    import json
    size, mtime = stat_shard(shard)
    stamp = {"format": INDEX_FORMAT, "name": os.path.basename(shard), "size": size, "mtime_ns": mtime,
             "options": options}
    buffer = io.BytesIO()
    np.savez(buffer, offsets=index.offsets, sizes=index.sizes, labels=index.labels, key_data=index.keys.data,
             key_offsets=index.keys.offsets, stamp=np.array(json.dumps(stamp, sort_keys=True)))
    write_atomic(file, buffer.getvalue())


def _npy_array(raw: memoryview) -> np.ndarray:
    """The array of one .npy file's bytes (no object dtype, C order), a view of `raw`; ValueError otherwise."""
    import ast
    if bytes(raw[:6]) != b"\x93NUMPY" or raw[6] not in (1, 2, 3):
        raise ValueError("not a .npy member")
    width = 2 if raw[6] == 1 else 4
    start = 8 + width + int.from_bytes(raw[8:8 + width], "little")
    text = bytes(raw[8 + width:start]).decode("latin1")
    plain = _NPY_HEADER.match(text)  # numpy's own layout of the header: read without ast (its cost per member)
    if plain:
        descr, fortran, shape = plain[1], plain[2] == "True", tuple(int(d) for d in plain[3].split(",") if d.strip())
    else:
        header = ast.literal_eval(text)
        descr, fortran, shape = header["descr"], header["fortran_order"], tuple(header["shape"])
    dtype = np.dtype(descr)
    if fortran or dtype.hasobject:
        raise ValueError("a Fortran-order or object .npy member")
    return np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=start).reshape(shape)


def _load_npz(file: str) -> dict:
    """The arrays of an uncompressed .npz (np.savez) as views of its bytes, CRCs checked: np.load's result
    without its per-member zipfile and header overhead (3 ms a file; 1281 sidecars at ImageNet scale)."""
    import io
    import struct
    import zipfile
    import zlib
    with open(file, "rb") as fh:
        data = memoryview(fh.read())
    arrays = {}
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
            start = info.header_offset + 30 + name_len + extra_len
            raw = data[start:start + info.file_size]
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                with np.load(file, allow_pickle=False) as whole:  # not as np.savez writes it: numpy's reader
                    return {name: whole[name] for name in whole.files}
            if len(raw) != info.file_size or zlib.crc32(raw) != info.CRC:
                raise ValueError(f"{file}: member {info.filename} is truncated or corrupt")
            arrays[info.filename[:-4]] = _npy_array(raw)
    return arrays


def _read_index(file: str, shard: str, options: dict) -> ShardIndex | None:
    """The index in `file` when it was made for this very shard (name, size, mtime) and options, else None."""
    import json
    import struct
    import zipfile
    size, mtime = stat_shard(shard)
    try:
        z = _load_npz(file)
        stamp = json.loads(str(z["stamp"][()]))
        if stamp != {"format": INDEX_FORMAT, "name": os.path.basename(shard), "size": size, "mtime_ns": mtime,
                     "options": options}:
            return None
        return ShardIndex(z["offsets"], z["sizes"], z["labels"], KeyList(z["key_data"], z["key_offsets"]))
    except (OSError, ValueError, KeyError, SyntaxError, TypeError, struct.error, zipfile.BadZipFile):
        return None  # unreadable: rebuilt like a stale one


def cached_index(shard: str, options: dict, build: Callable[[], ShardIndex], index_dir: str | None = None, *,
                 stale: list | None = None) -> ShardIndex:
    """The shard's index from its sidecar, else from `index_dir`, else built (and then saved in `index_dir`).
    Index files found but not fitting the shard (it changed since, or other options) go to `stale`."""
    for file in [_index_file(shard, None)] + ([_index_file(shard, index_dir)] if index_dir else []):
        if os.path.isfile(file):
            index = _read_index(file, shard, options)
            if index is not None:
                return index
            if stale is not None:
                stale.append(file)
    index = build()
    if index_dir is not None:
        save_index(_index_file(shard, index_dir), shard, index, options)
    return index


def assemble(kind: str, paths: list[str], indexes: list[ShardIndex]) -> tuple[list[Shard], KeyList, np.ndarray]:
    """(shards, keys, labels) of the data set made of `indexes` in order; DataError on a key found twice."""
    shards, start = [], 0
    for path, index in zip(paths, indexes):
        size, mtime = stat_shard(path)
        shards.append(Shard(path, start, start + len(index), size, mtime))
        start += len(index)
    keys = KeyList.concat([index.keys for index in indexes])
    pair = keys.first_duplicate()
    if pair is not None:
        stops = np.array([s.stop for s in shards])
        a, b = (shards[int(np.searchsorted(stops, i, side="right"))].name for i in pair)
        where = f"twice in shard {a}" if a == b else f"in shards {a} and {b}"
        raise DataError(f"dataset {kind!r}: key {keys[pair[0]]!r} occurs {where}; every example needs its own key")
    labels = np.concatenate([index.labels for index in indexes]) if indexes else np.empty(0, np.int64)
    return shards, keys, labels


def shards_fingerprint(shards: list[Shard], keys: KeyList) -> str:
    """sha256 hex over each shard's base name, size and mtime_ns (with its example count) and every key."""
    h = hashlib.sha256()
    for s in shards:
        h.update(f"{os.path.basename(s.name)}\t{s.size}\t{s.mtime_ns}\t{s.stop - s.start}\n".encode())
    h.update(keys.offsets.astype("<i8").tobytes())
    h.update(keys.data.tobytes())
    return h.hexdigest()


def cut_shards(shards: list[Shard], n: int) -> list[Shard]:
    """The shards of a data set's first `n` examples: a prefix of `shards`, the last one cut at n (marked by
    `whole`, so its record never passes for the whole file's)."""
    cut = []
    for s in shards:
        if s.start >= n:
            break
        cut.append(s if s.stop <= n else s._replace(stop=n, whole=s.whole or s.stop - s.start))
    return cut


def shard_records(shards: list[Shard]) -> list[list]:
    """The shard list as JSON rows [name, examples, size, mtime_ns] (recorded in a job's data identity), a cut
    shard's with its whole example count appended."""
    return [[s.name, s.stop - s.start, s.size, s.mtime_ns] + ([] if s.whole is None else [s.whole]) for s in shards]


def describe_shard_mismatch(recorded: list, current: list, limit: int = 5) -> str:
    """The shards that differ between two shard_records lists, by name: gone, new, changed (size or mtime)."""
    old, new = {r[0]: list(r[1:]) for r in recorded or []}, {r[0]: list(r[1:]) for r in current or []}
    gone, added = [n for n in old if n not in new], [n for n in new if n not in old]
    changed = [n for n in new if n in old and old[n] != new[n]]
    parts = [f"{len(gone)} shards gone: {first_names(gone, limit)}" if gone else "",
             f"{len(added)} new: {first_names(added, limit)}" if added else "",
             f"{len(changed)} changed (size or modification time): {first_names(changed, limit)}" if changed else ""]
    text = "; ".join(p for p in parts if p)
    return text or "the same shards in another order"
