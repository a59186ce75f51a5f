"""`kdfast-score`: score every example of a data set and write the scores, their provenance and a summary.

    kdfast-score                                   # digits, el2n, small CNNs trained here (offline, < 1 min)
    kdfast-score --dataset cifar100 --data-root ~/data --method el2n --model resnet32 --train-epochs 20 --seeds 10
    kdfast-score --dataset imagenet --data-root /data/imagenet --method grand --model resnet50 \\
                 --checkpoint a.pt --checkpoint b.pt --out runs/imagenet-grand
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from kdfast.runtime import distributed
from kdfast.cli.common import (UsageError, add_dataset_options, add_output_options, add_performance_options,
                               check_common, check_dataset_options, default_device, flag, log, lower, made, model_name)

EPILOG = """examples:
  kdfast-score
      trains 3 small CNNs on digits for 3 epochs each, scores all 1397 training images with EL2N and writes
      runs/digits-el2n/{scores.npy, meta.json, ...}; prints a per-class histogram and the hardest examples
  kdfast-score --dataset cifar100 --data-root ~/data --method el2n --model resnet32 --train-epochs 20 --seeds 10
  kdfast-score --dataset imagenet --data-root /data/imagenet --method grand --model resnet50 \\
               --checkpoint a.pt --checkpoint b.pt --out runs/imagenet-grand
  kdfast-score --method forgetting --train-epochs 10 --seeds 2 --show 8
  kdfast-score --dataset folder --data-root ~/photos --model resnet18 --checkpoint m.pt --image-size 128
  kdfast-score --dataset folder --data-root ~/photos --model torchvision:vit_b_16 --method grand --checkpoint w.pt
  kdfast-score --dataset 'wds:/data/in1k/train-{000000..001281}.tar' --model resnet50 --checkpoint a.pt --decode gpu
  kdfast-score --dataset 'parquet:/data/pets/train-*.parquet' --label-column label --model resnet18 --image-size 128

outputs (in --out):
  scores.npy            float32 (N,), data set order, higher = harder (mean over models)
  scores_per_model.npy  float32 (K, N) when K > 1 models
  job.json              the job: every resolved argument, the data identity and the kdfast version (written
                        before any work; --resume checks a new invocation against it)
  meta.json             method, direction, data identity (labels + file list fingerprints), models +
                        checkpoint sha256s and eval-mode accuracies, seeds, epochs, precision, versions, images/s
  files.txt             image folders: one file per line, in score order (scores keyed by file name)
  batch_ids.npy         liprune: the fixed batch of each example
  models/seed*.pt       checkpoints trained here (reuse them with --checkpoint)
  teacher-logits/       --save-logits: a TeacherCache for kdfast-distill
  show.png              --show K: the K hardest and K easiest images
A killed run (even SIGKILL) finishes with --resume; the files equal those of an uninterrupted run. --resume
with arguments that resolve to another job is refused, naming each differing field; --overwrite starts afresh.

distributed (torchrun; each rank scores a contiguous share of the batches, rank 0 merges; files equal those of
one process; --out must be a folder every node sees):
  torchrun --nproc-per-node 8 -m kdfast.cli.score --dataset imagenet --data-root /data/imagenet --method grand \\
           --model resnet50 --checkpoint a.pt --out runs/imagenet-grand
