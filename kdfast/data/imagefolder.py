"""Image folders: `imagenet` (ROOT/<split>/<wnid>/*.JPEG) and `folder` (any ROOT/<class>/<image> tree).

Classes are the sorted subfolder names; examples are sorted by class, then by path, so the index order
is the same on every machine. `files` holds each example's path relative to the data set's folder.
Preprocessing is ImageNet's evaluation transform (shorter side to 256, centre crop 224, per-channel
normalisation), scaled by `image_size` (crop) for small images; `augment=True` uses RandomResizedCrop and
a horizontal flip instead (training). An unreadable image raises DataError naming the file; 16-bit grey images
are scaled to 8 bits, 32-bit integer and float ones (no fixed range) raise DataError. Each file's bytes are read
once, their crc32 recorded in `digests` (data/digests.py), and decoded from memory.
"""
from __future__ import annotations

import io
import operator
import os
import warnings

import numpy as np
import torch

from kdfast.data.base import DataError, LabeledDataset, normalize
from kdfast.data.digests import DigestTable
from kdfast.data.identity import FileList

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_LAYOUT = "ROOT/<split>/<wnid>/*.JPEG (ImageFolder layout, e.g. ROOT/train/n01440764/n01440764_10026.JPEG)"
FOLDER_LAYOUT = "ROOT/<class name>/<image file> (ImageFolder layout: one subfolder per class)"


# PIL modes whose values have no fixed full scale: PIL's convert("RGB") clips them at 255 (a white image)
UNSCALED_MODES = {"I": "32-bit integer", "F": "32-bit float"}


def _sixteen_to_rgb(img):
    """A 16-bit grey image (PIL's I;16 modes, e.g. 16-bit PNG) as 8-bit RGB, scaled by 255 / 65535 (PIL's
    convert would clip every value above 255 to white)."""
    from PIL import Image
    grey = np.asarray(img).astype(np.float32) * (255.0 / 65535.0)
    return Image.fromarray(np.rint(grey).astype(np.uint8)).convert("RGB")  # 2-d uint8: mode L


class FolderScan(tuple):
    """(classes, relative file paths (a FileList with each file's size and mtime_ns), labels (int64 array)),
    unpacked as a 3-tuple; `.skipped` lists the relative paths of files that were not taken as images (other
    extensions), so callers can say how many were left out."""

    def __new__(cls, classes, files, labels, skipped):
        scan = super().__new__(cls, (classes, files, labels))
        scan.skipped = skipped
        return scan


_IMAGE_SUFFIXES = tuple(ext.encode() for ext in IMAGE_EXTENSIONS)
_SEP = os.sep.encode()
_ENTRY_NAME, _SIZE, _MTIME = (operator.attrgetter(a) for a in ("name", "st_size", "st_mtime_ns"))


class _ClassFiles:
    """The images of one class folder as they are listed: newline-ended relative paths joined (`chunks`), their
    byte lengths and (size, mtime_ns) stats; the skipped files' relative paths."""

    def __init__(self):
        self.chunks, self.lengths, self.stats, self.skipped = [], [], [], []
        self.count = 0

    def add(self, rel: bytes, images: list) -> None:
        """The images (DirEntry, sorted by name) of folder `rel`, stat'ed from the listing (one stat each)."""
        prefix = rel + _SEP
        names = [e.name for e in images]
        self.chunks.append(prefix + (b"\n" + prefix).join(names) + b"\n")
        self.lengths.append(np.fromiter(map(len, names), np.int64, len(names)) + len(prefix) + 1)
        try:
            stats = [e.stat() for e in images]  # follows links, as a stat of the path would
            size, mtime = _SIZE, _MTIME
        except OSError:  # one vanished since listed: -1, -1 for it (the fingerprint changes, the consumer says so)
            stats = [_stat_or_none(e) for e in images]
            size, mtime = _size, _mtime
        self.stats.append(np.stack([np.fromiter(map(size, stats), np.int64, len(stats)),
                                    np.fromiter(map(mtime, stats), np.int64, len(stats))], axis=1))
        self.count += len(images)


def _stat_or_none(entry):
    try:
        return entry.stat()
    except OSError:
        return None


def _size(st) -> int:
    return -1 if st is None else st.st_size


def _mtime(st) -> int:
    return -1 if st is None else st.st_mtime_ns


def _is_dir(entry) -> bool:
    try:
        return entry.is_dir()  # follows links, as os.walk does
    except OSError:
        return False


