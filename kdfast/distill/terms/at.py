"""AT: attention transfer (Zagoruyko & Komodakis, ICLR 2017, Eq. 2 with p = 2, as their code).

The attention map of a (B, C, H, W) feature is the channel mean of its squared activations, flattened and
L2-normalised per example; the term is the squared distance between student and teacher maps:

    Q_i = vec(mean_c A_ic^2) / ||vec(mean_c A_ic^2)||_2          r_i = mean_positions (Q^s_i - Q^t_i)^2

Channel counts may differ; the spatial sizes must match. No learnable parameters. Default beta 1000
(the paper's code and RepDistiller).
"""
from __future__ import annotations

from torch.nn import functional as F

from kdfast.distill.terms.base import KDTerm, register_term


def attention_map(f):
    return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)


@register_term("at")
class AT(KDTerm):
    default_beta = 1000.0
    default_layer_kind = "spatial"

    def __init__(self, student_shape, teacher_shape, **kw):
        super().__init__(student_shape, teacher_shape, **kw)
        if len(self.student_shape) != 3 or len(self.teacher_shape) != 3:
            raise self.mismatch("attention maps need (B, C, H, W) features on both sides")
        if self.student_shape[1:] != self.teacher_shape[1:]:
            raise self.mismatch("the spatial sizes H x W differ")

    def per_example(self, fs, ft):
        return (attention_map(fs) - attention_map(ft)).pow(2).mean(1)
