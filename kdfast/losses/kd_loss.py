"""The fused knowledge-distillation loss: argument checks, backend dispatch, autograd, torch.library op.

    loss = kd_loss(student_logits, teacher_logits, target, alpha=0.5, temperature=4.0)

Per row i:  l_i = w_i * ((1 - alpha) * CE(s_i, y_i) + alpha * T^2 * KL(softmax(t_i/T) || softmax(s_i/T))).

ALPHA IS THE WEIGHT OF THE DISTILLATION TERM (the data-pruning paper's convention): alpha=0 is plain
cross-entropy, alpha=1 pure distillation. Some libraries weight the ground truth with alpha instead; pass
1 - their alpha.

Every backend's forward computes the loss (reduced inside the kernel, in row order: deterministic), the
gradient w.r.t. the student logits (already scaled by the reduction) and the per-example statistics in one
pass over the logits; the backward only multiplies the stored gradient by the incoming one, in place, and
does nothing when that is exactly 1. Eager calls and torch.compile share the preparation (`_prepare`) and
the backends' reduction; they differ only in the autograd wrapper (an autograd.Function eagerly, a
torch.library op under torch.compile).

The eager call is host-bound at small shapes, so this file keeps its hot path short: scalar arguments are
checked once per distinct configuration (cached), tensors by metadata only, and nothing is imported or
looked up by name per call. Plain CPU inputs go straight to the C++ extension, which checks every tensor
itself; the Python checks and the preparation run only for what it refuses (`_eager_cpu_direct`).
"""
from __future__ import annotations

import torch

from kdfast.runtime.checks import finite, in_range, integer, one_of, require
from kdfast.runtime.dispatch import cpp_module, resolve_backend
from kdfast.errors import BackendUnavailableError, InvalidArgumentError
from kdfast.losses.reference import DIVERGENCES, KD_STAT_NAMES, SparseTeacher, kd_loss_fwd_torch
from kdfast.losses.topk_teacher import TopKTeacher, check_ids_below

REDUCTIONS = ("none", "sum", "mean")  # position = the backends' reduction code
_REDUCTION_CODE = {name: code for code, name in enumerate(REDUCTIONS)}
_DIVERGENCE_CODE = {name: code for code, name in enumerate(DIVERGENCES)}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_LABEL_DTYPES = (torch.int64, torch.int32)
_NO_GRADS = (None,) * 15  # the backward's answer for every argument but the student logits


# --------------------------------------------------------------------------------------------- backends
# Contract of a forward: (student (N, C), teacher (N, C), a SparseTeacher or None, target (N,) int64, weight
# (N,) fp32 or None, alpha, temperature, ignore_index, reduction code, need_grad, return_stats, grad_out or None,
# validate, divergence code, beta, normalizer or None) -> (loss, grad or None, stats (6, N) or None). See
# kdfast/losses/reference.py.
_kernels = None


def _triton():
    global _kernels
    if _kernels is None:  # triton imports only when a Triton backend is used
        from kdfast.losses import triton as _kernels
    return _kernels


def _fwd_triton(s, t, y, w, alpha, temperature, ignore_index, reduction, need_grad, return_stats, grad_out,
                validate, divergence=0, beta=0.5, normalizer=None):
    if validate:
        _check_labels(y, s.shape[1], ignore_index)
    return _triton().kd_loss_fwd(s, t, y, w, alpha, temperature, ignore_index, reduction, need_grad, return_stats,
                                 grad_out, divergence, beta, normalizer)



def _bwd_triton(grad, grad_output):
    _triton().kd_loss_bwd(grad, grad_output)


def _fwd_cpp(s, t, y, w, alpha, temperature, ignore_index, reduction, need_grad, return_stats, grad_out,
             validate, divergence=0, beta=0.5, normalizer=None):
    sparse = isinstance(t, SparseTeacher)
    try:  # the extension checks the labels while it counts them for the mean (validate raises ValueError)
        loss, grad, stats = _cpp().kd_loss_fwd(s, None if sparse else t, y, w, alpha, temperature, ignore_index,
                                               reduction, need_grad, return_stats, grad_out, validate, divergence,
                                               beta, normalizer, t.ids if sparse else None,
                                               t.logprobs if sparse else None, t.ratio if sparse else 1.0,
                                               sparse and t.tail)
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from None
    return loss, (grad if need_grad else None), (stats if return_stats else None)


