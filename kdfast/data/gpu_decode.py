"""JPEG image folders decoded in batches: loader workers read file bytes, the GPU decodes and resizes.

At ImageNet scale PIL decoding is the bottleneck (about 220 images/s per core), so with `decode="gpu"` the
workers only read each file into a uint8 tensor and the scoring loop decodes the whole batch on the device
with `torchvision.io.decode_jpeg(list, device="cuda")` (nvJPEG), then resizes and crops it there.
Without CUDA (or when nvJPEG fails), the same decoder runs on the CPU inside the loader workers, with one
logged note saying so. `decode="cpu"` asks for that path directly; `"auto"` takes the GPU when the scoring
device is one.

The evaluation view is ImageNet's, as in imagefolder.py: shorter side to `resize` (256 for a 224 crop) with
antialiased bilinear filtering, centre crop, pixels rounded to 8 bits like PIL's, per-channel normalisation.
Measured against the PIL path on the CPU (the same libjpeg-turbo IDCT; tests/test_gpu_decode.py, on
upscaled, downscaled and odd-sized images): at most one 8-bit level, 1 / (255 * 0.224) = 0.0175 in
normalised units; on average 0.002 levels with the CPU's 8-bit resize kernel (PIL's arithmetic) and 0.1 to
0.2 levels with the fp32 resize that CUDA runs. nvJPEG's IDCT may add a level or two (not yet measured on a
GPU). Scores do not depend on the decoder beyond that.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import InvalidArgumentError
from .base import DataError, LabeledDataset
from .imagefolder import MEAN, STD, scan_image_folder

DECODES = ("cpu", "gpu", "auto")
JPEG_MAGIC = b"\xff\xd8\xff"

log = logging.getLogger("kdfast.data")
_NOTED: set[str] = set()
_GPU_DECODE_OK: dict[str, bool] = {}


def note_once(message: str) -> None:
    if message not in _NOTED:
        _NOTED.add(message)
        log.warning(message)


def _gpu_decode_works(device: torch.device) -> bool:
    """Probe nvJPEG once per device with a tiny image (never at import time)."""
    key = str(device)
    if key not in _GPU_DECODE_OK:
        from torchvision.io import decode_jpeg, encode_jpeg
        try:
            decode_jpeg([encode_jpeg(torch.full((3, 8, 8), 128, dtype=torch.uint8))], device=device)
            _GPU_DECODE_OK[key] = True
        except (RuntimeError, NotImplementedError) as exc:
            _GPU_DECODE_OK[key] = False
            note_once(f"GPU JPEG decode failed on {device} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                      "decoding JPEGs on the CPU in the loader workers instead (slower)")
    return _GPU_DECODE_OK[key]


def resolve_decode_device(decode: str, device) -> torch.device:
    """Where JPEGs get decoded for a run on `device`: the GPU itself, or the CPU (noted once when asked for GPU)."""
    if decode not in DECODES:
        raise InvalidArgumentError(f"decode must be one of {', '.join(DECODES)}, got {decode!r}")
    device = torch.device(device)
    if decode == "cpu":
        return torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return device if _gpu_decode_works(device) else torch.device("cpu")
    if decode == "gpu":
        note_once(f"GPU JPEG decode unavailable (scoring device is {device}, CUDA available: "
                  f"{torch.cuda.is_available()}); decoding JPEGs on the CPU in the loader workers instead")
    return torch.device("cpu")


def eval_size(width: int, height: int, resize: int, crop: int) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to `resize`, never below the crop (as the PIL path)."""
    scale = resize / min(width, height)
    return max(crop, round(width * scale)), max(crop, round(height * scale))


