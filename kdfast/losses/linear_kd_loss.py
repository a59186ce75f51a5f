"""The fused-linear KD loss: the student's output layer and the KD loss together, never N x V logits at once.

    loss = linear_kd_loss(hidden, lm_head.weight, target, teacher)     # hidden (..., H), weight (V, H)

The student's logits z = h @ W.T (+ b) (with softcap: cap * tanh(z / cap), Gemma's soft capping) are made
for one chunk of tokens at a time; `kd_loss` turns each chunk into its loss and the gradient w.r.t. the chunk's
logits (its fused kernels, written into the chunk's own buffer), and that gradient is pushed through the
linear layer at once: grad_h[chunk] = g @ W, grad_W += g.T @ h[chunk], grad_b += sum(g). The forward thus
leaves the finished gradients behind and the backward only scales them (the pattern of Liger-Kernel's chunked
losses), so the extra memory is one chunk's logits (x2 with a linear teacher or a softcap) plus grad_W: O(chunk
x V + V x H), whatever the number of tokens N.

reduction="none" cannot store gradients in the forward (each row's upstream gradient is unknown until the
backward, and grad_W mixes rows), so its backward runs the chunk pass once more with the rows weighted by
their upstream gradient.

The teacher is dense logits (N, V), a `LinearTeacher` (its logits made per chunk, without gradient), a
`TopKTeacher` (k ids and log-probabilities per token, sliced per chunk, never expanded to V) or None with
alpha=0 (plain cross-entropy through the fused head).
"""
from __future__ import annotations

import numbers

import torch

from kdfast.runtime.checks import finite, positive_int
from kdfast.runtime.dispatch import resolve_backend
from kdfast.errors import InvalidArgumentError
from kdfast.losses.reference import KD_STAT_NAMES
from kdfast.losses.kd_loss import REDUCTIONS, kd_loss
from kdfast.losses.topk_teacher import TopKTeacher, check_ids_below

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Default chunk: the largest power of two of rows whose logits hold at most this many values. On the CPU 2^23
# (32 MiB of fp32 logits: 256 rows at V = 32000) keeps the extra memory a small fraction of the N x V
# composition and its time within a few percent of it (bench/results/NOTES.md). On CUDA each chunk re-reads W for its
# three matmuls, so the chunk must be tall enough for them to stay compute-bound: 2^25 (256 rows at
# V = 128256, 1024 at V = 32000), still a few hundred MB at LLM vocabularies.
_CHUNK_LOGITS = {"cpu": 2 ** 23, "cuda": 2 ** 25}
_MIN_CHUNK = 16