def _bwd_cpp(grad, grad_output):
    _cpp().kd_loss_bwd(grad, grad_output)


def _fwd_torch(s, t, y, w, alpha, temperature, ignore_index, reduction, need_grad, return_stats, grad_out,
               validate, divergence=0, beta=0.5, normalizer=None):
    if validate:
        _check_labels(y, s.shape[1], ignore_index)
    return kd_loss_fwd_torch(s, t, y, w, alpha, temperature, ignore_index, reduction, need_grad, return_stats,
                             grad_out, divergence, beta, normalizer)


def _bwd_torch(grad, grad_output):
    if grad_output.dim() == 0 and grad_output.device.type == "cpu" and grad_output.item() == 1.0:
        return
    grad.mul_(grad_output if grad_output.dim() == 0 else grad_output.reshape(-1, 1))


_cpp_mod = None


def _cpp():
    global _cpp_mod
    if _cpp_mod is None:
        _cpp_mod = cpp_module()
    return _cpp_mod


_FORWARD = {"triton": _fwd_triton, "cpp": _fwd_cpp, "torch": _fwd_torch}
_BACKWARD = {"triton": _bwd_triton, "cpp": _bwd_cpp, "torch": _bwd_torch}



# ----------------------------------------------------------------------------------------------- checks
_checked_scalars: set = set()  # configurations (alpha, temperature, ...) that passed _check_scalars


def _check_scalars(alpha, temperature, reduction, ignore_index, extrapolate, divergence="kl", beta=0.5,
                   normalizer=None) -> None:
    """Checks the non-tensor arguments; each distinct valid configuration is checked once."""
    key = (type(alpha), alpha, type(temperature), temperature, reduction, type(ignore_index), ignore_index,
           extrapolate, divergence, type(beta), beta, type(normalizer), normalizer)
    try:
        if key in _checked_scalars:
            return
    except TypeError:  # an unhashable value: invalid, reported below
        key = None
    if extrapolate not in (True, False):
        raise InvalidArgumentError(f"kd_loss: extrapolate must be True or False, got {extrapolate!r}")
    require("kd_loss", finite("alpha", alpha, expected="a finite number (extrapolate=True)") if extrapolate else
            in_range("alpha", alpha, 0.0, 1.0, expected="a number in [0, 1] (the weight of the distillation term), "
                                                        "or any finite number with extrapolate=True"))
    require("kd_loss", finite("temperature", temperature, low=0.0))
    require("kd_loss", one_of("reduction", reduction, REDUCTIONS))
    require("kd_loss", integer("ignore_index", ignore_index))
    require("kd_loss", one_of("divergence", divergence, DIVERGENCES))
    require("kd_loss", in_range("beta", beta, 0.0, 1.0, low_open=True, high_open=True,
                                expected="a number in (0, 1) (the teacher's weight in the jsd mixture)"))
    if normalizer is not None:
        require("kd_loss", finite("normalizer", normalizer, low=0.0,
                                  expected="None or a finite number > 0 (the mean's divisor, e.g. the global count "
                                           "of rows not ignored)"))
        if reduction != "mean":
            raise InvalidArgumentError(f"kd_loss: normalizer divides the mean and needs reduction='mean', got "
                                       f"reduction={reduction!r}")
    if len(_checked_scalars) > 1024:  # many distinct alphas (a schedule): keep the cache bounded
        _checked_scalars.clear()
    if key is None:
        raise InvalidArgumentError(f"kd_loss: arguments must be plain numbers and strings, got alpha={alpha!r}, "
                                   f"temperature={temperature!r}, reduction={reduction!r}, "
                                   f"ignore_index={ignore_index!r}")
    _checked_scalars.add(key)


def _same_device(x, student_logits, on_cpu):
    return x.is_cpu if on_cpu else x.device == student_logits.device  # (all-CPU: no device objects built)