class JpegBatchDecoder:
    """A list of JPEG byte tensors -> (B, 3, crop, crop) float32 normalised batch on the decode device.

    Images of one size are resized together (one interpolate call per distinct size). The resized pixels are
    8-bit, as PIL's are: `integer_resize` runs torch's 8-bit antialiased kernel (PIL's fixed-point arithmetic;
    CPU only, and 9x faster there than fp32), else the resize runs in fp32 and is rounded (what CUDA runs, it
    has no 8-bit antialiased kernel). None picks the 8-bit kernel on the CPU.
    """

    def __init__(self, crop: int = 224, resize: int | None = None, mean=MEAN, std=STD, *,
                 integer_resize: bool | None = None):
        self.crop = int(crop)
        self.resize = int(resize) if resize is not None else int(round(crop * 256 / 224))
        self.mean, self.std = tuple(mean), tuple(std)
        self.integer_resize = integer_resize

    def resize_group(self, group: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(n, 3, h, w) uint8 -> (n, 3, *size) float32 holding whole 8-bit values."""
        integer = self.integer_resize if self.integer_resize is not None else group.device.type == "cpu"
        if integer:
            return torch.nn.functional.interpolate(group, size=size, mode="bilinear", antialias=True,
                                                   align_corners=False).float()
        return torch.nn.functional.interpolate(group.float(), size=size, mode="bilinear", antialias=True,
                                               align_corners=False).round_().clamp_(0, 255)

    def decode(self, datas: list[torch.Tensor], device, names: list[str]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg
        try:
            return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass  # one bad file fails the whole batch: decode one by one to name it
        for data, name in zip(datas, names):
            try:
                decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            except RuntimeError as exc:
                raise DataError(f"cannot decode JPEG {name} ({str(exc).splitlines()[0]}); the file is corrupt "
                                "or truncated") from exc
        raise DataError(f"decoding a batch of {len(datas)} JPEGs on {device} failed, yet each decodes alone")

    def __call__(self, datas: list[torch.Tensor], device="cpu", names: list[str] | None = None) -> torch.Tensor:
        device = torch.device(device)
        names = names if names is not None else [f"#{i} of the batch" for i in range(len(datas))]
        images = self.decode(datas, device, names)
        out = torch.empty(len(images), 3, self.crop, self.crop, device=device)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(tuple(img.shape[-2:]), []).append(i)
        for (h, w), members in by_size.items():
            new_w, new_h = eval_size(w, h, self.resize, self.crop)
            group = self.resize_group(torch.stack([images[i] for i in members]), (new_h, new_w))
            top, left = (new_h - self.crop) // 2, (new_w - self.crop) // 2
            out[torch.tensor(members, device=device)] = group[..., top:top + self.crop, left:left + self.crop]
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return out.div_(255.0).sub_(mean).div_(std)


def collate_encoded(items):
    """Worker-side collate that keeps the variable-length byte tensors as a list: (datas, labels, indices)."""
    datas, labels, indices = zip(*items)
    return list(datas), torch.tensor(labels, dtype=torch.int64), torch.tensor(indices, dtype=torch.int64)


class DecodingCollate:
    """Worker-side collate for the CPU fallback: the same batch decoder, run in the loader worker."""

    def __init__(self, decoder: JpegBatchDecoder, files: list[str]):
        self.decoder, self.files = decoder, files

    def __call__(self, items):
        datas, labels, indices = collate_encoded(items)
        return self.decoder(datas, "cpu", [self.files[int(i)] for i in indices]), labels, indices


@dataclass
class BatchPipeline:
    """How a loader feeds a scoring loop: the collate run in workers and the step that makes the device batch."""
    collate_fn: Callable
    pin_memory: bool
    to_device: Callable[[tuple], torch.Tensor] | None  # batch -> input on the device; None: batch[0] is it


class EncodedImageFolder(LabeledDataset):
    """An ImageFolder of JPEG files whose items are (file bytes uint8 (n,), label, index).

    `batch_pipeline(device)` says how to turn batches of those into model inputs; `load(index)` decodes one
    image on the CPU (for callers that want a picture, such as image grids).
    """

    def __init__(self, name: str, folder: str, layout: str, *, image_size: int = 224, decode: str = "auto"):
        if decode not in DECODES:
            raise InvalidArgumentError(f"decode must be one of {', '.join(DECODES)}, got {decode!r}")
        self.folder, self.decode_on = folder, decode
        self.classes, files, labels = scan_image_folder(folder, name, layout)
        self.decoder = JpegBatchDecoder(image_size)
        super().__init__(name, labels, len(self.classes), files=files)

    def read(self, index: int) -> torch.Tensor:
        path = os.path.join(self.folder, self.files[index])
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise DataError(f"dataset {self.name!r}: cannot read image {path} ({type(exc).__name__}: {exc})") from exc
        if not raw.startswith(JPEG_MAGIC):
            raise DataError(f"dataset {self.name!r}: {path} is not a JPEG file (starts with {raw[:4]!r}); "
                            "batched JPEG decoding reads JPEG only: convert it, or load the data set with "
                            "decode=None (PIL, any format)")
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)

    def __getitem__(self, index: int):
        index = int(index)
        return self.read(index), int(self.targets[index]), index

    def load(self, index: int) -> torch.Tensor:
        return self.decoder([self.read(index)], "cpu", [self.files[index]])[0]

    def batch_pipeline(self, device, *, decode_in_workers: bool | None = None) -> BatchPipeline:
        """Workers decode when the decode device is the CPU (default), else the loop decodes each batch there."""
        where = resolve_decode_device(self.decode_on, device)
        if decode_in_workers if decode_in_workers is not None else where.type == "cpu":
            return BatchPipeline(DecodingCollate(self.decoder, self.files), pin_memory=torch.device(device).type
                                 == "cuda", to_device=None)

        def to_device(batch) -> torch.Tensor:
            datas, _, indices = batch
            return self.decoder(datas, where, [self.files[int(i)] for i in indices])
        return BatchPipeline(collate_encoded, pin_memory=False, to_device=to_device)
