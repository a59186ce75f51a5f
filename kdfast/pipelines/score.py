"""The `kdfast-score` job: load the data, get the models (trained here, resumably, or from checkpoints),
score every example into a resumable chunk store, write the outputs. The command line only parses and prints.

    result = run_score_job(cfg)     # cfg: the resolved options (an argparse Namespace or any attribute object)

Every field of `cfg` joins the job's identity (OUT/job.json) except NON_IDENTITY, so a resumed run is the run
that was interrupted. Under torchrun every rank calls it; the main rank writes the shared files and returns
the result, the others return None.
"""
from __future__ import annotations

import os
import shutil
import time

import numpy as np
import torch

from kdfast.data.digests import expect_digests, merge_digests, read_digests
from kdfast.runtime import distributed
from kdfast.runtime.progress import log, progress
from kdfast.io.atomic import save_npy, save_npz, save_torch
from kdfast.io.chunks import ChunkStore
from kdfast.io.job import Job
from kdfast.scoring.folder import DIGESTS_FILE, finish_folder, save_digests, save_scores, score_meta

NOT_LEARNING_MARGIN = 0.02  # accuracy within this of the majority-class share: the model did not learn
MEMORISED_GAP = 0.25  # held-out accuracy this far below training accuracy: the model memorised its examples
EXPLODED_FACTOR = 10.0  # a loss this many times the uniform guess's (ln C), or its own best, diverged
RUN_DIGESTS = "read-digests.npy"  # the digests of the files the run's finished models trained on


def load_score_data(cfg):
    """(scored data, training data): the evaluation view, and the augmented view for training (image data)."""
    from kdfast.data import LabeledSubset, load_dataset, source_options
    kw = dict(root=cfg.data_root, split=cfg.split, image_size=cfg.image_size, **source_options(cfg))
    decode = None if cfg.decode == "pil" else cfg.decode  # load_dataset refuses it for other data sets
    data = load_dataset(cfg.dataset, **kw, decode=decode)  # training below keeps the PIL path (augmented)
    train = None
    if cfg.train_epochs and cfg.dataset != "digits":  # training sees the augmented view
        train = data.with_augment(True) if hasattr(data, "with_augment") else \
            load_dataset(cfg.dataset, augment=True, **kw)  # image folders: from the one scan of the tree
    if cfg.limit and cfg.limit < len(data):
        data = LabeledSubset(data, range(cfg.limit))
        train = LabeledSubset(train, range(cfg.limit)) if train is not None else None
    return data, (train if train is not None else data)


def _input_shape(dataset):
    """(channels, side) of one decoded input (also for byte-loading data sets, whose items are JPEG bytes)."""
    x = dataset.load(0)
    return int(x.shape[0]), int(x.shape[-1])


def _new_model(cfg, num_classes, shape):
    from kdfast.models import create_model
    return create_model(cfg.model, num_classes=getattr(cfg, "num_classes", None) or num_classes, in_channels=shape[0],
                        image_size=shape[1])


def _load_models(cfg, num_classes, shape):
    from kdfast.models import file_sha256, load_checkpoint
    models, provenance = [], []
    for path in cfg.checkpoint:
        models.append(load_checkpoint(_new_model(cfg, num_classes, shape), path))
        provenance.append({"path": os.path.abspath(path), "sha256": file_sha256(path)})
    return models, provenance, []