def _check_tensors(student_logits, teacher_logits, target, alpha, weight, inplace):
    """Metadata-only checks of the tensors (no host synchronisation); returns the device type."""
    if not isinstance(student_logits, torch.Tensor):
        raise InvalidArgumentError(f"kd_loss: student_logits must be a tensor, got {type(student_logits).__name__}")
    if student_logits.dtype not in _FLOAT_DTYPES:
        raise InvalidArgumentError(
            f"kd_loss: student_logits must be float32, float16, bfloat16 or float64, got {student_logits.dtype}")
    shape = student_logits.shape
    if not shape:
        raise InvalidArgumentError("kd_loss: student_logits must have shape (..., C), got a 0-d tensor")
    on_cpu = student_logits.is_cpu
    device = student_logits.device if not on_cpu else "cpu"  # (for the messages)
    if not isinstance(target, torch.Tensor) or target.dtype not in _LABEL_DTYPES:
        raise InvalidArgumentError(f"kd_loss: target must be an int64 (or int32) tensor of class indices, got "
                                   f"{target.dtype if isinstance(target, torch.Tensor) else type(target).__name__}")
    if target.shape != shape[:-1]:
        raise InvalidArgumentError(f"kd_loss: target must have shape {tuple(shape[:-1])} (student_logits without "
                                   f"its class dimension), got {tuple(target.shape)}")
    if not _same_device(target, student_logits, on_cpu):
        raise InvalidArgumentError(f"kd_loss: target is on {target.device} but student_logits on {device}")
    if teacher_logits is None:
        if alpha != 0:
            raise InvalidArgumentError(f"kd_loss: teacher_logits is None, which needs alpha == 0, got alpha={alpha}")
    elif isinstance(teacher_logits, TopKTeacher):
        if teacher_logits.shape != shape[:-1]:
            raise InvalidArgumentError(f"kd_loss: the TopKTeacher must have one row per student row, indices of "
                                       f"shape {tuple(shape[:-1])} + (k,), got {tuple(teacher_logits.indices.shape)}")
        if teacher_logits.k > shape[-1]:
            raise InvalidArgumentError(f"kd_loss: the TopKTeacher's k must be at most the number of classes "
                                       f"{shape[-1]}, got k={teacher_logits.k}")
        if not _same_device(teacher_logits.indices, student_logits, on_cpu):
            raise InvalidArgumentError(f"kd_loss: the TopKTeacher is on {teacher_logits.device} but student_logits "
                                       f"on {device}")
    else:
        if not isinstance(teacher_logits, torch.Tensor) or teacher_logits.dtype not in _FLOAT_DTYPES:
            raise InvalidArgumentError("kd_loss: teacher_logits must be a floating tensor (float32, float16, "
                                       f"bfloat16, float64) or None, got "
                                       f"{getattr(teacher_logits, 'dtype', type(teacher_logits).__name__)}")
        if teacher_logits.shape != shape:
            what = "number of classes C" if teacher_logits.shape[:-1] == shape[:-1] else "shape"
            raise InvalidArgumentError(f"kd_loss: teacher_logits must match student_logits in {what}: student "
                                       f"{tuple(shape)}, teacher {tuple(teacher_logits.shape)}")
        if not _same_device(teacher_logits, student_logits, on_cpu):
            raise InvalidArgumentError(f"kd_loss: teacher_logits is on {teacher_logits.device} but student_logits "
                                       f"on {device}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
            raise InvalidArgumentError("kd_loss: weight must be a floating tensor with one weight per row or None")
        if weight.numel() != target.numel() or (weight.dim() > 1 and weight.shape != target.shape):
            raise InvalidArgumentError(f"kd_loss: weight must have shape {tuple(target.shape)} (one per row), got "
                                       f"{tuple(weight.shape)}")
        if not _same_device(weight, student_logits, on_cpu):
            raise InvalidArgumentError(f"kd_loss: weight is on {weight.device} but student_logits on {device}")
    if inplace and not student_logits.requires_grad:
        raise InvalidArgumentError("kd_loss: inplace=True writes the gradient into student_logits, which must "
                                   "require grad")
    return "cpu" if on_cpu else "cuda" if student_logits.is_cuda else device.type


def _check_topk_use(teacher, C, temperature, divergence, validate):
    """The checks of a TopKTeacher that depend on the call: its temperature, the divergence, ids below C."""
    if teacher.missing == "tail" and teacher.temperature != temperature:
        raise InvalidArgumentError(f"kd_loss: a TopKTeacher with missing='tail' knows its missing mass only at its "
                                   f"capture temperature {teacher.temperature}; pass temperature="
                                   f"{teacher.temperature} (got {temperature}) or use missing='renorm'")
    if divergence == "reverse_kl" and teacher.missing == "renorm" and teacher.k < C:
        raise InvalidArgumentError(f"kd_loss: divergence='reverse_kl' is infinite for a renormalised top-k teacher "
                                   f"(k={teacher.k} < {C} classes: probability 0 where the student has mass); use "
                                   f"missing='tail' or divergence='kl' or 'jsd'")
    if validate:
        check_ids_below(teacher, C, "kd_loss")


def _choose_backend(backend, device_type, student_logits, teacher_logits):
    chosen = resolve_backend(backend, device_type, op="kd_loss")
    if chosen != "torch" and (student_logits.dtype == torch.float64 or (
            teacher_logits is not None and _teacher_dtype(teacher_logits) == torch.float64)):
        if backend is None:
            return "torch"  # float64 is a reference/testing dtype: keep its precision
        raise BackendUnavailableError(f"kd_loss: backend={backend!r} computes in float32; float64 inputs need "
                                      "backend='torch'")
    return chosen


def _teacher_dtype(teacher):
    return teacher.logprobs.dtype if isinstance(teacher, TopKTeacher) else teacher.dtype


def _check_labels(target: torch.Tensor, C: int, ignore_index: int) -> None:
    """Host-synchronising label check (validate on the torch and Triton backends; the C++ kernel checks the
    labels itself). The common case costs one min/max reduction and one read; a failure finds the culprit."""
    if target.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(torch.where(target == ignore_index, 0, target))).tolist()
    if lo >= 0 and hi < C:
        return
    flat = target.reshape(-1)
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= C))
    idx = int(bad.nonzero()[0, 0])
    raise InvalidArgumentError(f"kd_loss: target must hold class indices in [0, {C}) or ignore_index="
                               f"{ignore_index}; row {idx} has {int(flat[idx])} ({int(bad.sum())} bad rows in all)")


