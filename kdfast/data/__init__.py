"""Data set registry: `load_dataset(name, root=..., split=...)` -> a Dataset of (input tensor, int label).

Every data set has `.targets` (LongTensor (N,)), `.num_classes`, `.name`, and `.files` (paths relative to
its folder for image folders, a FileList: a sequence of str over one byte buffer, with each file's size and mtime
from the scan; else None); image folders also list `.skipped_files` (not images). Outputs
carry `data_identity(dataset)` (labels and file-list fingerprints), checked by `check_identity`; image folders
also record the crc32 of each file's bytes as they read them, checked against the digests artifacts recorded
(`dataset.expect_digests`, data/digests.py), so content changed under the same name, size and mtime is caught. Nothing
is ever downloaded at run time: `digits` ships with scikit-learn; the others read an existing root and, when
it is missing or malformed, raise DataError saying which layout was expected.

    digits     scikit-learn's 8x8 digits (1797 images, 10 classes; splits train/test/all), no root needed
    cifar10    ROOT/cifar-10-batches-py/...          (torchvision layout)
    cifar100   ROOT/cifar-100-python/{train,test}    (torchvision layout)
    svhn       ROOT/{train,test,extra}_32x32.mat     (torchvision layout)
    imagenet   ROOT/<split>/<wnid>/*.JPEG            (ImageFolder; ImageNet evaluation preprocessing)
    folder     ROOT/<class>/<image>                  (any ImageFolder; split is ignored)
    wds:PATTERN      WebDataset tar shards, PATTERN brace-expanded or a glob (data/wds_source.py; no root)
    parquet:GLOB     Parquet files with image bytes and int labels (data/parquet_source.py; no root)

Shard data sets also have `.keys` (example keys) and `.shards` (Shard(name, start, stop, size, mtime_ns) records in
index order; see data/sharded.py); `python -m kdfast.data.make_shards` converts an image folder to shards.
"""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

from kdfast.errors import DataError, InvalidArgumentError
from kdfast.data.shard_index import SHARD_OPTIONS, shard_source

if TYPE_CHECKING:
    from kdfast.data.base import LabeledDataset

# the rest of the API, imported on first use: reading identities, listings and score files needs no torch
# (kdfast-prune runs without importing it)
_LAZY = {"LabeledDataset": "kdfast.data.base", "LabeledSubset": "kdfast.data.base", "class_names": "kdfast.data.base",
         "DataIdentityError": "kdfast.data.identity", "check_identity": "kdfast.data.identity",
         "data_identity": "kdfast.data.identity", "describe_file_mismatch": "kdfast.data.identity",
         "labels_fingerprint": "kdfast.data.identity", "stratified_split": "kdfast.data.split"}

DATASETS = ("digits", "cifar10", "cifar100", "svhn", "imagenet", "folder")
IMAGE_FOLDERS = ("imagenet", "folder")  # the data sets of an image-folder tree: walked, listed, prefetched
SPLITS = {"digits": ("train", "test", "all"), "cifar10": ("train", "test"), "cifar100": ("train", "test"),
          "svhn": ("train", "test", "extra"), "imagenet": ("train", "val"), "folder": ("train",)}
# Input shape (channels, side) each data set yields by default: models are built from it.
INPUT_SHAPES = {"digits": (1, 8), "cifar10": (3, 32), "cifar100": (3, 32), "svhn": (3, 32),
                "imagenet": (3, 224), "folder": (3, 224)}

__all__ = ["DATASETS", "IMAGE_FOLDERS", "SPLITS", "INPUT_SHAPES", "DataError", "LabeledDataset", "LabeledSubset",
           "load_dataset", "list_image_folder", "labels_fingerprint", "class_names", "DataIdentityError",
           "check_identity", "data_identity", "describe_file_mismatch", "stratified_split", "shard_source",
           "dataset_kind", "SHARD_OPTIONS", "source_options"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'kdfast.data' has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(_LAZY[name]), name)
    return value


def dataset_kind(name: str) -> str:
    """The DATASETS entry whose defaults a data set name takes: shard sources are image folders in shards."""
    return "folder" if shard_source(name) else str(name).lower()


def source_options(cfg) -> dict:
    """The shard options (SHARD_OPTIONS) a command's configuration gives, for load_dataset."""
    return {k: getattr(cfg, k) for opts in SHARD_OPTIONS.values() for k in opts if getattr(cfg, k, None) is not None}