def _train_models(cfg, job, train_data, num_classes, shape, track_forgetting):
    """Trains cfg.seeds models (resuming an interrupted one); returns models, their checkpoints, forgetting rows.

    Under torchrun, seed k is trained by rank k % world; after a barrier every rank loads the others' saved
    weights, so all ranks score with the same models as a single process.
    """
    from kdfast.models import file_sha256, load_checkpoint
    folder = job.path("models")
    os.makedirs(folder, exist_ok=True)
    world, rank = distributed.world_size(), distributed.rank()
    held = held_out_indices(cfg, train_data)
    train_indices = None if held is None else _complement(held, len(train_data))
    trained = {k: _train_one(cfg, job, train_data, num_classes, shape, track_forgetting, k, train_indices)
               for k in range(cfg.seeds)
               if k % world == rank and not os.path.exists(os.path.join(folder, f"seed{cfg.seed + k}.pt"))}
    distributed.barrier()  # every seed's final checkpoint is on disk
    models, provenance, forgetting = [], [], []
    for k in range(cfg.seeds):
        seed = cfg.seed + k
        final = os.path.join(folder, f"seed{seed}.pt")
        model = trained.get(k)
        if model is None:
            torch.manual_seed(seed)
            model = load_checkpoint(_new_model(cfg, num_classes, shape), final)
            log(f"model {k + 1}/{cfg.seeds}: reusing {final}", quiet=cfg.quiet)
        if track_forgetting:
            forgetting.append(np.load(os.path.join(folder, f"seed{seed}.forgetting.npy")))
        models.append(model)
        provenance.append({"path": os.path.abspath(final), "sha256": file_sha256(final), "seed": seed})
    return models, provenance, forgetting


def _complement(indices: np.ndarray, n: int) -> np.ndarray:
    """The sorted indices of range(n) not in `indices` (np.setdiff1d's answer without its sort of n values)."""
    keep = np.ones(n, dtype=bool)
    keep[indices] = False
    return np.flatnonzero(keep)


def held_out_indices(cfg, data) -> np.ndarray | None:
    """The examples the score models do not train on (cfg.holdout_fraction, stratified, seeded by cfg.seed), on
    which their accuracy shows whether they learned or memorised; None without a held-out split."""
    from kdfast.data import stratified_split
    fraction = getattr(cfg, "holdout_fraction", None)
    if not fraction:
        return None
    return stratified_split(data.targets, fraction, seed=cfg.seed)[1].numpy()


def _train_one(cfg, job, train_data, num_classes, shape, track_forgetting, k, indices):
    """Trains model k (seed cfg.seed + k) on `indices` of the data (None: all) and saves it as
    models/seed{seed}.pt, resuming its partial checkpoint."""
    from kdfast.scoring import ForgettingTracker
    from kdfast.training.fit import TrainRecipe, fit
    seed = cfg.seed + k
    folder = job.path("models")
    final = os.path.join(folder, f"seed{seed}.pt")
    torch.manual_seed(seed)
    model = _new_model(cfg, num_classes, shape)
    tracker = ForgettingTracker(len(train_data)) if track_forgetting else None
    partial = os.path.join(folder, f"seed{seed}.partial.pt")
    tic = time.perf_counter()
    recipe = TrainRecipe(epochs=cfg.train_epochs, batch_size=cfg.train_batch_size, lr=cfg.lr, precision=cfg.precision,
                         seed=seed, num_workers=cfg.num_workers)
    history = fit(model, train_data, recipe, subset=None if indices is None else torch.from_numpy(indices),
                  forgetting=tracker, device=cfg.device, checkpoint_path=partial, resume=True,
                  progress=not cfg.quiet)  # the job checked it is this run's
    if tracker is not None:
        save_npy(os.path.join(folder, f"seed{seed}.forgetting.npy"), tracker.scores().cpu().numpy())
    save_npy(os.path.join(folder, f"seed{seed}.train_loss.npy"), np.array([h["train_loss"] for h in history]))
    save_run_digests(job, train_data)  # before the model is marked done: a resumed run checks its reads against them
    save_torch(final, {"model": {n: v.detach().cpu() for n, v in model.state_dict().items()}})  # marks it done
    os.remove(partial)
    log(f"model {k + 1}/{cfg.seeds} (seed {seed}): {cfg.train_epochs} epochs in {time.perf_counter() - tic:.1f} s "
        f"-> {final}", quiet=cfg.quiet)
    return model