# ------------------------------------------------------------------------------------ the preparation
def _prepare(student, teacher, target, weight, inplace, temperature=1.0):
    """The backends' operands, shared by the eager and the compiled paths: (N, C) logits with unit class
    stride (a copy only when the strides demand it), a TopKTeacher as a SparseTeacher of (N, k) rows, int64
    labels, fp32 weights, and the gradient's destination (the student's own memory with inplace=True)."""
    C = student.shape[-1]
    s = student if student.dim() == 2 else student.reshape(-1, C)
    if s.stride(1) != 1 and s.shape[0] > 1:
        if inplace:
            raise InvalidArgumentError("kd_loss: inplace=True needs student_logits whose rows can be viewed as "
                                       f"(N, C) with unit class stride; got strides {tuple(student.stride())}")
        s = s.contiguous()
    if inplace and s.data_ptr() != student.data_ptr():
        raise InvalidArgumentError("kd_loss: inplace=True needs student_logits whose rows can be viewed as (N, C) "
                                   f"with unit class stride; got strides {tuple(student.stride())}")
    t = teacher
    if isinstance(t, TopKTeacher):
        k = t.k
        logprobs = t.logprobs.detach()
        t = SparseTeacher(t.indices.reshape(-1, k).to(torch.int64).contiguous(),
                          logprobs.reshape(-1, k).to(torch.float64 if logprobs.dtype == torch.float64
                                                     else torch.float32).contiguous(),
                          t.temperature / temperature, t.missing == "tail")
    elif t is not None:
        t = t if t.dim() == 2 else t.reshape(-1, C)
        if t.stride(1) != 1 and t.shape[0] > 1:
            t = t.contiguous()
    y = target if target.dim() == 1 else target.reshape(-1)
    if y.dtype != torch.int64:
        y = y.to(torch.int64)
    if not y.is_contiguous():
        y = y.contiguous()
    w = weight
    if w is not None:
        w = w.reshape(-1).to(torch.float32).contiguous()
    return s, t, y, w, (s if inplace else None)


