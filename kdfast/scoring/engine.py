"""The scoring loop: batches of a data set through one model or an ensemble, per-example scores out.

BatchScorer scores one batch already on the device (what the benchmark times); score_batches drives it over
a data set with a DataLoader (workers, pinned memory, non-blocking copies) and hands results back one batch
late on CUDA, so the device always has the next batch queued while the host collects the previous one.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, Subset

from kdfast.errors import InvalidArgumentError
from kdfast.runtime.devices import resolve_device
from kdfast.losses.kd_loss import kd_loss
from kdfast.scoring.head import HeadCapture, find_head
from kdfast.scoring.methods import Method

def as_model_list(model, where: str = "score") -> list[nn.Module]:
    models = list(model) if isinstance(model, (list, tuple, nn.ModuleList)) else [model]
    if not models:
        raise InvalidArgumentError(f"{where}: model is an empty list; pass a module or a non-empty list of modules")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise InvalidArgumentError(f"{where}: model must be an nn.Module or a list of them, got "
                                       f"{type(m).__name__}" + (f" at position {i}" if len(models) > 1 else ""))
    return models


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


class BatchScorer:
    """Scores batches with every model of an ensemble; a context manager that restores the models' modes.

    On entry each model is moved to `device` and put in eval mode (BatchNorm uses its running statistics);
    on CUDA, conv nets are converted to channels_last. On exit the modes come back and hooks are removed
    (device and memory format stay). `precision="bf16"` runs the models under bf16 autocast; the scores are
    computed in fp32 from the bf16 logits. Gradient methods run through one GradNormPlan per model, open while
    the scorer is (hooks installed once for the whole data set), in sub-batches where a batch's backward does
    not fit in device memory.
    """

    def __init__(self, models, method: Method, *, device, precision="fp32", head=None, keep_logits=False):
        self.models, self.method, self.device = models, method, torch.device(device)
        self.keep_logits = keep_logits
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if precision == "bf16"
                         else nullcontext())
        self.channels_last = self.device.type == "cuda" and any(_has_conv(m) for m in models)
        self.heads = [find_head(m, head) for m in models] if method.needs_features or head is not None else None
        self._plans, self._grad_batch = [], None  # gradient methods: one GradNormPlan per model while open
        self.num_classes = self.heads[0].out_features if self.heads else None
        self._captures, self._modes = [], []

    def __enter__(self):
        for m in self.models:
            self._modes.append([(mod, mod.training) for mod in m.modules()])
            m.to(self.device)
            if self.channels_last:
                m.to(memory_format=torch.channels_last)
            m.eval()
        if self.method.needs_features:
            self._captures = [HeadCapture(h) for h in self.heads]
        if self.method.kind == "gradient":
            from kdfast.grad_norms import GradNormPlan
            try:
                for m in self.models:
                    self._plans.append(GradNormPlan(m).__enter__())
            except BaseException:  # e.g. a module without a rule: leave every model as it was
                self.__exit__(None, None, None)
                raise
        return self

    def __exit__(self, *exc):
        for c in self._captures:
            c.remove()
        for plan in self._plans:
            plan.release()
        for modes in self._modes:
            for mod, training in modes:
                mod.training = training
        self._captures, self._modes, self._plans = [], [], []

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        """x, y on the device -> (scores (B, K) float32, logits of the first model or None), no host sync."""
        columns, kept = [], None
        for k, model in enumerate(self.models):
            if self.method.kind == "forward":
                with torch.no_grad(), self.autocast:
                    logits = model(x)
                self.num_classes = logits.shape[-1]
                # labels are checked on the host copy by the caller (no device sync here)
                _, stats = kd_loss(logits, None, y, alpha=0.0, reduction="none", return_stats=True, validate=False)
                sq = self._captures[k].take(logits) if self.method.needs_features else None
                bias = self._captures[k].has_bias if self.method.needs_features else True
                columns.append(self.method.fn(logits, stats, sq, bias).float())
            else:  # gradient
                columns.append(self._grad_norms(self._plans[k], x, y))
                logits = None
            if k == 0 and self.keep_logits:
                if logits is None:
                    with torch.no_grad(), self.autocast:
                        logits = model(x)
                kept = logits.float()
        return torch.stack(columns, 1), kept


    def _grad_norms(self, plan, x, y):
        """The plan's norms for the batch, in sub-batches when a whole one does not fit in device memory (the
        largest size that fitted is kept for the next batches)."""
        size = self._grad_batch or x.shape[0]
        while True:
            try:
                with self.autocast:
                    if size >= x.shape[0]:
                        return plan(x, y)
                    return torch.cat([plan(x[s:s + size], y[s:s + size]) for s in range(0, x.shape[0], size)])
            except torch.OutOfMemoryError:
                if size == 1:
                    raise
                size = self._grad_batch = max(1, size // 2)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()


def check_loader(loader: DataLoader, where: str = "score") -> None:
    """A DataLoader must visit the data set in order, every example once, so scores align with indices."""
    sampler = loader.batch_sampler.sampler if isinstance(loader.batch_sampler, BatchSampler) else loader.sampler
    if not isinstance(sampler, SequentialSampler):
        raise InvalidArgumentError(f"{where}: the DataLoader must not shuffle or resample (scores align with dataset "
                                   f"indices): it uses {type(sampler).__name__}; build it with shuffle=False or "
                                   "pass the Dataset itself")
    if isinstance(loader.batch_sampler, BatchSampler) and loader.batch_sampler.drop_last:
        raise InvalidArgumentError(f"{where}: the DataLoader drops the last batch (drop_last=True), so some "
                                   "examples would get no score; build it with drop_last=False")


def index_batches(indices, batch_size: int) -> list[list[int]]:
    """Consecutive batches of the given dataset indices (a fixed grid, so a resumed run batches the same way).

    A range stays a range per batch (no million-element lists for large data sets).
    """
    indices = indices if isinstance(indices, range) else list(indices)
    return [indices[s:s + batch_size] for s in range(0, len(indices), batch_size)]


def _check_labels(y: torch.Tensor, idx: torch.Tensor, num_classes: int) -> None:
    from kdfast.data.base import check_labels
    check_labels(y, num_classes, "score", indices=idx, why=f"the model has {num_classes} outputs")


def batch_pipeline(data, device: torch.device):
    """The data set's own batch pipeline (JPEG bytes decoded in batches, data/gpu_decode.py), through Subsets;
    None for data sets whose items are model inputs already."""
    while isinstance(data, Subset):
        data = data.dataset
    make = getattr(data, "batch_pipeline", None)
    return make(device) if make is not None else None


def score_batches(models, data, method: Method, *, batch_size=256, batches=None, device=None, precision="fp32",
                  num_workers=0, head=None, keep_logits=False):
    """Yields (indices (n,) int64, scores (n, K) float32, logits (n, C) float32 or None) on the CPU per batch.

    `data` is a map-style Dataset (batched on the grid `batches`, lists of dataset indices, default: all in
    order) or an ordered DataLoader (see check_loader). Labels are checked against the number of classes on
    the host copy, without a device sync. A data set with a batch pipeline (JPEG folders loaded with decode=)
    has its workers read bytes and its batches decoded on the device here.
    """
    device = resolve_device(models, device)
    pipeline = None
    if isinstance(data, DataLoader):
        if batches is not None:
            raise InvalidArgumentError("score: batches= needs a Dataset, not a DataLoader")
        check_loader(data)
        loader, batch_ids = data, None
    else:
        batch_ids = batches if batches is not None else index_batches(range(len(data)), batch_size)
        pipeline = batch_pipeline(data, device)
        extra = dict(collate_fn=pipeline.collate_fn) if pipeline is not None else {}
        pin = pipeline.pin_memory if pipeline is not None else device.type == "cuda"
        loader = DataLoader(data, batch_sampler=batch_ids, num_workers=num_workers, pin_memory=pin,
                            persistent_workers=False, **extra)
    # (batch, model input) pairs; a batch pipeline decodes on its own thread, ahead of the model
    feed = pipeline.feed(loader) if pipeline is not None else ((batch, batch[0]) for batch in loader)
    cuda = device.type == "cuda"
    pending, offset = None, 0
    with BatchScorer(models, method, device=device, precision=precision, head=head, keep_logits=keep_logits) as scorer:
        for b, (batch, x) in enumerate(feed):
            y = torch.as_tensor(batch[1])
            idx = torch.as_tensor(batch_ids[b]) if batch_ids is not None else torch.arange(offset, offset + len(y))
            offset += len(y)
            values, logits = scorer(scorer.prepare(x), y.to(device, non_blocking=True))
            if scorer.num_classes is not None:  # gradient methods without a head: the engine's loss checks labels
                _check_labels(y, idx, scorer.num_classes)
            values = values.to("cpu", non_blocking=cuda)
            logits = logits.to("cpu", non_blocking=cuda) if logits is not None else None
            event = torch.cuda.Event() if cuda else None
            if event is not None:
                event.record()
            if pending is not None:
                yield _settle(pending)
            pending = (idx, values, logits, event)
        if pending is not None:
            yield _settle(pending)


def _settle(pending):
    idx, values, logits, event = pending
    if event is not None:
        event.synchronize()
    return idx.to(torch.int64), values, logits
