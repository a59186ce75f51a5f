"""VID: variational information distillation (Ahn et al., CVPR 2019, Eq. 5-6).

The teacher feature t is modelled given the student feature s as a Gaussian with a learned mean
mu(s) (a regressor: linear / 1x1-conv, ReLU, linear, ReLU, linear) and a learned per-channel variance
sigma_c^2 = softplus(a_c) + eps (heteroscedastic across channels, shared across positions, as the paper's
CNN variant). The term is the negative log-likelihood without its constant:

    r_i = mean_{c, positions} [ log sigma_c + (t_ic - mu_c(s_i))^2 / (2 sigma_c^2) ]

Maximising this lower bound of the mutual information I(t; s) (Eq. 4) transfers the teacher's features.
init_var sets sigma^2 at initialisation (5.0, RepDistiller's); default beta 1.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from kdfast.distill.terms.base import KDTerm, projection, register_term


@register_term("vid")
class VID(KDTerm):
    default_beta = 1.0

    def __init__(self, student_shape, teacher_shape, *, hidden: int | None = None, init_var: float = 5.0,
                 eps: float = 1e-5, **kw):
        super().__init__(student_shape, teacher_shape, **kw)
        if len(self.student_shape) != len(self.teacher_shape) or len(self.student_shape) not in (1, 3):
            raise self.mismatch("expected both (B, D) vectors or both (B, C, H, W) maps")
        hidden = hidden or self.teacher_shape[0]
        mid = (hidden,) + self.teacher_shape[1:]
        self.mean = nn.Sequential(projection(self.student_shape, mid, self), nn.ReLU(),
                                  projection(mid, mid, self), nn.ReLU(),
                                  projection(mid, self.teacher_shape, self))
        self.eps = float(eps)
        # softplus^{-1}(init_var - eps), so sigma^2 starts at init_var
        self.log_scale = nn.Parameter(torch.full((self.teacher_shape[0],), math.log(math.expm1(init_var - eps))))

    def variance(self) -> torch.Tensor:
        return F.softplus(self.log_scale) + self.eps

    def per_example(self, fs, ft):
        var = self.variance().view(-1, *([1] * (ft.dim() - 2)))
        nll = 0.5 * (torch.log(var) + (ft - self.mean(fs)).pow(2) / var)
        return nll.flatten(1).mean(1)