# ---------------------------------------------------------------------------------------- eager autograd
class KDLossFunction(torch.autograd.Function):
    """Autograd wrapper: the forward stores the (pre-scaled) gradient; the backward scales it in place."""

    @staticmethod
    def forward(ctx, student, teacher, target, weight, alpha, temperature, reduction, ignore_index,
                return_stats, backend, inplace, validate, divergence, beta, normalizer):
        need_grad = ctx.needs_input_grad[0]
        s, t, y, w, grad_out = _prepare(student, teacher, target, weight, inplace, temperature)
        loss, grad, stats = _FORWARD[backend](s, t, y, w, alpha, temperature, ignore_index, reduction, need_grad,
                                              return_stats, grad_out, validate, divergence, beta, normalizer)
        if reduction == 0 and target.dim() != 1:
            loss = loss.reshape(target.shape)
        ctx.backend, ctx.grad, ctx.used = backend, grad, False
        ctx.shape = None if grad is None or grad.shape == student.shape else student.shape
        ctx.set_materialize_grads(False)
        if stats is None:
            return loss
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, *_grad_stats):
        if ctx.used:  # the stored gradient was scaled in place already: a second backward would be wrong
            raise RuntimeError("kd_loss: backward ran twice through the same graph; the fused loss keeps one "
                               "gradient buffer and scales it in place (recompute the loss instead of "
                               "retain_graph=True)")
        grad = ctx.grad
        if grad is None or grad_loss is None:
            return _NO_GRADS
        ctx.used, ctx.grad = True, None  # handed over, not kept: .grad accumulation can take it without a copy
        if grad_loss.dim() > 1:  # reduction="none": one value per row, whatever the target's leading dims
            grad_loss = grad_loss.reshape(-1)
        if grad_loss.dtype != torch.float32:
            grad_loss = grad_loss.to(torch.float32)
        _BACKWARD[ctx.backend](grad, grad_loss)
        return (grad if ctx.shape is None else grad.view(ctx.shape),) + _NO_GRADS[1:]


def _eager_function(student, teacher, target, weight, alpha, temperature, reduction, ignore_index, return_stats,
                    backend, inplace, validate, divergence=0, beta=0.5, normalizer=None):
    out = KDLossFunction.apply(student, teacher, target, weight, alpha, temperature, reduction, ignore_index,
                               return_stats, backend, inplace, validate, divergence, beta, normalizer)
    return out if return_stats else (out, None)


def _cpp_autograd(s, t, y, w, alpha, temperature, ignore_index, reduction, return_stats, inplace, validate):
    """The C++ kernel behind an autograd node written in C++, whose backward runs without Python (at small shapes
    the Python node cost more than the arithmetic): (loss, stats or None). The extension checks every tensor and
    raises ValueError (TypeError from the binding for a non-tensor) before any work."""
    loss, stats = _cpp().kd_loss_autograd(s, t, y, w, alpha, temperature, ignore_index, reduction, return_stats,
                                          inplace, validate)
    return loss, (stats if return_stats else None)


def _eager_cpp(student, teacher, target, weight, alpha, temperature, reduction, ignore_index, return_stats,
               backend, inplace, validate):
    """The C++ backend's eager path: the shared preparation, then the C++ autograd node."""
    s, t, y, w, _ = _prepare(student, teacher, target, weight, inplace)
    try:
        loss, stats = _cpp_autograd(s, t, y, w, alpha, temperature, ignore_index, reduction, return_stats, inplace,
                                    validate)
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from None
    if reduction == 0 and target.dim() != 1:
        loss = loss.reshape(target.shape)
    return loss, stats


_EAGER = {"cpp": _eager_cpp}  # backends with their own autograd node; the others use KDLossFunction


