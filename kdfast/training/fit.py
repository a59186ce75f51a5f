"""The training loop behind `kdfast-distill` and `kdfast-score --train-epochs`: SGD over a (kept) subset
with `distill_step` and the fused KD loss, a teacher online or from a TeacherCache, per-epoch metrics,
checkpoints every epoch and every few minutes within one, and exact resumption from either.

    history = fit(model, dataset, epochs=30, indices=keep, teacher=teacher, alpha=0.5)
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from kdfast.runtime import distributed as dist
from kdfast.data.epoch_loader import EpochLoader
from kdfast.distill.step import distill_step
from kdfast.errors import InvalidArgumentError
from kdfast.io.atomic import save_torch
from kdfast.losses.kd_loss import kd_loss
from kdfast.runtime.progress import progress_bar
from kdfast.pruning.sampling import ImportanceSampler
from kdfast.runtime.devices import PRECISIONS
from kdfast.distill.variance_reduction import TeacherGradient, resolve_correction

SCHEDULES = ("cosine", "step", "constant")
CHECKPOINT_FORMAT = "kdfast-fit/1"
CHECKPOINT_EVERY_S = 300.0  # a kill loses at most this much training time (plus one checkpoint write)


class IndexedSubset(Dataset):
    """Yields (input, label, dataset_index) for the chosen dataset indices, so every batch knows where
    its examples live in the full data set (for forgetting statistics and teacher caches)."""

    def __init__(self, dataset, indices=None):
        self.dataset = dataset
        self.indices = torch.arange(len(dataset)) if indices is None else indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        i = int(self.indices[j])
        x, y = self.dataset[i]
        return x, y, i


def _check_indices(indices, n):
    if indices is None:
        return None
    idx = torch.as_tensor(indices)
    if idx.dim() != 1 or idx.numel() == 0 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise InvalidArgumentError(f"fit: indices must be a non-empty 1-d integer array of dataset indices, got "
                                   f"dtype {idx.dtype} shape {tuple(idx.shape)}")
    idx = idx.to(torch.int64)
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise InvalidArgumentError(f"fit: indices must lie in [0, {n}) (the dataset's size), got values in "
                                   f"[{int(idx.min())}, {int(idx.max())}]")
    return idx


def _check_fit_args(dataset, epochs, batch_size, lr, schedule, milestones, teacher, teacher_cache, alpha,
                    precision, extrapolate=False):
    problems = []
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        problems.append(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr):
        problems.append(f"lr must be a finite number > 0, got {lr!r}")
    if schedule not in SCHEDULES:
        problems.append(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "step" and not milestones:
        problems.append("schedule='step' needs milestones (epochs where the LR is divided by 10)")
    if precision not in PRECISIONS:
        problems.append(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if extrapolate:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            problems.append(f"alpha must be a finite number with extrapolate=True, got {alpha!r}")
        elif alpha != 0 and teacher is None and teacher_cache is None:
            problems.append(f"alpha={alpha} needs a teacher or a teacher_cache")
    elif not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        problems.append(f"alpha must be a number in [0, 1] (the weight of the distillation term; any finite value "
                        f"with extrapolate=True), got {alpha!r}")
    elif alpha > 0 and teacher is None and teacher_cache is None:
        problems.append(f"alpha={alpha} needs a teacher or a teacher_cache")
    if teacher is not None and teacher_cache is not None:
        problems.append("pass a teacher or a teacher_cache, not both")
    if teacher_cache is not None and len(teacher_cache) != len(dataset):
        problems.append(f"teacher_cache holds {len(teacher_cache)} examples but the dataset {len(dataset)}; it was "
                        "built for another data set")
    if problems:
        raise InvalidArgumentError("fit: " + "; ".join(problems))
    if teacher_cache is not None and hasattr(dataset, "targets"):
        teacher_cache.check_dataset(dataset)


def _check_sampler(sampler, dataset, indices, ddp):
    if sampler is None:
        return
    if not isinstance(sampler, ImportanceSampler):
        raise InvalidArgumentError(f"fit: sampler must be a kdfast.ImportanceSampler or None, got "
                                   f"{type(sampler).__name__}")
    problems = []
    if sampler.probs.numel() != len(dataset):
        problems.append(f"sampler holds {sampler.probs.numel()} scores but the dataset {len(dataset)} examples "
                        "(one score per example of the whole dataset)")
    if indices is not None:
        problems.append("sampler (stochastic pruning) and indices (deterministic pruning) cannot go together; "
                        "pass one of them")
    if ddp:
        problems.append("sampler is not supported with distributed=True (train on one process)")
    if problems:
        raise InvalidArgumentError("fit: " + "; ".join(problems))


def _check_kd_term(kd_term, teacher, ddp):
    if kd_term is None:
        return
    from kdfast.distill.terms import KDTerm
    if not isinstance(kd_term, KDTerm):
        raise InvalidArgumentError(f"fit: kd_term must be a kdfast.distill.terms term (make_kd_term), got "
                                   f"{type(kd_term).__name__}")
    if teacher is None:
        raise InvalidArgumentError(f"fit: kd_term {kd_term.name!r} compares features: it needs an online teacher "
                                   "module (a teacher_cache holds only logits)")
    if ddp:  # its parameters live outside DistributedDataParallel, so their gradients would not be averaged
        raise InvalidArgumentError(f"fit: kd_term {kd_term.name!r} is not supported with distributed=True over "
                                   "several ranks; train on one process")


def _scheduler(optimizer, schedule, epochs, milestones):
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _eval_loader(dataset, batch_size, num_workers, device, distributed) -> EpochLoader:
    """This rank's share of `dataset` (all of it on one process), in order."""
    part = Subset(dataset, dist.shard_indices(len(dataset), dist.rank(), dist.world_size())) if distributed \
        else dataset
    return EpochLoader(part, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")


@torch.no_grad()
def evaluate(model, dataset, *, batch_size=256, device=None, num_workers=0, precision="fp32",
             distributed=False) -> dict:
    """Accuracy and mean cross-entropy of `model` (eval mode) on a map-style dataset of (input, label).

    distributed=True (inside a torchrun process group, the same model on every rank): each rank evaluates its
    shard (kdfast.runtime.distributed.shard_indices) and the sums are all-reduced, so every rank returns the totals.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with _eval_loader(dataset, batch_size, num_workers, device, distributed) as loader:
        return _evaluate(model, loader, len(dataset), device, precision, distributed)


@torch.no_grad()
def _evaluate(model, loader: EpochLoader, n, device, precision, distributed) -> dict:
    """evaluate() over one pass of `loader` (fit keeps one across epochs, so its workers start once)."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    for x, y in loader.epoch():
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x)
        loss, stats = kd_loss(logits, None, y, alpha=0.0, reduction="sum", return_stats=True)
        loss_sum += loss
        correct += stats["correct"].sum()
    if distributed:
        dist.all_reduce_sum(loss_sum)
        dist.all_reduce_sum(correct)
    return {"loss": float(loss_sum) / n, "acc": float(correct) / n}