def model_accuracies(cfg, job, models, data, held=None) -> dict | None:
    """Eval-mode accuracy of each model on the scored data (the view it scores), in one pass over the data:
    an example is right when its margin (largest other logit minus the true one) is negative. Resumable: each
    example's outcome goes to the chunk store OUT/accuracy-chunks (per shard to OUT/accuracy-shards for sharded
    sources; removed with the scoring chunks), split over torchrun ranks like the scoring pass.
    {"all": [K], "trained": [K], "held_out": [K]} on the main rank (None on the others); the last two split the
    examples by `held` (the held-out indices), None without them."""
    from kdfast.scoring import get_method, score_batches
    n = len(data)
    store, _, mine = _open_pass(cfg, job, data, len(models), "accuracy-")
    for idx, values, _ in progress(score_batches(models, data, get_method("margin"), batches=mine,
                                                 device=cfg.device, precision=cfg.precision,
                                                 num_workers=cfg.num_workers),
                                   total=sum(len(b) for b in mine), desc="eval accuracy", quiet=cfg.quiet,
                                   count=lambda r: len(r[0])):
        store.write(idx.numpy(), (values < 0).to(torch.float32).cpu().numpy(), digests=read_digests(data, idx))
    store.close()
    distributed.barrier()  # every rank's outcomes are on disk
    if not distributed.is_main():
        return None
    right = store.gather().astype(np.float64)  # (N, K) 1 where right; the store stays until the job completes
    if held is None:
        return {"all": right.mean(0).tolist(), "trained": None, "held_out": None}
    trained = np.setdiff1d(np.arange(n), held)
    return {"all": right.mean(0).tolist(), "trained": right[trained].mean(0).tolist(),
            "held_out": right[held].mean(0).tolist()}


def _names(what, count):
    return [f"{what} {k + 1}" for k in range(count)] if count > 1 else [what]


def not_learning_warnings(accuracies, targets, what="model", on="eval-mode accuracy") -> list[str]:
    """A note for each accuracy at (or below) the majority-class share: such a model predicts one class."""
    majority = float(np.bincount(np.asarray(targets)).max()) / len(targets)
    return [f"{name}: {on} {acc:.3f} is at the majority-class share {majority:.3f}; it did not learn (more "
            "epochs, a lower learning rate or a model suited to the images may help)"
            for name, acc in zip(_names(what, len(accuracies)), accuracies) if acc <= majority + NOT_LEARNING_MARGIN]


def memorised_warnings(trained, held_out, what="model") -> list[str]:
    """A note for each model whose held-out accuracy lies far below its accuracy on its own training examples."""
    return [f"{name}: held-out accuracy {h:.3f} is far below its accuracy {t:.3f} on the examples it trained on; it "
            "memorised them rather than learned (fewer epochs, augmentation or more data may help)"
            for name, t, h in zip(_names(what, len(trained)), trained, held_out) if t - h > MEMORISED_GAP]


def diverged_warnings(losses, num_classes, what="model", kind="training loss") -> list[str]:
    """A note for each loss curve (one per model, one value per epoch) that turned non-finite or exploded: above
    EXPLODED_FACTOR times the uniform guess's loss ln C, or its own best so far."""
    notes = []
    for name, curve in zip(_names(what, len(losses)), losses):
        curve = np.asarray(curve, dtype=np.float64)
        bad = ~np.isfinite(curve) | (curve > EXPLODED_FACTOR * max(np.log(num_classes), 1.0)) | \
            (curve > EXPLODED_FACTOR * np.minimum.accumulate(np.where(np.isfinite(curve), curve, np.inf)))
        if bad.any():
            epoch = int(bad.argmax())
            notes.append(f"{name}: the {kind} diverged ({curve[epoch]:.4g} at epoch {epoch + 1}, a uniform guess "
                         f"scores {np.log(num_classes):.3g}); a lower learning rate may help")
    return notes


def learning_warnings(history, targets, num_classes, what) -> list[str]:
    """The notes on one fit's per-epoch history (kdfast.training.fit): its last held-out accuracy at the majority
    share or far below its training accuracy, its training or held-out loss diverged."""
    last = history[-1]
    notes = diverged_warnings([[h["train_loss"] for h in history]], num_classes, what)
    if "eval_acc" in last:
        notes += diverged_warnings([[h["eval_loss"] for h in history]], num_classes, what, kind="held-out loss")
        notes += not_learning_warnings([last["eval_acc"]], targets, what, on="held-out accuracy")
        notes += memorised_warnings([last["train_acc"]], [last["eval_acc"]], what)
    return notes