def default_chunk_size(vocab_size: int, device_type: str) -> int:
    """Rows per chunk for a vocabulary of `vocab_size`: a power of two, at least _MIN_CHUNK."""
    budget = _CHUNK_LOGITS.get(device_type, _CHUNK_LOGITS["cuda"])
    rows = max(1, budget // max(1, vocab_size))
    return max(_MIN_CHUNK, 1 << (rows.bit_length() - 1))


def _err(message):
    return InvalidArgumentError(f"linear_kd_loss: {message}")


class LinearTeacher:
    """A teacher given by its last hidden states and output layer: logits = hidden @ weight.T (+ bias), made
    chunk by chunk inside `linear_kd_loss` (never N x V at once) and never differentiated."""

    def __init__(self, hidden, weight, bias=None):
        for name, x in (("hidden", hidden), ("weight", weight)):
            if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
                raise InvalidArgumentError(f"LinearTeacher: {name} must be a floating tensor, got "
                                           f"{getattr(x, 'dtype', type(x).__name__)}")
        if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
            raise InvalidArgumentError(f"LinearTeacher: hidden (..., H) and weight (V, H) must share H, got hidden "
                                       f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
        if hidden.dtype != weight.dtype or hidden.device != weight.device:
            raise InvalidArgumentError(f"LinearTeacher: hidden and weight must share dtype and device, got "
                                       f"{hidden.dtype} on {hidden.device} and {weight.dtype} on {weight.device}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)
                                 or bias.dtype != weight.dtype or bias.device != weight.device):
            raise InvalidArgumentError(f"LinearTeacher: bias must be a ({weight.shape[0]},) tensor of the weight's "
                                       f"dtype and device or None, got {getattr(bias, 'shape', type(bias).__name__)}")
        self.hidden = hidden.detach().reshape(-1, hidden.shape[-1])
        self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()

    @property
    def shape(self):
        """(N, V): the shape of the logits it stands for."""
        return (self.hidden.shape[0], self.weight.shape[0])

    def logits(self, start: int, stop: int) -> torch.Tensor:
        """Logits of rows [start, stop)."""
        with torch.no_grad():
            h = self.hidden[start:stop]
            return h @ self.weight.t() if self.bias is None else torch.addmm(self.bias, h, self.weight.t())

    def __repr__(self):
        return f"LinearTeacher(N={self.shape[0]}, V={self.shape[1]}, H={self.hidden.shape[1]})"


# ----------------------------------------------------------------------------------------------- checks
def _check(h, W, b, target, teacher, weight, reduction, normalizer, softcap, chunk_size, return_stats):
    """Metadata checks (no host synchronisation); returns (N, V)."""
    for name, x in (("student_hidden", h), ("student_weight", W)):
        if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
            raise _err(f"{name} must be a float32, float16, bfloat16 or float64 tensor, got "
                       f"{getattr(x, 'dtype', type(x).__name__)}")
    if h.dim() < 1 or W.dim() != 2 or h.shape[-1] != W.shape[1]:
        raise _err(f"student_hidden (..., H) and student_weight (V, H) must share H, got student_hidden "
                   f"{tuple(h.shape)} and student_weight {tuple(W.shape)}")
    if W.dtype != h.dtype or W.device != h.device:
        raise _err(f"student_weight must have student_hidden's dtype and device ({h.dtype} on {h.device}), got "
                   f"{W.dtype} on {W.device}")
    V = W.shape[0]
    if b is not None and (not isinstance(b, torch.Tensor) or b.shape != (V,) or b.dtype != h.dtype
                          or b.device != h.device):
        raise _err(f"student_bias must be a ({V},) tensor of student_hidden's dtype and device or None, got "
                   f"{getattr(b, 'shape', type(b).__name__)} {getattr(b, 'dtype', '')}")
    rows = tuple(h.shape[:-1])
    if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32):
        raise _err(f"target must be an int64 (or int32) tensor of token ids, got "
                   f"{getattr(target, 'dtype', type(target).__name__)}")
    if tuple(target.shape) != rows or target.device != h.device:
        raise _err(f"target must have shape {rows} (student_hidden without H) on {h.device}, got "
                   f"{tuple(target.shape)} on {target.device}")
    N = target.numel()
    if isinstance(teacher, LinearTeacher):
        if teacher.shape != (N, V) or teacher.hidden.device != h.device:
            raise _err(f"teacher (LinearTeacher) must make ({N}, {V}) logits on {h.device} (one row per token, the "
                       f"student's vocabulary), got {teacher.shape} on {teacher.hidden.device}")
    elif isinstance(teacher, TopKTeacher):
        if tuple(teacher.shape) != rows or teacher.k > V or teacher.device != h.device:
            raise _err(f"teacher (TopKTeacher) must have one row per token {rows}, k <= V = {V}, on {h.device}; got "
                       f"rows {tuple(teacher.shape)}, k = {teacher.k}, on {teacher.device}")
    elif isinstance(teacher, torch.Tensor):
        if tuple(teacher.shape) != rows + (V,) or teacher.device != h.device:
            raise _err(f"teacher logits must have shape {rows + (V,)} on {h.device}, got {tuple(teacher.shape)} on "
                       f"{teacher.device}")
    elif teacher is not None:
        raise _err(f"teacher must be dense logits (a tensor), a LinearTeacher, a TopKTeacher or None, got "
                   f"{type(teacher).__name__}")
    if weight is not None and (not isinstance(weight, torch.Tensor) or weight.numel() != N):
        raise _err(f"weight must be a tensor with one weight per token ({N}) or None, got "
                   f"{getattr(weight, 'shape', type(weight).__name__)}")
    if reduction not in REDUCTIONS:
        raise _err(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if normalizer is not None:
        if reduction != "mean":
            raise _err(f"normalizer divides the sum of reduction='mean'; got reduction={reduction!r}")
        value = normalizer if isinstance(normalizer, numbers.Real) and not isinstance(normalizer, bool) else None
        if isinstance(normalizer, torch.Tensor) and normalizer.numel() == 1:
            value = float(normalizer)  # (one host read: a count is usually already on the host)
        if value is None or not 0 < value < float("inf"):
            raise _err(f"normalizer must be a finite number > 0 (e.g. the global count of non-ignored tokens), got "
                       f"{normalizer!r}")
    problem = (softcap is not None and finite("softcap", softcap, low=0.0, expected="a finite number > 0 or None")) or \
        (chunk_size is not None and positive_int("chunk_size", chunk_size, "a positive int or None (chosen from V)"))
    if problem:
        raise _err(problem.text())
    if return_stats not in (True, False):
        raise _err(f"return_stats must be True or False, got {return_stats!r}")
    return N, V


def _check_target(target, V, ignore_index):
    """Token ids in [0, V) or ignore_index (one host read; the chunks' kd_loss calls then skip the check)."""
    flat = target.reshape(-1)
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= V))
    if flat.numel() and bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        raise _err(f"target must hold token ids in [0, {V}) or ignore_index={ignore_index}; token {idx} has "
                   f"{int(flat[idx])} ({int(bad.sum())} bad tokens in all)")


