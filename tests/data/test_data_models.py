"""Data sets (every layout, never downloaded, clear errors) and models (registry, shapes, checkpoints)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from _fake_datasets import write_cifar, write_image_folder, write_svhn
from kdfast.data import DATASETS, DataError, labels_fingerprint, load_dataset
from kdfast.errors import InvalidArgumentError
from kdfast.models import MODELS, CheckpointError, create_model, load_checkpoint, model_fingerprint


def test_digits_splits_partition_the_bundled_data():
    train, test, full = (load_dataset("digits", split=s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(full)) == (1397, 400, 1797)
    x, y = train[3]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1
    assert isinstance(y, int) and train.num_classes == 10 and train.name == "digits" and train.files is None
    assert sorted(torch.cat([train.targets, test.targets]).tolist()) == sorted(full.targets.tolist())


def test_labels_fingerprint_is_sha256_of_int64_labels():
    import hashlib
    y = torch.randint(0, 7, (50,))
    fp = labels_fingerprint(y)
    assert fp == hashlib.sha256(y.numpy().astype("<i8").tobytes()).hexdigest()
    assert fp == labels_fingerprint(y.tolist()) and fp != labels_fingerprint(y.flip(0) + 1)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_torchvision_layout(tmp_path, name):
    images, labels = write_cifar(tmp_path, name, n=4)
    ds = load_dataset(name, root=str(tmp_path))
    assert len(ds) == len(labels) and ds.num_classes == (10 if name == "cifar10" else 100)
    assert torch.equal(ds.targets, torch.as_tensor(labels))
    x, y = ds[3]
    mean, std = torch.tensor(ds.mean)[:, None, None], torch.tensor(ds.std)[:, None, None]
    want = (torch.as_tensor(images[3]).double() / 255 - mean) / std
    assert x.shape == (3, 32, 32) and float((x.double() - want).abs().max()) < 1e-5 and y == labels[3]
    assert len(load_dataset(name, root=str(tmp_path), split="test")) == 4
    aug = load_dataset(name, root=str(tmp_path), augment=True)
    assert aug[3][0].shape == (3, 32, 32)


def test_svhn_reads_mat_files_and_maps_ten_to_zero(tmp_path):
    images, labels = write_svhn(tmp_path, n=9)
    ds = load_dataset("svhn", root=str(tmp_path))
    assert torch.equal(ds.targets, torch.as_tensor(labels)) and int(ds.targets.max()) <= 9
    assert ds[2][0].shape == (3, 32, 32)


@pytest.mark.parametrize("name", ["folder", "imagenet"])
def test_image_folders_keep_file_order_and_preprocess(tmp_path, name):
    folder = tmp_path / "train" if name == "imagenet" else tmp_path
    files = write_image_folder(folder)
    ds = load_dataset(name, root=str(tmp_path), image_size=16)
    assert ds.files == sorted(files, key=lambda f: (f.split(os.sep)[0], f)) == files
    assert ds.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and ds.num_classes == 3
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and y == 1
    # centre crop of the resized image, normalised with ImageNet statistics
    from PIL import Image
    img = Image.open(folder / files[4]).convert("RGB")
    resized = img.resize((max(16, round(20 * 18 / 14)), 18), Image.BILINEAR)
    left, top = (resized.size[0] - 16) // 2, (resized.size[1] - 16) // 2
    crop = np.asarray(resized.crop((left, top, left + 16, top + 16)), dtype=np.float32)
    raw = torch.from_numpy(crop).permute(2, 0, 1) / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    want = (raw - mean) / std
    assert float((x - want).abs().max()) < 1e-5


def test_missing_or_malformed_roots_name_the_expected_layout(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", root=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="needs a root"):
        load_dataset("svhn")
    with pytest.raises(DataError, match=r"cifar-10-batches-py/data_batch_1 not found; expected ROOT/cifar-10-batches"):
        load_dataset("cifar10", root=str(tmp_path))
    with pytest.raises(DataError, match=r"train_32x32.mat not found; expected ROOT/\{train,test,extra\}_32x32.mat"):
        load_dataset("svhn", root=str(tmp_path))
    with pytest.raises(DataError, match=r"expected ROOT/<split>/<wnid>/\*.JPEG"):
        load_dataset("imagenet", root=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders; expected ROOT/<class name>/<image file>"):
        load_dataset("folder", root=str(tmp_path / "empty"))
    (tmp_path / "empty" / "a").mkdir()
    with pytest.raises(DataError, match="no image files"):
        load_dataset("folder", root=str(tmp_path / "empty"))
    bad = tmp_path / "bad" / "cifar-100-python"
    bad.mkdir(parents=True)
    (bad / "train").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot read .*train"):
        load_dataset("cifar100", root=str(tmp_path / "bad"))


def test_out_of_range_labels_and_unreadable_images_are_clear_errors(tmp_path):
    write_cifar(tmp_path, "cifar10", n=3, labels=[1, 10, 2])
    with pytest.raises(DataError, match=r"label 10 at index 1 is outside \[0, 10\)"):
        load_dataset("cifar10", root=str(tmp_path))
    write_image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "dog" / "img1.png").write_bytes(b"garbage")
    ds = load_dataset("folder", root=str(tmp_path / "imgs"), image_size=8)
    with pytest.raises(DataError, match="cannot read image .*img1.png"):
        ds[4]


def test_sixteen_bit_images_are_scaled_and_unscaled_depths_refused(tmp_path):
    from PIL import Image
    grey = np.random.default_rng(0).integers(1, 256, (20, 14), dtype=np.uint8)
    for cls in ("eight", "sixteen"):
        (tmp_path / "f" / cls).mkdir(parents=True)
    Image.fromarray(grey).save(tmp_path / "f" / "eight" / "a.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "f" / "sixteen" / "a.png")  # the same picture
    assert Image.open(tmp_path / "f" / "sixteen" / "a.png").mode == "I;16"
    ds = load_dataset("folder", root=str(tmp_path / "f"), image_size=8)
    eight, sixteen = ds[0][0], ds[1][0]
    assert float(sixteen.std()) > 0.1  # not one flat (white) image
    torch.testing.assert_close(sixteen, eight, rtol=0, atol=0)
    Image.fromarray(grey.astype(np.float32)).save(tmp_path / "f" / "sixteen" / "b.tif")
    ds = load_dataset("folder", root=str(tmp_path / "f"), image_size=8)
    with pytest.raises(DataError, match=r"b.tif has 32-bit float pixels \(PIL mode F\) of no fixed range") as info:
        ds[2]
    assert "\n" not in str(info.value)


def test_load_dataset_argument_errors(tmp_path):
    with pytest.raises(InvalidArgumentError, match="name must be one of digits, cifar10"):
        load_dataset("mnist")
    with pytest.raises(InvalidArgumentError, match="never downloads"):
        load_dataset("cifar10", root=str(tmp_path), download=True)
    with pytest.raises(InvalidArgumentError, match="split for 'digits' must be one of train, test, all, got 'val'"):
        load_dataset("digits", split="val")
    assert set(DATASETS) == {"digits", "cifar10", "cifar100", "svhn", "imagenet", "folder"}


@pytest.mark.parametrize("name", MODELS)
def test_every_model_maps_images_to_logits(name):
    small = name in ("mlp", "cnn")
    shape = (1, 8, 8) if small else (3, 32, 32)
    model = create_model(name, num_classes=7, in_channels=shape[0], image_size=shape[-1]).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert isinstance([m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1], torch.nn.Linear)


def test_cifar_resnet_sizes_match_the_papers():
    counts = {n: sum(p.numel() for p in create_model(n, num_classes=10).parameters())
              for n in ("resnet20", "resnet32", "resnet56", "resnet110", "wrn40_2")}
    # He et al. Table 6: 0.27M, 0.46M, 0.85M, 1.7M; Zagoruyko & Komodakis: WRN-40-2 2.2M
    for name, want in (("resnet20", 0.27e6), ("resnet32", 0.46e6), ("resnet56", 0.85e6), ("resnet110", 1.7e6),
                       ("wrn40_2", 2.2e6)):
        assert abs(counts[name] - want) / want < 0.03, (name, counts[name])


def test_create_model_errors():
    with pytest.raises(InvalidArgumentError, match="model must be one of mlp, cnn, resnet8"):
        create_model("vgg16", num_classes=10)
    with pytest.raises(InvalidArgumentError, match="num_classes must be a positive int, got 0"):
        create_model("cnn", num_classes=0)


def test_checkpoints_round_trip_and_mismatches_are_clear(tmp_path):
    torch.manual_seed(1)
    a = create_model("resnet8", num_classes=10)
    b = create_model("resnet8", num_classes=10)
    assert model_fingerprint(a) != model_fingerprint(b)
    torch.save({"model": {f"module.{k}": v for k, v in a.state_dict().items()}}, tmp_path / "wrapped.pt")
    torch.save(a.state_dict(), tmp_path / "plain.pt")
    for f in ("wrapped.pt", "plain.pt"):
        c = load_checkpoint(create_model("resnet8", num_classes=10), str(tmp_path / f))
        assert model_fingerprint(c) == model_fingerprint(a)
    with pytest.raises(CheckpointError, match=r"does not fit model CifarResNet: 2 shape mismatch \(fc.weight"):
        load_checkpoint(create_model("resnet8", num_classes=100), str(tmp_path / "plain.pt"))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(create_model("resnet14", num_classes=10), str(tmp_path / "plain.pt"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(a, str(tmp_path / "nope.pt"))
    torch.save({"model": a, "note": object}, tmp_path / "pickled.pt")  # a whole module: refused by weights_only
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(a, str(tmp_path / "pickled.pt"))


def test_folder_walk_follows_no_loop_counts_real_folders_once_and_skips_appledouble(tmp_path):
    import warnings
    files = write_image_folder(tmp_path / "f")
    (tmp_path / "f" / "loop").symlink_to(tmp_path / "f")       # ln -s . ROOT/loop
    (tmp_path / "f" / "up").symlink_to(tmp_path)                # a link above the root
    (tmp_path / "f" / "cat2").symlink_to(tmp_path / "f" / "cat")  # the same images under a second name
    (tmp_path / "f" / "empty").mkdir()
    (tmp_path / "f" / "dog" / "._img0.JPEG").write_bytes(b"\0\5\x16\7 AppleDouble")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_dataset("folder", root=str(tmp_path / "f"), image_size=8)
    notes = [str(w.message) for w in caught]
    assert ds.classes == ["cat", "cat2", "dog", "empty", "emu"] and ds.num_classes == 5
    assert list(ds.files) == files and ds.targets.tolist() == [0, 0, 0, 2, 2, 2, 4, 4, 4]
    assert ds.skipped_files == [os.path.join("dog", "._img0.JPEG")]
    assert any("class folders loop, up link back" in n for n in notes)
    assert any("2 class folders hold no images (cat2, empty); kept as classes without examples" in n for n in notes)
    ds[3]  # the first dog image reads; the AppleDouble file is not among the images
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dropped = load_dataset("folder", root=str(tmp_path / "f"), image_size=8, drop_empty_classes=True)
    assert dropped.classes == ["cat", "dog", "emu"] and dropped.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_a_run_scans_an_image_folder_once(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from kdfast.data import imagefolder
    from kdfast.data import identity
    from kdfast.pipelines.distill import load_distill_data
    from kdfast.pipelines.score import load_score_data
    write_image_folder(tmp_path / "f", per_class=4)
    scans, stats = [], []
    real_scan, real_stats = imagefolder.scan_image_folder, identity.file_stats

    def counted(calls, real):
        def call(*args, **kwargs):
            calls.append(args)
            return real(*args, **kwargs)
        return call
    monkeypatch.setattr(imagefolder, "scan_image_folder", counted(scans, real_scan))
    monkeypatch.setattr(identity, "file_stats", counted(stats, real_stats))
    cfg = SimpleNamespace(dataset="folder", data_root=str(tmp_path / "f"), split="train", image_size=8, decode="pil",
                          train_epochs=2, limit=None)
    data, train = load_score_data(cfg)
    assert train is not data and train.augment is not None and data.augment is None
    assert list(train.files) == list(data.files) and torch.equal(train.targets, data.targets)
    data.files_fingerprint, train.files_fingerprint  # noqa: B018 - both views' identities
    assert len(scans) == 1 and not stats  # sizes and mtimes come from the scan's listing
    scans.clear()
    cfg = SimpleNamespace(dataset="folder", data_root=str(tmp_path / "f"), image_size=8, augment=True, keep=None,
                          sampler=None, val_fraction=0.25, seed=0, steps=1)
    distill = load_distill_data(cfg)
    assert len(scans) == 1 and distill.evaluation.dataset.augment is None and distill.train.augment is not None