def _score_chunked(cfg, job, method, models, data):
    """Scores with the resumable chunk store; returns (K, N) float32 (main rank only, else None), the store and
    the images/s of this pass.

    Under torchrun each rank scores a contiguous block of the single-process batches (so every value comes from
    the same batch as in a plain run) and writes its own chunk files (sharded sources: its block of whole shards,
    see _open_pass); rank 0 gathers after a barrier.
    """
    from kdfast.scoring import score_batches
    store, mine, batches = _open_pass(cfg, job, data, len(models), "")
    writer = _open_main_first(lambda: _logit_writer(cfg, job, models[0], data)) if cfg.save_logits else None
    todo, share = sum(len(b) for b in batches), sum(len(b) for b in mine)
    if todo < share:
        log(f"resuming: {share - todo} of {share} examples already scored", quiet=cfg.quiet)
    tic = time.perf_counter()
    results = score_batches(models, data, method, batches=batches, device=cfg.device, precision=cfg.precision,
                            num_workers=cfg.num_workers, head=cfg.head, keep_logits=writer is not None)
    for idx, values, logits in progress(results, total=todo, desc=f"scoring ({cfg.method})", quiet=cfg.quiet,
                                        count=lambda r: len(r[0])):
        digests = read_digests(data, idx)
        if writer is not None:
            writer.write(idx, logits, digests=digests)  # before the chunk: a row on disk always has its logits
        store.write(idx.numpy(), values.numpy(), digests=digests)
    store.close()
    del writer  # its rows are in the shared files; the main rank reopens them to check all are there and close
    # every rank's share, counted on the scoring device (NCCL reduces GPU tensors only)
    todo = int(distributed.all_reduce_sum(torch.tensor([todo], device=cfg.device))[0])
    distributed.barrier()  # every rank's chunks and logits are on disk
    seconds = time.perf_counter() - tic
    if not distributed.is_main():
        return None, store, None
    if cfg.save_logits:
        _logit_writer(cfg, job, models[0], data).close()
    per_model = store.gather().T.copy()
    return per_model, store, (todo / seconds if todo else None)


def _open_pass(cfg, job, data, width, prefix):
    """(store, this rank's batches, those of them still to score) of one resumable pass over `data`, `width`
    values per example, stored in OUT/{prefix}chunks (a ChunkStore) or, for sharded sources (`.shards`), in
    OUT/{prefix}shards (a ShardStore): there the shard is the unit of work and of commit, batches never cross a
    shard boundary and rank r of W takes the contiguous block shard_indices(#shards, r, W) of whole shards."""
    from kdfast.data.keys import example_keys
    from kdfast.io.shards import ShardStore
    from kdfast.scoring import index_batches
    rank, world = distributed.rank(), distributed.world_size()
    shards = getattr(data, "shards", None)
    if not shards or shards[-1].stop != len(data):  # (a reordered subset records its parent's shards)
        store = _open_main_first(lambda: ChunkStore(job.path(f"{prefix}chunks"), num_rows=len(data), width=width,
                                                    resume=True, rank=rank, rows_per_chunk=cfg.chunk_size))
        done = store.done_mask()
        batches = index_batches(range(len(data)), cfg.batch_size)
        mine = [batches[i] for i in distributed.shard_indices(len(batches), rank, world)]
        return store, mine, [b for b in mine if not done[b[0]]]
    store = _open_main_first(lambda: ShardStore(job.path(f"{prefix}shards"), shards=shards, width=width,
                                                keys=example_keys(data), labels=data.targets.numpy()))
    mine = list(distributed.shard_indices(len(shards), rank, world))

    def batches_of(ids):
        return [b for i in ids for b in index_batches(range(shards[i].start, shards[i].stop), cfg.batch_size)]
    return store, batches_of(mine), batches_of(store.todo(mine))


def _open_main_first(open_fn):
    """open_fn() on the main rank (which creates the shared files), then on the others."""
    opened = open_fn() if distributed.is_main() else None
    distributed.barrier()
    return opened if distributed.is_main() else open_fn()


