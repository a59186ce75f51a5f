"""`kdfast-score`: score every example of a data set and write the scores, their provenance and a summary.

    kdfast-score                                   # digits, el2n, small CNNs trained here (offline, < 1 min)
    kdfast-score --dataset cifar100 --data-root ~/data --method el2n --model resnet32 --train-epochs 20 --seeds 10
    kdfast-score --dataset imagenet --data-root /data/imagenet --method grand --model resnet50 \\
                 --checkpoint a.pt --checkpoint b.pt --out runs/imagenet-grand
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np
import torch

from .. import distributed
from .common import CliError, UsageError, log, progress, save_config, write_json_atomic

EPILOG = """examples:
  kdfast-score
      trains 3 small CNNs on digits for 3 epochs each, scores all 1397 training images with EL2N and writes
      runs/digits-el2n/{scores.npy, meta.json, ...}; prints a per-class histogram and the hardest examples
  kdfast-score --dataset cifar100 --data-root ~/data --method el2n --model resnet32 --train-epochs 20 --seeds 10
  kdfast-score --dataset imagenet --data-root /data/imagenet --method grand --model resnet50 \\
               --checkpoint a.pt --checkpoint b.pt --out runs/imagenet-grand
  kdfast-score --method forgetting --train-epochs 10 --seeds 2 --show 8
  kdfast-score --dataset folder --data-root ~/photos --model resnet18 --checkpoint m.pt --image-size 128

outputs (in --out):
  scores.npy            float32 (N,), data set order, higher = harder (mean over models)
  scores_per_model.npy  float32 (K, N) when K > 1 models
  meta.json             method, direction, data set + labels fingerprint, models + checkpoint sha256s,
                        seeds, epochs, precision, versions, wall time, images/s
  files.txt             image folders: one file per line, in score order (scores keyed by file name)
  batch_ids.npy         liprune: the fixed batch of each example
  models/seed*.pt       checkpoints trained here (reuse them with --checkpoint)
  teacher-logits/       --save-logits: a TeacherCache for kdfast-distill
  show.png              --show K: the K hardest and K easiest images
A killed run (even SIGKILL) finishes with --resume; the files equal those of an uninterrupted run.

distributed (torchrun; each rank scores a contiguous share of the batches, rank 0 merges; files equal those of
one process; --out must be a folder every node sees):
  torchrun --nproc-per-node 8 -m kdfast.cli.score --dataset imagenet --data-root /data/imagenet --method grand \\
           --model resnet50 --checkpoint a.pt --out runs/imagenet-grand