def _is_image(name: bytes) -> bool:
    return name.lower().endswith(_IMAGE_SUFFIXES) and not name.startswith(b"._")  # ._x: macOS AppleDouble


def _class_files(folder: bytes, cls: bytes, seen: set) -> _ClassFiles:
    """The images and skipped files under class folder `cls` of `folder` (both bytes), in os.walk's top-down
    order (a folder's files sorted by name, then its subfolders, sorted); links below the class are not followed
    and folders whose real path is in `seen` (reached through a link to a class folder already) are left out,
    which it extends: one realpath per folder, not per file. One os.scandir per folder, whose entries give the
    file type and each image's stat."""
    out = _ClassFiles()
    stack = [cls]
    while stack:
        rel = stack.pop()
        path = os.path.join(folder, rel)
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        try:
            with os.scandir(path) as listing:
                entries = list(listing)
        except OSError:
            continue  # unreadable folder: os.walk's default, nothing listed
        try:  # inlined: the per-file cost of a scan is this line and the stat
            images = [e for e in entries if (n := e.name).lower().endswith(_IMAGE_SUFFIXES) and n[:2] != b"._"
                      and not e.is_dir()]
        except OSError:  # is_dir can raise (PermissionError): os.walk takes such an entry as a file
            images = [e for e in entries if _is_image(e.name) and not _is_dir(e)]
        subfolders, skipped = [], []
        for entry in entries if len(images) < len(entries) else ():  # the rest: folders and other files
            name = entry.name
            if _is_dir(entry):
                if not entry.is_symlink():
                    subfolders.append(name)
            elif not _is_image(name) and (not name.startswith(b".") or name.startswith(b"._")):
                skipped.append(name)  # other hidden files are not worth a note
        if images:
            images.sort(key=_ENTRY_NAME)
            out.add(rel, images)
        out.skipped += [os.fsdecode(os.path.join(rel, name)) for name in sorted(skipped)]
        stack += [os.path.join(rel, d) for d in sorted(subfolders, reverse=True)]  # popped smallest first
    return out


def scan_image_folder(folder: str, name: str, layout: str, *, drop_empty_classes: bool = False) -> FolderScan:
    """(classes, relative file paths, labels) of an ImageFolder tree; DataError when it is not one.

    One os.scandir walk that keeps each image's size and mtime_ns (the files fingerprint's stats) as it lists,
    the paths held in one byte buffer (FileList). A class folder that is a link to the tree or above it (a loop)
    is left out, as is any folder reached a second time through links to class folders (real paths counted
    once); a class folder without images is warned about and, with `drop_empty_classes`, left out of the
    classes."""
    if not os.path.isdir(folder):
        raise DataError(f"dataset {name!r}: {folder} is not a directory; expected {layout}")
    root = os.path.realpath(folder)
    names = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    loops = [c for c in names if (root + os.sep).startswith(os.path.realpath(os.path.join(folder, c)) + os.sep)]
    if loops:
        warnings.warn(f"dataset {name!r}: class folders {', '.join(loops)} link back to {folder} or above it (a loop); "
                      "left out", stacklevel=3)
    names = [c for c in names if c not in loops]
    if not names:
        raise DataError(f"dataset {name!r}: {folder} has no class subfolders; expected {layout}")
    seen, per_class, raw_folder = set(), {}, os.fsencode(folder)
    for cls in names:
        per_class[cls] = _class_files(raw_folder, os.fsencode(cls), seen)
    skipped = [f for c in names for f in per_class[c].skipped]
    empty = [c for c in names if not per_class[c].count]
    if empty and len(empty) < len(names):
        what = "left out of the classes" if drop_empty_classes else \
            "kept as classes without examples (drop_empty_classes=True leaves them out)"
        warnings.warn(f"dataset {name!r}: {len(empty)} class folders hold no images ({', '.join(empty[:5])}"
                      f"{', ...' if len(empty) > 5 else ''}); {what}", stacklevel=3)
    classes = [c for c in names if per_class[c].count or not drop_empty_classes]
    if not any(per_class[c].count for c in classes):
        raise DataError(f"dataset {name!r}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}; "
                        f"expected {layout}")
    kept = [per_class[c] for c in classes]
    offsets = np.zeros(sum(k.count for k in kept) + 1, dtype=np.int64)
    np.cumsum(np.concatenate([n for k in kept for n in k.lengths]), out=offsets[1:])
    files = FileList.from_buffer(b"".join(chunk for k in kept for chunk in k.chunks), offsets, folder=folder,
                                 stats=np.concatenate([st for k in kept for st in k.stats]))
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [k.count for k in kept])
    return FolderScan(classes, files, labels, skipped)