def _logit_writer(cfg, job, model, data):
    from kdfast.data import data_identity
    from kdfast.data.keys import example_keys, has_keys
    from kdfast.models import model_fingerprint
    from kdfast.distill.teacher_cache import TeacherCache
    identity = data_identity(data)
    return TeacherCache.create(job.path("teacher-logits"), num_examples=len(data), num_classes=data.num_classes,
                               topk=getattr(cfg, "topk", None),  # (configurations from before --topk have none)
                               dataset_fingerprint=identity["labels_fingerprint"],
                               teacher_fingerprint=model_fingerprint(model), resume=True, files=data.files,
                               files_fingerprint=identity["files_fingerprint"], labels=data.targets,
                               keys=example_keys(data) if has_keys(data) else None)


def _score_liprune(cfg, job, models, data):
    """Per-batch Hessian norms per model (each model's result saved, so a resumed run skips it); (K, N), batch ids.

    Under torchrun model k is scored by rank k % world; the main rank collects them (others return None, None).
    """
    from kdfast.scoring.liprune import liprune_batch_scores
    world, rank = distributed.world_size(), distributed.rank()
    paths = [job.path(f"liprune-model{k}.npz") for k in range(len(models))]
    for k, (model, path) in enumerate(zip(models, paths)):
        if k % world == rank and not os.path.exists(path):
            s, ids = liprune_batch_scores(model, data, cfg.batch_size, seed=cfg.seed, device=cfg.device,
                                          progress=not cfg.quiet)
            save_npz(path, scores=np.asarray(torch.as_tensor(s, dtype=torch.float32).cpu()),
                     batch_ids=np.asarray(torch.as_tensor(ids, dtype=torch.int64).cpu()))
    distributed.barrier()
    if not distributed.is_main():
        return None, None
    rows, batch_ids = [], None
    for path in paths:
        with np.load(path) as z:
            rows.append(z["scores"])
            batch_ids = z["batch_ids"]
    return np.stack(rows), batch_ids


def recorded_run_digests(job, n: int) -> np.ndarray | None:
    """The content digests of the files the job read before it was stopped (kdfast.data.digests): those its
    finished models trained on, and those written with the rows of its chunk and shard stores."""
    from kdfast.io.chunks import chunk_digests
    from kdfast.io.shards import shard_digests
    path = job.path(RUN_DIGESTS)
    return merge_digests(np.load(path) if os.path.isfile(path) else None,
                         *(read(job.path(f"{what}{kind}"), n) for what in ("", "accuracy-")
                           for kind, read in (("chunks", chunk_digests), ("shards", shard_digests))))


def expect_run_digests(job, data) -> None:
    """Every read of `data` from now on must give the bytes the interrupted run read (DigestMismatchError naming
    the file otherwise): a file replaced between a kill and --resume is not mixed into one set of scores."""
    from kdfast.data.digests import any_read
    recorded = recorded_run_digests(job, len(data))
    if any_read(recorded):
        expect_digests(data, recorded, what=f"the interrupted run in {job.out}",
                       hint="restore the file, or start afresh (--overwrite)")


def save_run_digests(job, data) -> None:
    """OUT/read-digests.npy: what `data` read so far, merged with what the job recorded before (main rank)."""
    if distributed.is_main() and read_digests(data) is not None:
        save_npy(job.path(RUN_DIGESTS), merge_digests(read_digests(data), recorded_run_digests(job, len(data))))


def start_score_job(cfg, data, *, label=None) -> Job:
    """The main rank opens (or checks) the job in cfg.out; every rank gets it after a barrier."""
    from kdfast.data import data_identity
    return Job.start_on_main(cfg.out, "score", vars(cfg), data=data_identity(data), files=data.files,
                             resume=cfg.resume, overwrite=cfg.overwrite, label=label)


