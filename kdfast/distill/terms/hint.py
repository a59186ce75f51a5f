"""Hint: feature regression through a learned projection (FitNets, Romero et al. 2015), and the kernel-regime
paper's Eq. 2 hidden-feature matching (lambda sum_k (phi_k(x) - f_k(x))^2) with project=False.

    r_i = mean_j (P(s_i) - t_i)_j^2          P: nn.Linear on (B, D), 1x1 conv on (B, C, H, W); identity
                                             with project=False (the shapes must then be equal)

Means over feature elements j (the papers' sums differ by the constant D, absorbed into beta). Default
beta 100 (RepDistiller's for FitNets).
"""
from __future__ import annotations

from torch import nn

from kdfast.distill.terms.base import KDTerm, projection, register_term


@register_term("hint")
class Hint(KDTerm):
    default_beta = 100.0

    def __init__(self, student_shape, teacher_shape, *, project: bool = True, **kw):
        super().__init__(student_shape, teacher_shape, **kw)
        if project:
            self.proj = projection(self.student_shape, self.teacher_shape, self)
        elif self.student_shape != self.teacher_shape:
            raise self.mismatch("project=False compares the features as they are, so the shapes must be equal")
        else:
            self.proj = nn.Identity()

    def per_example(self, fs, ft):
        return (self.proj(fs) - ft).pow(2).flatten(1).mean(1)
