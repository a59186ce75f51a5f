"""The fused knowledge-distillation loss: argument checks, backend dispatch, autograd, torch.library op.

    loss = kd_loss(student_logits, teacher_logits, target, alpha=0.5, temperature=4.0)

Per row i:  l_i = w_i * ((1 - alpha) * CE(s_i, y_i) + alpha * T^2 * KL(softmax(t_i/T) || softmax(s_i/T))).

ALPHA IS THE WEIGHT OF THE DISTILLATION TERM (the data-pruning paper's convention): alpha=0 is plain
cross-entropy, alpha=1 pure distillation. Some libraries weight the ground truth with alpha instead; pass
1 - their alpha.

Every backend's forward computes the loss rows, the gradient w.r.t. the student logits (already scaled by
the reduction) and the per-example statistics in one pass over the logits; the backward only multiplies
the stored gradient by the incoming one, in place, and does nothing when that is exactly 1.
"""
from __future__ import annotations

import torch

from ..dispatch import cpp_module, resolve_backend
from ..errors import BackendUnavailableError, InvalidArgumentError
from ..reference.kd_loss import KD_STAT_NAMES, kd_loss_fwd_torch

REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------------------------- backends
def _fwd_triton(*args, **kwargs):
    from ..kernels.kd_loss import kd_loss_fwd
    return kd_loss_fwd(*args, **kwargs)


def _bwd_triton(grad, grad_output):
    from ..kernels.kd_loss import kd_loss_bwd
    kd_loss_bwd(grad, grad_output)


def _fwd_cpp(student, teacher, target, weight, grad_scale, alpha, temperature, ignore_index, need_grad,
             return_stats, grad_out):
    rows, grad, stats = cpp_module().kd_loss_fwd(student, teacher, target, weight, grad_scale, alpha,
                                                 temperature, ignore_index, need_grad, return_stats, grad_out)
    return rows, (grad if need_grad else None), (stats if return_stats else None)


def _bwd_cpp(grad, grad_output):
    cpp_module().kd_loss_bwd(grad, grad_output)


def _bwd_torch(grad, grad_output):
    grad.mul_(grad_output if grad_output.dim() == 0 else grad_output.reshape(-1, 1))


_FORWARD = {"triton": _fwd_triton, "cpp": _fwd_cpp, "torch": kd_loss_fwd_torch}
_BACKWARD = {"triton": _bwd_triton, "cpp": _bwd_cpp, "torch": _bwd_torch}


