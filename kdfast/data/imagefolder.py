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
import math
import os

import numpy as np
import torch

from kdfast.data.base import DataError, LabeledDataset, normalize
from kdfast.data.digests import DigestTable
from kdfast.data.folder_listing import FolderScan, scan_image_folder  # noqa: F401 (API)
from kdfast.runtime.folder_walk import FOLDER_LAYOUT, IMAGENET_LAYOUT  # noqa: F401 (API)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# PIL modes whose values have no fixed full scale: PIL's convert("RGB") clips them at 255 (a white image)
UNSCALED_MODES = {"I": "32-bit integer", "F": "32-bit float"}


def _sixteen_to_rgb(img):
    """A 16-bit grey image (PIL's I;16 modes, e.g. 16-bit PNG) as 8-bit RGB, scaled by 255 / 65535 (PIL's
    convert would clip every value above 255 to white)."""
    from PIL import Image
    grey = np.asarray(img).astype(np.float32) * (255.0 / 65535.0)
    return Image.fromarray(np.rint(grey).astype(np.uint8)).convert("RGB")  # 2-d uint8: mode L


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


def training_augment(dataset: str, crop: int) -> "TrainingAugment":
    """RandomResizedCrop(crop) and a horizontal flip, the training view of image data sets (of any `dataset`: it
    needs no optional package)."""
    return TrainingAugment(crop)


class TrainingAugment:
    """torchvision's RandomResizedCrop(crop) (scale (0.08, 1), ratio (3/4, 4/3), bilinear) then
    RandomHorizontalFlip() on a PIL image, making the same draws from torch's generator (a run trains on the crops
    torchvision would give), without importing torchvision: its import (torch._dynamo's) took 2-3 s before
    kdfast-score's first batch."""
    SCALE, RATIO = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)

    def __init__(self, crop: int):
        self.crop = int(crop)

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop: RandomResizedCrop.get_params, draw for draw."""
        area = height * width
        log_ratio = torch.log(torch.tensor(self.RATIO))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.SCALE[0], self.SCALE[1]).item()
            aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                i = torch.randint(0, height - h + 1, size=(1,)).item()
                j = torch.randint(0, width - w + 1, size=(1,)).item()
                return i, j, h, w
        in_ratio = float(width) / float(height)  # ten misses: the centre crop of the nearest allowed ratio
        if in_ratio < min(self.RATIO):
            w, h = width, int(round(width / min(self.RATIO)))
        elif in_ratio > max(self.RATIO):
            w, h = int(round(height * max(self.RATIO))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img):
        from PIL import Image
        i, j, h, w = self.box(*img.size)
        img = img.crop((j, i, j + w, i + h))
        if (h, w) != (self.crop, self.crop):  # torchvision's resize leaves an image of the size as it is
            img = img.resize((self.crop, self.crop), Image.BILINEAR)
        return img.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(1) < 0.5 else img


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

