"""`wds:PATTERN`: WebDataset tar shards as a map-style data set (like DALI's readers.webdataset with index files
and webdataset's own indexed `wids` data sets).

Samples are grouped the WebDataset way: consecutive members sharing a key, the member path up to the first dot
of its base name (webdataset's base_plus_ext; `a/b.c.jpg` is key `a/b`, extension `c.jpg`). The image is the
member with extension `image_ext` (default: the first of jpg, jpeg, png, webp the sample has); the label is the
integer text of its `cls` member, else the `label_field` of its `json` member ("label"; a given label_field
reads the json member only). The index comes from the tar headers (tarfile seeks over member data; only the
small label members are read) and is cached per shard (shard_index.py: a `<shard>.idx.npz` sidecar, or
`index_dir`); an image is then one positioned read of its member. Shards must be uncompressed tars.
"""
from __future__ import annotations

import json
import os
import tarfile

import numpy as np

from kdfast.data.gpu_decode import note_once
from kdfast.data.shard_index import KeyList, ShardIndex, assemble, cached_index, expand_shards
from kdfast.data.sharded import ShardedDataset, need_extra
from kdfast.errors import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")  # the image folders' extensions
LABEL_FIELD = "label"


def _label(kind: str, shard: str, key: str, members: dict, label_field: str | None) -> int:
    """The sample's label from its cls member (text int), else its json member's field."""
    if "cls" in members and label_field is None:
        text, what = members["cls"], "its cls member"
        try:
            value = int(text.decode().strip())
        except (UnicodeDecodeError, ValueError):
            value = None
    elif "json" in members:
        field = label_field or LABEL_FIELD
        what = f"field {field!r} of its json member"
        try:
            record = json.loads(members["json"])
        except ValueError as exc:
            raise DataError(f"dataset {kind!r}: sample {key!r} in shard {shard} has a json member that is not "
                            f"JSON ({exc})") from exc
        if not isinstance(record, dict) or field not in record:
            raise DataError(f"dataset {kind!r}: sample {key!r} in shard {shard} has no label: its json member "
                            f"has no field {field!r}")
        text = record[field]
        value = text if isinstance(text, int) and not isinstance(text, bool) else None
    else:
        want = "a json member" if label_field else "a cls or json member"
        raise DataError(f"dataset {kind!r}: sample {key!r} in shard {shard} has no label ({want})")
    if value is None:
        raise DataError(f"dataset {kind!r}: sample {key!r} in shard {shard}: the label ({what}) is {text!r}, not "
                        "an int")
    return value


def scan_shard(path: str, image_ext: str | None = None, label_field: str | None = None,
               kind: str = "wds") -> ShardIndex:
    """The index of one tar shard from its headers: each sample's key, label, image offset and size."""
    base_plus_ext = need_extra("webdataset.tariterators").base_plus_ext
    total = os.path.getsize(path)
    keys, offsets, sizes, labels = [], [], [], []

    def finish(key, images, labels_raw, others):
        ext = image_ext if image_ext is not None else next((e for e in IMAGE_EXTS if e in images), None)
        if ext not in images:
            has = ", ".join(sorted([*images, *labels_raw, *others]))
            want = f"a .{image_ext} image" if image_ext else f"an image ({', '.join(IMAGE_EXTS)})"
            raise DataError(f"dataset {kind!r}: sample {key!r} in shard {path} has no image: it needs {want} "
                            f"and has {has}")
        keys.append(key)
        offsets.append(images[ext][0])
        sizes.append(images[ext][1])
        labels.append(_label(kind, path, key, labels_raw, label_field))

    try:
        with tarfile.open(path, "r:") as tar:
            current = None  # [key, images {ext: (offset, size)}, label members {ext: bytes}, other exts]
            for member in tar:  # headers only: tarfile seeks over the member data
                if not member.isfile():
                    continue
                key, ext = base_plus_ext(member.name)
                if key is None:
                    continue  # no extension: webdataset skips it too
                if member.offset_data + member.size > total:
                    raise tarfile.ReadError(f"member {member.name} ends past the end of the file")
                if current is None or current[0] != key:
                    if current is not None:
                        finish(*current)
                    current = [key, {}, {}, []]
                ext = ext.lower()
                if ext in ("cls", "json"):
                    current[2][ext] = tar.extractfile(member).read()
                elif ext in IMAGE_EXTS or ext == image_ext:
                    current[1][ext] = (member.offset_data, member.size)
                else:
                    current[3].append(ext)
            if current is not None:
                finish(*current)
    except (tarfile.TarError, EOFError) as exc:
        raise DataError(f"dataset {kind!r}: shard {path} is not a readable tar file, truncated or compressed "
                        f"({type(exc).__name__}: {exc}); expected an uncompressed WebDataset tar") from exc
    return ShardIndex(np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64),
                      np.asarray(labels, dtype=np.int64), KeyList.from_strings(keys))


def index_options(image_ext: str | None, label_field: str | None) -> dict:
    """What a cached index depends on besides the shard itself."""
    return {"image_ext": image_ext, "label_field": label_field}


class WdsDataset(ShardedDataset):
    def __init__(self, pattern: str, *, image_size: int = 224, augment: bool = False, num_classes: int | None = None,
                 image_ext: str | None = None, label_field: str | None = None, index_dir: str | None = None):
        self.pattern = pattern
        image_ext = image_ext.lower().lstrip(".") if image_ext else None
        paths = expand_shards(pattern, "wds")
        options, stale = index_options(image_ext, label_field), []
        indexes = [cached_index(p, options, lambda p=p: scan_shard(p, image_ext, label_field), index_dir, stale=stale)
                   for p in paths]
        if stale:  # one note for all: shards copied without their modification times make every sidecar stale
            note_once(f"{len(stale)} shard index files no longer fit their shards (changed since indexed, copied "
                      f"without modification times, or other --image-ext/--label-field), e.g. {stale[0]}; the "
                      "shards were scanned instead")
        if not sum(len(i) for i in indexes):
            raise DataError(f"dataset 'wds': the shards of {pattern!r} hold no samples")
        shards, keys, labels = assemble("wds", paths, indexes)
        self.offsets = np.concatenate([i.offsets for i in indexes])
        self.sizes = np.concatenate([i.sizes for i in indexes])
        super().__init__("wds", shards, keys, labels, image_size=image_size, augment=augment,
                         num_classes=num_classes)

    def read(self, index: int) -> bytes:
        shard = self.names.shard(index)
        size = int(self.sizes[index])
        fh = self.handle(shard, lambda path: open(path, "rb"))
        try:
            data = os.pread(fh.fileno(), size, int(self.offsets[index]))
        except OSError as exc:
            raise DataError(f"dataset 'wds': cannot read image {self.names[index]} ({exc})") from exc
        if len(data) != size:
            raise DataError(f"dataset 'wds': cannot read image {self.names[index]}: the shard ends {size - len(data)} "
                            "bytes early (truncated or rewritten since it was indexed)")
        return data
