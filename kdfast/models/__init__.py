"""Model registry: `create_model(name, num_classes=..., in_channels=..., image_size=...)`, checkpoints, fingerprints.

    mlp, cnn                                  small models for digits (any small image)
    resnet8/14/20/32/56/110, wrn40_2          CIFAR ResNets (He et al. 2016) and WRN-40-2 (Zagoruyko 2016)
    resnet18/34/50                            torchvision's ImageNet ResNets (needs torchvision)
    torchvision:NAME                          any constructor in torchvision.models (vit_b_16, swin_t, ...)
    timm:NAME                                 any timm model (the optional extra: pip install 'kdfast[models]')

Weights never come from the network: models by name start from random initialisation and get their weights
from a checkpoint file (load_checkpoint, --checkpoint).

Every model ends in an nn.Linear head (what grand-last and liprune-last differentiate through).
"""
from __future__ import annotations

import hashlib
import os
from functools import partial

import torch
from torch import nn

from kdfast.errors import InvalidArgumentError, KDFastError
from kdfast.runtime.checks import positive_int, require
from kdfast.models import cifar_resnet, small


class CheckpointError(KDFastError, ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


def _torchvision(name: str, num_classes: int, in_channels: int = 3, image_size: int | None = None) -> nn.Module:
    try:
        import torchvision.models
    except ImportError as exc:
        raise InvalidArgumentError(f"model {name!r} needs torchvision: pip install torchvision "
                                   "(or choose a CIFAR model: resnet20, resnet32, ...)") from exc
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model


def _cifar(depth: int, num_classes: int, in_channels: int = 3, image_size: int | None = None) -> nn.Module:
    return cifar_resnet.CifarResNet(depth, num_classes, in_channels)


def _wrn(depth: int, widen: int, num_classes: int, in_channels: int = 3, image_size: int | None = None):
    return cifar_resnet.WideResNet(depth, widen, num_classes, in_channels)


def _small(builder, num_classes: int, in_channels: int = 1, image_size: int | None = None) -> nn.Module:
    return builder(num_classes, in_channels, image_size or 8)


_BUILDERS = {
    "mlp": partial(_small, small.mlp),
    "cnn": partial(_small, small.cnn),
    **{f"resnet{d}": partial(_cifar, d) for d in (8, 14, 20, 32, 56, 110)},
    "wrn40_2": partial(_wrn, 40, 2),
    **{name: partial(_torchvision, name) for name in ("resnet18", "resnet34", "resnet50")},
}
MODELS = tuple(_BUILDERS)
PREFIXES = ("torchvision:", "timm:")
# The model each data set gets when none is named.
DEFAULT_MODEL = {"digits": "cnn", "cifar10": "resnet20", "cifar100": "resnet32", "svhn": "resnet20",
                 "imagenet": "resnet18", "folder": "resnet18"}

__all__ = ["MODELS", "PREFIXES", "DEFAULT_MODEL", "CheckpointError", "create_model", "check_model_name",
           "load_checkpoint", "model_fingerprint", "file_sha256"]


def check_model_name(name: str) -> str | None:
    """None when `name` names a model create_model can build, else the problem in one line."""
    name = str(name)
    prefix, _, arch = name.partition(":")
    if f"{prefix}:" not in PREFIXES:
        key = name.lower().replace("-", "_")
        return None if key in _BUILDERS else (f"model must be one of {', '.join(MODELS)}, torchvision:NAME or "
                                              f"timm:NAME, got {name!r}")
    if ":" in arch or not arch:
        return (f"model {name!r}: expected {prefix}:NAME with no weights tag (kdfast never downloads weights; "
                "pass them with --checkpoint)")
    if prefix == "torchvision":
        try:
            import torchvision.models
        except ImportError:
            return f"model {name!r} needs torchvision: pip install torchvision"
        if arch not in torchvision.models.list_models():
            return f"model {name!r}: torchvision.models has no constructor {arch!r} (see torchvision.models.list_models())"
        return None
    try:
        import timm
    except ImportError:
        return f"model {name!r} needs timm, an optional extra: pip install 'kdfast[models]'"
    if not timm.is_model(arch):
        return f"model {name!r}: timm has no model {arch!r} (see timm.list_models())"
    return None


def _by_name(name: str, num_classes: int, in_channels: int, image_size: int | None) -> nn.Module:
    """torchvision:NAME or timm:NAME, randomly initialised (no download), for inputs of image_size."""
    prefix, _, arch = name.partition(":")
    if prefix == "timm":
        import timm
        build = partial(timm.create_model, arch, pretrained=False, num_classes=num_classes, in_chans=in_channels)
        if image_size:
            try:  # transformers size their position embeddings for the input; CNNs take no img_size
                return build(img_size=image_size)
            except TypeError:
                pass
        return build()
    import torchvision.models
    if in_channels != 3:
        raise InvalidArgumentError(f"create_model: {name} takes 3-channel images, got in_channels={in_channels}")
    kwargs = {}
    if image_size and arch.startswith("vit_"):  # position embeddings sized for the input
        kwargs["image_size"] = image_size
    if image_size and arch.startswith("maxvit"):
        kwargs["input_size"] = (image_size, image_size)
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)


def create_model(name: str, *, num_classes: int, in_channels: int = 3, image_size: int | None = None) -> nn.Module:
    """A freshly initialised model `name` (see MODELS, or torchvision:NAME / timm:NAME) with `num_classes` outputs
    (seed torch first)."""
    problem = check_model_name(name)
    if problem:
        raise InvalidArgumentError(f"create_model: {problem}")
    require("create_model", positive_int("num_classes", num_classes, expected="a positive int"),
            positive_int("in_channels", in_channels, expected="a positive int"))
    if str(name).startswith(PREFIXES):
        return _by_name(str(name), num_classes, in_channels, image_size)
    return _BUILDERS[str(name).lower().replace("-", "_")](num_classes, in_channels, image_size)


def _state_dict_of(obj, path: str) -> dict:
    """The weights inside a checkpoint: a bare state dict, or a dict holding one under a usual key."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict", "model_state"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} holds no state dict (expected a dict of tensors, or one under "
                              "'model' / 'state_dict')")
    prefixes = ("module.", "_orig_mod.")  # DistributedDataParallel and torch.compile wrappers
    out = {}
    for k, v in obj.items():
        while k.startswith(prefixes):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def load_checkpoint(model: nn.Module, path: str) -> nn.Module:
    """Loads weights from `path` into `model` (torch.load with weights_only=True); CheckpointError on any mismatch."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load checkpoint {path} with weights_only=True "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    state = _state_dict_of(obj, path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for what, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                parts.append(f"{len(items)} {what} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
        raise CheckpointError(f"checkpoint {path} does not fit model {type(model).__name__}: {'; '.join(parts)}; "
                              "check --model and the data set's number of classes")
    model.load_state_dict(state)
    return model


def model_fingerprint(model: nn.Module) -> str:
    """sha256 hex of the state dict (names, dtypes, shapes and bytes, in key order)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
