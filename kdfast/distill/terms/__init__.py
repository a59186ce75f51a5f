"""Feature-distillation terms added to the logit KD loss (the data-pruning paper's Table 1, the kernel-regime
paper's Eq. 2):

    hint   feature regression through a learned projection (FitNets; Eq. 2 hidden-feature matching)
    vid    variational information distillation (Ahn et al. 2019): Gaussian NLL, learned mean and variance
    at     attention transfer (Zagoruyko & Komodakis 2017): L2 between normalised attention maps

    term = make_kd_term("vid", student, teacher, x[:2])          # layers: the classifier heads' inputs
    opt = torch.optim.SGD([*student.parameters(), *term.parameters()], lr=0.05, momentum=0.9)
    distill_step(student, x, y, opt, KDSetup(teacher=teacher, alpha=0.5, kd_term=term))   # KD loss + beta * term

A term owns its learnable parameters (projection, regressor, variance): they must join the optimizer, as
above (`fit(..., KDSetup(kd_term=...))` adds them as a second parameter group). Register new terms with @register_term.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from kdfast.errors import InvalidArgumentError
from kdfast.distill.terms import at, hint, vid  # noqa: F401  (each registers its term)
from kdfast.distill.terms.base import KD_TERMS, KDTerm, register_term
from kdfast.distill.terms.capture import capture, default_layer, probe_shape

__all__ = ["KD_TERMS", "KDTerm", "register_term", "make_kd_term", "capture_pair"]


def make_kd_term(name: str, student: nn.Module, teacher: nn.Module, example_input: torch.Tensor, *,
                 student_layer: str | None = None, teacher_layer: str | None = None, beta: float | None = None,
                 **options) -> KDTerm:
    """Builds the term `name` (see KD_TERMS) for this student/teacher pair.

    example_input: a batch of the training input size (one example suffices): one no-grad, eval-mode pass of
    each model reads the feature shapes, which size the term's parameters (on the input's device).
    student_layer / teacher_layer: module names as in named_modules(), ending in ":in" for a module's input;
    None picks the inputs of the classifier heads (hint, vid) or the last spatial stage (at).
    beta: the term's weight (default: the term's, see its module). options: the term's own (e.g. project=False
    for hint, hidden= / init_var= for vid).
    """
    if name not in KD_TERMS:
        raise InvalidArgumentError(f"make_kd_term: name must be one of {', '.join(sorted(KD_TERMS))}, got {name!r}")
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise InvalidArgumentError(f"make_kd_term: student and teacher must be nn.Modules (feature terms need the "
                                   f"teacher's features, not only its logits), got {type(student).__name__} and "
                                   f"{type(teacher).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise InvalidArgumentError(f"make_kd_term: example_input must be a tensor batch, got "
                                   f"{type(example_input).__name__}")
    cls = KD_TERMS[name]
    student_layer = student_layer or default_layer(student, example_input, cls.default_layer_kind)
    teacher_layer = teacher_layer or default_layer(teacher, example_input, cls.default_layer_kind)
    s_shape = probe_shape(student, student_layer, example_input, "student")
    t_shape = probe_shape(teacher, teacher_layer, example_input, "teacher")
    term = cls(s_shape, t_shape, student_layer=student_layer, teacher_layer=teacher_layer, beta=beta, **options)
    return term.to(example_input.device)


@contextlib.contextmanager
def capture_pair(term: KDTerm, student: nn.Module, teacher: nn.Module):
    """Hooks the term's layers for the forward passes inside the block: yields (student, teacher) holders."""
    with capture(student, term.student_layer, "student") as s, capture(teacher, term.teacher_layer, "teacher") as t:
        yield s, t