# ----------------------------------------------------------------------------------------------- checks
def _check_args(student_logits, teacher_logits, target, alpha, temperature, reduction, weight, backend,
                inplace):
    """Metadata-only checks (no host synchronisation); returns the backend to use."""
    if not isinstance(student_logits, torch.Tensor):
        raise InvalidArgumentError(f"kd_loss: student_logits must be a tensor, got {type(student_logits).__name__}")
    if student_logits.dtype not in _FLOAT_DTYPES:
        raise InvalidArgumentError(
            f"kd_loss: student_logits must be float32, float16, bfloat16 or float64, got {student_logits.dtype}")
    if student_logits.dim() < 1:
        raise InvalidArgumentError("kd_loss: student_logits must have shape (..., C), got a 0-d tensor")
    if not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise InvalidArgumentError(f"kd_loss: alpha must be a number in [0, 1] (the weight of the distillation "
                                   f"term), got {alpha!r}")
    if not isinstance(temperature, (int, float)) or not float(temperature) > 0.0 or temperature == float("inf"):
        raise InvalidArgumentError(f"kd_loss: temperature must be a finite number > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise InvalidArgumentError(f"kd_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    C = student_logits.shape[-1]
    lead = tuple(student_logits.shape[:-1])
    if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32):
        raise InvalidArgumentError(f"kd_loss: target must be an int64 (or int32) tensor of class indices, got "
                                   f"{target.dtype if isinstance(target, torch.Tensor) else type(target).__name__}")
    if tuple(target.shape) != lead:
        raise InvalidArgumentError(f"kd_loss: target must have shape {lead} (student_logits without its class "
                                   f"dimension), got {tuple(target.shape)}")
    if target.device != student_logits.device:
        raise InvalidArgumentError(f"kd_loss: target is on {target.device} but student_logits on "
                                   f"{student_logits.device}")
    if teacher_logits is None:
        if alpha != 0:
            raise InvalidArgumentError(f"kd_loss: teacher_logits is None, which needs alpha == 0, got alpha={alpha}")
    else:
        if not isinstance(teacher_logits, torch.Tensor) or teacher_logits.dtype not in _FLOAT_DTYPES:
            raise InvalidArgumentError("kd_loss: teacher_logits must be a floating tensor (float32, float16, "
                                       f"bfloat16, float64) or None, got "
                                       f"{getattr(teacher_logits, 'dtype', type(teacher_logits).__name__)}")
        if teacher_logits.shape != student_logits.shape:
            what = "number of classes C" if teacher_logits.shape[:-1] == student_logits.shape[:-1] else "shape"
            raise InvalidArgumentError(f"kd_loss: teacher_logits must match student_logits in {what}: student "
                                       f"{tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}")
        if teacher_logits.device != student_logits.device:
            raise InvalidArgumentError(f"kd_loss: teacher_logits is on {teacher_logits.device} but student_logits "
                                       f"on {student_logits.device}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
            raise InvalidArgumentError("kd_loss: weight must be a floating tensor with one weight per row or None")
        if weight.numel() != target.numel() or (weight.dim() > 1 and tuple(weight.shape) != lead):
            raise InvalidArgumentError(f"kd_loss: weight must have shape {lead} (one per row), got "
                                       f"{tuple(weight.shape)}")
        if weight.device != student_logits.device:
            raise InvalidArgumentError(f"kd_loss: weight is on {weight.device} but student_logits on "
                                       f"{student_logits.device}")
    if inplace and not student_logits.requires_grad:
        raise InvalidArgumentError("kd_loss: inplace=True writes the gradient into student_logits, which must "
                                   "require grad")
    chosen = resolve_backend(backend, student_logits.device, op="kd_loss")
    wide = student_logits.dtype == torch.float64 or (teacher_logits is not None
                                                     and teacher_logits.dtype == torch.float64)
    if wide and chosen != "torch":
        if backend is None:
            return "torch"  # float64 is a reference/testing dtype: keep its precision
        raise BackendUnavailableError(f"kd_loss: backend={backend!r} computes in float32; float64 inputs need "
                                      "backend='torch'")
    return chosen


def _check_labels(target: torch.Tensor, C: int, ignore_index: int) -> None:
    """Host-synchronising label check (validate=True); kernels mask bad labels either way (NaN rows).

    The common case costs one min/max reduction and one read; only a failure looks for the culprit.
    """
    lo, hi = torch.stack(torch.aminmax(torch.where(target == ignore_index, 0, target))).tolist()
    if lo >= 0 and hi < C:
        return
    flat = target.reshape(-1)
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= C))
    idx = int(bad.nonzero()[0, 0])
    raise InvalidArgumentError(f"kd_loss: target must hold class indices in [0, {C}) or ignore_index="
                               f"{ignore_index}; row {idx} has {int(flat[idx])} ({int(bad.sum())} bad rows in all)")


def _can_synchronise(x: torch.Tensor) -> bool:
    """False while torch.compile traces or a CUDA graph captures: a host read would break either."""
    if torch.compiler.is_compiling():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _as_rows(x: torch.Tensor, C: int) -> torch.Tensor:
    """(N, C) view with unit column stride (a copy only when the strides demand it)."""
    x = x.reshape(-1, C)
    return x if x.stride(1) == 1 or x.shape[0] == 0 else x.contiguous()


# ---------------------------------------------------------------------------------------- the forward
def _forward(backend, student, teacher, target, weight, alpha, temperature, reduction, ignore_index,
             need_grad, return_stats, inplace):
    """Runs the backend on flattened rows; returns (loss, grad or None, stats (6, N) or None)."""
    C = student.shape[-1]
    s = _as_rows(student, C)
    if inplace and s.data_ptr() != student.data_ptr():
        raise InvalidArgumentError("kd_loss: inplace=True needs student_logits whose rows can be viewed as "
                                   "(N, C) with unit class stride; got strides "
                                   f"{tuple(student.stride())}")
    t = None if teacher is None else _as_rows(teacher.detach(), C)
    y = target.reshape(-1)
    y = y.to(torch.int64) if y.dtype != torch.int64 else y.contiguous()
    w = None if weight is None else weight.detach().reshape(-1).to(torch.float32).contiguous()
    grad_scale, options = None, {}
    if reduction == "mean":
        if backend == "triton":  # the kernel counts the labels and fills grad_scale itself: four launches fewer
            grad_scale, options = torch.empty((), dtype=torch.float32, device=y.device), {"count_valid": True}
        else:
            grad_scale = (y != ignore_index).sum(dtype=torch.float32).clamp_(min=1).reciprocal_()
    grad_out = s.detach() if inplace else None
    rows, grad, stats = _FORWARD[backend](s.detach(), t, y, w, grad_scale, float(alpha), float(temperature),
                                          int(ignore_index), need_grad, return_stats, grad_out, **options)
    if reduction == "none":
        loss = rows.reshape(target.shape)
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() * grad_scale
    return loss, grad, stats


