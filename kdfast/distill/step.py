"""Knowledge distillation on a (pruned) training subset: one training step, and the weight of the KD term.

    out = distill_step(student, inputs, targets, optimizer, KDSetup(teacher=teacher, alpha=0.5, temperature=4.0))
    alpha = alpha_for_fraction(0.2)                      # the data-pruning paper's f -> alpha trend
    alpha = optimal_alpha(y_val, pred_labels_only, pred_teacher_only)   # closed form, kernel ridge

ALPHA IS THE WEIGHT OF THE DISTILLATION TERM everywhere in kdfast (loss = (1 - alpha) CE + alpha T^2 KL),
as in the data-pruning paper. The self-distillation paper weights the GROUND TRUTH with its alpha;
`optimal_alpha` converts: it returns one minus that paper's alpha.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

from kdfast.distill.setup import KDSetup, as_setup
from kdfast.errors import InvalidArgumentError
from kdfast.distill.terms import capture_pair as _capture_pair
from kdfast.losses.kd_loss import kd_loss
from kdfast.distill.variance_reduction import TeacherGradient
from kdfast.runtime.checks import fraction as _fraction, require

AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

# (pruning fraction f, KD weight) anchors of the default schedule, from the data-pruning paper: alpha = 1
# beats 0.5 by > 8 points at f = 0.1 and 0.5 beats 1 at f = 0.7 (Sec. 4.2, Fig. 6 and 9 on CIFAR-100/SVHN).
DEFAULT_ALPHA_SCHEDULE = ((0.1, 1.0), (0.7, 0.5))


# ---------------------------------------------------------------------------------------- the step
def _amp_dtype(amp):
    if amp is None or amp is False:
        return None
    if amp is torch.bfloat16:
        return torch.bfloat16
    if isinstance(amp, str) and amp.lower() in AMP_DTYPES:
        return AMP_DTYPES[amp.lower()]
    # fp16 would need a gradient scaler to train safely; bf16 has fp32's range and needs none.
    raise InvalidArgumentError(f"distill_step: amp must be None, 'bf16' or torch.bfloat16, got {amp!r}")


def _check_step_args(teacher, inputs, targets, alpha, teacher_logits, indices, forgetting):
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1:
        raise InvalidArgumentError("distill_step: targets must be a 1-d tensor of class indices, got "
                                   f"{getattr(targets, 'shape', type(targets).__name__)}")
    if isinstance(inputs, torch.Tensor) and inputs.shape[0] != targets.shape[0]:
        raise InvalidArgumentError(f"distill_step: inputs hold {inputs.shape[0]} examples but targets "
                                   f"{targets.shape[0]}")
    if teacher is None and teacher_logits is None and alpha != 0:
        raise InvalidArgumentError(f"distill_step: alpha={alpha} weights a distillation term, which needs a "
                                   "teacher module (in the KDSetup) or teacher_logits; pass one or use alpha=0")
    if forgetting is not None:
        if not callable(getattr(forgetting, "update", None)):
            raise InvalidArgumentError("distill_step: forgetting must have an update(indices, correct) method, "
                                       f"got {type(forgetting).__name__}")
        if indices is None:
            raise InvalidArgumentError("distill_step: forgetting needs indices (the examples' dataset indices)")
    if indices is not None and (not isinstance(indices, torch.Tensor) or indices.shape != targets.shape):
        raise InvalidArgumentError(f"distill_step: indices must be a tensor of shape {tuple(targets.shape)} "
                                   f"(one dataset index per example), got "
                                   f"{getattr(indices, 'shape', type(indices).__name__)}")


def _check_correction(correction, student):
    if not isinstance(correction, TeacherGradient):
        raise InvalidArgumentError("distill_step: correction must be a kdfast.distill.variance_reduction.TeacherGradient (from "
                                   f"kdfast.teacher_gradient(teacher, data)) or None, got {type(correction).__name__}")
    correction.check(student, "distill_step")


def distill_step(student, inputs, targets, optimizer, kd: KDSetup | None = None, *, teacher_logits=None,
                 weight=None, indices=None, forgetting=None, amp=None, validate=False):
    """One training step of `student` on a batch with the fused KD loss.

    loss = mean_i w_i ((1 - alpha) CE(s_i, y_i) + alpha T^2 KL(softmax(t_i/T) || softmax(s_i/T)))

    Args:
        student: the model being trained; runs in whatever mode it is in (`fit` puts it in train mode).
        inputs, targets: the batch; targets (B,) int64 class indices.
        optimizer: stepped once; gradients are zeroed first.
        kd: a kdfast.KDSetup: the teacher module (run in eval mode, switched there if needed, without autograd),
            alpha (weight of the DISTILLATION term), temperature, extrapolate, a feature term (its parameters
            must be in `optimizer`, make_kd_term's docstring; its features are hooked during both forward
            passes, hooks removed after) and the Eq. 16 correction, which here must be a TeacherGradient
            (`teacher_gradient(teacher, data)`, computed once): it adds alpha times the teacher's full-data
            cross-entropy gradient to the step's gradient before the optimizer step (exactly unbiased for
            softmax regression at temperature 1, and at student = teacher for any model). None: labels alone.
        teacher_logits: (B, C) precomputed teacher logits (a class at -inf has probability 0), or a
            kdfast.TopKTeacher (e.g. TeacherCache.topk_rows: k ids and log-probabilities per example, never
            expanded to C); wins over kd's teacher.
        weight: optional (B,) per-example loss weights (importance sampling).
        indices: (B,) dataset indices of the batch, for `forgetting`.
        forgetting: an object with update(indices, correct) (e.g. kdfast.ForgettingTracker), fed the
            fused loss's `correct` statistic.
        amp: None (fp32) or "bf16": forward passes under bfloat16 autocast.
        validate: check on the host that every target lies in [0, C) (one synchronisation). Off by default
            so a step never waits for the device; a bad label then gives a NaN loss, never a wild read
            (`fit` validates during its first epoch, which presents every kept example once).

    Returns:
        dict of device tensors, no host synchronisation: "loss" (0-d, detached) and the per-example
        statistics of the fused loss ("ce", "kl", "el2n", "grad_norm", "correct", "margin"); with kd_term
        also "kd_term" (0-d, detached: its weighted contribution to the loss).
    """
    kd = as_setup(kd, "distill_step")
    teacher, alpha, kd_term, correction = kd.teacher, kd.alpha, kd.kd_term, kd.correction
    _check_step_args(teacher, inputs, targets, alpha, teacher_logits, indices, forgetting)
    if correction is not None:
        _check_correction(correction, student)
    amp_dtype = _amp_dtype(amp)

    def precision():  # a disabled autocast still costs a context switch per step: skip it in fp32
        return contextlib.nullcontext() if amp_dtype is None else torch.autocast(targets.device.type, amp_dtype)

    features = contextlib.nullcontext((None, None)) if kd_term is None else _capture_pair(kd_term, student, teacher)
    with features as (student_feature, teacher_feature):
        if teacher is not None and (kd_term is not None or (teacher_logits is None and alpha != 0)):
            if teacher.training:
                teacher.eval()
            with torch.no_grad(), precision():
                online_logits = teacher(inputs)
            teacher_logits = online_logits if teacher_logits is None else teacher_logits
        with precision():
            student_logits = student(inputs)
        # The fused loss computes in fp32 whatever the logits' dtype; alpha == 0 needs no teacher at all.
        loss, stats = kd_loss(student_logits, teacher_logits if alpha != 0 else None, targets, alpha=alpha,
                              temperature=kd.temperature, weight=weight, return_stats=True, validate=validate,
                              extrapolate=kd.extrapolate)
        if kd_term is not None:
            extra = kd_term(student_feature.get(), teacher_feature.get(), weight)
            loss = loss + extra
            stats["kd_term"] = extra.detach()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if correction is not None and alpha != 0:
        correction.apply(student, alpha)
    optimizer.step()
    if forgetting is not None:
        forgetting.update(indices, stats["correct"])
    return {"loss": loss.detach(), **stats}


# ------------------------------------------------------------------------------ the KD weight vs f
def _check_schedule(points) -> tuple[tuple[float, float], ...]:
    try:
        pts = tuple((float(f), float(a)) for f, a in points)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"alpha_for_fraction: schedule must be a sequence of (fraction, alpha) "
                                   f"pairs, got {points!r}") from exc
    if not pts:
        raise InvalidArgumentError("alpha_for_fraction: schedule must hold at least one (fraction, alpha) pair")
    for f, a in pts:
        if not (0.0 < f <= 1.0 and 0.0 <= a <= 1.0):
            raise InvalidArgumentError(f"alpha_for_fraction: schedule points need fraction in (0, 1] and alpha "
                                       f"in [0, 1], got ({f}, {a})")
    fs = [f for f, _ in pts]
    alphas = [a for _, a in pts]
    if any(b <= a for a, b in zip(fs, fs[1:])) or any(b > a for a, b in zip(alphas, alphas[1:])):
        raise InvalidArgumentError("alpha_for_fraction: schedule must have strictly increasing fractions and "
                                   f"non-increasing alphas (less teacher weight as more data is kept), got {pts}")
    return pts


def alpha_for_fraction(fraction, *, schedule: Sequence[tuple[float, float]] | None = None) -> float:
    """The KD weight for a student trained on a fraction f of the data: more teacher as f shrinks.

    The data-pruning paper (Sec. 4.2) finds the best alpha falls as f grows: pure distillation (alpha = 1)
    wins by over 8 points at f = 0.1 on CIFAR-100, an even split (0.5) wins at f = 0.7. The default schedule
    interpolates linearly between those anchors and is constant outside them:

        f:      <= 0.1   0.2    0.3    0.4    0.5    0.6    >= 0.7
        alpha:   1.0    0.917  0.833  0.75   0.667  0.583   0.5

    Override with `schedule`: (fraction, alpha) anchors, fractions strictly increasing, alphas
    non-increasing (so the result is monotone in f); piecewise linear between them, flat outside.
    """
    require("alpha_for_fraction", _fraction("fraction", fraction, expected="a number in (0, 1] (the share of the "
                                                                      "data kept)"))
    pts = _check_schedule(DEFAULT_ALPHA_SCHEDULE if schedule is None else schedule)
    f = float(fraction)
    if f <= pts[0][0]:
        return pts[0][1]
    for (f0, a0), (f1, a1) in zip(pts, pts[1:]):
        if f <= f1:
            return a0 + (a1 - a0) * (f - f0) / (f1 - f0)
    return pts[-1][1]


# ------------------------------------------------------------------------- the optimal KD weight
def _as_float64(name, x):
    try:
        t = torch.as_tensor(x, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidArgumentError(f"optimal_alpha: {name} must be an array of numbers, got "
                                   f"{type(x).__name__}") from exc
    if not bool(torch.isfinite(t).all()):
        raise InvalidArgumentError(f"optimal_alpha: {name} must be finite, got NaN or infinite values")
    return t


def optimal_alpha(y_val, pred_labels_only, pred_teacher_only, *, clip=False) -> float:
    """The validation-optimal KD weight in closed form (self-distillation paper, Theorem 4.4, Algorithm 1).

    Given validation targets y~, the predictions of a model fit on the ground truth only (y~1, the paper's
    step 1) and of one fit on the teacher's outputs only (y~0, the paper's alpha = 0 fit), the prediction
    of the fit with KD weight w is exactly y~1 + w (y~0 - y~1) for kernel ridge regression (Theorem 4.1,
    eq. 7), so the validation squared error is minimised by

        w* = <y~0 - y~1, y~ - y~1> / ||y~0 - y~1||^2      (= 1 - the paper's alpha*, eq. 16)

    Multi-output arrays (e.g. (m, C) one-hot targets and predictions) use the Frobenius inner product, as
    the paper's Sec. 5 does for networks. w* may fall outside [0, 1]; clip=True clips it there (footnote 9).

    Returns the weight of the DISTILLATION term (kdfast's alpha), as a float.
    """
    y = _as_float64("y_val", y_val)
    p1 = _as_float64("pred_labels_only", pred_labels_only)
    p0 = _as_float64("pred_teacher_only", pred_teacher_only)
    if not (y.shape == p1.shape == p0.shape) or y.numel() == 0:
        raise InvalidArgumentError(f"optimal_alpha: y_val, pred_labels_only and pred_teacher_only must have the "
                                   f"same non-empty shape, got {tuple(y.shape)}, {tuple(p1.shape)}, "
                                   f"{tuple(p0.shape)}")
    direction = (p0 - p1).reshape(-1)
    denom = float(direction @ direction)
    if denom <= 1e-300 or not math.isfinite(denom):
        raise InvalidArgumentError("optimal_alpha: pred_labels_only and pred_teacher_only are identical, so "
                                   "every weight gives the same predictions; no optimum to pick")
    w = float(direction @ (y - p1).reshape(-1)) / denom
    return min(1.0, max(0.0, w)) if clip else w
