"""Distillation: `distill_step`, the KD weights (`alpha_for_fraction`, `optimal_alpha`), feature terms
(`terms`), the variance-reduction correction and teacher report, and the teacher-logit cache."""
from kdfast.distill.step import alpha_for_fraction, distill_step, optimal_alpha

__all__ = ["alpha_for_fraction", "distill_step", "optimal_alpha"]