class KDLossFunction(torch.autograd.Function):
    """Autograd wrapper: the forward stores the (pre-scaled) gradient; the backward scales it in place."""

    @staticmethod
    def forward(ctx, student, teacher, target, weight, alpha, temperature, reduction, ignore_index,
                return_stats, backend, inplace):
        need_grad = ctx.needs_input_grad[0]
        loss, grad, stats = _forward(backend, student, teacher, target, weight, alpha, temperature, reduction,
                                     ignore_index, need_grad, return_stats, inplace)
        ctx.backend, ctx.shape, ctx.used = backend, student.shape, False
        ctx.grad = grad
        if stats is not None:
            ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        if ctx.grad is None:
            return (None,) * 11
        if ctx.used:  # the stored gradient was scaled in place already: a second backward would be wrong
            raise RuntimeError("kd_loss: backward ran twice through the same graph; the fused loss keeps one "
                               "gradient buffer and scales it in place (recompute the loss instead of "
                               "retain_graph=True)")
        ctx.used = True
        grad_output = grad_loss.detach().to(torch.float32)
        # reduction="none": one value per row, whatever the leading dims of the target were
        _BACKWARD[ctx.backend](ctx.grad, grad_output.reshape(-1) if grad_output.dim() else grad_output)
        return (ctx.grad.view(ctx.shape),) + (None,) * 10


def kd_loss(student_logits, teacher_logits, target, *, alpha=0.5, temperature=4.0, reduction="mean",
            ignore_index=-100, weight=None, return_stats=False, backend=None, inplace=False, validate=True):
    """Fused knowledge-distillation loss: (1 - alpha) * CE + alpha * T^2 * KL, forward and backward in one pass.

    Args:
        student_logits: (..., C) float32 / float16 / bfloat16 logits; any strides. Gets the gradient.
        teacher_logits: (..., C) logits of any of those dtypes (no gradient), or None when alpha == 0.
        target: (...) int64 class indices; rows equal to ignore_index contribute nothing.
        alpha: weight of the DISTILLATION term in [0, 1] (0: pure cross-entropy, 1: pure distillation).
        temperature: T > 0, applied to both logits; the KL term is multiplied by T^2 (Hinton et al.).
        reduction: "mean" (over non-ignored rows; 0 if all are ignored), "sum" or "none" (shape of target).
        weight: optional per-row weights (shape of target), e.g. importance-sampling weights.
        return_stats: also return a dict of (N,) float32 per-example statistics from the same pass:
            ce, kl (NaN when teacher_logits is None), el2n = ||softmax(s) - onehot(y)||, grad_norm =
            ||d l_i / d s_i|| (unreduced, weighted), correct (1.0 where s_y beats every other logit
            strictly), margin (s_y minus the largest other logit). Ignored rows get 0.
        backend: "triton", "cpp", "torch" or None (KDFAST_BACKEND, else by device).
        inplace: write the gradient into student_logits' memory instead of a new buffer (saves one N x C
            buffer; student_logits holds the gradient afterwards, and the backward may run once).
        validate: check on the host that labels are in [0, C) or ignore_index (one synchronisation).
            Skipped while torch.compile traces or a CUDA graph captures, where a synchronisation cannot run.
            Without it a bad label yields a NaN loss row, never an out-of-bounds read.

    Returns:
        loss, or (loss, stats) with return_stats=True.
    """
    chosen = _check_args(student_logits, teacher_logits, target, alpha, temperature, reduction, weight, backend,
                         inplace)
    if validate and target.numel() and _can_synchronise(target):
        _check_labels(target, student_logits.shape[-1], ignore_index)
    if torch.compiler.is_compiling():
        loss, stats = _compiled_kd_loss(student_logits, teacher_logits, target, weight, alpha, temperature,
                                        reduction, ignore_index, return_stats, chosen)
    else:
        loss, stats = KDLossFunction.apply(student_logits, teacher_logits, target, weight, alpha, temperature,
                                           reduction, ignore_index, return_stats, chosen, inplace)
    if not return_stats:
        return loss
    return loss, dict(zip(KD_STAT_NAMES, stats.unbind(0)))


