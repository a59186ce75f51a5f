"""A sparse teacher: the k most likely classes of each row and their log-probabilities.

    teacher = TopKTeacher(ids, logprobs, temperature=1.0, missing="renorm")   # ids, logprobs: (..., k)
    loss = kd_loss(student_logits, teacher, target, temperature=1.0)

It is what a served or cached LLM teacher can afford to keep (k ids and values per token instead of a row of
the vocabulary). `logprobs` are log softmax(t / tau) of the teacher's logits t at the capture temperature
tau (`temperature` here), taken at `ids`. `missing` says what the teacher is outside its k classes:

  "renorm"  nothing: the teacher is its top k renormalised, exactly the dense teacher whose logits are
            tau * logprobs at `ids` and -inf elsewhere (so any kd_loss temperature T is exact: the
            distribution at T is softmax((tau / T) * logprobs) over the k classes).
  "tail"    the mass the k classes miss, 1 - sum(exp(logprobs)), sits in one extra bucket, compared with
            the student's mass outside the same ids (the other buckets are the k classes). That mass is
            known only at tau, so kd_loss's temperature must equal it. With k == C the bucket is empty
            and left out.

kd_loss never expands it to a dense (N, C) teacher: see kdfast/losses/kd_loss.py for how each backend uses it.
"""
from __future__ import annotations

import torch

from kdfast.errors import InvalidArgumentError
from kdfast.runtime.checks import finite, require

MISSING = ("renorm", "tail")
_ID_DTYPES = (torch.int64, torch.int32)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class TopKTeacher:
    """k class ids and their log-probabilities per row, captured at `temperature` (see the module docstring).

    Args:
        indices: (..., k) int64 / int32 class ids, distinct within a row, k >= 1.
        logprobs: (..., k) floating log-probabilities (<= 0; -inf allowed: a class of probability 0), on the
            device of `indices`.
        temperature: the temperature tau the log-probabilities were computed at (> 0).
        missing: "renorm" or "tail" (what the teacher is outside its k classes).
        validate: check the values (logprobs <= 0 and not NaN, ids >= 0 and distinct within a row). None
            (default): on CPU tensors only, where it costs no device synchronisation. Ids below the number of
            classes are checked by kd_loss, which knows it.
    """

    __slots__ = ("indices", "logprobs", "temperature", "missing")

    def __init__(self, indices, logprobs, *, temperature=1.0, missing="renorm", validate=None):
        if not isinstance(indices, torch.Tensor) or indices.dtype not in _ID_DTYPES:
            raise InvalidArgumentError(f"TopKTeacher: indices must be an int64 (or int32) tensor of class ids, got "
                                       f"{getattr(indices, 'dtype', type(indices).__name__)}")
        if not isinstance(logprobs, torch.Tensor) or logprobs.dtype not in _FLOAT_DTYPES:
            raise InvalidArgumentError("TopKTeacher: logprobs must be a floating tensor (float32, float16, bfloat16, "
                                       f"float64), got {getattr(logprobs, 'dtype', type(logprobs).__name__)}")
        if indices.dim() == 0 or indices.shape[-1] < 1:
            raise InvalidArgumentError(f"TopKTeacher: indices must have shape (..., k) with k >= 1, got "
                                       f"{tuple(indices.shape)}")
        if logprobs.shape != indices.shape:
            raise InvalidArgumentError(f"TopKTeacher: logprobs must have the shape of indices "
                                       f"{tuple(indices.shape)}, got {tuple(logprobs.shape)}")
        if logprobs.device != indices.device:
            raise InvalidArgumentError(f"TopKTeacher: logprobs is on {logprobs.device} but indices on "
                                       f"{indices.device}")
        require("TopKTeacher", finite("temperature", temperature, low=0.0,
                                      expected="a finite number > 0 (the capture temperature of logprobs)"))
        if missing not in MISSING:
            raise InvalidArgumentError(f"TopKTeacher: missing must be one of {MISSING}, got {missing!r}")
        if validate not in (None, True, False):
            raise InvalidArgumentError(f"TopKTeacher: validate must be None, True or False, got {validate!r}")
        if validate or (validate is None and indices.is_cpu):
            _check_values(indices, logprobs)
        self.indices, self.logprobs = indices, logprobs
        self.temperature, self.missing = float(temperature), missing

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """The rows' shape (the target's): indices' shape without k."""
        return self.indices.shape[:-1]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def detach(self) -> TopKTeacher:
        """The same teacher with its logprobs out of any autograd graph (the teacher gets no gradient)."""
        if not self.logprobs.requires_grad:
            return self
        return TopKTeacher(self.indices, self.logprobs.detach(), temperature=self.temperature,
                           missing=self.missing, validate=False)

    def __repr__(self):
        return (f"TopKTeacher(k={self.k}, rows={tuple(self.shape)}, temperature={self.temperature}, "
                f"missing={self.missing!r})")


def _check_values(indices: torch.Tensor, logprobs: torch.Tensor) -> None:
    """The host-synchronising checks: logprobs in [-inf, 0], ids >= 0 and distinct within each row."""
    if indices.numel() == 0:
        return
    bad = ~(logprobs <= 0)  # NaN fails the comparison too
    if bool(bad.any()):
        idx = bad.reshape(-1).nonzero()[0, 0]
        raise InvalidArgumentError(f"TopKTeacher: logprobs must be log-probabilities (<= 0, not NaN); flat index "
                                   f"{int(idx)} has {float(logprobs.reshape(-1)[idx])}")
    if int(indices.min()) < 0:
        idx = (indices.reshape(-1) < 0).nonzero()[0, 0]
        raise InvalidArgumentError(f"TopKTeacher: indices must be class ids >= 0; flat index {int(idx)} has "
                                   f"{int(indices.reshape(-1)[idx])}")
    if indices.shape[-1] > 1:
        ordered = indices.reshape(-1, indices.shape[-1]).sort(-1).values
        dup = (ordered[:, 1:] == ordered[:, :-1]).any(-1)
        if bool(dup.any()):
            row = int(dup.nonzero()[0, 0])
            raise InvalidArgumentError(f"TopKTeacher: indices must be distinct within a row; row {row} repeats a "
                                       f"class id ({int(dup.sum())} such rows in all)")


def check_ids_below(teacher: TopKTeacher, C: int, op: str) -> None:
    """Host-synchronising check that every id is below the number of classes C."""
    if teacher.indices.numel() and int(teacher.indices.max()) >= C:
        flat = teacher.indices.reshape(-1)
        idx = int((flat >= C).nonzero()[0, 0])
        raise InvalidArgumentError(f"{op}: the TopKTeacher's indices must be below the number of classes {C}; "
                                   f"flat index {idx} has {int(flat[idx])}")
