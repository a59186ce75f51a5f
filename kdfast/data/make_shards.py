"""Convert an image folder to shards: `python -m kdfast.data.make_shards ROOT OUT --shard-size 1000 [--format wds]`.

The examples keep the folder's order (its scan: classes sorted, then paths) and their original image bytes.
    wds:      OUT/shard-000000.tar, ... written with webdataset's ShardWriter: per example the member
              KEY.<image extension> (the file's bytes) and KEY.cls (the label as text), plus each shard's index
              sidecar OUT/shard-000000.tar.idx.npz, so loading them never scans the tars.
    parquet:  OUT/shard-000000.parquet, ... with columns image (binary: the file's bytes), label (int64) and id
              (the key), in row groups of --row-group-size rows (small: training reads whole row groups).
KEY is the image's path relative to ROOT without its extension, with '%', '.' and '/' written as %25, %2E and
%2F (so `cat/a.b.jpg` is `cat%2Fa%2Eb`): webdataset splits a member name at the first dot of its base name and
would take a '/' for a folder, and the escape keeps keys distinct and the path recoverable.
OUT/info.json records the classes (the loaders read them), the number of examples and the shards. The command
prints the `wds:` / `parquet:` name to pass to `kdfast-score --dataset`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from kdfast.data.imagefolder import FOLDER_LAYOUT, scan_image_folder
from kdfast.data.shard_index import save_index, write_atomic
from kdfast.data.sharded import INFO_FILE, need_extra
from kdfast.errors import DataError, KDFastError

FORMATS = ("wds", "parquet")
ROW_GROUP = 64


def folder_key(relpath: str) -> str:
    """The shard key of the image at `relpath` (see the module docstring)."""
    stem = os.path.splitext(relpath)[0].replace(os.sep, "/")
    return stem.replace("%", "%25").replace(".", "%2E").replace("/", "%2F")


def _read(root: str, rel: str) -> bytes:
    with open(os.path.join(root, rel), "rb") as fh:
        return fh.read()


def _write_wds(root, out, files, labels, shard_size) -> list[tuple[str, int]]:
    from kdfast.data.wds_source import index_options, scan_shard
    wds = need_extra("webdataset")
    pattern = os.path.join(out, "shard-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for rel, label in zip(files, labels):
            ext = os.path.splitext(rel)[1].lower().lstrip(".")
            sink.write({"__key__": folder_key(rel), ext: _read(root, rel), "cls": int(label)})
    shards = []
    for k in range(-(-len(files) // shard_size)):
        path = pattern % k
        index = scan_shard(path)
        save_index(path + ".idx.npz", path, index, index_options(None, None))
        shards.append((path, len(index)))
    return shards


def _write_parquet(root, out, files, labels, shard_size, row_group) -> list[tuple[str, int]]:
    pa, pq = need_extra("pyarrow"), need_extra("pyarrow.parquet")
    shards = []
    for k, start in enumerate(range(0, len(files), shard_size)):
        part = slice(start, start + shard_size)
        table = pa.table({"image": pa.array([_read(root, rel) for rel in files[part]], type=pa.binary()),
                          "label": pa.array(np.asarray(labels[part], dtype=np.int64)),
                          "id": pa.array([folder_key(rel) for rel in files[part]], type=pa.string())})
        path = os.path.join(out, f"shard-{k:06d}.parquet")
        pq.write_table(table, path + ".tmp", row_group_size=row_group)
        os.replace(path + ".tmp", path)
        shards.append((path, len(table)))
    return shards


def make_shards(root: str, out: str, *, shard_size: int = 1000, format: str = "wds",
                row_group_size: int = ROW_GROUP) -> str:
    """Writes the shards of the image folder `root` to `out` (see the module docstring); returns the data set
    name to load them with (`wds:OUT/shard-{000000..00000K}.tar` or `parquet:OUT/shard-*.parquet`)."""
    if format not in FORMATS:
        raise DataError(f"make_shards: format must be one of {', '.join(FORMATS)}, got {format!r}")
    if shard_size < 1 or row_group_size < 1:
        raise DataError(f"make_shards: shard size and row group size must be >= 1, got {shard_size}, "
                        f"{row_group_size}")
    classes, files, labels = scan_image_folder(root, "folder", FOLDER_LAYOUT)
    if os.path.isdir(out) and any(n.startswith("shard-") or n == INFO_FILE for n in os.listdir(out)):
        raise DataError(f"make_shards: {out} already holds shards; choose an empty folder")
    keys = [folder_key(rel) for rel in files]
    if len(set(keys)) != len(keys):
        raise DataError(f"make_shards: two images of {root} differ only in their extensions; keys must be unique")
    os.makedirs(out, exist_ok=True)
    if format == "wds":
        shards = _write_wds(root, out, files, labels, shard_size)
        last = len(shards) - 1
        name = f"wds:{os.path.join(out, 'shard-{000000..' + f'{last:06d}' + '}.tar')}"
    else:
        shards = _write_parquet(root, out, files, labels, shard_size, row_group_size)
        name = f"parquet:{os.path.join(out, 'shard-*.parquet')}"
    info = {"format": "kdfast-shards/1", "source": os.path.abspath(root), "classes": list(classes),
            "num_examples": len(files), "key": "relative path without extension; %, ., / escaped as %25, %2E, %2F",
            "shards": [{"name": os.path.basename(p), "num_examples": n} for p, n in shards]}
    write_atomic(os.path.join(out, INFO_FILE), (json.dumps(info, indent=1) + "\n").encode())
    return name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdfast.data.make_shards", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="image folder: ROOT/<class>/<image>")
    parser.add_argument("out", help="output folder for the shards (new or empty)")
    parser.add_argument("--shard-size", type=int, default=1000, help="examples per shard (default: %(default)s)")
    parser.add_argument("--format", choices=FORMATS, default="wds", help="(default: %(default)s)")
    parser.add_argument("--row-group-size", type=int, default=ROW_GROUP, help="parquet: rows per row group "
                        "(default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        name = make_shards(args.root, args.out, shard_size=args.shard_size, format=args.format,
                           row_group_size=args.row_group_size)
    except (KDFastError, OSError) as exc:
        print(f"make_shards: error: {exc}", file=sys.stderr)
        return 1
    print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
