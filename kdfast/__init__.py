"""kdfast: score, prune and distill training data, each step as fast as the hardware allows.

Public API (imported lazily, so `import kdfast` stays cheap and never touches a device):
    kd_loss, KDLoss                      fused KD loss (alpha = weight of the DISTILLATION term; kl, reverse_kl, jsd)
    TopKTeacher                          a sparse teacher (k ids and log-probabilities per row) kd_loss takes as is
    linear_kd_loss, LinearKDLoss         the same behind the output layer, logits made chunk by chunk (LLM heads)
    LinearTeacher                        a teacher given by hidden states and output layer (for linear_kd_loss)
    backends                             which kernel backends are live here, and why not the others
    score, ForgettingTracker             per-example scores (el2n, grand, grand-last, forgetting, ...)
    per_example_grad_norms, GradNormPlan exact per-example gradient norms of whole networks (a plan: hooks once)
    hessian, liprune_batches, ImportanceSampler
    prune, distill_step, alpha_for_fraction, optimal_alpha, TeacherCache
    fit, TrainRecipe, KDSetup            the training loop behind kdfast-distill (checkpoints, exact resumption),
                                         its recipe and what it distills from
    jobs                                 runs as jobs: job records checked on resume, chunk stores, atomic writes
    data_identity, check_identity        what ties scores, keep files and caches to one data set
    example_keys                         each example's key (a source's own, a file's relative path, or the index),
                                         by which scores.parquet, keep.parquet and teacher caches are matched
    teacher_gradient, teacher_report     unbiased self-distillation (Eq. 16) and its Eq. 14-15 diagnostics
    self_distill                         iterated self-distillation, each step's KD weight in closed form
    make_kd_term                         feature-distillation terms (hint, vid, at) for distill_step / fit
    load_score_file                      external per-example scores (.npy, or CSV / .npz keyed by file name)
"""
from __future__ import annotations

import importlib

from kdfast._version import __version__

# public name -> module that defines it
_API = {
    "kd_loss": "kdfast.losses.kd_loss",
    "KDLoss": "kdfast.losses.kd_loss",
    "TopKTeacher": "kdfast.losses.topk_teacher",
    "linear_kd_loss": "kdfast.losses.linear_kd_loss",
    "LinearKDLoss": "kdfast.losses.linear_kd_loss",
    "LinearTeacher": "kdfast.losses.linear_kd_loss",
    "backends": "kdfast.runtime.dispatch",
    "score": "kdfast.scoring",
    "ForgettingTracker": "kdfast.scoring",
    "per_example_grad_norms": "kdfast.grad_norms",
    "GradNormPlan": "kdfast.grad_norms",
    "liprune_batches": "kdfast.scoring.liprune",
    "ImportanceSampler": "kdfast.pruning.sampling",
    "prune": "kdfast.pruning.selection",
    "distill_step": "kdfast.distill.step",
    "alpha_for_fraction": "kdfast.distill.step",
    "optimal_alpha": "kdfast.distill.step",
    "TeacherCache": "kdfast.distill.teacher_cache",
    "fit": "kdfast.training.fit",
    "TrainRecipe": "kdfast.training.recipe",
    "KDSetup": "kdfast.distill.setup",
    "data_identity": "kdfast.data",
    "check_identity": "kdfast.data",
    "example_keys": "kdfast.data.keys",
    # distillation as partial variance reduction: Eq. 16's correction and the Eq. 14-15 report
    "teacher_gradient": "kdfast.distill.variance_reduction",
    "teacher_report": "kdfast.distill.variance_reduction",
    # iterated self-distillation (self-distillation paper, Algorithm 1)
    "self_distill": "kdfast.training.self_distill",
    "make_kd_term": "kdfast.distill.terms",
    "load_score_file": "kdfast.pruning.score_files",
}
_SUBMODULES = ("hessian", "jobs")

__all__ = sorted([*_API, *_SUBMODULES])


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"kdfast.{name}")
    else:
        raise AttributeError(f"module 'kdfast' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__
