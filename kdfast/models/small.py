"""Small models for the digits data set (and any small image): an MLP and a CNN, both with a linear head."""
from __future__ import annotations

from torch import nn


def mlp(num_classes: int, in_channels: int = 1, image_size: int = 8, width: int = 256) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def cnn(num_classes: int, in_channels: int = 1, image_size: int = 8, width: int = 16) -> nn.Module:
    """Three 3x3 conv-BN-ReLU stages, one 2x2 max-pool, global average pool, linear head (any input size)."""
    return nn.Sequential(*_conv_bn_relu(in_channels, width), *_conv_bn_relu(width, 2 * width), nn.MaxPool2d(2),
                         *_conv_bn_relu(2 * width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2 * width, num_classes))