# ------------------------------------------------------------------------------------------ the chunk pass
def _teacher_rows(teacher, start, stop):
    """The teacher of tokens [start, stop): dense rows, a LinearTeacher's logits, a TopKTeacher's rows."""
    if isinstance(teacher, LinearTeacher):
        return teacher.logits(start, stop)
    if isinstance(teacher, TopKTeacher):
        return TopKTeacher(teacher.indices[start:stop], teacher.logprobs[start:stop], temperature=teacher.temperature,
                           missing=teacher.missing, validate=False)
    return None if teacher is None else teacher[start:stop]


def _chunk_logits(h, W, b, softcap):
    """(logits, tanh or None): the chunk's logits in their own buffer (the kd_loss gradient overwrites them)."""
    z = torch.mm(h, W.t()) if b is None else torch.addmm(b, h, W.t())
    if softcap is None:
        return z, None
    tanh = z.div_(softcap).tanh_()
    return tanh * softcap, tanh


def _chunk_pass(h, W, b, teacher, y, w, cfg, chunk, need, rows, return_stats):
    """One pass over the token chunks.

    need = (grad_h, grad_W, grad_b) wanted; rows: per-token losses (reduction none) instead of their sum.
    Returns (loss, grad_h, grad_W, grad_b, stats (6, N) or None); the gradients are those of the summed loss
    (w included), in the inputs' dtypes (grad_W and grad_b accumulate in place: no V x H temporary)."""
    N = h.shape[0]
    any_grad = any(need)
    dense = torch.contiguous_format  # (grad_h is written by row slices)
    grad_h = torch.empty_like(h, memory_format=dense) if need[0] else None
    grad_W = torch.zeros_like(W, memory_format=dense) if need[1] else None
    grad_b = torch.zeros_like(b) if need[2] else None
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    loss = h.new_empty(N, dtype=acc) if rows else h.new_zeros((), dtype=acc)
    stats = h.new_empty((len(KD_STAT_NAMES), N), dtype=torch.float32) if return_stats else None
    for start in range(0, max(N, 1), chunk):  # N = 0: one empty chunk, so the result has kd_loss's form
        stop = min(start + chunk, N)
        h_c = h[start:stop]
        z, tanh = _chunk_logits(h_c, W, b, cfg["softcap"])
        t = _teacher_rows(teacher, start, stop)
        with torch.enable_grad():  # (an autograd.Function's forward runs without grad mode)
            z.requires_grad_(any_grad)
            out = kd_loss(z, t, y[start:stop], weight=None if w is None else w[start:stop],
                          reduction="none" if rows else "sum", return_stats=return_stats, inplace=any_grad,
                          validate=False, **cfg["kd"])
            loss_c, stats_c = out if return_stats else (out, None)
            if any_grad:  # the gradient is already in z's memory; the backward only hands it over
                (g,) = torch.autograd.grad(loss_c, z)
        del t
        if rows:
            loss[start:stop] = loss_c
        else:
            loss += loss_c.detach()
        if stats is not None:
            for i, name in enumerate(KD_STAT_NAMES):
                stats[i, start:stop] = stats_c[name]
        if not any_grad:
            continue
        if tanh is not None:  # d cap*tanh(z/cap) / dz = 1 - tanh^2
            g = tanh.square_().neg_().add_(1).mul_(g)
        if need[0]:
            torch.mm(g, W, out=grad_h[start:stop])
        if need[1]:
            grad_W.addmm_(g.t(), h_c)
        if need[2]:
            grad_b += g.sum(0)
    return loss, grad_h, grad_W, grad_b, stats