def _run_identity(dataset, indices, **settings) -> dict:
    """What makes two fit() calls the same run, recorded in the checkpoint and checked when resuming."""
    import hashlib

    from kdfast.io.job import jsonable
    data = {"num_examples": len(dataset)}
    if hasattr(dataset, "targets"):
        from kdfast.data import labels_fingerprint
        data["labels_fingerprint"] = labels_fingerprint(dataset.targets)
    if indices is not None:
        data["indices_sha256"] = hashlib.sha256(indices.numpy().astype("<i8").tobytes()).hexdigest()
    return jsonable({**settings, "data": data})


def _sha256(tensors) -> str:
    import hashlib
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _sampler_identity(sampler):
    """The importance sampler's part of the run identity: its distribution, draws per epoch and seed."""
    if sampler is None:
        return None
    return {"probs_sha256": _sha256([sampler.probs]), "num_samples": sampler.num_samples, "seed": sampler.seed}


def _correction_identity(correction):
    """None, the name of a correction computed inside fit, or the fingerprint of a given TeacherGradient."""
    if isinstance(correction, TeacherGradient):
        return {"teacher_gradient_sha256": _sha256(correction.grads), "num_examples": correction.num_examples}
    return correction


def _rng_state(device) -> dict:
    """Every random generator a training step or in-process data loading may draw from, as tensors and plain
    values (what torch.load(weights_only=True) reads back)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _save_checkpoint(path, model, optimizer, scheduler, epoch, history, forgetting, identity, sampler=None,
                     kd_term=None, within=None):
    """`epoch`: the epochs completed; `within`: the state inside epoch `epoch` + 1 after `within["step"]` steps
    (the step count, the running sums, the random generators), or its record awaiting evaluation
    (`within["record"]`), None at an epoch's end."""
    state = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "history": history,
             "run": identity}
    if within is not None:
        state["within"] = within
    if kd_term is not None:
        state["kd_term"] = kd_term.state_dict()
    if forgetting is not None and hasattr(forgetting, "state_dict"):
        state["forgetting"] = forgetting.state_dict()
    if sampler is not None:
        state["sampler"] = sampler.state_dict()
    save_torch(path, state)  # atomic: a kill mid-save leaves the previous checkpoint intact


