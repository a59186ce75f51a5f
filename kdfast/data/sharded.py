"""Data sets read from shards (`wds:PATTERN`, `parquet:GLOB`): map-style, indexed, decoded like image folders.

    data = load_shards("wds:/data/in1k-train-{000000..001281}.tar", image_size=224)
    data.keys[i], data.shards      # example i's key; Shard(name, start, stop, size, mtime_ns) records in order

Each source (wds_source.py, parquet_source.py) finds its examples' keys, labels and image locations up front
and reads one image's bytes on demand; everything else is here: `load(i)` decodes those bytes on the path of
image folders (imagefolder.py: PIL, 16-bit grey, evaluation resize and crop or the training augmentation),
`with_augment` gives the other view of the same index, `decode="cpu"|"gpu"|"auto"` gives items of (JPEG bytes,
label, index) for the batched decoder (gpu_decode.py). `classes` come from the `info.json` that make_shards
writes beside the shards (else None, the classes are the label numbers).
"""
from __future__ import annotations

import copy
import functools
import io
import json
import os
from collections import OrderedDict

import numpy as np
import torch

from kdfast.data.base import LabeledDataset
from kdfast.data.digests import DigestTable
from kdfast.data.imagefolder import image_tensor, open_image, training_augment
from kdfast.data.shard_index import SHARD_OPTIONS, SOURCES, KeyList, Shard, shard_source, shards_fingerprint
from kdfast.errors import DataError, InvalidArgumentError

INFO_FILE = "info.json"
# open shard files per process: enough for shuffled reads over many shards, well below the usual fd limit
OPEN_SHARDS = 64


def need_extra(package: str):
    """Imports `package` (pyarrow, webdataset), or DataError naming the extra that brings it."""
    import importlib
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise DataError(f"shard data sets need {package}: pip install 'kdfast[data]'") from exc


class ExampleNames:
    """`names[i]`: "KEY in shard NAME", how errors name example i (picklable, sent to loader workers)."""

    def __init__(self, keys: KeyList, shards: list[Shard]):
        self.keys, self.shards = keys, shards
        self.stops = np.array([s.stop for s in shards], dtype=np.int64)

    def shard(self, index: int) -> int:
        return int(np.searchsorted(self.stops, index, side="right"))

    def __getitem__(self, index: int) -> str:
        return f"{self.keys[index]!r} in shard {self.shards[self.shard(index)].name}"


def read_classes(shards: list[Shard], num_labels: int) -> list[str] | None:
    """The class names from make_shards' info.json beside the first shard, when it lists these very shards."""
    path = os.path.join(os.path.dirname(os.path.abspath(shards[0].name)), INFO_FILE)
    try:
        with open(path) as fh:
            info = json.load(fh)
    except (OSError, ValueError):
        return None
    listed = {os.path.basename(s["name"]) for s in info.get("shards", [])}
    classes = info.get("classes")
    if not classes or not {os.path.basename(s.name) for s in shards} <= listed or len(classes) < num_labels:
        return None
    return [str(c) for c in classes]


class ShardedDataset(LabeledDataset):
    """The examples of shards in index order; sources implement `read(index)` -> the image file's bytes.

    Open shard handles belong to one process: a forked loader worker or an unpickled copy opens its own.
    """

    def __init__(self, kind: str, shards: list[Shard], keys: KeyList, labels, *, image_size: int = 224,
                 augment: bool = False, num_classes: int | None = None):
        self.shards, self.keys = shards, keys
        self.names = ExampleNames(keys, shards)
        self.crop = int(image_size)
        self.resize = int(round(image_size * 256 / 224))
        self.augment = training_augment(kind, self.crop) if augment else None
        labels = np.asarray(labels, dtype=np.int64)
        top = int(labels.max()) + 1 if len(labels) else 0
        self.classes = read_classes(shards, top)
        if num_classes is None:
            num_classes = len(self.classes) if self.classes else top
        elif self.classes and len(self.classes) != num_classes:
            self.classes = None
        self._handles: OrderedDict = OrderedDict()
        self._pid = os.getpid()
        self.digests = DigestTable(len(labels))  # crc32 of each image's bytes as read; shared by with_augment views
        super().__init__(kind, torch.from_numpy(labels), num_classes)

    @functools.cached_property
    def files_fingerprint(self) -> str:
        """sha256 over the shards (base names, sizes, mtimes, example counts) and every key (shard_index.py)."""
        return shards_fingerprint(self.shards, self.keys)

    def handle(self, shard: int, open_fn):
        """This process's open handle of shard number `shard` (open_fn(path) opens it); the least recently used
        is closed past OPEN_SHARDS."""
        if self._pid != os.getpid():  # a forked worker: the parent's handles share its file offsets
            self._handles, self._pid = OrderedDict(), os.getpid()
        fh = self._handles.get(shard)
        if fh is None:
            fh = self._handles[shard] = open_fn(self.shards[shard].name)
            if len(self._handles) > OPEN_SHARDS:
                self._handles.popitem(last=False)[1].close()
        else:
            self._handles.move_to_end(shard)
        return fh

    def __getstate__(self):
        return {**self.__dict__, "_handles": OrderedDict()}

    def read(self, index: int) -> bytes:
        """The bytes (or a bytes-like buffer) of example `index`'s image file."""
        raise NotImplementedError

    def read_recorded(self, index: int):
        """read(index), its content digest recorded in (and checked by) the digest table (kdfast.data.digests)."""
        raw = self.read(index)
        self.digests.record(index, raw, self.names[index])
        return raw

    def load(self, index: int) -> torch.Tensor:
        img = open_image(io.BytesIO(self.read_recorded(index)), self.name, self.names[index])
        return image_tensor(img, self.crop, self.resize, self.augment)

    def with_augment(self, augment: bool) -> "ShardedDataset":
        """The same examples (this index, no second scan) with or without the training augmentation."""
        view = copy.copy(self)
        view.augment = training_augment(self.name, self.crop) if augment else None
        view._handles = OrderedDict()
        return view


