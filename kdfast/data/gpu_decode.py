"""JPEG image folders decoded in batches: loader workers read file bytes, the GPU decodes and resizes.

At ImageNet scale PIL decoding is the bottleneck (about 220 images/s per core), so with `decode="gpu"` the
workers only read the files and send each batch as one flat byte buffer (PackedBytes, pinned), and a decode
thread decodes the whole batch on the device with `torchvision.io.decode_jpeg(list, device="cuda")` (nvJPEG),
then resizes and crops it there, up to two batches ahead of the model (`decoded_batches`).
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
import queue
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from kdfast.errors import InvalidArgumentError
from kdfast.data.base import DataError, LabeledDataset
from kdfast.data.digests import DigestTable
from kdfast.data.imagefolder import MEAN, STD, scan_image_folder

DECODES = ("cpu", "gpu", "auto")
JPEG_MAGIC = b"\xff\xd8\xff"
# Images of one size are stacked, converted and resized this many at a time: a whole ImageNet batch at once
# (256 of 500x375) would stack 144 MB of pixels and make a 576 MB float copy of them.
RESIZE_GROUP = 32
# Batches decoded ahead of the model by the decode thread.
DECODE_AHEAD = 2

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
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getstate__(self):  # sent to loader workers: without device tensors
        return {**self.__dict__, "_constants": {}}

    def constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as (1, 3, 1, 1) tensors on `device`, made once per device (no copy per batch)."""
        if device not in self._constants:
            self._constants[device] = (torch.tensor(self.mean, device=device).view(1, 3, 1, 1),
                                       torch.tensor(self.std, device=device).view(1, 3, 1, 1))
        return self._constants[device]

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
            top, left = (new_h - self.crop) // 2, (new_w - self.crop) // 2
            for s in range(0, len(members), RESIZE_GROUP):
                part = members[s:s + RESIZE_GROUP]
                group = self.resize_group(torch.stack([images[i] for i in part]), (new_h, new_w))
                crop = group[..., top:top + self.crop, left:left + self.crop]
                if part[-1] - part[0] == len(part) - 1:  # consecutive rows (one image size per batch): no index
                    out[part[0]:part[-1] + 1].copy_(crop)
                else:
                    out.index_copy_(0, _index(part, device), crop)
        mean, std = self.constants(device)
        return out.div_(255.0).sub_(mean).div_(std)


def _index(members: list[int], device: torch.device) -> torch.Tensor:
    """Row indices on the device; on CUDA copied from pinned memory without blocking the host."""
    index = torch.tensor(members, dtype=torch.int64)
    return index.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else index


class PackedBytes:
    """A batch's files as one flat uint8 buffer and their end offsets: what loader workers send, so the
    main process receives two tensors per batch instead of one per image (each tensor crossing the process
    boundary costs a shared-memory handle; bench/perf/bench_e2e.py's receive rows measure both). The DataLoader
    pins it (its `pin_memory` method) when the decode runs on CUDA."""

    def __init__(self, flat: torch.Tensor, ends: torch.Tensor):
        self.flat, self.ends = flat, ends

    @classmethod
    def pack(cls, datas: list[torch.Tensor]) -> "PackedBytes":
        lengths = torch.tensor([d.numel() for d in datas], dtype=torch.int64)
        return cls(torch.cat(datas) if datas else torch.empty(0, dtype=torch.uint8), lengths.cumsum(0))

    def pin_memory(self, device=None) -> "PackedBytes":
        return PackedBytes(self.flat.pin_memory(), self.ends)

    def unpack(self) -> list[torch.Tensor]:
        """Views of the flat buffer, one per file (no copies)."""
        ends = self.ends.tolist()
        return [self.flat[start:end] for start, end in zip([0] + ends[:-1], ends)]

    def __len__(self) -> int:
        return self.ends.numel()


def collate_encoded(items):
    """Worker-side collate for the loop-side decode: (PackedBytes of the files, labels, indices)."""
    datas, labels, indices = zip(*items)
    return (PackedBytes.pack(list(datas)), torch.tensor(labels, dtype=torch.int64),
            torch.tensor(indices, dtype=torch.int64))


class DecodingCollate:
    """Worker-side collate for the CPU fallback: the same batch decoder, run in the loader worker."""

    def __init__(self, decoder: JpegBatchDecoder, names):
        self.decoder, self.names = decoder, names  # names[i]: example i in errors (a file, a key in a shard)

    def __call__(self, items):
        datas, labels, indices = zip(*items)
        names = [self.names[int(i)] for i in indices]
        return (self.decoder(list(datas), "cpu", names), torch.tensor(labels, dtype=torch.int64),
                torch.tensor(indices, dtype=torch.int64))


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()