def _load_checkpoint(path, model, optimizer, scheduler, forgetting, identity, sampler=None, kd_term=None):
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InvalidArgumentError(f"fit: {path!r} is not a kdfast training checkpoint (format "
                                   f"{CHECKPOINT_FORMAT!r}); remove it or start without resume")
    # the sampler's own check first: it says in its terms what differs (scores, fraction or seed); the run
    # record below covers every other argument
    if (sampler is None) != ("sampler" not in state):
        raise InvalidArgumentError(f"fit: checkpoint {path!r} was written " + (
            "with an importance sampler; resume with the same sampler" if sampler is None else
            "without an importance sampler; it cannot be resumed with one"))
    if sampler is not None:
        sampler.load_state_dict(state["sampler"])
    if "run" in state:  # checkpoints of older versions carry no record: nothing to compare
        from kdfast.io.errors import JobMismatchError
        from kdfast.io.job import differences
        diffs = differences(state["run"], identity)
        if diffs:
            raise JobMismatchError(f"fit: resume=True found a checkpoint {path!r} of another run ("
                                   + "; ".join(f"{k}: {a!r} then, {b!r} now" for k, a, b in diffs)
                                   + "); pass the same arguments, or start without resume", diffs)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise InvalidArgumentError(f"fit: checkpoint {path!r} does not fit this model: {exc}") from None
    if kd_term is not None:
        if "kd_term" not in state:
            raise InvalidArgumentError(f"fit: checkpoint {path!r} was trained without a kd_term; resume it without "
                                       "one or start a new run")
        kd_term.load_state_dict(state["kd_term"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if forgetting is not None and "forgetting" in state and hasattr(forgetting, "load_state_dict"):
        forgetting.load_state_dict(state["forgetting"])
    return state["epoch"], list(state["history"]), state.get("within")


def _epoch_line(record, epochs):
    evaluation = f", eval loss {record['eval_loss']:.4f} acc {record['eval_acc']:.4f}" if "eval_acc" in record else ""
    return (f"epoch {record['epoch']}/{epochs}: lr {record['lr']:.4g}, train loss {record['train_loss']:.4f} "
            f"acc {record['train_acc']:.4f}{evaluation} ({record['examples_per_s']:,.0f} ex/s)")


def fit(model, dataset, *, epochs, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine",
        milestones=(), teacher=None, teacher_cache=None, alpha=0.0, temperature=4.0, indices=None, forgetting=None,
        device=None, precision="fp32", seed=0, num_workers=0, checkpoint_path=None, resume=False, progress=True,
        eval_dataset=None, on_epoch=None, distributed=False, correction=None, sampler=None,
        extrapolate=False, kd_term=None, checkpoint_every_s=CHECKPOINT_EVERY_S, checkpoint_steps=None) -> list[dict]:
    """Trains `model` with SGD on `dataset` (or its `indices` subset), distilling from a teacher if alpha > 0.

    Args:
        model: the student, moved to `device` and trained in place.
        dataset: a map-style dataset yielding (input, label).
        epochs, batch_size, lr, momentum, weight_decay: SGD recipe (Nesterov off, as the papers' recipes).
        schedule: "cosine" (annealed to 0 over `epochs`), "step" (LR / 10 at each epoch in `milestones`)
            or "constant"; stepped once per epoch.
        teacher: a module run online in eval mode; or teacher_cache: a TeacherCache of its logits for
            `dataset` (checked against the dataset's labels when it has `.targets`; a top-k cache is read
            sparse, `topk_rows`: the teacher's renormalised top k, never expanded to C). Not both.
        alpha, temperature: weight of the DISTILLATION term in [0, 1] and the softmax temperature.
        extrapolate: allow any finite alpha (outside [0, 1] the loss is the same formula, one term then has a
            negative weight: the self-distillation paper's extrapolation past the teacher or the labels).
        indices: dataset indices to train on (e.g. `kdfast.prune(...)`); None trains on everything.
        forgetting: an object with update(dataset_indices, correct) (kdfast.ForgettingTracker, created on
            the training device), fed every step with device tensors; its state is checkpointed when it has
            state_dict()/load_state_dict().
        device: where to train (default: the model's device). precision: "fp32" or "bf16" autocast.
        seed: seeds the shuffling; epoch e shuffles with seed + e, so a resumed run replays the same order.
        num_workers: data loading processes, started once per fit call (one set for training, one for
            eval_dataset) and stopped when fit returns or raises. Each epoch's batches and the workers' torch,
            random and numpy seeds are those a DataLoader built for that epoch alone would have
            (kdfast.data.epoch_loader); the workers keep their copy of the dataset from the first epoch on.
        checkpoint_path: a file written (atomically) after every epoch, before its evaluation, and within an
            epoch every `checkpoint_every_s` seconds or `checkpoint_steps` steps (one process only: under
            torchrun at epoch ends); with resume=True an existing one is loaded and training continues where it
            stopped, to bitwise the same weights (the skipped batches are loaded again, unused, so random data
            augmentation draws the same numbers).
        checkpoint_every_s, checkpoint_steps: how often to checkpoint within an epoch (None: never by that rule).
        progress: on stderr, a bar with examples/s on a terminal (plain lines with rate and ETA in logs) within
            each epoch, and one line per epoch.
        eval_dataset: evaluated after every epoch (accuracy and loss in the metrics).
        on_epoch: called as on_epoch(history) after every epoch's checkpoint (e.g. to write metrics files).
        distributed: inside a torchrun process group of more than one rank (kdfast.runtime.distributed.init_from_env),
            train with DistributedDataParallel: each rank takes a DistributedSampler share of the (kept)
            examples, reshuffled every epoch from `seed`; metrics are totals over ranks; only rank 0 writes the
            checkpoint and calls on_epoch; resume loads the checkpoint on every rank. With one process it is
            the plain loop. forgetting is not supported with it (each rank sees only its share).
        correction: None, "unbiased" or a kdfast.distill.variance_reduction.TeacherGradient: unbiased self-distillation (the
            KD-variance-reduction paper's Eq. 16). "unbiased" computes the teacher's full-data gradient over the
            training examples once, before the first epoch; every step adds alpha times it (distill_step). Needs
            a teacher module with the student's parameter space.
        sampler: a kdfast.ImportanceSampler over the whole `dataset` (one score per example): stochastic data
            pruning (the LiPrune paper's Eq. 2). Each epoch draws round(r n) examples with p_i ∝ score_i (epoch
            e from the sampler's seed and e, so resuming redraws the same) and weights their loss by
            1/(round(r n) p_i), so an epoch's summed gradient is unbiased for a full epoch's. Not with
            `indices` or distributed; its state goes into the checkpoint.
        kd_term: a feature-distillation term (kdfast.distill.terms.make_kd_term) added to every step's loss; needs
            an online `teacher`. Its parameters are trained as a second SGD parameter group (same lr, momentum,
            weight decay and schedule as the model) and its state is checkpointed with the model's.

    Returns:
        one dict per epoch: epoch, lr, train_loss, train_acc, seconds, examples_per_s (+ eval_loss,
        eval_acc with eval_dataset), including epochs restored from the checkpoint.
    """
    _check_fit_args(dataset, epochs, batch_size, lr, schedule, milestones, teacher, teacher_cache, alpha, precision,
                    extrapolate)
    ddp = bool(distributed) and dist.world_size() > 1
    _check_sampler(sampler, dataset, indices, ddp)
    _check_kd_term(kd_term, teacher, ddp)
    if ddp and forgetting is not None:
        raise InvalidArgumentError("fit: forgetting needs every example's outcome on one process; it cannot go with "
                                   "distributed=True (train on one process, or drop forgetting)")
    subset = IndexedSubset(dataset, _check_indices(indices, len(dataset)))
    identity = None
    if checkpoint_path is not None:
        from kdfast.models import model_fingerprint
        teacher_id = model_fingerprint(teacher) if teacher is not None else \
            teacher_cache.meta["teacher_fingerprint"] if teacher_cache is not None else None
        # epochs shape the cosine schedule from the first epoch on; a step or constant schedule may be extended
        identity = _run_identity(dataset, None if indices is None else subset.indices,
                                 epochs=epochs if schedule == "cosine" else None, batch_size=batch_size, lr=lr,
                                 momentum=momentum, weight_decay=weight_decay, schedule=schedule,
                                 milestones=list(milestones), alpha=alpha, temperature=temperature, seed=seed,
                                 precision=precision, teacher=teacher_id, forgetting=forgetting is not None,
                                 correction=_correction_identity(correction), sampler=_sampler_identity(sampler),
                                 extrapolate=bool(extrapolate), kd_term=None if kd_term is None else kd_term.identity())
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    correction = resolve_correction(correction, model, teacher, dataset, indices=subset.indices,
                                    batch_size=max(batch_size, 256), device=device)
    params = [{"params": list(model.parameters())}]
    if kd_term is not None:
        params.append({"params": list(kd_term.to(device).parameters())})
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = _scheduler(optimizer, schedule, epochs, milestones)
    start, history, within = 0, [], None
    if resume and checkpoint_path is not None and os.path.exists(checkpoint_path):
        start, history, within = _load_checkpoint(checkpoint_path, model, optimizer, scheduler, forgetting, identity,
                                                  sampler=sampler, kd_term=kd_term)
    importance, sampler = sampler, None  # from here on `sampler` is the DistributedSampler (ddp) or None
    net = model
    if ddp:  # wraps the same parameters, so the optimizer above and the checkpoints keep working on `model`
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        sampler = DistributedSampler(subset, shuffle=True, seed=seed, drop_last=False)
    writes_files = dist.is_main() or not ddp
    amp = "bf16" if precision == "bf16" else None
    pin = device.type == "cuda"
    train_loader = EpochLoader(subset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin)
    eval_loader = contextlib.nullcontext() if eval_dataset is None else \
        _eval_loader(eval_dataset, max(batch_size, 256), num_workers, device, ddp)
    within_epochs = checkpoint_path is not None and not ddp and (checkpoint_every_s or checkpoint_steps)

    def finish_epoch(record, epoch):
        """Evaluates (after a checkpoint, so a kill during evaluation keeps the epoch), records, checkpoints."""
        if eval_dataset is not None:
            if writes_files and checkpoint_path is not None:
                _save_checkpoint(checkpoint_path, model, optimizer, scheduler, epoch, history, forgetting, identity,
                                 sampler=importance, kd_term=kd_term, within={"record": record})
            ev = _evaluate(model, eval_loader, len(eval_dataset), device, precision, ddp)
            record.update(eval_loss=ev["loss"], eval_acc=ev["acc"])
        history.append(record)
        if not writes_files:
            return
        if progress:
            print(_epoch_line(record, epochs), file=sys.stderr, flush=True)
        if checkpoint_path is not None:
            _save_checkpoint(checkpoint_path, model, optimizer, scheduler, epoch, history, forgetting, identity,
                             sampler=importance, kd_term=kd_term)
        if on_epoch is not None:
            on_epoch(history)

    # one set of workers each for training and evaluation, kept across epochs and stopped on the way out
    with train_loader, eval_loader:
        if within is not None and "record" in within:  # killed during the evaluation of epoch `start`
            finish_epoch(within.pop("record"), start)
            within = None
        for epoch in range(start, epochs):
            model.train()
            if sampler is not None:
                sampler.set_epoch(epoch)
            if importance is not None:
                importance.set_epoch(epoch)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)
            skip, seconds_before = 0, 0.0  # steps (and seconds) of this epoch done before a resume
            if within is not None:
                skip, seconds_before = within["step"], within["seconds"]
                loss_sum, correct = within["loss_sum"].to(device), within["correct"].to(device)
            lr_now = optimizer.param_groups[0]["lr"]
            tic = last_save = time.perf_counter()
            total = len(subset) if importance is None else len(importance)
            # off a terminal (logs, pipes): a line with rate and ETA every PLAIN_INTERVAL_S, the epoch's line below
            with progress_bar(total, desc=f"epoch {epoch + 1}/{epochs}", quiet=not (progress and writes_files),
                              plain=False) as bar:
                for step, (x, y, idx) in enumerate(train_loader.epoch(seed + epoch,
                                                                      sampler if importance is None else importance)):
                    if step < skip:  # trained before the resume: loaded again only to replay the loading's draws
                        if step == skip - 1:
                            _set_rng_state(within["rng"], device)  # as they were when the checkpoint was written
                        bar.update(len(y))
                        continue
                    cached = None if teacher_cache is None or alpha == 0 else teacher_cache[idx]
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    idx_dev = idx.to(device, non_blocking=True)
                    cached = None
                    if teacher_cache is not None and alpha != 0:  # a top-k cache stays sparse: k ids per example
                        cached = (teacher_cache[idx].to(device, non_blocking=True) if teacher_cache.topk is None
                                  else teacher_cache.topk_rows(idx, device=device))
                    weight = None if importance is None else importance.weights[idx].to(device, non_blocking=True)
                    out = distill_step(net, teacher, x, y, optimizer, alpha=alpha, temperature=temperature,
                                       teacher_logits=cached, indices=idx_dev, forgetting=forgetting, amp=amp,
                                       extrapolate=extrapolate,
                                       validate=epoch == start,  # the first epoch sees every example: check once
                                       weight=weight, correction=correction, kd_term=kd_term)
                    loss_sum += out["loss"] * len(y)
                    correct += out["correct"].sum()
                    bar.update(len(y))
                    now = time.perf_counter()
                    if within_epochs and writes_files and (
                            (checkpoint_steps and (step + 1) % checkpoint_steps == 0) or
                            (checkpoint_every_s and now - last_save >= checkpoint_every_s)):
                        _save_checkpoint(checkpoint_path, model, optimizer, scheduler, epoch, history, forgetting,
                                         identity, sampler=importance, kd_term=kd_term,
                                         within={"step": step + 1, "loss_sum": loss_sum.cpu(),
                                                 "correct": correct.cpu(), "rng": _rng_state(device),
                                                 "seconds": seconds_before + now - tic})
                        last_save = time.perf_counter()
            within = None
            scheduler.step()
            if ddp:
                dist.all_reduce_sum(loss_sum)
                dist.all_reduce_sum(correct)
                dist.broadcast_buffers(model)  # BatchNorm statistics: rank 0's, the ones its checkpoint holds
            seconds = seconds_before + time.perf_counter() - tic
            n = len(sampler) * dist.world_size() if ddp else total  # DistributedSampler pads to equal shares
            record = {"epoch": epoch + 1, "lr": lr_now, "train_loss": float(loss_sum) / n,
                      "train_acc": float(correct) / n, "seconds": seconds, "examples_per_s": n / max(seconds, 1e-9)}
            finish_epoch(record, epoch + 1)
    return history