"""

DEFAULT_EPOCHS = {"digits": 3}  # others: 10% of a typical schedule, where EL2N is measured (Paul et al.)
DEFAULT_SEEDS = 3


def add_parser(subparsers):
    from ..data import DATASETS
    from ..models import MODELS
    from ..scoring import METHOD_NAMES
    p = subparsers.add_parser("score", help="score every example of a data set",
                              description="Score every example of a data set; higher = harder.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("Data")
    g.add_argument("--dataset", default="digits", type=str.lower, choices=DATASETS, help="(default: %(default)s)")
    g.add_argument("--data-root", help="folder holding the data set (not needed for digits; never downloaded)")
    g.add_argument("--split", default="train", help="split to score (default: %(default)s)")
    g.add_argument("--image-size", type=int, help="crop side for image folders (default: 224)")
    g.add_argument("--limit", type=int, help="score only the first N examples (quick trials)")
    g.add_argument("--decode", choices=("pil", "cpu", "gpu", "auto"), default="pil",
                   help="image folders: PIL per image in the loader workers (any format), or batched JPEG decoding "
                        "on the GPU (gpu, or auto when scoring on CUDA; falls back to the CPU with a note) or in the "
                        "workers (cpu) (default: pil)")
    g = p.add_argument_group("Model")
    g.add_argument("--model", type=lambda s: s.lower().replace("-", "_"), choices=MODELS,
                   help="architecture (default: cnn for digits, resnet20 for cifar10/svhn, resnet32 for cifar100, "
                        "resnet18 for image folders)")
    g.add_argument("--checkpoint", action="append", default=[], metavar="PATH",
                   help="score with these weights (repeat for an ensemble); otherwise models are trained here")
    g.add_argument("--train-epochs", type=int, help="epochs per trained model (default: 3 on digits, 20 otherwise)")
    g.add_argument("--seeds", type=int,
                   help=f"number of models trained, seeds SEED..SEED+K-1 (default: {DEFAULT_SEEDS})")
    g.add_argument("--lr", type=float, default=0.05,
                   help="training learning rate, cosine schedule (default: %(default)s)")
    g.add_argument("--train-batch-size", type=int, default=64, help="(default: %(default)s)")
    g.add_argument("--head", help="qualified name of the linear layer making the logits (default: the last nn.Linear)")
    g = p.add_argument_group("Scoring")
    g.add_argument("--method", default="el2n", type=str.lower, choices=METHOD_NAMES, help="(default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=256, help="scoring batch size; liprune: the batch scored as "
                   "a whole (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="first training seed; random and liprune seed (default: 0)")
    g = p.add_argument_group("Output")
    g.add_argument("--out", help="output folder (default: runs/<dataset>-<method>)")
    g.add_argument("--resume", action="store_true", help="finish an interrupted run in --out")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    g.add_argument("--show", type=int, metavar="K", help="write show.png with the K hardest and K easiest images")
    g.add_argument("--top", type=int, default=10, help="hardest examples listed in the summary (default: %(default)s)")
    g.add_argument("--save-logits", action="store_true", help="also cache the model's logits (TeacherCache) for "
                   "kdfast-distill; needs exactly one model")
    g = p.add_argument_group("Performance")
    g.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    g.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="(default: %(default)s)")
    g.add_argument("--num-workers", type=int, help="data loading processes (default: 0 for in-memory data sets, "
                   "min(8, CPUs) for image folders)")
    g.add_argument("--chunk-size", type=int, default=8192, help="rows per resumable chunk (default: %(default)s)")
    return p


# ------------------------------------------------------------------------------------------ validation
def _resolve(args) -> None:
    """Fills defaults that depend on other arguments and collects every usage problem into one error."""
    from ..models import DEFAULT_MODEL
    from ..scoring import get_method
    method = get_method(args.method)
    problems = []
    if args.dataset != "digits" and not args.data_root:
        problems.append(f"--dataset {args.dataset} needs --data-root (kdfast never downloads data)")
    args.model = args.model or DEFAULT_MODEL[args.dataset]
    if args.checkpoint and (args.train_epochs is not None or args.seeds is not None):
        problems.append("give --checkpoint or --train-epochs/--seeds, not both")
    if method.kind == "training" and args.checkpoint:
        problems.append("--method forgetting is measured while training: use --train-epochs/--seeds, not --checkpoint")
    if method.kind == "random" and (args.checkpoint or args.train_epochs is not None or args.seeds is not None):
        problems.append("--method random uses no model: drop --checkpoint, --train-epochs and --seeds")
    training = not args.checkpoint and method.kind != "random"
    if training:
        args.train_epochs = DEFAULT_EPOCHS.get(args.dataset, 20) if args.train_epochs is None else args.train_epochs
        args.seeds = DEFAULT_SEEDS if args.seeds is None else args.seeds
    for name in ("train_epochs", "seeds", "batch_size", "train_batch_size", "chunk_size", "top", "image_size",
                 "limit", "show"):
        value = getattr(args, name)
        if value is not None and value < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.show:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            problems.append("--show draws with matplotlib, which is not installed: pip install matplotlib")
    if args.num_workers is not None and args.num_workers < 0:
        problems.append(f"--num-workers must be >= 0, got {args.num_workers}")
    if not args.lr > 0:
        problems.append(f"--lr must be > 0, got {args.lr}")
    if args.resume and args.overwrite:
        problems.append("give --resume or --overwrite, not both")
    num_models = len(args.checkpoint) or (args.seeds or 1)
    if args.save_logits and (num_models != 1 or method.kind not in ("forward", "gradient")):
        problems.append(f"--save-logits caches one model's logits during a el2n/grand/loss/... pass; got {num_models} "
                        f"models and method {args.method} (use one --checkpoint, or --seeds 1)")
    for path in args.checkpoint:
        if not os.path.isfile(path):
            problems.append(f"--checkpoint {path} does not exist")
    if args.device:
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            problems.append(f"--device must be like cpu, cuda or cuda:1, got {args.device!r}")
        else:
            if dev.type == "cuda" and not torch.cuda.is_available():
                problems.append(f"--device {args.device}: no CUDA device here")
    if problems:
        raise UsageError("; ".join(problems))
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.out = args.out or os.path.join("runs", f"{args.dataset}-{args.method}")
    if args.num_workers is None:
        args.num_workers = min(8, os.cpu_count() or 1) if args.dataset in ("imagenet", "folder") else 0


def _prepare_out(args) -> bool:
    """Creates --out; True when a finished run is already there (and --resume asked to finish it)."""
    meta = os.path.join(args.out, "meta.json")
    if os.path.isdir(args.out) and os.listdir(args.out):
        ours = any(os.path.exists(os.path.join(args.out, f)) for f in ("config.json", "meta.json", "chunks"))
        if not ours:
            raise CliError(f"--out {args.out} is not empty and holds no kdfast-score run; choose another folder "
                           "(nothing there was changed)")
        if args.overwrite:
            shutil.rmtree(args.out)
        elif not args.resume:
            raise CliError(f"--out {args.out} already holds a run; pass --resume to finish it or --overwrite to "
                           "replace it")
        elif os.path.exists(meta):
            return True
    os.makedirs(args.out, exist_ok=True)
    return False


# ------------------------------------------------------------------------------------------------ data
def _load_data(args):
    from torch.utils.data import Subset

    from ..data import load_dataset
    from ..errors import InvalidArgumentError
    kw = dict(root=args.data_root, split=args.split, image_size=args.image_size)
    decode = None if args.decode == "pil" else args.decode  # load_dataset refuses it for other data sets
    try:
        data = load_dataset(args.dataset, **kw, decode=decode)  # training below keeps the PIL path (augmented)
    except InvalidArgumentError as exc:  # a bad split or size is the user's argument; DataError is the data's
        raise UsageError(str(exc)) from exc
    train = None
    if args.train_epochs and args.dataset != "digits":  # training sees the augmented view
        train = load_dataset(args.dataset, augment=True, **kw)
    if args.limit and args.limit < len(data):
        keep = range(args.limit)
        sub = Subset(data, keep)
        sub.targets, sub.num_classes, sub.name = data.targets[:args.limit], data.num_classes, data.name
        sub.files = data.files[:args.limit] if data.files else None
        sub.images = getattr(data, "images", None)
        sub.folder = getattr(data, "folder", None)
        data = sub
        train = Subset(train, keep) if train is not None else None
    return data, (train if train is not None else data)


def _input_shape(dataset):
    """(channels, side) of one decoded input (also for byte-loading data sets, whose items are JPEG bytes)."""
    base = getattr(dataset, "dataset", dataset)  # through the Subset of --limit
    x = base.load(0)
    return int(x.shape[0]), int(x.shape[-1])


# ---------------------------------------------------------------------------------------------- models
def _new_model(args, num_classes, shape):
    from ..models import create_model
    return create_model(args.model, num_classes=num_classes, in_channels=shape[0], image_size=shape[1])


def _load_models(args, num_classes, shape):
    from ..models import CheckpointError, file_sha256, load_checkpoint
    models, provenance = [], []
    for path in args.checkpoint:
        try:
            models.append(load_checkpoint(_new_model(args, num_classes, shape), path))
        except CheckpointError as exc:
            raise CliError(str(exc)) from exc
        provenance.append({"path": os.path.abspath(path), "sha256": file_sha256(path)})
    return models, provenance, []


def _train_models(args, train_data, num_classes, shape, track_forgetting):
    """Trains --seeds models (resuming an interrupted one); returns models, their checkpoints, forgetting rows.

    Under torchrun, seed k is trained by rank k % world; after a barrier every rank loads the others' saved
    weights, so all ranks score with the same models as a single process.
    """
    from ..models import file_sha256, load_checkpoint
    folder = os.path.join(args.out, "models")
    os.makedirs(folder, exist_ok=True)
    world, rank = distributed.world_size(), distributed.rank()
    trained = {k: _train_one(args, train_data, num_classes, shape, track_forgetting, k) for k in range(args.seeds)
               if k % world == rank and not os.path.exists(os.path.join(folder, f"seed{args.seed + k}.pt"))}
    distributed.barrier()  # every seed's final checkpoint is on disk
    models, provenance, forgetting = [], [], []
    for k in range(args.seeds):
        seed = args.seed + k
        final = os.path.join(folder, f"seed{seed}.pt")
        model = trained.get(k)
        if model is None:
            torch.manual_seed(seed)
            model = load_checkpoint(_new_model(args, num_classes, shape), final)
            log(f"model {k + 1}/{args.seeds}: reusing {final}", quiet=args.quiet)
        if track_forgetting:
            forgetting.append(np.load(os.path.join(folder, f"seed{seed}.forgetting.npy")))
        models.append(model)
        provenance.append({"path": os.path.abspath(final), "sha256": file_sha256(final), "seed": seed})
    return models, provenance, forgetting


def _train_one(args, train_data, num_classes, shape, track_forgetting, k):
    """Trains model k (seed --seed + k) and saves it as models/seed{seed}.pt, resuming its partial checkpoint."""
    from ..scoring import ForgettingTracker
    from ..training import fit
    seed = args.seed + k
    folder = os.path.join(args.out, "models")
    final = os.path.join(folder, f"seed{seed}.pt")
    torch.manual_seed(seed)
    model = _new_model(args, num_classes, shape)
    tracker = ForgettingTracker(len(train_data)) if track_forgetting else None
    partial = os.path.join(folder, f"seed{seed}.partial.pt")
    tic = time.perf_counter()
    history = fit(model, train_data, epochs=args.train_epochs, batch_size=args.train_batch_size, lr=args.lr,
                  forgetting=tracker, device=args.device, precision=args.precision, seed=seed,
                  num_workers=args.num_workers, checkpoint_path=partial, resume=args.resume,
                  progress=not args.quiet)
    if tracker is not None:
        _save_npy(os.path.join(folder, f"seed{seed}.forgetting.npy"), tracker.scores().cpu().numpy())
    _save_weights(final, model)  # its existence marks the seed finished (forgetting saved before it)
    os.remove(partial)
    log(f"model {k + 1}/{args.seeds} (seed {seed}): {args.train_epochs} epochs in "
        f"{time.perf_counter() - tic:.1f} s, train acc {history[-1]['train_acc']:.3f} -> {final}", quiet=args.quiet)
    return model


def _save_weights(path, model):
    tmp = f"{path}.tmp"
    torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, tmp)
    os.replace(tmp, path)


def _save_npy(path, array):
    tmp = f"{path}.tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- scoring
def _score_chunked(args, method, models, data, job):
    """Scores with the resumable chunk store; returns (K, N) float32 (main rank only, else None), the store and
    the images/s of this pass.

    Under torchrun each rank scores a contiguous block of the single-process batches (so every value comes from
    the same batch as in a plain run) and writes its own chunk files; rank 0 gathers after a barrier.
    """
    from ..scoring import index_batches, score_batches
    from .chunks import ChunkStore
    n = len(data)
    store = _open_main_first(lambda resume: ChunkStore(
        os.path.join(args.out, "chunks"), num_rows=n, width=len(models), job=job, resume=resume,
        rank=distributed.rank(), rows_per_chunk=args.chunk_size), args.resume)
    writer = _open_main_first(lambda resume: _logit_writer(args, models[0], data, resume), args.resume) \
        if args.save_logits else None
    done = store.done_mask()
    batches = index_batches(range(n), args.batch_size)
    mine = [batches[i] for i in distributed.shard_indices(len(batches), distributed.rank(), distributed.world_size())]
    batches = [b for b in mine if not done[b[0]]]
    todo = sum(len(b) for b in batches)
    if todo < sum(len(b) for b in mine):
        log(f"resuming: {sum(len(b) for b in mine) - todo} of {sum(len(b) for b in mine)} examples already scored",
            quiet=args.quiet)
    tic = time.perf_counter()
    results = score_batches(models, data, method, batches=batches, device=args.device, precision=args.precision,
                            num_workers=args.num_workers, head=args.head, keep_logits=writer is not None)
    for idx, values, logits in progress(results, total=todo, desc=f"scoring ({args.method})", quiet=args.quiet,
                                        count=lambda r: len(r[0])):
        if writer is not None:
            writer.write(idx, logits)  # before the chunk: a row on disk always has its logits
        store.write(idx.numpy(), values.numpy())
    store.close()
    del writer  # its rows are in the shared files; the main rank reopens them to check all are there and close
    # every rank's share, counted on the scoring device (NCCL reduces GPU tensors only)
    todo = int(distributed.all_reduce_sum(torch.tensor([todo], device=args.device))[0])
    distributed.barrier()  # every rank's chunks and logits are on disk
    seconds = time.perf_counter() - tic
    if not distributed.is_main():
        return None, store, None
    if args.save_logits:
        _logit_writer(args, models[0], data, True).close()
    per_model = store.gather().T.copy()
    return per_model, store, (todo / seconds if todo else None)


def _open_main_first(open_fn, resume):
    """open_fn(resume) on the main rank (which validates or creates the shared files), then on the others."""
    if distributed.is_main():
        opened = open_fn(resume)
    distributed.barrier()
    if not distributed.is_main():
        opened = open_fn(True)
    return opened


def _logit_writer(args, model, data, resume):
    from ..data import labels_fingerprint
    from ..models import model_fingerprint
    from ..teacher_cache import TeacherCache
    return TeacherCache.create(os.path.join(args.out, "teacher-logits"), num_examples=len(data),
                               num_classes=data.num_classes, dataset_fingerprint=labels_fingerprint(data.targets),
                               teacher_fingerprint=model_fingerprint(model), resume=resume)


def _score_liprune(args, models, data):
    """Per-batch Hessian norms per model (each model's result saved, so --resume skips it); (K, N), batch ids.

    Under torchrun model k is scored by rank k % world; the main rank collects them (others return None, None).
    """
    from ..liprune import liprune_batch_scores
    world, rank = distributed.world_size(), distributed.rank()
    paths = [os.path.join(args.out, f"liprune-model{k}.npz") for k in range(len(models))]
    for k, (model, path) in enumerate(zip(models, paths)):
        if k % world == rank and not os.path.exists(path):
            s, ids = liprune_batch_scores(model, data, args.batch_size, seed=args.seed, device=args.device,
                                          progress=not args.quiet)
            tmp = f"{path[:-4]}.tmp.npz"
            np.savez(tmp, scores=np.asarray(torch.as_tensor(s, dtype=torch.float32).cpu()),
                     batch_ids=np.asarray(torch.as_tensor(ids, dtype=torch.int64).cpu()))
            os.replace(tmp, path)
    distributed.barrier()
    if not distributed.is_main():
        return None, None
    rows, batch_ids = [], None
    for path in paths:
        with np.load(path) as z:
            rows.append(z["scores"])
            batch_ids = z["batch_ids"]
    return np.stack(rows), batch_ids


# ------------------------------------------------------------------------------------------------- run
def run(args) -> int:
    """Scores as one process, or as one rank of a torchrun job (see kdfast.distributed); 0 on success."""
    _resolve(args)
    if args.save_logits and distributed.spans_nodes():
        # ranks fill disjoint rows of one memory-mapped file, which is coherent only within a node
        raise UsageError("--save-logits writes one memory-mapped file from every rank, so it needs a single-node "
                         "job (torchrun --nnodes 1); score without it, or with --nnodes 1")
    args.device = str(distributed.init_from_env(args.device))
    try:
        return _run(args)
    finally:
        distributed.destroy()


def _run(args) -> int:
    from .. import __version__
    from ..data import labels_fingerprint
    from ..scoring import get_method, random_scores
    from .summary import format_summary, show_grid, summarize
    method = get_method(args.method)
    start = time.perf_counter()
    finished = _prepare_out(args) if distributed.is_main() else False
    distributed.barrier()  # the main rank has checked, cleared or created --out
    if finished or os.path.exists(os.path.join(args.out, "meta.json")):
        log(f"{args.out} already holds a finished run (meta.json); nothing to do", quiet=args.quiet)
        return 0
    if distributed.is_main():
        save_config(args.out, args)
    args.quiet = args.quiet or not distributed.is_main()  # one rank reports progress
    data, train_data = _load_data(args)
    n, num_classes = len(data), data.num_classes
    targets = data.targets.numpy()
    shape = _input_shape(data)
    log(f"{args.dataset} ({args.split}): {n} examples, {num_classes} classes; method {args.method}; "
        f"device {args.device}; output -> {args.out}", quiet=args.quiet)

    models, checkpoints, forgetting = [], [], []
    if method.kind != "random":
        if args.checkpoint:
            models, checkpoints, forgetting = _load_models(args, num_classes, shape)
        else:
            models, checkpoints, forgetting = _train_models(args, train_data, num_classes, shape,
                                                            track_forgetting=method.kind == "training")
    extra_files, rate, batch_ids = [], None, None
    if method.kind == "random":
        per_model = random_scores(n, args.seed).numpy()[None]
    elif method.kind == "training":
        per_model = np.stack(forgetting).astype(np.float32)
    elif method.kind == "batch":
        per_model, batch_ids = _score_liprune(args, models, data)
    else:
        job = {"method": args.method, "dataset": args.dataset, "split": args.split, "limit": args.limit,
               "labels_fingerprint": labels_fingerprint(data.targets), "precision": args.precision,
               "batch_size": args.batch_size, "checkpoints": [c["sha256"] for c in checkpoints], "head": args.head}
        per_model, store, rate = _score_chunked(args, method, models, data, job)
    if not distributed.is_main():
        return 0  # the main rank merges every rank's rows and writes the outputs
    per_model = per_model.astype(np.float32)
    scores = per_model.mean(0) if len(per_model) > 1 else per_model[0]

    _save_npy(os.path.join(args.out, "scores.npy"), scores)
    outputs = ["scores.npy"]
    if len(per_model) > 1:
        _save_npy(os.path.join(args.out, "scores_per_model.npy"), per_model)
        outputs.append("scores_per_model.npy")
    if batch_ids is not None:
        _save_npy(os.path.join(args.out, "batch_ids.npy"), batch_ids)
        outputs.append("batch_ids.npy")
    if data.files:
        with open(os.path.join(args.out, "files.txt.tmp"), "w") as f:
            f.write("\n".join(data.files) + "\n")
        os.replace(os.path.join(args.out, "files.txt.tmp"), os.path.join(args.out, "files.txt"))
        outputs.append("files.txt")
    if args.save_logits:
        outputs.append("teacher-logits/")
    if args.show:
        show_grid(os.path.join(args.out, "show.png"), data, scores, targets, args.show, args.method)
        outputs.append("show.png")
    outputs += [os.path.relpath(c["path"], args.out) for c in checkpoints if c["path"].startswith(
        os.path.abspath(args.out))]
    wall = time.perf_counter() - start
    meta = {"method": args.method, "direction": "higher is harder", "dataset": args.dataset, "split": args.split,
            "data_root": os.path.abspath(args.data_root) if args.data_root else None,
            "labels_fingerprint": labels_fingerprint(data.targets), "num_examples": n, "num_classes": num_classes,
            "limit": args.limit, "model": None if method.kind == "random" else args.model,
            "checkpoints": checkpoints, "trained_here": bool(args.train_epochs), "seeds":
            [args.seed + k for k in range(args.seeds)] if args.seeds else None, "epochs": args.train_epochs,
            "seed": args.seed, "precision": args.precision, "batch_size": args.batch_size, "device": args.device,
            "world_size": distributed.world_size(),
            "kdfast_version": __version__, "torch_version": torch.__version__, "wall_time_s": round(wall, 3),
            "images_per_s": round(rate, 1) if rate else None, "files": outputs,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json_atomic(os.path.join(args.out, "meta.json"), meta)  # last: its presence marks the run finished
    if method.kind in ("forward", "gradient"):
        store.remove()

    print(f"scored {n} examples of {args.dataset} with {args.method} ({len(per_model)} model"
          f"{'s' if len(per_model) > 1 else ''}) in {wall:.1f} s"
          + (f", {rate:,.0f} images/s scoring" if rate else "") + f" -> {args.out}")
    print(format_summary(summarize(scores, targets, top=args.top, files=data.files)))
    return 0


if __name__ == "__main__":
    from .main import score_main
    sys.exit(score_main())