def folder_scan_of(dataset) -> FolderScan:
    """The scan an image-folder data set was built from (its file list shared, with the stats taken)."""
    return FolderScan(dataset.classes, dataset.files, dataset.targets, dataset.skipped_files)


class ImageFolderDataset(LabeledDataset):
    def __init__(self, name: str, folder: str, layout: str, *, image_size: int = 224, augment: bool = False,
                 drop_empty_classes: bool = False, scan: FolderScan | None = None, digests: DigestTable | None = None):
        """`scan`: the folder's scan_image_folder result when already taken (another view of the same tree);
        `digests`: that view's DigestTable (the views read the same files: one record of their bytes)."""
        self.folder, self.layout = folder, layout
        scan = scan or scan_image_folder(folder, name, layout, drop_empty_classes=drop_empty_classes)
        self.classes, files, labels = scan
        self.skipped_files = scan.skipped
        self.crop = int(image_size)
        self.resize = int(round(image_size * 256 / 224))
        self.augment = training_augment(name, self.crop) if augment else None
        super().__init__(name, labels, len(self.classes), files=files)
        self.digests = digests if digests is not None else DigestTable(len(self))

    def _open(self, index: int):
        path = os.path.join(self.folder, self.files[index])
        try:
            with open(path, "rb") as fh:  # the bytes read once: digested, then decoded from memory
                raw = fh.read()
        except OSError as exc:
            raise DataError(f"dataset {self.name!r}: cannot read image {path} ({type(exc).__name__}: {exc})") from exc
        self.digests.record(index, raw, path)
        return open_image(io.BytesIO(raw), self.name, path)

    def with_augment(self, augment: bool) -> "ImageFolderDataset":
        """The same images (from this data set's scan, no second walk of the tree) with or without the training
        augmentation."""
        return ImageFolderDataset(self.name, self.folder, self.layout, image_size=self.crop, augment=augment,
                                  scan=folder_scan_of(self), digests=self.digests)

    def load(self, index: int) -> torch.Tensor:
        return image_tensor(self._open(index), self.crop, self.resize, self.augment)


def open_image(source, dataset: str, where: str):
    """`source` (a path or a binary file object) as a PIL RGB image, 16-bit grey scaled to 8 bits; DataError
    naming `where` (the file, or the shard and key) when it cannot be read or has pixels of no fixed range."""
    from PIL import Image
    try:
        with Image.open(source) as img:
            mode = img.mode
            if mode not in UNSCALED_MODES:
                return _sixteen_to_rgb(img) if mode.startswith("I;16") else img.convert("RGB")
    except Exception as exc:  # truncated, not an image, unreadable: the file is the cause either way
        raise DataError(f"dataset {dataset!r}: cannot read image {where} "
                        f"({type(exc).__name__}: {exc})") from exc
    raise DataError(f"dataset {dataset!r}: image {where} has {UNSCALED_MODES[mode]} pixels (PIL mode {mode}) "
                    "of no fixed range; expected 8- or 16-bit images: convert it to 8 or 16 bits")


def training_augment(dataset: str, crop: int):
    """RandomResizedCrop(crop) and a horizontal flip (torchvision), the training view of image data sets."""
    try:
        from torchvision import transforms
    except ImportError as exc:
        raise DataError(f"dataset {dataset!r}: augment=True needs torchvision (pip install torchvision)") from exc
    return transforms.Compose([transforms.RandomResizedCrop(crop), transforms.RandomHorizontalFlip()])


def resize_center_crop(img, resize: int, crop: int):
    from PIL import Image
    w, h = img.size
    scale = resize / min(w, h)
    img = img.resize((max(crop, round(w * scale)), max(crop, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - crop) // 2, (h - crop) // 2
    return img.crop((left, top, left + crop, top + crop))


def image_tensor(img, crop: int, resize: int, augment=None) -> torch.Tensor:
    """A PIL RGB image as the model input: `augment` (training) or the evaluation view (shorter side to
    `resize`, centre crop `crop`), as floats in [0, 1], normalised per channel."""
    img = augment(img) if augment is not None else resize_center_crop(img, resize, crop)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return normalize(x, MEAN, STD)