class KDLoss(torch.nn.Module):
    """Module form of `kd_loss`; alpha weights the distillation term (see kd_loss)."""

    def __init__(self, alpha=0.5, temperature=4.0, reduction="mean", ignore_index=-100, *, return_stats=False,
                 backend=None, inplace=False, validate=True):
        super().__init__()
        # Check eagerly, so a bad configuration fails where it is written, not at the first batch.
        _check_args(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64), alpha,
                    temperature, reduction, None, None, False)
        self.alpha, self.temperature, self.reduction, self.ignore_index = alpha, temperature, reduction, ignore_index
        self.return_stats, self.backend, self.inplace, self.validate = return_stats, backend, inplace, validate

    def forward(self, student_logits, teacher_logits, target, weight=None):
        return kd_loss(student_logits, teacher_logits, target, alpha=self.alpha, temperature=self.temperature,
                       reduction=self.reduction, ignore_index=self.ignore_index, weight=weight,
                       return_stats=self.return_stats, backend=self.backend, inplace=self.inplace,
                       validate=self.validate)

    def extra_repr(self):
        return (f"alpha={self.alpha} (distillation weight), temperature={self.temperature}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}")


# ------------------------------------------------------------------- torch.library op (torch.compile)
@torch.library.custom_op("kdfast::kd_loss_fwd", mutates_args=())
def _kd_loss_fwd_op(student: torch.Tensor, teacher: torch.Tensor | None, target: torch.Tensor,
                    weight: torch.Tensor | None, grad_scale: torch.Tensor | None, alpha: float, temperature: float,
                    ignore_index: int, need_grad: bool, return_stats: bool,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, grad, stats = _FORWARD[backend](student, teacher, target, weight, grad_scale, alpha, temperature,
                                          ignore_index, need_grad, return_stats, None)
    empty = student.new_empty(0)
    return rows, (grad if grad is not None else empty), (stats if stats is not None else empty.float())


@_kd_loss_fwd_op.register_fake
def _(student, teacher, target, weight, grad_scale, alpha, temperature, ignore_index, need_grad, return_stats,
      backend):
    N = student.shape[0]
    rows = student.new_empty(N, dtype=torch.float32)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if need_grad else student.new_empty(0)
    stats = student.new_empty((6, N) if return_stats else (0,), dtype=torch.float32)
    return rows, grad, stats


@torch.library.custom_op("kdfast::kd_loss_bwd_", mutates_args=("grad",))
def _kd_loss_bwd_op(grad: torch.Tensor, grad_output: torch.Tensor, backend: str) -> None:
    _BACKWARD[backend](grad, grad_output)


@_kd_loss_bwd_op.register_fake
def _(grad, grad_output, backend):
    return None


def _setup_context(ctx, inputs, output):
    ctx.backend = inputs[-1]
    ctx.save_for_backward(output[1])


def _backward_op(ctx, grad_rows, _grad_grad, _grad_stats):
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0:
        return (None,) * 11
    grad = grad.clone()  # a traced graph may replay; never scale the saved buffer twice
    _kd_loss_bwd_op(grad, grad_rows.to(torch.float32), ctx.backend)
    return (grad,) + (None,) * 10


torch.library.register_autograd("kdfast::kd_loss_fwd", _backward_op, setup_context=_setup_context)


def _compiled_kd_loss(student, teacher, target, weight, alpha, temperature, reduction, ignore_index,
                      return_stats, backend):
    """The traceable path: the same backends behind a custom op that torch.compile/CUDA graphs capture."""
    C = student.shape[-1]
    s = _as_rows(student, C)
    t = None if teacher is None else _as_rows(teacher.detach(), C)
    y = target.reshape(-1).to(torch.int64)
    w = None if weight is None else weight.detach().reshape(-1).to(torch.float32)
    # rows carries the autograd edge and the reduction is ordinary torch ops, so the reduction's factor
    # (1 for sum, 1/n_valid for mean) arrives per row in the backward: the op stores the unscaled gradient.
    rows, _, stats = _kd_loss_fwd_op(s, t, y, w, None, float(alpha), float(temperature), int(ignore_index),
                                     student.requires_grad, return_stats, backend)
    stats = stats if return_stats else None
    if reduction == "none":
        return rows.reshape(target.shape), stats
    if reduction == "sum":
        return rows.sum(), stats
    return rows.sum() / (y != ignore_index).sum().clamp(min=1), stats
