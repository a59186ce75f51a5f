"""What a student distills from and how: one frozen object that `distill_step`, `fit` and the CLI's distill job
share, validated once when it is made.

    kd = KDSetup(teacher=teacher, alpha=0.5, temperature=4.0)          # online teacher
    kd = KDSetup(teacher_cache=TeacherCache.open(path), alpha=0.8)     # its cached logits
    kd = KDSetup(teacher=teacher, alpha=0.5, kd_term=make_kd_term("at", student, teacher, x[:1]))
    kd = KDSetup(teacher=teacher, alpha=0.5, temperature=1.0, correction="unbiased")   # Eq. 16

ALPHA IS THE WEIGHT OF THE DISTILLATION TERM (loss = (1 - alpha) CE + alpha T^2 KL). A setup without a teacher
is valid: `distill_step` may get the teacher's logits per batch (`teacher_logits=`); `fit` requires a teacher or
a cache whenever alpha != 0.
"""
from __future__ import annotations

import dataclasses
import hashlib

import torch

from kdfast.distill.variance_reduction import CORRECTIONS, TeacherGradient
from kdfast.errors import InvalidArgumentError
from kdfast.runtime.checks import Problem, finite, in_range, require


def tensors_sha256(tensors) -> str:
    """One SHA-256 over the float64 values of `tensors`: the fingerprint of a distribution or a gradient."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)
class KDSetup:
    """The distillation half of a training run.

    teacher: a module, run online in eval mode without autograd; or teacher_cache: a TeacherCache of its logits
        (checked by `fit` against the data set). Not both.
    alpha: weight of the DISTILLATION term, in [0, 1] (any finite value with extrapolate=True: outside [0, 1] one
        term has a negative weight, the self-distillation paper's extrapolation).
    temperature: T > 0 of the soft targets.
    kd_term: a feature-distillation term (kdfast.distill.terms.make_kd_term) added to every step's loss; it
        needs the online teacher (its features are hooked). `fit` trains its parameters beside the model's.
    correction: None, "unbiased" (`fit` computes the teacher's full-data gradient once) or a TeacherGradient:
        unbiased self-distillation (the KD-variance-reduction paper's Eq. 16); needs the teacher module with the
        student's parameter space. `distill_step` takes only a TeacherGradient.
    """
    teacher: torch.nn.Module | None = None
    teacher_cache: object | None = None
    alpha: float = 0.5
    temperature: float = 4.0
    extrapolate: bool = False
    kd_term: object | None = None
    correction: object | None = None

    def __post_init__(self):
        require("KDSetup", *self._problems())

    def _problems(self):
        from kdfast.distill.terms import KDTerm
        if self.extrapolate:
            yield finite("alpha", self.alpha, expected="a finite number with extrapolate=True")
        else:
            yield in_range("alpha", self.alpha, 0.0, 1.0, expected="a number in [0, 1] (the weight of the "
                           "distillation term; any finite value with extrapolate=True)")
        yield finite("temperature", self.temperature, low=0.0)
        if not isinstance(self.extrapolate, bool):
            yield Problem("extrapolate", "True or False", self.extrapolate)
        if self.teacher is not None and not isinstance(self.teacher, torch.nn.Module):
            yield Problem("teacher", "an nn.Module or None", type(self.teacher).__name__)
        if self.teacher is not None and self.teacher_cache is not None:
            yield "pass a teacher or a teacher_cache, not both"
        if self.kd_term is not None:
            if not isinstance(self.kd_term, KDTerm):
                yield Problem("kd_term", "a kdfast.distill.terms term (make_kd_term)", type(self.kd_term).__name__)
            elif self.teacher is None:
                yield (f"kd_term {self.kd_term.name!r} compares features: it needs an online teacher module (a "
                       "teacher_cache or per-batch teacher_logits hold only logits)")
        if self.correction is not None and not isinstance(self.correction, TeacherGradient):
            if self.correction not in CORRECTIONS:
                yield Problem("correction", f"None, one of {CORRECTIONS} or a kdfast.distill.variance_reduction."
                                            "TeacherGradient", self.correction)
            elif self.teacher is None:
                yield (f"correction={self.correction!r} needs the teacher module (its full-data gradient is added "
                       "back); cached teacher logits are not enough")

    @property
    def has_source(self) -> bool:
        return self.teacher is not None or self.teacher_cache is not None

    def teacher_fingerprint(self) -> str | None:
        from kdfast.models import model_fingerprint
        if self.teacher is not None:
            return model_fingerprint(self.teacher)
        return None if self.teacher_cache is None else self.teacher_cache.meta["teacher_fingerprint"]

    def identity(self) -> dict:
        """Every field, JSON-able: the teacher (module or cache) as its fingerprint, the term and the correction
        as theirs. Part of fit's run identity, so a new field joins it without another list to edit."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del fields["teacher_cache"]
        correction = self.correction
        if isinstance(correction, TeacherGradient):
            correction = {"teacher_gradient_sha256": tensors_sha256(correction.grads),
                          "num_examples": correction.num_examples}
        return {**fields, "teacher": self.teacher_fingerprint(),
                "kd_term": None if self.kd_term is None else self.kd_term.identity(), "correction": correction,
                "extrapolate": bool(self.extrapolate)}


NO_KD = KDSetup(alpha=0.0)  # training on the labels alone


def as_setup(kd, where: str) -> KDSetup:
    """kd, or NO_KD for None; InvalidArgumentError for anything else."""
    if kd is None:
        return NO_KD
    if not isinstance(kd, KDSetup):
        raise InvalidArgumentError(f"{where}: kd must be a kdfast.KDSetup or None, got {type(kd).__name__}")
    return kd