"""

DEFAULT_EPOCHS = {"digits": 3}  # others: 10% of a typical schedule, where EL2N is measured (Paul et al.)
DEFAULT_SEEDS = 3
DEFAULT_HOLDOUT = 0.05  # small: held-out examples are scored by models that never saw them


def add_parser(subparsers):
    from kdfast.models import MODELS
    from kdfast.scoring import METHOD_NAMES
    p = subparsers.add_parser("score", help="score every example of a data set",
                              description="Score every example of a data set; higher = harder.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("Data")
    add_dataset_options(g)
    g.add_argument("--data-root", help="folder holding the data set (not needed for digits and shards; never "
                                       "downloaded)")
    g.add_argument("--split", default="train", help="split to score (default: %(default)s)")
    g.add_argument("--image-size", type=int, help="crop side for image folders (default: 224)")
    g.add_argument("--limit", type=int, help="score only the first N examples (quick trials)")
    g.add_argument("--decode", type=lower, choices=("pil", "cpu", "gpu", "auto"), default="pil",
                   help="image folders and shards: PIL per image in the loader workers (any format), or batched JPEG "
                        "decoding on the GPU (gpu, or auto when scoring on CUDA; falls back to the CPU with a note) or in the "
                        "workers (cpu) (default: pil)")
    g = p.add_argument_group("Model")
    g.add_argument("--model", type=model_name, metavar="NAME",
                   help=f"architecture: {', '.join(MODELS)}, torchvision:NAME (any torchvision.models constructor) or "
                        "timm:NAME (pip install 'kdfast[models]'); randomly initialised, weights only from "
                        "--checkpoint (default: cnn for digits, resnet20 for cifar10/svhn, resnet32 for cifar100, "
                        "resnet18 for image folders)")
    g.add_argument("--num-classes", type=int, help="outputs of the model's head where they differ from the data "
                   "set's classes (e.g. an ImageNet checkpoint scoring a folder of its images) (default: the data's)")
    g.add_argument("--checkpoint", action="append", default=[], metavar="PATH",
                   help="score with these weights (repeat for an ensemble); otherwise models are trained here")
    g.add_argument("--train-epochs", type=int, help="epochs per trained model (default: 3 on digits, 20 otherwise)")
    g.add_argument("--seeds", type=int,
                   help=f"number of models trained, seeds SEED..SEED+K-1 (default: {DEFAULT_SEEDS})")
    g.add_argument("--lr", type=float, default=0.05,
                   help="training learning rate, cosine schedule (default: %(default)s)")
    g.add_argument("--train-batch-size", type=int, default=64, help="(default: %(default)s)")
    g.add_argument("--holdout-fraction", type=float,
                   help="share of each class the trained models never see (seeded by --seed), on which their "
                        f"accuracy shows whether they learned or memorised; recorded in meta.json (default: "
                        f"{DEFAULT_HOLDOUT} when training here, 0 for forgetting, which trains on every example)")
    g.add_argument("--head", help="qualified name of the linear layer making the logits (default: the last nn.Linear)")
    g = p.add_argument_group("Scoring")
    g.add_argument("--method", default="el2n", type=lower, choices=METHOD_NAMES, help="(default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=256, help="scoring batch size; liprune: the batch scored as "
                   "a whole (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="first training seed; random and liprune seed (default: 0)")
    g = p.add_argument_group("Output")
    add_output_options(g, out_help="output folder (default: runs/<dataset>-<method>)",
                       resume_help="finish an interrupted run in --out")
    g.add_argument("--show", type=int, metavar="K", help="write show.png with the K hardest and K easiest images")
    g.add_argument("--top", type=int, default=10, help="hardest examples listed in the summary (default: %(default)s)")
    g.add_argument("--save-logits", action="store_true", help="also cache the model's logits (TeacherCache) for "
                   "kdfast-distill; needs exactly one model")
    g.add_argument("--topk", type=int, metavar="K", help="with --save-logits: keep each example's K largest logits "
                   "only (a sparse cache, which kdfast-distill reads as a top-k teacher; default: every logit)")
    g = p.add_argument_group("Performance")
    add_performance_options(g, num_workers_help="data loading processes (default: 0 for in-memory data sets, "
                            "min(8, CPUs) for image folders)")
    g.add_argument("--chunk-size", type=int, default=8192, help="rows per resumable chunk (default: %(default)s)")
    return p


# ------------------------------------------------------------------------------------------ validation
def _resolve(args) -> None:
    """Fills defaults that depend on other arguments and collects every usage problem into one error."""
    from kdfast.data import dataset_kind
    from kdfast.models import DEFAULT_MODEL
    from kdfast.scoring import get_method
    method = get_method(args.method)
    problems = []
    kind = dataset_kind(args.dataset)  # shards take an image folder's defaults
    check_dataset_options(args, problems)
    args.model = args.model or DEFAULT_MODEL[kind]
    if args.checkpoint and (args.train_epochs is not None or args.seeds is not None):
        problems.append("give --checkpoint or --train-epochs/--seeds, not both")
    if method.kind == "training" and args.checkpoint:
        problems.append("--method forgetting is measured while training: use --train-epochs/--seeds, not --checkpoint")
    if method.kind == "random" and (args.checkpoint or args.train_epochs is not None or args.seeds is not None):
        problems.append("--method random uses no model: drop --checkpoint, --train-epochs and --seeds")
    training = not args.checkpoint and method.kind != "random"
    if training:
        args.train_epochs = DEFAULT_EPOCHS.get(kind, 20) if args.train_epochs is None else args.train_epochs
        args.seeds = DEFAULT_SEEDS if args.seeds is None else args.seeds
    if args.holdout_fraction is not None and not (training and 0.0 <= args.holdout_fraction < 1.0):
        problems.append(f"--holdout-fraction must be in [0, 1) and goes with models trained here, got "
                        f"{args.holdout_fraction}")
    elif method.kind == "training" and args.holdout_fraction:
        problems.append("--method forgetting counts forgetting events of every example during training: it takes no "
                        "--holdout-fraction")
    elif args.holdout_fraction is None:
        args.holdout_fraction = DEFAULT_HOLDOUT if training and method.kind != "training" else 0.0
    check_common(args, problems, positive=("seeds", "batch_size", "chunk_size", "num_classes", "top", "image_size",
                                           "limit", "show"))
    if training:  # the recipe checks its own fields, named here by their flags
        from kdfast.training.recipe import TrainRecipe
        made(lambda: TrainRecipe(epochs=args.train_epochs, batch_size=args.train_batch_size, lr=args.lr,
                                 precision=args.precision, seed=args.seed), problems,
             labels={"epochs": "--train-epochs", "batch_size": "--train-batch-size"})
    if args.show:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            problems.append("--show draws with matplotlib, which is not installed: pip install matplotlib")
    num_models = len(args.checkpoint) or (args.seeds or 1)
    if args.save_logits and (num_models != 1 or method.kind not in ("forward", "gradient")):
        problems.append(f"--save-logits caches one model's logits during a el2n/grand/loss/... pass; got {num_models} "
                        f"models and method {args.method} (use one --checkpoint, or --seeds 1)")
    if args.topk is not None and (not args.save_logits or args.topk < 1):
        problems.append(f"--topk keeps the K largest logits of --save-logits' cache: it needs --save-logits and "
                        f"K >= 1, got --topk {args.topk}" + ("" if args.save_logits else " without --save-logits"))
    for path in args.checkpoint:
        if not os.path.isfile(path):
            problems.append(f"--checkpoint {path} does not exist")
    if problems:
        raise UsageError("; ".join(problems))
    args.device = default_device(args.device)
    args.out = args.out or os.path.join("runs", f"{args.dataset.partition(':')[0]}-{args.method}")
    if args.num_workers is None:
        from kdfast.data import IMAGE_FOLDERS
        args.num_workers = min(8, os.cpu_count() or 1) if kind in IMAGE_FOLDERS else 0
    # the weights behind the paths join the job's identity: a checkpoint replaced in place is another job
    from kdfast.models import file_sha256
    args.checkpoint_sha256 = [file_sha256(path) for path in args.checkpoint]


# ------------------------------------------------------------------------------------------------- run
def run(args) -> int:
    """Scores as one process, or as one rank of a torchrun job (see kdfast.runtime.distributed); 0 on success."""
    _resolve(args)
    if args.save_logits and distributed.spans_nodes():
        # ranks fill disjoint rows of one memory-mapped file, which is coherent only within a node
        raise UsageError("--save-logits writes one memory-mapped file from every rank, so it needs a single-node "
                         "job (torchrun --nnodes 1); score without it, or with --nnodes 1")
    with distributed.process_group_for(args.device) as device:
        args.device = str(device)
        return _run(args)


def _load_data(args):
    from kdfast.data import DataError
    from kdfast.errors import InvalidArgumentError
    from kdfast.pipelines.score import load_score_data
    try:
        return load_score_data(args)
    except DataError:
        raise  # the data's fault (exit 1), also for a bad label (a LabelError is both)
    except InvalidArgumentError as exc:  # a bad split or size is the user's argument
        raise UsageError(str(exc)) from exc


def _run(args) -> int:
    from kdfast.data import class_names
    from kdfast.pipelines.score import finish_score_job, run_score_job, score_job_finished, start_score_job
    from kdfast.cli.summary import format_summary, show_grid, summarize
    args.quiet = args.quiet or not distributed.is_main()  # one rank reports progress
    if args.train_epochs:  # torch.optim imports torch._dynamo at the first optimizer (2-3 s): now, while an image
        import torch._dynamo  # noqa: F401  folder's walk (cli/prefetch.py) still runs in its own process
    data, train_data = _load_data(args)  # before the job starts: a data error leaves --out untouched
    if args.topk is not None and args.topk > data.num_classes:
        raise UsageError(f"--topk {args.topk} keeps more logits than the {data.num_classes} classes of "
                         f"{args.dataset}; pass K <= {data.num_classes}")
    job = start_score_job(args, data, label=flag)
    if score_job_finished(job):
        log(f"{args.out} already holds a finished run (meta.json); nothing to do", quiet=args.quiet)
        return 0
    skipped = getattr(getattr(data, "dataset", data), "skipped_files", None)
    log(f"{args.dataset} ({args.split}): {len(data)} examples, {data.num_classes} classes"
        + (f" ({len(skipped)} non-image files skipped, e.g. {skipped[0]})" if skipped else "")
        + f"; method {args.method}; device {args.device}; output -> {args.out}", quiet=args.quiet)
    with job:  # a failure before any work product leaves nothing that blocks a corrected rerun
        result = run_score_job(args, job, data, train_data)
        if result is None:
            return 0  # the main rank merges every rank's rows and writes the outputs
        extra = []
        if args.show:
            show_grid(job.path("show.png"), data, result["scores"], result["targets"], args.show, args.method,
                      class_names=class_names(data))
            extra.append("show.png")
        meta = finish_score_job(job, result, extra)
    per_model, rate = result["per_model"], result["rate"]
    print(f"scored {len(data)} examples of {args.dataset} with {args.method} ({len(per_model)} model"
          f"{'s' if len(per_model) > 1 else ''}) in {meta['wall_time_s']:.1f} s"
          + (f", {rate:,.0f} images/s scoring" if rate else "") + f" -> {args.out}")
    accuracies = result["accuracies"]
    for k, acc in enumerate(accuracies["all"]):
        held = "" if accuracies["held_out"] is None else \
            f" (trained on: {accuracies['trained'][k]:.4f}, held out: {accuracies['held_out'][k]:.4f})"
        print(f"model {k + 1}: eval-mode accuracy {acc:.4f} on the {len(data)} scored examples{held}")
    for warning in result["warnings"]:
        warnings.warn(warning, stacklevel=1)  # one line on stderr through run_cli
    print(format_summary(summarize(result["scores"], result["targets"], top=args.top, files=data.files,
                                   keys=getattr(data, "keys", None), class_names=class_names(data))))
    if args.show:
        print(f"wrote {job.path('show.png')} ({args.show} hardest and {args.show} easiest images)")
    return 0


if __name__ == "__main__":
    from kdfast.cli.main import score_main
    sys.exit(score_main())