class EncodedShards(LabeledDataset):
    """A ShardedDataset whose items are (JPEG bytes uint8 (n,), label, index), decoded in batches as
    gpu_decode.py's EncodedImageFolder; `load(i)` decodes one image on the CPU."""

    def __init__(self, source: ShardedDataset, decode: str):
        from kdfast.data.gpu_decode import JpegBatchDecoder
        self.source, self.decode_on = source, decode
        self.shards, self.keys, self.classes, self.names = source.shards, source.keys, source.classes, source.names
        self.digests = source.digests
        self.decoder = JpegBatchDecoder(source.crop)
        super().__init__(source.name, source.targets, source.num_classes)

    @property
    def files_fingerprint(self) -> str:
        return self.source.files_fingerprint

    def read(self, index: int) -> torch.Tensor:
        from kdfast.data.gpu_decode import jpeg_tensor
        return jpeg_tensor(self.source.read_recorded(index), self.name, self.names[index])

    def __getitem__(self, index: int):
        index = int(index)
        return self.read(index), int(self.targets[index]), index

    def load(self, index: int) -> torch.Tensor:
        return self.decoder([self.read(index)], "cpu", [self.names[index]])[0]

    def with_augment(self, augment: bool) -> ShardedDataset:
        return self.source.with_augment(augment)

    def batch_pipeline(self, device, *, decode_in_workers: bool | None = None):
        from kdfast.data.gpu_decode import encoded_batch_pipeline
        return encoded_batch_pipeline(self.decode_on, self.decoder, self.names, device,
                                      decode_in_workers=decode_in_workers)


def load_shards(name: str, *, image_size: int = 224, augment: bool = False, decode: str | None = None,
                num_classes: int | None = None, **options) -> LabeledDataset:
    """The data set `wds:PATTERN` or `parquet:GLOB` (see kdfast.data.load_dataset for the options)."""
    kind = shard_source(name)
    pattern = str(name).partition(":")[2]
    wrong = [k for k, v in options.items() if v is not None and k not in SHARD_OPTIONS[kind]]
    if wrong:
        raise InvalidArgumentError(f"load_dataset: {', '.join(wrong)} apply to "
                                   f"{' / '.join(s for s in SOURCES if wrong[0] in SHARD_OPTIONS[s])} data sets, "
                                   f"not {kind}")
    if not pattern:
        raise InvalidArgumentError(f"load_dataset: name {name!r} needs a pattern after '{kind}:'")
    from kdfast.data.gpu_decode import DECODES
    if decode is not None and decode not in DECODES:
        raise InvalidArgumentError(f"load_dataset: decode must be None or one of {', '.join(DECODES)}, got {decode!r}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise InvalidArgumentError(f"load_dataset: num_classes must be a positive int or None, got {num_classes!r}")
    given = {k: v for k, v in options.items() if v is not None}
    if kind == "wds":
        from kdfast.data.wds_source import WdsDataset
        data = WdsDataset(pattern, image_size=image_size, augment=augment, num_classes=num_classes, **given)
    else:
        from kdfast.data.parquet_source import ParquetDataset
        data = ParquetDataset(pattern, image_size=image_size, augment=augment, num_classes=num_classes, **given)
    return EncodedShards(data, decode) if decode is not None else data
