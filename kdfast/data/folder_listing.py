"""An image folder's files and labels, in the order `load_dataset` gives them, without reading a file and without
torch: the scan image-folder data sets are built from, and the listing kdfast-prune matches a score file keyed by
file name to, or checks a score folder against.

    classes, files, labels = scan_image_folder(folder, "folder", FOLDER_LAYOUT)
    listing = FolderListing("imagenet", "/data/in1k/train", IMAGENET_LAYOUT)   # .files, .targets, .classes

A listing's walk is split over a forked helper (runtime/folder_walk.py). `stat=False` lists the names alone, a
third to a quarter of a full scan's time on a warm tree (the stats are the rest); the identity of such a listing ties an
artifact to the files' names and their order (`file_names_fingerprint`, not `files_fingerprint`): the scores of a
keyed score file were computed elsewhere, from bytes kdfast never read, so no sizes or contents hold them. With
`stat=True` the identity is the data set's own (`files_fingerprint`).
"""
from __future__ import annotations

import numpy as np

from kdfast.data.identity import FileList
from kdfast.runtime.folder_walk import walk_image_folder
from kdfast.runtime.walk_prefetch import take_prefetched_walk


class FolderScan(tuple):
    """(classes, relative file paths (a FileList with each file's size and mtime_ns), labels (int64 array)),
    unpacked as a 3-tuple; `.skipped` lists the relative paths of files that were not taken as images (other
    extensions), so callers can say how many were left out."""

    def __new__(cls, classes, files, labels, skipped):
        scan = super().__new__(cls, (classes, files, labels))
        scan.skipped = skipped
        return scan


def scan_image_folder(folder: str, name: str, layout: str, *, drop_empty_classes: bool = False, stat: bool = True,
                      split: bool = False) -> FolderScan:
    """(classes, relative file paths, labels) of an ImageFolder tree; DataError when it is not one.

    One os.scandir walk (runtime/folder_walk.py) that keeps each image's size and mtime_ns (the files fingerprint's
    stats) as it lists, the paths held in one byte buffer (FileList); the walk kdfast-score started in a process of
    its own for these arguments when there is one (runtime/walk_prefetch.py). A class folder that is a link to the
    tree or above it (a loop) is left out, as is any folder reached a second time through links to class folders
    (real paths counted once); a class folder without images is warned about and, with `drop_empty_classes`, left
    out of the classes. `stat=False`: the names alone (the FileList without stats and without a folder, so it never
    stats them itself); `split`: the walk split over a forked helper where that is safe."""
    walk = (take_prefetched_walk(folder, name, layout, drop_empty_classes=drop_empty_classes) if stat else None) or \
        walk_image_folder(folder, name, layout, drop_empty_classes=drop_empty_classes, stat=stat, split=split)
    files = FileList.from_buffer(walk.buffer, walk.offsets, folder=folder if stat else None, stats=walk.stats)
    labels = np.repeat(np.arange(len(walk.classes), dtype=np.int64), walk.counts)
    return FolderScan(walk.classes, files, labels, walk.skipped)


class FolderListing:
    """`name`, `folder`, `classes` (sorted), `files` (a FileList, with each file's size and mtime_ns when `stat`),
    `targets` (int64 array), `num_classes` and `skipped_files` of an image folder, as load_dataset's data set has
    them; `names_only` when listed without stats."""

    def __init__(self, name: str, folder: str, layout: str, *, drop_empty_classes: bool = False, stat: bool = False):
        scan = scan_image_folder(folder, name, layout, drop_empty_classes=drop_empty_classes, stat=stat, split=True)
        self.name, self.folder, self.names_only = name, folder, not stat
        self.classes, self.files, self.targets = scan
        self.num_classes, self.skipped_files = len(self.classes), scan.skipped

    def __len__(self) -> int:
        return len(self.files)