def _eager_cpu_direct(student, teacher, target, weight, alpha, temperature, reduction, ignore_index,
                      return_stats, backend, inplace, validate):
    """The C++ backend on inputs it takes as they are (CPU, 2-D, unit class stride, int64 labels, fp32
    weights): the extension checks every tensor itself, so the Python checks and the preparation run only
    when it refuses one. Returns None where it does not apply; the general path then handles the inputs (a
    copy, a conversion, another backend) or raises its error naming the argument. (At 128 x 100 the skipped
    Python is ~3 us of a ~50 us step.)"""
    if (type(student) is not torch.Tensor or not student.is_cpu or (inplace and not student.requires_grad)
            or torch.compiler.is_compiling() or resolve_backend(backend, "cpu", op="kd_loss") != "cpp"):
        return None
    try:
        return _cpp_autograd(student, teacher, target, weight, float(alpha), float(temperature), int(ignore_index),
                             _REDUCTION_CODE[reduction], return_stats, inplace, validate is not False)
    except (ValueError, TypeError):  # refused before any work: the general path says why, or handles it
        return None


# --------------------------------------------------------------------------------------------- the op
def kd_loss(student_logits, teacher_logits, target, *, alpha=0.5, temperature=4.0, reduction="mean",
            ignore_index=-100, weight=None, return_stats=False, backend=None, inplace=False, validate=None,
            extrapolate=False, divergence="kl", beta=0.5, normalizer=None):
    """Fused knowledge-distillation loss: (1 - alpha) * CE + alpha * T^2 * D, forward and backward in one pass.

    Args:
        student_logits: (..., C) float32 / float16 / bfloat16 logits; any strides. Gets the gradient.
        teacher_logits: (..., C) logits of any of those dtypes (no gradient), a `kdfast.TopKTeacher` (k ids and
            log-probabilities per row, never expanded to (..., C)), or None when alpha == 0.
        target: (...) int64 class indices; rows equal to ignore_index contribute nothing.
        alpha: weight of the DISTILLATION term in [0, 1] (0: pure cross-entropy, 1: pure distillation).
        temperature: T > 0, applied to both logits; the KL term is multiplied by T^2 (Hinton et al.).
        reduction: "mean" (over non-ignored rows; 0 if all are ignored), "sum" or "none" (shape of target).
        divergence: D, the distillation term at temperature T: "kl" (KL(teacher || student), the default),
            "reverse_kl" (KL(student || teacher); infinite where the teacher has probability 0 and the
            student not: such a row's loss is +inf and its gradient NaN, and a renormalised TopKTeacher with
            k < C is refused), "jsd" (beta KL(teacher || m) + (1 - beta) KL(student || m), m = beta teacher +
            (1 - beta) student: finite everywhere). See kdfast/losses/reference.py for the formulas.
        beta: the teacher's weight in the jsd mixture, 0 < beta < 1 (ignored by the other divergences).
        normalizer: with reduction="mean", divide the sum by this number (> 0) instead of the count of rows not
            ignored: e.g. the global count of tokens over gradient-accumulation steps or ranks, so every
            token weighs the same.
        weight: optional per-row weights (shape of target), e.g. importance-sampling weights.
        return_stats: also return a dict of (N,) float32 per-example statistics from the same pass:
            ce, kl (the chosen divergence D, without T^2; NaN when teacher_logits is None), el2n =
            ||softmax(s) - onehot(y)||, grad_norm = ||d l_i / d s_i|| (unreduced, weighted), correct (1.0 where
            s_y beats every other logit strictly), margin (s_y minus the largest other logit). Ignored rows get 0.
        backend: "triton", "cpp", "torch" or None (KDFAST_BACKEND, else by device).
        inplace: write the gradient into student_logits' memory instead of a new buffer (saves one N x C
            buffer; student_logits holds the gradient afterwards, and the backward may run once). Eager only:
            under torch.compile it raises (a traced op cannot overwrite its input).
        validate: check that labels are in [0, C) or ignore_index, raising InvalidArgumentError otherwise.
            None (default): on CPU tensors, where the check is free (the C++ kernel checks while it counts
            the labels); not on CUDA tensors, where it would stall the stream with a device-to-host copy:
            there a bad label gives a NaN loss row (and so a NaN loss), never an out-of-bounds read.
            True: check on any device (one synchronisation on CUDA). False: never check. Skipped while
            torch.compile traces or a CUDA graph captures, where a synchronisation cannot run.
        extrapolate: allow any finite alpha (outside [0, 1] the same per-row formula extrapolates past the
            teacher or the labels, as the optimal self-distillation weight may ask for).

    Non-finite logits (the same on every backend): -inf is a legal logit, an impossible class (softmax 0
    there; an infinite loss with a finite gradient when the label or a teacher-supported class sits on it).
    A student row with NaN or +inf, or no finite logit, gets NaN loss, gradient and stats, except correct = 0.
    A teacher row with NaN or +inf, or no finite logit, gets NaN kl, and NaN loss, gradient and grad_norm
    unless alpha == 0.

    Returns:
        loss, or (loss, stats) with return_stats=True.
    """
    _check_scalars(alpha, temperature, reduction, ignore_index, extrapolate, divergence, beta, normalizer)
    args = (student_logits, teacher_logits, target, weight, alpha, temperature, reduction, ignore_index,
            return_stats, backend, inplace, validate)
    if divergence == "kl" and normalizer is None and type(teacher_logits) is not TopKTeacher:
        direct = _eager_cpu_direct(*args)
        loss, stats = direct if direct is not None else _kd_loss_general(*args)
    else:
        loss, stats = _kd_loss_general(*args, divergence, beta, normalizer)
    if not return_stats:
        return loss
    return loss, dict(zip(KD_STAT_NAMES, stats.unbind(0)))