def _scaled(x, scale):
    return None if x is None else x.mul_(scale)


class LinearKDLossFunction(torch.autograd.Function):
    """sum / mean: the forward leaves the finished gradients, the backward scales them. none: the backward
    runs the chunk pass again, each row weighted by its upstream gradient."""

    @staticmethod
    def forward(ctx, h, W, b, teacher, y, w, reduction, normalizer, cfg, chunk, return_stats):
        need = ctx.needs_input_grad[:3]
        ctx.set_materialize_grads(False)
        ctx.used = False
        if reduction == "none":
            loss, _, _, _, stats = _chunk_pass(h, W, b, teacher, y, w, cfg, chunk, (False,) * 3, True,
                                               return_stats)
            ctx.save_for_backward(h, W, b)
            ctx.teacher, ctx.y, ctx.w, ctx.cfg, ctx.chunk, ctx.need = teacher, y, w, cfg, chunk, need
            ctx.grads = None
        else:
            loss, gh, gW, gb, stats = _chunk_pass(h, W, b, teacher, y, w, cfg, chunk, need, False, return_stats)
            if reduction == "mean":
                count = normalizer if normalizer is not None else \
                    (y != cfg["kd"]["ignore_index"]).sum().clamp(min=1).to(loss.dtype)
                loss, gh, gW, gb = loss / count, _scaled(gh, 1 / count), _scaled(gW, 1 / count), _scaled(gb, 1 / count)
            ctx.grads = (gh, gW, gb)
        loss = loss.to(torch.float32)
        if stats is None:
            return loss
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, *_grad_stats):
        none = (None,) * 8
        if grad_loss is None:
            return (None, None, None) + none
        if ctx.used:
            raise RuntimeError("linear_kd_loss: backward ran twice through the same graph; the fused loss hands its "
                               "stored gradients over once (recompute the loss instead of retain_graph=True)")
        ctx.used = True
        if ctx.grads is None:  # reduction none: the rows weighted by their upstream gradient
            h, W, b = ctx.saved_tensors
            go = grad_loss.reshape(-1).to(torch.float32)
            w = go if ctx.w is None else go * ctx.w
            _, gh, gW, gb, _ = _chunk_pass(h, W, b, ctx.teacher, ctx.y, w, ctx.cfg, ctx.chunk, ctx.need, False, False)
            return (gh, gW, gb) + none
        grads, ctx.grads = ctx.grads, None
        if not (grad_loss.device.type == "cpu" and float(grad_loss) == 1.0):
            grads = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)
        return grads + none