def decoded_batches(batches, to_device: Callable, device, depth: int = DECODE_AHEAD):
    """Yields (batch, to_device(batch)) for each batch of the iterable `batches` (a DataLoader), in order.

    A thread pulls the batches and runs `to_device` (on its own CUDA stream on CUDA) up to `depth` batches
    ahead, so reading (the loader workers), decoding (this thread) and the model (the caller) overlap; the
    GPU decoder synchronises its stream, which would otherwise stall the thread that queues the model. On
    CUDA the caller's stream waits for each batch's decode before using it. A decode error is re-raised in
    the caller, and leaving the loop early stops the thread.
    """
    device = torch.device(device)
    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            stream = torch.cuda.Stream(device) if device.type == "cuda" else None
            for batch in batches:
                if stop.is_set():
                    return
                if stream is None:
                    ahead.put((batch, to_device(batch), None))
                    continue
                with torch.cuda.stream(stream):
                    x = to_device(batch)
                    done = torch.cuda.Event()
                    done.record(stream)
                ahead.put((batch, x, done))
            ahead.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, which re-raises it
            ahead.put(_Failed(exc))

    thread = threading.Thread(target=work, name="kdfast-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = ahead.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            batch, x, done = item
            if done is not None:
                main = torch.cuda.current_stream(device)
                main.wait_event(done)
                x.record_stream(main)  # made on the decode stream, used on this one: keep it until then
            yield batch, x
    finally:
        stop.set()
        while thread.is_alive():  # unblock a put on a full queue so the thread can see `stop`
            try:
                ahead.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


@dataclass
class BatchPipeline:
    """How a loader feeds a scoring loop: the collate run in workers and the step that makes the device batch."""
    collate_fn: Callable
    pin_memory: bool
    to_device: Callable[[tuple], torch.Tensor] | None  # batch -> input on the device; None: batch[0] is it
    device: torch.device | None = None  # where to_device puts its result

    def feed(self, batches):
        """(batch, model input) per batch of `batches`: decoded by the decode thread, or batch[0] as it is."""
        if self.to_device is None:
            return ((batch, batch[0]) for batch in batches)
        return decoded_batches(batches, self.to_device, self.device)


class EncodedImageFolder(LabeledDataset):
    """An ImageFolder of JPEG files whose items are (file bytes uint8 (n,), label, index).

    `batch_pipeline(device)` says how to turn batches of those into model inputs; `load(index)` decodes one
    image on the CPU (for callers that want a picture, such as image grids).
    """

    def __init__(self, name: str, folder: str, layout: str, *, image_size: int = 224, decode: str = "auto",
                 drop_empty_classes: bool = False):
        if decode not in DECODES:
            raise InvalidArgumentError(f"decode must be one of {', '.join(DECODES)}, got {decode!r}")
        self.folder, self.layout, self.decode_on, self.image_size = folder, layout, decode, image_size
        scan = scan_image_folder(folder, name, layout, drop_empty_classes=drop_empty_classes)
        self.classes, files, labels = scan
        self.skipped_files = scan.skipped
        self.decoder = JpegBatchDecoder(image_size)
        super().__init__(name, labels, len(self.classes), files=files)
        self.digests = DigestTable(len(self))  # crc32 of each file's bytes as the workers read them

    def with_augment(self, augment: bool):
        """The same images decoded by PIL per example (with or without the training augmentation), from this data
        set's scan: no second walk of the tree."""
        from kdfast.data.imagefolder import ImageFolderDataset, folder_scan_of
        return ImageFolderDataset(self.name, self.folder, self.layout, image_size=self.image_size, augment=augment,
                                  scan=folder_scan_of(self), digests=self.digests)

    def read(self, index: int) -> torch.Tensor:
        path = os.path.join(self.folder, self.files[index])
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise DataError(f"dataset {self.name!r}: cannot read image {path} ({type(exc).__name__}: {exc})") from exc
        self.digests.record(index, raw, path)
        return jpeg_tensor(raw, self.name, path)

    def __getitem__(self, index: int):
        index = int(index)
        return self.read(index), int(self.targets[index]), index

    def load(self, index: int) -> torch.Tensor:
        return self.decoder([self.read(index)], "cpu", [self.files[index]])[0]

    def batch_pipeline(self, device, *, decode_in_workers: bool | None = None) -> BatchPipeline:
        return encoded_batch_pipeline(self.decode_on, self.decoder, self.files, device,
                                      decode_in_workers=decode_in_workers)


def jpeg_tensor(raw, dataset: str, where: str) -> torch.Tensor:
    """A JPEG file's bytes as a uint8 tensor; DataError naming `where` for bytes of another format."""
    if not bytes(raw[:3]) == JPEG_MAGIC:
        raise DataError(f"dataset {dataset!r}: {where} is not a JPEG file (starts with {bytes(raw[:4])!r}); "
                        "batched JPEG decoding reads JPEG only: convert it, or load the data set with "
                        "decode=None (PIL, any format)")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def encoded_batch_pipeline(decode_on: str, decoder: JpegBatchDecoder, names, device, *,
                           decode_in_workers: bool | None = None) -> BatchPipeline:
    """How batches of (JPEG bytes, label, index) become model inputs: workers decode when the decode device is
    the CPU (default), else the loop decodes each batch there. `names[i]` names example i in errors."""
    where = resolve_decode_device(decode_on, device)
    if decode_in_workers if decode_in_workers is not None else where.type == "cpu":
        return BatchPipeline(DecodingCollate(decoder, names), pin_memory=torch.device(device).type == "cuda",
                             to_device=None)

    def to_device(batch) -> torch.Tensor:
        packed, _, indices = batch
        return decoder(packed.unpack(), where, [names[int(i)] for i in indices])
    return BatchPipeline(collate_encoded, pin_memory=where.type == "cuda", to_device=to_device, device=where)
