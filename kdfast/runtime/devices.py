"""Where models run and in which precision: one home for the device default and the precision names (importable
without torch: the command lines name the precisions before any model is built)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

PRECISIONS = ("fp32", "bf16")


def resolve_device(models: list[nn.Module], device) -> torch.device:
    """`device` when given, else the device of the first model's parameters (CPU for a model without any)."""
    import torch
    if device is not None:
        return torch.device(device)
    for p in models[0].parameters():
        return p.device
    return torch.device("cpu")