# --------------------------------------------------------------------------------------------- the op
def linear_kd_loss(student_hidden, student_weight, target, teacher, *, student_bias=None, alpha=0.5,
                   temperature=4.0, reduction="mean", ignore_index=-100, weight=None, divergence="kl", beta=0.5,
                   normalizer=None, softcap=None, chunk_size=None, return_stats=False, backend=None, validate=None):
    """KD loss of a linear output layer, its logits made chunk by chunk over the tokens (never N x V at once).

    Args:
        student_hidden: (..., H) float32 / float16 / bfloat16 / float64 hidden states (the input of the LM head).
        student_weight: (V, H) output weights of the same dtype; student_bias: (V,) or None.
        target: (...) int64 token ids (shifted labels); tokens equal to ignore_index contribute nothing.
        teacher: dense logits (..., V), a LinearTeacher(hidden, weight, bias), a TopKTeacher (ids, logprobs:
            (..., k)), or None with alpha=0.
        alpha, temperature, ignore_index, weight, divergence, beta: as in kd_loss (alpha weights the
            distillation term D, "kl", "reverse_kl" or "jsd", which carries T^2).
        reduction: "mean" (over non-ignored tokens, or divided by `normalizer`; 0 when all are ignored), "sum"
            or "none" (shape of target).
        normalizer: with reduction="mean", divide the sum by this count instead (e.g. the number of
            non-ignored tokens across the gradient-accumulation steps or ranks), a number > 0.
        softcap: the student's logits are cap * tanh(z / cap) (Gemma's soft capping), or None.
        chunk_size: tokens per chunk; None chooses from V (default_chunk_size: a fixed budget of logits).
        return_stats: also return kd_loss's per-token statistics dict (ce, kl, el2n, grad_norm, correct,
            margin; (N,) float32, N = target.numel()), grad_norm of the loss w.r.t. the (capped) logits.
        backend: kd_loss's backend for every chunk ("triton", "cpp", "torch" or None: by device).
        validate: check the token ids and a TopKTeacher's ids against V (one host read each); None: on CPU
            tensors only (as kd_loss).

    Returns:
        loss, or (loss, stats) with return_stats=True. The gradients reach student_hidden, student_weight and
        student_bias; the teacher gets none.
    """
    N, V = _check(student_hidden, student_weight, student_bias, target, teacher, weight, reduction, normalizer,
                  softcap, chunk_size, return_stats)
    if backend is not None:
        resolve_backend(backend, student_hidden.device, op="linear_kd_loss")
    if validate if validate is not None else student_hidden.device.type == "cpu":
        _check_target(target, V, ignore_index)
        if isinstance(teacher, TopKTeacher):
            try:
                check_ids_below(teacher, V, "linear_kd_loss")
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(str(exc).replace("number of classes", "vocabulary size V =")) from None
    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    t = teacher.detach().reshape(-1, V) if isinstance(teacher, torch.Tensor) else teacher
    if isinstance(teacher, TopKTeacher):
        t = TopKTeacher(teacher.indices.reshape(N, -1), teacher.logprobs.detach().reshape(N, -1),
                        temperature=teacher.temperature, missing=teacher.missing, validate=False)
    w = None if weight is None else weight.detach().reshape(-1).to(torch.float32)
    chunk = chunk_size if chunk_size is not None else default_chunk_size(V, student_hidden.device.type)
    if isinstance(normalizer, torch.Tensor):
        normalizer = float(normalizer)
    cfg = {"softcap": softcap, "kd": {"alpha": alpha, "temperature": temperature, "ignore_index": ignore_index,
                                      "divergence": divergence, "beta": beta, "backend": backend}}
    try:
        out = LinearKDLossFunction.apply(h, student_weight, student_bias, t, target.reshape(-1), w, reduction,
                                         normalizer, cfg, chunk, return_stats)
    except InvalidArgumentError as exc:  # kd_loss's checks of alpha, temperature, ...: name this op
        raise _err(str(exc).removeprefix("kd_loss: ")) from None
    loss, stats = out if return_stats else (out, None)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    if not return_stats:
        return loss
    return loss, dict(zip(KD_STAT_NAMES, stats.unbind(0)))


class LinearKDLoss(torch.nn.Module):
    """Module form of `linear_kd_loss` (alpha weights the distillation term); the configuration is checked
    when the module is built."""

    def __init__(self, alpha=0.5, temperature=4.0, reduction="mean", ignore_index=-100, *, divergence="kl", beta=0.5,
                 softcap=None, chunk_size=None, return_stats=False, backend=None, validate=None):
        super().__init__()
        self.alpha, self.temperature, self.reduction, self.ignore_index = alpha, temperature, reduction, ignore_index
        self.divergence, self.beta = divergence, beta
        self.softcap, self.chunk_size, self.return_stats = softcap, chunk_size, return_stats
        self.backend, self.validate = backend, validate
        # one tiny call on the reference backend checks every argument now, so a bad configuration fails
        # where it is written
        if backend is not None:
            resolve_backend(backend, None, op="LinearKDLoss")
        one = torch.ones(1, 1)
        linear_kd_loss(one, one, torch.zeros(1, dtype=torch.int64), None if alpha == 0 else one, alpha=alpha,
                       temperature=temperature, reduction=reduction, ignore_index=ignore_index, divergence=divergence,
                       beta=beta, softcap=softcap, chunk_size=chunk_size, return_stats=return_stats, backend="torch",
                       validate=validate)

    def forward(self, student_hidden, student_weight, target, teacher, *, student_bias=None, weight=None,
                normalizer=None):
        return linear_kd_loss(student_hidden, student_weight, target, teacher, student_bias=student_bias,
                              alpha=self.alpha, temperature=self.temperature, reduction=self.reduction,
                              ignore_index=self.ignore_index, weight=weight, divergence=self.divergence,
                              beta=self.beta, normalizer=normalizer,
                              softcap=self.softcap, chunk_size=self.chunk_size, return_stats=self.return_stats,
                              backend=self.backend, validate=self.validate)

    def extra_repr(self):
        return (f"alpha={self.alpha} (distillation weight), temperature={self.temperature}, "
                f"divergence={self.divergence!r}, beta={self.beta}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}, softcap={self.softcap}, "
                f"chunk_size={self.chunk_size}")
