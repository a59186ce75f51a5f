"""The training augmentation (RandomResizedCrop + horizontal flip, without importing torchvision) gives
torchvision's own crops, pixel for pixel, and leaves torch's generator where torchvision leaves it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kdfast.data.imagefolder import training_augment

transforms = pytest.importorskip("torchvision.transforms")


@pytest.mark.parametrize("size", [(37, 23), (200, 150), (8, 8), (1, 60), (90, 2), (16, 16)])
@pytest.mark.parametrize("crop", [8, 16])
def test_training_augment_draws_and_crops_as_torchvision(size, crop):
    rng = np.random.default_rng(size[0] * 1000 + size[1] + crop)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    reference = transforms.Compose([transforms.RandomResizedCrop(crop), transforms.RandomHorizontalFlip()])
    ours = training_augment("folder", crop)
    for seed in range(25):
        torch.manual_seed(seed)
        expected, after = np.asarray(reference(img)), torch.rand(3)
        torch.manual_seed(seed)
        got = np.asarray(ours(img))
        assert got.shape == (crop, crop, 3) and np.array_equal(got, expected), (size, crop, seed)
        assert torch.equal(torch.rand(3), after)


def test_training_augment_does_not_import_torchvision():
    """torchvision's import (torch._dynamo's) cost 2-3 s before kdfast-score's first training batch."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import sys; from PIL import Image; from kdfast.data.imagefolder import training_augment; "
            "training_augment('folder', 8)(Image.new('RGB', (20, 10))); print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0 and out.stdout.split() == ["False"], out.stderr[-2000:]