def load_dataset(name: str, *, root: str | None = None, split: str = "train", download: bool = False,
                 augment: bool = False, image_size: int | None = None, decode: str | None = None,
                 drop_empty_classes: bool = False, num_classes: int | None = None, image_ext: str | None = None,
                 label_field: str | None = None, index_dir: str | None = None, image_column: str | None = None,
                 label_column: str | None = None, id_column: str | None = None) -> LabeledDataset:
    """The data set `name` (see DATASETS) under `root`.

    Args:
        name: one of DATASETS (case-insensitive), or `wds:PATTERN` / `parquet:GLOB` (shards; root and split unused).
        root: the folder holding the data (unused for digits).
        split: one of SPLITS[name] ("train" by default; ignored by "folder", whose root is the tree itself).
        download: must stay False: kdfast reads data, it never fetches it (use torchvision once to download).
        augment: random training augmentation (crop + flip) instead of the deterministic evaluation view.
        image_size: crop side for image folders (224 by default; the resize scales with it).
        decode: for imagenet/folder only: None decodes each image with PIL in the loader workers (any format);
            "gpu" has the workers read JPEG bytes and the scoring loop decode and resize whole batches on the
            GPU (nvJPEG), falling back to "cpu" with a logged note when it cannot; "cpu" runs that batched
            decoder in the workers; "auto" is "gpu" when scoring on CUDA, else "cpu" (see data/gpu_decode.py).
            Such a data set's items are (JPEG bytes, label, index): score it with kdfast.score / score_batches,
            which apply its batch pipeline; `.load(i)` gives one decoded image.
        drop_empty_classes: for imagenet/folder: a class folder without images is left out of the classes (and
            the class count) instead of kept as a class with no examples; either way it is warned about.
        num_classes: shards: the class count when labels do not reach it (default: make_shards' info.json, else
            the largest label + 1).
        image_ext, label_field, index_dir: wds only: the image member's extension (default: the first of jpg,
            jpeg, png, webp a sample has), the json field holding the label when samples have no cls member
            ("label"), a folder caching the index of shards without a `.idx.npz` sidecar.
        image_column, label_column, id_column: parquet only (defaults "image", "label", "id" when present).
    """
    shard_options = dict(image_ext=image_ext, label_field=label_field, index_dir=index_dir,
                         image_column=image_column, label_column=label_column, id_column=id_column)
    if shard_source(name) and not download:
        if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
            raise InvalidArgumentError(f"load_dataset: image_size must be a positive int or None, got {image_size!r}")
        if decode is not None and augment:
            raise InvalidArgumentError("load_dataset: decode= gives the evaluation view; it cannot go with augment")
        from kdfast.data.sharded import load_shards
        return load_shards(name, image_size=image_size or 224, augment=augment, decode=decode,
                           num_classes=num_classes, **shard_options)
    given = [k for k, v in dict(shard_options, num_classes=num_classes).items() if v is not None]
    if given:
        raise InvalidArgumentError(f"load_dataset: {', '.join(given)} apply to wds:/parquet: shard data sets only, "
                                   f"not {name!r}")
    key = str(name).lower()
    if key not in DATASETS:
        raise InvalidArgumentError(f"load_dataset: name must be one of {', '.join(DATASETS)}, got {name!r}")
    if download:
        raise InvalidArgumentError("load_dataset: download=True is not supported; kdfast never downloads data at "
                                   "run time. Fetch it once, e.g. torchvision.datasets.CIFAR10(ROOT, download=True)")
    _check_split(key, split)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise InvalidArgumentError(f"load_dataset: image_size must be a positive int or None, got {image_size!r}")
    if decode is not None:
        from kdfast.data.gpu_decode import DECODES
        if decode not in DECODES:
            raise InvalidArgumentError(f"load_dataset: decode must be None or one of {', '.join(DECODES)}, "
                                       f"got {decode!r}")
        if key not in IMAGE_FOLDERS or augment:
            raise InvalidArgumentError(f"load_dataset: decode={decode!r} applies to the evaluation view of JPEG "
                                       f"image folders (imagenet, folder) only, got name={key!r}, augment={augment}")
    if key == "digits":
        from kdfast.data.digits import Digits
        return Digits(split)
    root = _root_folder(key, root)
    if key in ("cifar10", "cifar100"):
        from kdfast.data.cifar import CIFAR
        return CIFAR(key, root, split, augment=augment)
    if key == "svhn":
        from kdfast.data.svhn import SVHN
        return SVHN(root, split, augment=augment)
    from kdfast.data.imagefolder import ImageFolderDataset
    from kdfast.runtime.folder_walk import image_folder_of
    size, (folder, layout) = image_size or 224, image_folder_of(key, root, split)
    if decode is not None:
        from kdfast.data.gpu_decode import EncodedImageFolder
        return EncodedImageFolder(key, folder, layout, image_size=size, decode=decode,
                                  drop_empty_classes=drop_empty_classes)
    return ImageFolderDataset(key, folder, layout, image_size=size, augment=augment,
                              drop_empty_classes=drop_empty_classes)


def list_image_folder(name: str, *, root: str | None, split: str = "train", drop_empty_classes: bool = False,
                      stat: bool = False):
    """The files and labels of image folder data set `name` (imagenet, folder) in load_dataset's order: a
    FolderListing (data/folder_listing.py), names alone unless `stat`; no file read, torch not imported."""
    key = str(name).lower()
    if key not in IMAGE_FOLDERS:
        raise InvalidArgumentError(f"list_image_folder: name must be imagenet or folder, got {name!r}")
    _check_split(key, split)
    from kdfast.data.folder_listing import FolderListing
    from kdfast.runtime.folder_walk import image_folder_of
    return FolderListing(key, *image_folder_of(key, _root_folder(key, root), split),
                         drop_empty_classes=drop_empty_classes, stat=stat)


def _check_split(key: str, split: str) -> None:
    if key != "folder" and split not in SPLITS[key]:
        raise InvalidArgumentError(f"load_dataset: split for {key!r} must be one of {', '.join(SPLITS[key])}, "
                                   f"got {split!r}")


def _root_folder(key: str, root) -> str:
    """`root` expanded; DataError when it is not given or not a folder."""
    if root is None:
        raise DataError(f"dataset {key!r} needs a root folder (--data-root); kdfast never downloads data")
    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
        raise DataError(f"dataset {key!r}: root {root} does not exist or is not a directory")
    return root
