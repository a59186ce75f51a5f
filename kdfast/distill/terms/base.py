"""The base class and registry of feature-distillation terms.

A term is an nn.Module holding its own learnable parameters (a projection, a regressor, a variance) and the
names of the student and teacher layers it compares. Called on the two captured features it returns

    beta * mean_i w_i r_i(student_feature_i, teacher_feature_i)

with r_i the term's per-example loss (`per_example`) and w_i optional example weights (1 by default).
"""
from __future__ import annotations


import torch
from torch import nn

from kdfast.errors import InvalidArgumentError
from kdfast.runtime.checks import finite, require

KD_TERMS: dict[str, type] = {}


def register_term(name: str, *, overwrite: bool = False):
    """Class decorator: makes a KDTerm subclass available as `name` to make_kd_term and --kd-term."""
    def deco(cls):
        if name in KD_TERMS and not overwrite:
            raise InvalidArgumentError(f"register_term: a term named {name!r} exists ({KD_TERMS[name].__name__}); "
                                       "pass overwrite=True to replace it")
        cls.name = name
        KD_TERMS[name] = cls
        return cls
    return deco


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 features (autocast) are compared in fp32; fp64 ones (reference tests) stay fp64."""
    return x if x.dtype == torch.float64 else x.float()


class KDTerm(nn.Module):
    """Base of the feature terms. Subclasses set `default_beta` and `default_layer_kind` ("head" or "spatial")
    and implement `per_example(fs, ft) -> (B,)` on fp32 features."""

    name = "?"
    default_beta = 1.0
    default_layer_kind = "head"

    def __init__(self, student_shape, teacher_shape, *, student_layer: str, teacher_layer: str,
                 beta: float | None = None):
        super().__init__()
        beta = self.default_beta if beta is None else beta
        require(self.name, finite("beta", beta, low=0.0, low_open=False,
                                  expected="a finite number >= 0 (the term's weight)"))
        self.beta = float(beta)
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.student_shape, self.teacher_shape = tuple(student_shape)[1:], tuple(teacher_shape)[1:]

    def mismatch(self, why: str) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"{self.name}: cannot match student layer {self.student_layer!r} of shape (B, "
            f"{', '.join(map(str, self.student_shape))}) to teacher layer {self.teacher_layer!r} of shape (B, "
            f"{', '.join(map(str, self.teacher_shape))}): {why}; name other layers (student_layer=, teacher_layer=)")

    def per_example(self, fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, fs: torch.Tensor, ft: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if tuple(fs.shape[1:]) != self.student_shape or tuple(ft.shape[1:]) != self.teacher_shape:
            raise InvalidArgumentError(
                f"{self.name}: the term was built for student {self.student_layer!r} (B, {self.student_shape}) and "
                f"teacher {self.teacher_layer!r} (B, {self.teacher_shape}) features, got {tuple(fs.shape)} and "
                f"{tuple(ft.shape)}; build it with an input of the training size")
        r = self.per_example(_at_least_fp32(fs), _at_least_fp32(ft.detach()))
        if weight is not None:
            r = r * weight.to(r.dtype)
        return self.beta * r.mean()

    def identity(self) -> dict:
        """What the term is, JSON-able: recorded in fit's checkpoints (checked on resume) and run summaries."""
        return {"name": self.name, "beta": self.beta, "student_layer": self.student_layer,
                "teacher_layer": self.teacher_layer}

    def extra_repr(self) -> str:
        return f"student_layer={self.student_layer!r}, teacher_layer={self.teacher_layer!r}, beta={self.beta}"


def projection(shape_in: tuple, shape_out: tuple, term: KDTerm, *, channels_out: int | None = None) -> nn.Module:
    """A learned linear map from student to teacher features: nn.Linear on (B, D), 1x1 conv on (B, C, H, W)
    (same H, W: the map is per position). channels_out overrides the output width (a hidden layer)."""
    if len(shape_in) != len(shape_out) or len(shape_in) not in (1, 3):
        raise term.mismatch("expected both (B, D) vectors or both (B, C, H, W) maps")
    out = shape_out[0] if channels_out is None else channels_out
    if len(shape_in) == 1:
        return nn.Linear(shape_in[0], out)
    if shape_in[1:] != shape_out[1:]:
        raise term.mismatch("the spatial sizes differ (the 1x1 projection maps channels only)")
    return nn.Conv2d(shape_in[0], out, kernel_size=1)
