"""Where models run and in which precision: one home for the device default and the precision names."""
from __future__ import annotations

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16")


def resolve_device(models: list[nn.Module], device) -> torch.device:
    """`device` when given, else the device of the first model's parameters (CPU for a model without any)."""
    if device is not None:
        return torch.device(device)
    for p in models[0].parameters():
        return p.device
    return torch.device("cpu")