def _kd_loss_general(student_logits, teacher_logits, target, weight, alpha, temperature, reduction, ignore_index,
                     return_stats, backend, inplace, validate, divergence="kl", beta=0.5, normalizer=None):
    """kd_loss on any inputs: the Python checks, the backend choice, then the eager or the traceable path."""
    device_type = _check_tensors(student_logits, teacher_logits, target, alpha, weight, inplace)
    chosen = _choose_backend(backend, device_type, student_logits, teacher_logits)
    if validate is None:
        validate = device_type == "cpu"
    if isinstance(teacher_logits, TopKTeacher):
        _check_topk_use(teacher_logits, student_logits.shape[-1], temperature, divergence,
                        validate and not torch.compiler.is_compiling())
    code, beta = _DIVERGENCE_CODE[divergence], float(beta)
    normalizer = None if normalizer is None else float(normalizer)
    if torch.compiler.is_compiling():
        if inplace:
            raise InvalidArgumentError("kd_loss: inplace=True cannot be honoured under torch.compile (the traced "
                                       "op cannot overwrite its input); pass inplace=False")
        loss, stats = _compiled_kd_loss(student_logits, teacher_logits, target, weight, float(alpha),
                                        float(temperature), _REDUCTION_CODE[reduction], int(ignore_index),
                                        return_stats, chosen, code, beta, normalizer)
    else:
        if validate and device_type == "cuda" and torch.cuda.is_current_stream_capturing():
            validate = False
        args = (student_logits, teacher_logits, target, weight, float(alpha), float(temperature),
                _REDUCTION_CODE[reduction], int(ignore_index), return_stats, chosen, inplace, validate)
        if code == 0 and normalizer is None and not isinstance(teacher_logits, TopKTeacher):
            loss, stats = _EAGER.get(chosen, _eager_function)(*args)
        else:
            loss, stats = _eager_function(*args, code, beta, normalizer)
    return loss, stats


class KDLoss(torch.nn.Module):
    """Module form of `kd_loss`; alpha weights the distillation term (see kd_loss). The configuration is
    checked when the module is built."""

    def __init__(self, alpha=0.5, temperature=4.0, reduction="mean", ignore_index=-100, *, return_stats=False,
                 backend=None, inplace=False, validate=None, extrapolate=False, divergence="kl", beta=0.5):
        super().__init__()
        # Check eagerly, so a bad configuration fails where it is written, not at the first batch.
        _check_scalars(alpha, temperature, reduction, ignore_index, extrapolate, divergence, beta)
        for name, value in (("return_stats", return_stats), ("inplace", inplace)):
            if value not in (True, False):
                raise InvalidArgumentError(f"KDLoss: {name} must be True or False, got {value!r}")
        if validate not in (None, True, False):
            raise InvalidArgumentError(f"KDLoss: validate must be None, True or False, got {validate!r}")
        if backend is not None:
            resolve_backend(backend, None, op="KDLoss")  # the name, and whether it can run here at all
        self.alpha, self.temperature, self.reduction, self.ignore_index = alpha, temperature, reduction, ignore_index
        self.return_stats, self.backend, self.inplace, self.validate = return_stats, backend, inplace, validate
        self.extrapolate, self.divergence, self.beta = extrapolate, divergence, beta

    def forward(self, student_logits, teacher_logits, target, weight=None, normalizer=None):
        """normalizer: the mean's divisor for this call (see kd_loss), e.g. the step's global token count."""
        return kd_loss(student_logits, teacher_logits, target, alpha=self.alpha, temperature=self.temperature,
                       reduction=self.reduction, ignore_index=self.ignore_index, weight=weight,
                       return_stats=self.return_stats, backend=self.backend, inplace=self.inplace,
                       validate=self.validate, extrapolate=self.extrapolate, divergence=self.divergence,
                       beta=self.beta, normalizer=normalizer)

    def extra_repr(self):
        return (f"alpha={self.alpha} (distillation weight), temperature={self.temperature}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, divergence={self.divergence!r}"
                + (f", beta={self.beta}" if self.divergence == "jsd" else ""))