def run_score_job(cfg, job, data, train_data) -> dict | None:
    """Runs the job (see the module docstring); the main rank returns the result, the others None.

    The result: scores (N,), per_model (K, N), targets, rate (images/s or None), meta (as in meta.json),
    accuracies (eval-mode accuracy of each model on the scored data) and warnings.
    """
    from kdfast.scoring import get_method, random_scores
    method = get_method(cfg.method)
    start = time.perf_counter()
    n, num_classes = len(data), data.num_classes
    expect_run_digests(job, data)  # a resumed run reads the files its interrupted part read: the same bytes
    shape = _input_shape(data)
    models, checkpoints, forgetting = [], [], []
    if method.kind != "random":
        if cfg.checkpoint:
            models, checkpoints, forgetting = _load_models(cfg, num_classes, shape)
        else:
            models, checkpoints, forgetting = _train_models(cfg, job, train_data, num_classes, shape,
                                                            track_forgetting=method.kind == "training")
    held = held_out_indices(cfg, data) if cfg.train_epochs and not cfg.checkpoint else None
    accuracies = model_accuracies(cfg, job, models, data, held) if models else \
        {"all": [], "trained": None, "held_out": None}
    rate, batch_ids, store = None, None, None
    if method.kind == "random":
        per_model = random_scores(n, cfg.seed).numpy()[None]
    elif method.kind == "training":
        per_model = np.stack(forgetting).astype(np.float32)
    elif method.kind == "batch":
        per_model, batch_ids = _score_liprune(cfg, job, models, data)
    else:
        per_model, store, rate = _score_chunked(cfg, job, method, models, data)
    if not distributed.is_main():
        return None
    per_model = per_model.astype(np.float32)
    targets = data.targets.numpy()
    scores, outputs = save_scores(job, per_model, data, batch_ids=batch_ids)
    digests = save_digests(job, merge_digests(read_digests(data), recorded_run_digests(job, n)))
    if digests is not None:
        outputs.append(DIGESTS_FILE)
    if data.files:
        outputs.append("files.txt")  # written by the job when it started
    if cfg.save_logits:
        outputs.append("teacher-logits/")
    outputs += [os.path.relpath(c["path"], job.out) for c in checkpoints if c["path"].startswith(
        os.path.abspath(job.out))]
    for k, (c, acc) in enumerate(zip(checkpoints, accuracies["all"])):
        c["eval_acc"] = acc
        if held is not None:
            c.update(train_acc=accuracies["trained"][k], held_out_acc=accuracies["held_out"][k])
    meta = score_meta(cfg.method, data, outputs, dataset=cfg.dataset, split=cfg.split,
                      data_root=os.path.abspath(cfg.data_root) if cfg.data_root else None, num_classes=num_classes,
                      limit=cfg.limit, model=None if method.kind == "random" else cfg.model, checkpoints=checkpoints,
                      trained_here=bool(cfg.train_epochs),
                      seeds=[cfg.seed + k for k in range(cfg.seeds)] if cfg.seeds else None, epochs=cfg.train_epochs,
                      lr=cfg.lr if cfg.train_epochs else None, seed=cfg.seed, precision=cfg.precision,
                      batch_size=cfg.batch_size, device=cfg.device, world_size=distributed.world_size(),
                      images_per_s=round(rate, 1) if rate else None,
                      held_out=None if held is None else {"fraction": cfg.holdout_fraction, "seed": cfg.seed,
                                                          "num_examples": len(held), "indices": held.tolist()},
                      digests=digests)
    if held is None:
        warnings = not_learning_warnings(accuracies["all"], targets)
    else:
        warnings = not_learning_warnings(accuracies["held_out"], targets[held], on="held-out accuracy") + \
            memorised_warnings(accuracies["trained"], accuracies["held_out"])
    if checkpoints and cfg.train_epochs and not cfg.checkpoint:
        warnings += diverged_warnings([np.load(c["path"].replace(".pt", ".train_loss.npy")) for c in checkpoints],
                                      num_classes)
    meta["warnings"] = warnings
    return {"scores": scores, "per_model": per_model, "targets": targets, "rate": rate, "meta": meta,
            "accuracies": accuracies, "warnings": warnings, "store": store, "start": start}


def finish_score_job(job, result, extra_outputs=()) -> dict:
    """Writes meta.json (with any files the caller added, e.g. show.png), drops the chunks, completes the job."""
    meta = result["meta"]
    meta["files"] += list(extra_outputs)
    meta["wall_time_s"] = round(time.perf_counter() - result["start"], 3)
    for name in ("accuracy-chunks", "accuracy-shards"):
        if os.path.isdir(job.path(name)):
            shutil.rmtree(job.path(name))
    finish_folder(job, meta, result["store"])
    return meta


def score_job_finished(job) -> bool:
    return job.finished or os.path.exists(job.path("meta.json"))
