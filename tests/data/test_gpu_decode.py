"""Batched JPEG decoding (data/gpu_decode.py) on the CPU: the bytes the workers read, the evaluation view
against the PIL path (the reference), order under workers, the CPU fallback's note, and bad files named."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from kdfast.data import DataError, load_dataset
from kdfast.data import gpu_decode
from kdfast.data.gpu_decode import (EncodedImageFolder, JpegBatchDecoder, PackedBytes, decoded_batches,
                                     resolve_decode_device)
from kdfast.data.imagefolder import FOLDER_LAYOUT, STD, ImageFolderDataset
from kdfast.errors import InvalidArgumentError

# Downscaled (both orientations, ImageNet's 500x375), square, odd, and upscaled (smaller than the crop).
SIZES = ((500, 375), (375, 500), (300, 300), (257, 199), (90, 61), (41, 67))
# One 8-bit level in normalised units for the channel with the smallest std: the PIL path rounds its
# resized pixels to 8 bits, the batched path rounds fp32 ones, so they may differ by one level.
ONE_LEVEL = 1.0 / (255.0 * min(STD))


def natural_image(rng, width, height):
    """Smooth colour blobs plus a gradient plus sensor-like noise: compresses like a photograph."""
    from PIL import Image
    coarse = Image.fromarray(rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8))
    img = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float64)
    img += np.linspace(-40, 40, width)[None, :, None] + rng.normal(0, 8, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def write_jpeg_folder(folder, sizes=SIZES, classes=("ant", "bee"), seed=0):
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        os.makedirs(os.path.join(folder, classes[i % len(classes)]), exist_ok=True)
        natural_image(rng, w, h).save(os.path.join(folder, classes[i % len(classes)], f"im{i}.JPEG"), quality=90)
    return folder


@pytest.fixture
def jpeg_root(tmp_path):
    return str(write_jpeg_folder(tmp_path / "jpegs"))


def test_items_are_file_bytes_labels_and_indices_in_pil_order(jpeg_root):
    ds = load_dataset("folder", root=jpeg_root, decode="cpu")
    pil = load_dataset("folder", root=jpeg_root)
    assert isinstance(ds, EncodedImageFolder) and ds.files == pil.files and torch.equal(ds.targets, pil.targets)
    for i in range(len(ds)):
        data, label, index = ds[i]
        with open(os.path.join(jpeg_root, ds.files[i]), "rb") as fh:
            assert data.dtype == torch.uint8 and bytes(data.numpy()) == fh.read()
        assert (label, index) == (int(pil.targets[i]), i)


# (integer_resize, mean |diff| bound in 8-bit levels): the 8-bit kernel (the CPU default) is PIL's arithmetic,
# rare rounding ties aside; fp32 + rounding (what CUDA runs) differs on a fraction of the pixels by one level.
RESIZE_KERNELS = [(None, 0.02), (False, 0.3)]


@pytest.mark.parametrize("integer_resize, mean_levels", RESIZE_KERNELS)
@pytest.mark.parametrize("crop", [224, 32])
def test_batched_decode_matches_the_pil_eval_transform(jpeg_root, crop, integer_resize, mean_levels):
    pil = ImageFolderDataset("folder", jpeg_root, FOLDER_LAYOUT, image_size=crop)
    enc = EncodedImageFolder("folder", jpeg_root, FOLDER_LAYOUT, image_size=crop, decode="cpu")
    decoder = JpegBatchDecoder(crop, integer_resize=integer_resize)
    batch = decoder([enc.read(i) for i in range(len(enc))], "cpu", enc.files)
    want = torch.stack([pil.load(i) for i in range(len(pil))])
    assert batch.shape == want.shape == (len(SIZES), 3, crop, crop) and batch.dtype == torch.float32
    diff = (batch.double() - want.double()).abs()
    worst = int(diff.flatten().argmax())
    msg = (f"max abs diff {float(diff.max()):.4f} normalised units ({float(diff.max()) / ONE_LEVEL:.2f} levels) "
           f"at {np.unravel_index(worst, diff.shape)}, mean {float(diff.mean()) / ONE_LEVEL:.3f} levels, "
           f"{int((diff > 1e-5).sum())} of {diff.numel()} values differ")
    print(msg)
    assert float(diff.max()) <= ONE_LEVEL + 1e-5, msg
    assert float(diff.mean()) <= mean_levels * ONE_LEVEL, msg  # rounding only, not a shifted or blurred image
    if integer_resize is None:
        for i in range(len(enc)):  # single-image load is the same decoder
            assert torch.equal(enc.load(i), batch[i])


def test_normalisation_against_a_float64_oracle():
    """A flat grey JPEG decodes to one value per channel; the output must be (v/255 - mean) / std exactly."""
    from torchvision.io import encode_jpeg
    rng = np.random.default_rng(3)
    colour = torch.tensor(rng.integers(20, 236, 3), dtype=torch.uint8)
    img = colour.view(3, 1, 1).expand(3, 48, 80).contiguous()
    out = JpegBatchDecoder(16)([encode_jpeg(img, quality=100)], "cpu").double()
    decoded = (out[0] * torch.tensor(STD, dtype=torch.float64).view(3, 1, 1)
               + torch.tensor(gpu_decode.MEAN, dtype=torch.float64).view(3, 1, 1)) * 255
    level = decoded.round()
    assert (level - colour.double().view(3, 1, 1)).abs().max() <= 2  # JPEG colour conversion of a flat field
    rel = ((decoded - level).abs() / level).max()
    assert rel < 1e-5, f"normalisation relative error {float(rel):.2e}"


def test_order_and_indices_survive_two_workers(jpeg_root):
    ds = load_dataset("folder", root=jpeg_root, decode="gpu", image_size=16)  # no CUDA here: CPU in workers
    pipeline = ds.batch_pipeline(torch.device("cpu"))
    assert pipeline.to_device is None
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=pipeline.collate_fn)
    xs, ys, idx = zip(*loader)
    assert torch.equal(torch.cat(idx), torch.arange(len(ds))) and torch.equal(torch.cat(ys), ds.targets)
    assert torch.equal(torch.cat(xs), torch.stack([ds.load(i) for i in range(len(ds))]))


def test_scoring_a_jpeg_folder_through_the_engine_matches_the_pil_path(jpeg_root):
    from kdfast.scoring import get_method, score_batches
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    enc = load_dataset("folder", root=jpeg_root, decode="auto", image_size=16)
    pil = load_dataset("folder", root=jpeg_root, image_size=16)
    keep = [5, 0, 3, 1]
    got = list(score_batches([model], Subset(enc, keep), get_method("el2n"), batch_size=3, num_workers=2,
                             device="cpu"))
    want = list(score_batches([model], Subset(pil, keep), get_method("el2n"), batch_size=3, device="cpu"))
    assert torch.equal(torch.cat([g[0] for g in got]), torch.arange(4))
    a, b = torch.cat([g[1] for g in got]), torch.cat([w[1] for w in want])
    rel = float(((a - b).abs() / b.abs()).max())
    assert rel < 1e-3, f"el2n from batched decode vs PIL: max rel diff {rel:.3g}"


def test_loop_side_decode_path_keeps_order_and_values(jpeg_root, monkeypatch):
    """The GPU layout (workers send bytes, the scoring loop decodes each batch) run on the CPU."""
    from functools import partial

    from kdfast.scoring import get_method, score_batches
    enc = load_dataset("folder", root=jpeg_root, decode="cpu", image_size=16)
    pipeline = enc.batch_pipeline("cpu", decode_in_workers=False)
    batches = list(DataLoader(enc, batch_size=4, num_workers=2, collate_fn=pipeline.collate_fn))
    assert all(isinstance(b[0], PackedBytes) for b in batches)  # one flat buffer per batch from the workers
    files = [f for b in batches for f in b[0].unpack()]
    assert [bytes(f.numpy()) for f in files] == [bytes(enc.read(i).numpy()) for i in range(len(enc))]
    decoded = torch.cat([pipeline.to_device(b) for b in batches])
    assert torch.equal(decoded, torch.stack([enc.load(i) for i in range(len(enc))]))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))
    workers = list(score_batches([model], enc, get_method("el2n"), batch_size=4, num_workers=2, device="cpu"))
    in_loop = partial(EncodedImageFolder.batch_pipeline, decode_in_workers=False)
    monkeypatch.setattr(EncodedImageFolder, "batch_pipeline", lambda self, device: in_loop(self, device))
    loop = list(score_batches([model], enc, get_method("el2n"), batch_size=4, num_workers=2, device="cpu"))
    assert torch.equal(torch.cat([b[0] for b in loop]), torch.arange(len(enc)))
    assert torch.equal(torch.cat([b[1] for b in loop]), torch.cat([b[1] for b in workers]))


def test_fallback_is_noted_once(monkeypatch, caplog):
    monkeypatch.setattr(gpu_decode, "_NOTED", set())
    with caplog.at_level(logging.WARNING, logger="kdfast.data"):
        for _ in range(3):
            assert resolve_decode_device("gpu", "cpu") == torch.device("cpu")
        assert resolve_decode_device("auto", "cpu") == torch.device("cpu")  # asked for nothing: no note
        assert resolve_decode_device("cpu", "cuda") == torch.device("cpu")
    notes = [r.getMessage() for r in caplog.records if r.name == "kdfast.data"]
    assert len(notes) == 1 and "GPU JPEG decode unavailable" in notes[0] and "on the CPU" in notes[0], notes


def test_failing_gpu_decoder_falls_back_with_a_note(monkeypatch, caplog):
    def refuse(*args, device="cpu", **kwargs):
        raise RuntimeError("nvjpeg: NVJPEG_STATUS_NOT_SUPPORTED")
    monkeypatch.setattr(gpu_decode, "_NOTED", set())
    monkeypatch.setattr(gpu_decode, "_GPU_DECODE_OK", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("torchvision.io.decode_jpeg", refuse)
    with caplog.at_level(logging.WARNING, logger="kdfast.data"):
        assert resolve_decode_device("auto", "cuda:0") == torch.device("cpu")
        assert resolve_decode_device("gpu", "cuda:0") == torch.device("cpu")
    notes = [r.getMessage() for r in caplog.records if r.name == "kdfast.data"]
    assert len(notes) == 1 and "GPU JPEG decode failed on cuda:0" in notes[0] and "NOT_SUPPORTED" in notes[0]


def test_non_jpeg_and_corrupt_files_are_named(tmp_path):
    root = write_jpeg_folder(tmp_path / "bad", sizes=((60, 40), (50, 50), (40, 60)))
    from PIL import Image
    Image.new("RGB", (30, 20), (10, 200, 30)).save(os.path.join(root, "bee", "zz.png"))
    ds = load_dataset("folder", root=str(root), decode="cpu", image_size=16)
    png = ds.files.index(os.path.join("bee", "zz.png"))
    with pytest.raises(DataError, match=r"zz\.png is not a JPEG file .*decode=None"):
        ds[png]
    victim = os.path.join(root, "ant", "im2.JPEG")
    with open(victim, "rb") as fh:
        raw = fh.read()
    with open(victim, "wb") as fh:
        fh.write(raw[:len(raw) // 3])
    datas = [ds.read(i) for i in range(len(ds)) if i != png]
    names = [f for i, f in enumerate(ds.files) if i != png]
    with pytest.raises(DataError, match=r"cannot decode JPEG ant/im2\.JPEG \(.*truncated"):
        ds.decoder(datas, "cpu", names)


def test_decode_argument_errors(jpeg_root):
    with pytest.raises(InvalidArgumentError, match="decode must be None or one of cpu, gpu, auto, got 'nvjpeg'"):
        load_dataset("folder", root=jpeg_root, decode="nvjpeg")
    with pytest.raises(InvalidArgumentError, match="image folders .* got name='digits'"):
        load_dataset("digits", decode="gpu")
    with pytest.raises(InvalidArgumentError, match="augment=True"):
        load_dataset("folder", root=jpeg_root, decode="cpu", augment=True)
    with pytest.raises(InvalidArgumentError, match="decode must be one of cpu, gpu, auto, got 'x'"):
        resolve_decode_device("x", "cpu")


def test_packed_bytes_round_trip_including_empty_files():
    datas = [torch.arange(5, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8),
             torch.full((3,), 7, dtype=torch.uint8)]
    packed = PackedBytes.pack(datas)
    assert packed.flat.numel() == 8 and len(packed) == 3
    assert all(torch.equal(a, b) for a, b in zip(packed.unpack(), datas))
    assert all(v.data_ptr() >= packed.flat.data_ptr() for v in packed.unpack()[::2])  # views, not copies
    if torch.cuda.is_available():
        pinned = packed.pin_memory()
        assert pinned.flat.is_pinned() and all(torch.equal(a, b) for a, b in zip(pinned.unpack(), datas))


def test_decode_thread_keeps_order_runs_ahead_and_stops():
    import threading
    import time
    calls = []

    def to_device(batch):
        calls.append(batch)
        return torch.tensor([batch])
    feed = decoded_batches(range(10), to_device, "cpu", depth=2)
    batch, x = next(feed)
    assert (batch, int(x)) == (0, 0)
    deadline = time.time() + 5
    while len(calls) < 3 and time.time() < deadline:  # decodes ahead while the caller holds batch 0
        time.sleep(0.01)
    time.sleep(0.05)
    assert 3 <= len(calls) <= 4, calls  # at most `depth` queued and one in hand
    assert [(b, int(v)) for b, v in feed] == [(i, i) for i in range(1, 10)]
    early = decoded_batches(range(1000), to_device, "cpu")
    next(early)
    early.close()  # leaving the loop early stops the thread
    assert not [t for t in threading.enumerate() if t.name == "kdfast-decode"]


def test_decode_thread_reraises_a_decode_error_in_the_caller():
    def to_device(batch):
        if batch == 2:
            raise DataError("cannot decode JPEG bee/im2.JPEG")
        return torch.tensor([batch])
    with pytest.raises(DataError, match="bee/im2"):
        list(decoded_batches(range(5), to_device, "cpu"))


def test_decoder_constants_are_made_once_per_device():
    decoder = JpegBatchDecoder(16)
    first = decoder.constants(torch.device("cpu"))
    assert decoder.constants(torch.device("cpu"))[0] is first[0]
    import pickle
    assert pickle.loads(pickle.dumps(decoder))._constants == {}  # workers get no device tensors


def test_resizing_in_groups_changes_nothing(jpeg_root, monkeypatch):
    enc = EncodedImageFolder("folder", jpeg_root, FOLDER_LAYOUT, image_size=32, decode="cpu")
    order = [0, 1, 0, 0, 0, 1, 0]  # two sizes, interleaved (rows by index) and in a run (rows by slice)
    mixed = [enc.read(i) for i in order]
    whole = enc.decoder(mixed, "cpu")
    alone = torch.stack([enc.load(i) for i in order])
    assert torch.equal(whole, alone)
    monkeypatch.setattr(gpu_decode, "RESIZE_GROUP", 2)
    assert torch.equal(enc.decoder(mixed, "cpu"), whole)