# ------------------------------------------------------------------- torch.library op (torch.compile)
@torch.library.custom_op("kdfast::kd_loss_fwd", mutates_args=())
def _kd_loss_fwd_op(student: torch.Tensor, teacher: torch.Tensor | None, target: torch.Tensor,
                    weight: torch.Tensor | None, alpha: float, temperature: float, ignore_index: int, reduction: int,
                    need_grad: bool, return_stats: bool, backend: str, topk_ids: torch.Tensor | None,
                    topk_ratio: float, topk_tail: bool, divergence: int, beta: float,
                    normalizer: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # a sparse teacher travels as its logprobs (teacher) and ids (topk_ids): an op takes tensors, not tuples
    t = teacher if topk_ids is None else SparseTeacher(topk_ids, teacher, topk_ratio, topk_tail)
    loss, grad, stats = _FORWARD[backend](student, t, target, weight, alpha, temperature, ignore_index,
                                          reduction, need_grad, return_stats, None, False, divergence, beta,
                                          normalizer)
    empty = student.new_empty(0)
    return loss, (grad if grad is not None else empty), (stats if stats is not None else empty.float())


@_kd_loss_fwd_op.register_fake
def _(student, teacher, target, weight, alpha, temperature, ignore_index, reduction, need_grad, return_stats,
      backend, topk_ids, topk_ratio, topk_tail, divergence, beta, normalizer):
    N = student.shape[0]
    loss = student.new_empty((N,) if reduction == 0 else (), dtype=torch.float32)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if need_grad else student.new_empty(0)
    stats = student.new_empty((6, N) if return_stats else (0,), dtype=torch.float32)
    return loss, grad, stats


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _backward_op(ctx, grad_loss, _grad_grad, _grad_stats):
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0 or grad_loss is None:
        return (None,) * 17
    # out of place: a traced graph may replay, so the saved buffer is never scaled in place
    go = grad_loss.to(torch.float32)
    scaled = grad * (go if go.dim() == 0 else go.reshape(-1, 1))
    return (scaled.to(grad.dtype),) + (None,) * 16


torch.library.register_autograd("kdfast::kd_loss_fwd", _backward_op, setup_context=_setup_context)


def _compiled_kd_loss(student, teacher, target, weight, alpha, temperature, reduction, ignore_index,
                      return_stats, backend, divergence, beta, normalizer):
    """The traceable path: the same preparation and backends behind a custom op that torch.compile and CUDA
    graphs capture (no label check: it would need a host synchronisation)."""
    s, t, y, w, _ = _prepare(student, teacher.detach() if teacher is not None else None, target,
                             weight.detach() if weight is not None else None, False, temperature)
    sparse = isinstance(t, SparseTeacher)
    loss, grad, stats = _kd_loss_fwd_op(s, t.logprobs if sparse else t, y, w, alpha, temperature, ignore_index,
                                        reduction, student.requires_grad, return_stats, backend,
                                        t.ids if sparse else None, t.ratio if sparse else 1.0,
                                        t.tail if sparse else False, divergence, beta, normalizer)
    if reduction == 0:
        loss = loss.reshape(target.shape)
    return loss, (stats if return_stats else None)
