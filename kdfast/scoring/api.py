"""`score(model, data, method)` and the names `kdfast.scoring` exports (lazily: kdfast/scoring/__init__.py, whose
docstring lists the methods). Scoring runs every model in eval mode: BatchNorm uses its running statistics and
dropout is off.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from kdfast.errors import InvalidArgumentError
from kdfast.runtime.checks import int_at_least, one_of, positive_int, require
from kdfast.runtime.progress import progress as _progress
from kdfast.runtime.devices import PRECISIONS, resolve_device
from kdfast.scoring.engine import BatchScorer, as_model_list, index_batches, score_batches
from kdfast.scoring.forgetting import ForgettingTracker
from kdfast.scoring.methods import METHOD_NAMES, METHODS, Method, get_method

__all__ = ["score", "ForgettingTracker", "METHODS", "METHOD_NAMES", "Method", "get_method", "BatchScorer",
           "score_batches", "index_batches", "random_scores", "PRECISIONS"]


def random_scores(num_examples: int, seed: int = 0) -> torch.Tensor:
    """(N,) float32 uniform in [0, 1) from a generator seeded with `seed`: the same on every machine."""
    return torch.rand(num_examples, generator=torch.Generator().manual_seed(int(seed)))


def _check_score_args(data, batch_size, precision, num_workers):
    require("score", positive_int("batch_size", batch_size), one_of("precision", precision, PRECISIONS),
            int_at_least("num_workers", num_workers, 0))
    if not isinstance(data, DataLoader) and not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise InvalidArgumentError(f"score: data must be a map-style Dataset of (input, label) or an ordered "
                                   f"DataLoader, got {type(data).__name__}")


def score(model, data, method, *, batch_size=256, device=None, precision="fp32", progress=True, num_workers=0,
          seed=0, head=None, return_per_model=False, out=None, resume=False, overwrite=False, chunk_size=8192):
    """Scores every example of `data` with `method`; higher means harder.

    Args:
        model: an nn.Module, or a list of them (an ensemble: the scores are averaged over members). Each
            model is moved to `device` and scored in eval mode; its train/eval modes are restored after.
        data: a map-style Dataset yielding (input, label), or a DataLoader that does not shuffle.
        method: see the module docstring. "forgetting" is measured during training: use
            ForgettingTracker (kdfast.training.fit feeds one) or `kdfast-score --method forgetting`.
        batch_size, num_workers: how a Dataset is batched and loaded (ignored for a DataLoader).
        device: where to run (default: the first model's device).
        precision: "fp32", or "bf16" autocast (scores are computed in fp32 from the bf16 logits).
        progress: a progress bar on stderr (examples/s).
        seed: for "random" (and the batch permutation of "liprune").
        head: the linear layer producing the logits (module or qualified name) for grand-last and
            liprune-last; default: the model's last nn.Linear.
        return_per_model: also return the (K, N) scores of each ensemble member.
        out: a folder to run as a resumable job (kdfast.io): job.json (method, settings, model and data
            fingerprints) is written first, rows land in atomic chunks as they are scored, and the result
            is a score folder like kdfast-score's (kdfast.scoring.folder): scores.npy, scores_per_model.npy for
            an ensemble, and meta.json with the data identity, so `kdfast-prune --scores DIR` and
            `read_scores` check it against their data. resume=True finishes an interrupted job (or returns
            a finished one) after checking that it is the same job (JobMismatchError names each differing
            field); overwrite=True starts afresh; without either, a folder holding a run is refused.
        chunk_size: rows per resumable chunk with `out`.

    Returns:
        (N,) float32 CPU tensor in dataset order; with return_per_model, (scores, per_model (K, N)).
    """
    m = get_method(method)
    _check_score_args(data, batch_size, precision, num_workers)
    if out is not None:
        return _score_job(model, data, m, out, resume=resume, overwrite=overwrite, chunk_size=chunk_size,
                          return_per_model=return_per_model, batch_size=batch_size, device=device,
                          precision=precision, progress=progress, num_workers=num_workers, seed=seed, head=head)
    n = len(data.dataset) if isinstance(data, DataLoader) else len(data)
    if m.kind == "training":
        raise InvalidArgumentError("score: method 'forgetting' is measured during training: feed "
                                   "kdfast.ForgettingTracker(num_examples).update(indices, correct) from the training "
                                   "loop (kdfast.training.fit(..., forgetting=tracker) does) and call "
                                   "tracker.scores(); `kdfast-score --method forgetting` trains and tracks for you")
    if m.kind == "random":
        per_model = random_scores(n, seed)[None]
    else:
        models = as_model_list(model)
        if m.kind == "batch":
            per_model = _liprune_scores(models, data, batch_size, seed, device, progress)
        else:
            per_model = torch.empty(len(models), n, dtype=torch.float32)
            for idx, values, _ in _progress(score_batches(models, data, m, batch_size=batch_size, device=device,
                                                          precision=precision, num_workers=num_workers, head=head),
                                            total=n, desc=m.name, quiet=not progress, count=lambda r: len(r[0])):
                per_model[:, idx] = values.T
    scores = per_model.mean(0)
    return (scores, per_model) if return_per_model else scores


def _score_job(model, data, m, out, *, resume, overwrite, chunk_size, return_per_model, **kw):
    """score(..., out=DIR): the same scores, computed as a resumable job in DIR and written as a score folder
    (kdfast.scoring.folder, the one kdfast-score writes: meta.json included, so consumers check its data)."""
    from kdfast.io import Job
    from kdfast.models import model_fingerprint
    from kdfast.data.digests import read_digests
    from kdfast.scoring.folder import finish_folder, load_per_model, open_chunks, save_digests, save_scores, score_meta
    require("score", positive_int("chunk_size", chunk_size))
    dataset = data.dataset if isinstance(data, DataLoader) else data
    models = [] if m.kind == "random" else as_model_list(model)
    head = kw["head"]
    settings = {"batch_size": data.batch_size if isinstance(data, DataLoader) else kw["batch_size"],
                "precision": kw["precision"], "seed": kw["seed"],
                "head": head if head is None or isinstance(head, str) else type(head).__name__,
                "models": [model_fingerprint(mod) for mod in models]}
    config = {"method": m.name, **settings}
    if hasattr(dataset, "targets"):
        from kdfast.data import data_identity
        identity = data_identity(dataset)
    else:
        identity = {"num_examples": len(dataset)}
    job = Job.start(out, "score", config, data=identity, files=getattr(dataset, "files", None), resume=resume,
                    overwrite=overwrite)
    with job:
        if job.finished:
            per_model = torch.from_numpy(load_per_model(job.out))
        else:
            store = None
            if m.kind in ("forward", "gradient"):
                n = len(dataset)
                store = open_chunks(job, num_rows=n, width=len(models), rows_per_chunk=chunk_size)
                done = store.done_mask()
                batches = [b for b in index_batches(range(n), kw["batch_size"]) if not done[b[0]]]
                for idx, values, _ in _progress(score_batches(models, dataset, m, batches=batches,
                                                              device=kw["device"], precision=kw["precision"],
                                                              num_workers=kw["num_workers"], head=head),
                                                total=sum(len(b) for b in batches), desc=m.name,
                                                quiet=not kw["progress"], count=lambda r: len(r[0])):
                    store.write(idx.numpy(), values.numpy(), digests=read_digests(dataset, idx))
                store.close()
                per_model = torch.from_numpy(store.gather().T.copy())
                digests = store.digests()
            else:
                _, per_model = score(model, data, m.name, return_per_model=True, **kw)
                digests = read_digests(dataset)
            _, files = save_scores(job, per_model.numpy(), dataset)
            settings["digests"] = save_digests(job, digests)
            if settings["digests"] is not None:
                files.append("digests.npy")
            if getattr(dataset, "files", None) is not None:
                files.append("files.txt")  # written by the job when it started
            finish_folder(job, score_meta(m.name, dataset, files, **settings), store)
        scores = per_model.mean(0)
    return (scores, per_model) if return_per_model else scores


def _liprune_scores(models, data, batch_size, seed, device, progress):
    if isinstance(data, DataLoader):
        raise InvalidArgumentError("score: method 'liprune' batches the data itself from a seeded permutation; pass "
                                   "the Dataset, not a DataLoader")
    from kdfast.scoring.liprune import liprune_batch_scores
    rows = []
    for model in models:
        s, _ = liprune_batch_scores(model, data, batch_size, seed=seed, device=resolve_device([model], device),
                                    progress=progress)
        rows.append(torch.as_tensor(s, dtype=torch.float32).cpu())
    return torch.stack(rows)
