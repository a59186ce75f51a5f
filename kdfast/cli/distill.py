"""`kdfast-distill`: train a student on the kept subset of a data set, distilling from a teacher.

    kdfast-distill --dataset cifar100 --model resnet32 --teacher teacher.pt --keep keep.npy \\
                   --alpha auto --temperature 4 --epochs 240 --out runs/student
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import sys

import numpy as np

from .. import distributed
from .common import CliError, UsageError, log, save_config, write_json_atomic

# The data-pruning paper's recipes (its App. A): RepDistiller's for CIFAR/SVHN, DeepCore's for ImageNet; the
# digits recipe is this project's, sized to run in seconds on a CPU.
RECIPES = {
    "cifar": dict(epochs=240, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="step",
                  milestones=(150, 180, 210)),
    "imagenet": dict(epochs=240, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                     milestones=()),
    "digits": dict(epochs=30, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                   milestones=()),
}
DATASET_RECIPE = {"digits": "digits", "cifar10": "cifar", "cifar100": "cifar", "svhn": "cifar",
                  "imagenet": "imagenet", "folder": "imagenet"}
EVAL_SPLIT = {"digits": "test", "cifar10": "test", "cifar100": "test", "svhn": "test", "imagenet": "val",
              "folder": None}
METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "eval_loss", "eval_acc", "seconds", "examples_per_s")

EPILOG = """examples:
  kdfast-distill --train-teacher --keep keep.npy --out runs/digits-student
      (digits: trains a CNN teacher on all data, then the student on keep.npy with alpha = auto)
  kdfast-distill --dataset cifar100 --data-root ~/data --model resnet32 --teacher teacher.pt \\
                 --keep keep.npy --alpha auto --temperature 4 --out runs/student
  kdfast-distill --dataset cifar100 --data-root ~/data --model resnet32 --teacher-model resnet110 \\
                 --teacher t110.pt --keep keep.npy --alpha 0.5 --out runs/capacity
  kdfast-distill --train-teacher --keep keep.npy --kd-term vid --out runs/digits-vid
      (logit KD plus variational information distillation on the classifier heads' inputs)
  kdfast-distill ... --out runs/student --resume      (continues after the last finished epoch)
  torchrun --nproc-per-node 8 -m kdfast.cli.distill ...   (DistributedDataParallel, --batch-size per GPU; rank 0
                                                           writes the files)

Defaults follow the data-pruning paper's recipes: CIFAR/SVHN SGD lr 0.05, momentum 0.9, wd 5e-4, batch 64,
240 epochs, LR / 10 at epochs 150/180/210 (scaled to --epochs when only --epochs is given); ImageNet lr 0.1,
batch 128, cosine; digits a 30-epoch cosine run. --alpha auto takes kdfast.alpha_for_fraction(f), f = kept /
total. Writes OUT/student.pt, OUT/checkpoint.pt (every epoch), OUT/metrics.csv, OUT/accuracy.png,
OUT/config.json and OUT/summary.json; a teacher trained here goes to OUT/teacher/.
"""


def add_parser(subparsers):
    from ..data import DATASETS
    from ..models import MODELS
    from ..training import PRECISIONS, SCHEDULES
    p = subparsers.add_parser("distill", help="train a student on the kept subset with a teacher",
                              description="Train a student on the kept subset of a data set, distilling from a "
                                          "teacher trained on more data.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("Data")
    g.add_argument("--dataset", default="digits", choices=DATASETS, help="(default: %(default)s)")
    g.add_argument("--data-root", help="root folder of the data set (not needed for digits)")
    g.add_argument("--keep", help=".npy of kept dataset indices (kdfast-prune); default: every example")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop + flip (default: on for CIFAR/SVHN/ImageNet, off for digits)")
    g.add_argument("--image-size", type=int, help="crop side for image folders (default 224)")
    g = p.add_argument_group("Model")
    g.add_argument("--model", choices=MODELS, help="student architecture (default: the data set's)")
    g.add_argument("--teacher", help="teacher checkpoint (.pt)")
    g.add_argument("--teacher-model", choices=MODELS, help="teacher architecture (default: --model)")
    g.add_argument("--train-teacher", action="store_true",
                   help="train the teacher here first (on all data, or on --teacher-fraction of it)")
    g.add_argument("--teacher-fraction", type=float, default=1.0,
                   help="f_t: random share of the data the teacher is trained on (default: %(default)s)")
    g.add_argument("--teacher-epochs", type=int, help="epochs of --train-teacher (default: --epochs)")
    g.add_argument("--teacher-cache", help="TeacherCache folder of the teacher's logits (kdfast-score "
                                           "--save-logits); needs --no-augment")
    g = p.add_argument_group("Distillation")
    g.add_argument("--alpha", default="auto",
                   help="weight of the distillation term in [0, 1], or 'auto' (alpha_for_fraction of the kept "
                        "fraction) (default: %(default)s)")
    g.add_argument("--alpha-schedule", help="anchors for --alpha auto, e.g. '0.1:1,0.7:0.5' (the default)")
    g.add_argument("--temperature", type=float, default=4.0, help="(default: %(default)s)")
    _add_kd_term_arguments(p)
    g = p.add_argument_group("Optimisation (default: the data set's recipe)")
    g.add_argument("--recipe", choices=sorted(RECIPES), help="recipe the defaults come from")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--schedule", choices=SCHEDULES)
    g.add_argument("--milestones", help="epochs where the LR is divided by 10, e.g. 150,180,210")
    g = p.add_argument_group("Performance")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--precision", default="fp32", choices=PRECISIONS, help="(default: %(default)s)")
    g.add_argument("--num-workers", type=int, default=0, help="data loader workers (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    g = p.add_argument_group("Output")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--resume", action="store_true", help="continue the run in --out after its last epoch")
    return p


def _add_kd_term_arguments(p):
    g = p.add_argument_group("Feature distillation (added to the logit KD term)")
    g.add_argument("--kd-term", default="logit", choices=("logit", "hint", "vid", "at"),
                   help="logit: the KD loss alone; hint (FitNets), vid (variational information distillation) or "
                        "at (attention transfer): that feature term added, beta * term (default: %(default)s)")
    g.add_argument("--kd-beta", type=float, help="weight beta of the feature term (default: the term's: hint 100, "
                                                 "vid 1, at 1000)")
    g.add_argument("--kd-layers", help="STUDENT_LAYER:TEACHER_LAYER module names (a trailing '.in' takes a "
                                       "module's input); default: the classifier heads' inputs (hint, vid), the "
                                       "last spatial stage (at)")


def _check_kd_term(args, sources, problems):
    if args.kd_term == "logit":
        for flag in ("kd_beta", "kd_layers"):
            if getattr(args, flag) is not None:
                problems.append(f"--{flag.replace('_', '-')} goes with --kd-term hint|vid|at")
        return
    if not {"--teacher", "--train-teacher"} & set(sources):
        problems.append(f"--kd-term {args.kd_term} distills from a teacher's features: pass --teacher PATH or "
                        "--train-teacher (a --teacher-cache holds only logits)")
    if args.kd_beta is not None and not (args.kd_beta >= 0 and math.isfinite(args.kd_beta)):
        problems.append(f"--kd-beta must be a finite number >= 0, got {args.kd_beta}")
    if args.kd_layers is not None and (args.kd_layers.count(":") != 1 or "" in args.kd_layers.split(":")):
        problems.append(f"--kd-layers must be STUDENT_LAYER:TEACHER_LAYER, e.g. 9:9 or 12.in:12.in, got "
                        f"{args.kd_layers!r}")


def _kd_term(args, student, teacher, train, device):
    """The feature term of --kd-term (None for logit), sized on one training example."""
    if args.kd_term == "logit":
        return None
    from ..kd_terms import make_kd_term
    layers = [None, None] if args.kd_layers is None else [
        name[:-3] + ":in" if name.endswith(".in") else name for name in args.kd_layers.split(":")]
    return make_kd_term(args.kd_term, student.to(device), teacher.to(device), train[0][0][None].to(device),
                        student_layer=layers[0], teacher_layer=layers[1], beta=args.kd_beta)


# --------------------------------------------------------------------------------- argument resolution
def _parse_milestones(text, problems):
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        problems.append(f"--milestones must be comma-separated epochs, e.g. 150,180,210, got {text!r}")
        return ()
    if any(v < 1 for v in values) or list(values) != sorted(set(values)):
        problems.append(f"--milestones must be increasing positive epochs, got {text!r}")
    return values


def _parse_schedule(text, problems):
    try:
        return tuple(tuple(float(v) for v in pair.split(":")) for pair in text.split(","))
    except ValueError:
        problems.append(f"--alpha-schedule must look like '0.1:1,0.7:0.5' (fraction:alpha pairs), got {text!r}")
        return None


def resolve(args):
    """Fills recipe defaults into args and validates everything at once (UsageError listing every problem)."""
    problems = []
    recipe = RECIPES[args.recipe or DATASET_RECIPE[args.dataset]]
    explicit_milestones = args.milestones is not None
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if explicit_milestones:
        args.milestones = _parse_milestones(args.milestones, problems)
    elif recipe["milestones"] and args.epochs != recipe["epochs"]:
        # keep the recipe's shape on shorter or longer runs: 150/180/210 of 240 -> the same fractions
        args.milestones = tuple(max(1, round(m * args.epochs / recipe["epochs"])) for m in recipe["milestones"])
    args.milestones = tuple(args.milestones)
    if args.schedule == "step" and not args.milestones:
        problems.append("--schedule step needs --milestones")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.teacher_epochs is not None and args.teacher_epochs < 1:
        problems.append(f"--teacher-epochs must be >= 1, got {args.teacher_epochs}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        problems.append(f"--lr must be > 0, got {args.lr}")
    if not args.temperature > 0:
        problems.append(f"--temperature must be > 0, got {args.temperature}")
    if not 0.0 < args.teacher_fraction <= 1.0:
        problems.append(f"--teacher-fraction must be in (0, 1], got {args.teacher_fraction}")
    if args.num_workers < 0:
        problems.append(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.alpha != "auto":
        try:
            args.alpha = float(args.alpha)
            if not 0.0 <= args.alpha <= 1.0:
                raise ValueError
        except ValueError:
            problems.append(f"--alpha must be a number in [0, 1] or 'auto', got {args.alpha!r}")
    args.alpha_schedule_points = None if args.alpha_schedule is None else _parse_schedule(args.alpha_schedule,
                                                                                         problems)
    sources = [name for name, on in (("--teacher", args.teacher), ("--train-teacher", args.train_teacher),
                                     ("--teacher-cache", args.teacher_cache)) if on]
    _check_kd_term(args, sources, problems)
    if args.train_teacher and args.teacher:
        problems.append("give --teacher or --train-teacher, not both")
    if args.teacher_cache and args.train_teacher:
        problems.append("--teacher-cache holds an existing teacher's logits; it cannot go with --train-teacher")
    if not sources and args.alpha != 0.0:
        problems.append(f"--alpha {args.alpha} distills from a teacher: pass --teacher PATH, --train-teacher or "
                        "--teacher-cache DIR (or --alpha 0 to train without one)")
    for flag, path in (("--teacher", args.teacher), ("--keep", args.keep)):
        if path and not os.path.isfile(path):
            problems.append(f"{flag} {path} does not exist")
    if args.teacher_cache and not os.path.isdir(args.teacher_cache):
        problems.append(f"--teacher-cache {args.teacher_cache} is not a folder")
    if args.augment is None:
        args.augment = args.dataset != "digits" and not args.teacher_cache
    if args.teacher_cache and args.augment:
        problems.append("--teacher-cache needs --no-augment: cached logits are of the un-augmented images")
    if args.dataset != "digits" and not args.data_root:
        problems.append(f"--dataset {args.dataset} needs --data-root (kdfast never downloads data)")
    if args.image_size is not None and args.image_size < 1:
        problems.append(f"--image-size must be >= 1, got {args.image_size}")
    checkpoint = os.path.join(args.out, "checkpoint.pt")
    if os.path.exists(checkpoint) and not args.resume:
        problems.append(f"--out {args.out} already holds a run; pass --resume to continue it or choose another --out")
    if problems:
        raise UsageError("; ".join(problems))
    from ..models import DEFAULT_MODEL
    args.model = args.model or DEFAULT_MODEL[args.dataset]
    args.teacher_model = args.teacher_model or args.model
    args.teacher_epochs = args.teacher_epochs or args.epochs
    return args


# ----------------------------------------------------------------------------------------- the work
def _device(name):
    import torch
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be a torch device such as cpu or cuda:0, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name}: no CUDA device is available here")
    return device


def _load_keep(path, dataset):
    keep = np.load(path, allow_pickle=False)
    n = len(dataset)
    if keep.ndim != 1 or keep.size == 0 or keep.dtype.kind not in "iu":
        raise CliError(f"--keep {path} must hold a non-empty 1-d integer array, got {keep.dtype} {keep.shape}")
    if keep.min() < 0 or keep.max() >= n or len(np.unique(keep)) != len(keep):
        raise CliError(f"--keep {path} must hold distinct indices in [0, {n}) ({dataset.name} has {n} examples); "
                       "was it made for another data set or split?")
    record = f"{path}.json"
    if os.path.isfile(record):
        with open(record) as fh:
            expected = json.load(fh).get("labels_fingerprint")
        from ..data import labels_fingerprint
        if expected and expected != labels_fingerprint(dataset.targets):
            raise CliError(f"--keep {path} was made from scores of another data set (labels fingerprint mismatch)")
    return keep.astype(np.int64)


def _build(name, dataset_name, num_classes, image_size):
    from ..data import INPUT_SHAPES
    from ..models import create_model
    channels, side = INPUT_SHAPES[dataset_name]
    return create_model(name, num_classes=num_classes, in_channels=channels, image_size=image_size or side)


@functools.lru_cache(maxsize=None)
def _warn_no_matplotlib():
    print("kdfast-distill: accuracy.png skipped: matplotlib is not installed (pip install matplotlib)",
          file=sys.stderr)


def write_metrics(out, history):
    """OUT/metrics.csv (one row per epoch) and OUT/accuracy.png (train and eval accuracy per epoch)."""
    path = os.path.join(out, "metrics.csv")
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _warn_no_matplotlib()
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_acc"] for h in history], label="train (kept subset)")
    if "eval_acc" in history[0]:
        ax.plot(epochs, [h["eval_acc"] for h in history], label="eval")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy.png"), dpi=100)
    plt.close(fig)


def _train_teacher(args, train, evaluation, device):
    import torch

    from ..selection import prune
    from ..training import fit
    folder = os.path.join(args.out, "teacher")
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, "teacher.pt")
    torch.manual_seed(args.seed + 1)
    teacher = _build(args.teacher_model, args.dataset, train.num_classes, args.image_size)
    if args.resume and os.path.isfile(final):
        from ..models import load_checkpoint
        log(f"teacher: reusing {final}", quiet=args.quiet)
        return load_checkpoint(teacher, final)
    indices = None
    if args.teacher_fraction < 1.0:
        indices = prune(torch.zeros(len(train)), args.teacher_fraction, "random", seed=args.seed + 1)
    log(f"teacher: training {args.teacher_model} on {len(train) if indices is None else len(indices)} examples "
        f"for {args.teacher_epochs} epochs", quiet=args.quiet)
    fit(teacher, train, epochs=args.teacher_epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, schedule=args.schedule, milestones=args.milestones, indices=indices,
        device=device, precision=args.precision, seed=args.seed + 1, num_workers=args.num_workers,
        checkpoint_path=os.path.join(folder, "checkpoint.pt"), resume=args.resume, progress=not args.quiet,
        eval_dataset=evaluation, on_epoch=lambda history: write_metrics(folder, history), distributed=True)
    if distributed.is_main():
        torch.save(teacher.state_dict(), final)
    return teacher


def run(args) -> int:
    """Distills as one process, or as one rank of a torchrun job (DistributedDataParallel); 0 on success."""
    resolve(args)
    device = distributed.init_from_env(_device(args.device))
    try:
        return _run(args, device)
    finally:
        distributed.destroy()


def _run(args, device) -> int:
    import torch

    from ..data import load_dataset
    from ..distill import alpha_for_fraction
    from ..models import load_checkpoint, model_fingerprint
    from ..training import fit
    main_rank = distributed.is_main()  # the one rank that writes files and reports
    args.quiet = args.quiet or not main_rank
    train = load_dataset(args.dataset, root=args.data_root, split="train", augment=args.augment,
                         **({"image_size": args.image_size} if args.image_size else {}))
    eval_split = EVAL_SPLIT[args.dataset]
    evaluation = None if eval_split is None else load_dataset(args.dataset, root=args.data_root, split=eval_split,
                                                              **({"image_size": args.image_size}
                                                                 if args.image_size else {}))
    keep = None if args.keep is None else _load_keep(args.keep, train)
    fraction = 1.0 if keep is None else len(keep) / len(train)
    alpha = args.alpha
    if alpha == "auto":
        alpha = alpha_for_fraction(fraction, schedule=args.alpha_schedule_points)
    os.makedirs(args.out, exist_ok=True)
    if main_rank:
        save_config(args.out, args)

    teacher, cache = None, None
    if args.train_teacher:
        teacher = _train_teacher(args, train, evaluation, device)
    elif args.teacher:
        teacher = load_checkpoint(_build(args.teacher_model, args.dataset, train.num_classes, args.image_size),
                                  args.teacher)
    if args.teacher_cache:
        from ..teacher_cache import TeacherCache
        cache = TeacherCache.open(args.teacher_cache,
                                  teacher_fingerprint=None if teacher is None else model_fingerprint(teacher))
        teacher = None  # the cache replaces the online teacher
    if alpha == 0:
        teacher, cache = (None, None) if args.kd_term == "logit" else (teacher, None)
    log(f"student: {args.model} on {len(train) if keep is None else len(keep)} of {len(train)} {args.dataset} "
        f"examples (f = {fraction:.3g}), alpha = {alpha:.3g}, T = {args.temperature}, {args.epochs} epochs, "
        f"device {device}", quiet=args.quiet)
    torch.manual_seed(args.seed)
    student = _build(args.model, args.dataset, train.num_classes, args.image_size)
    kd_term = _kd_term(args, student, teacher, train, device)
    history = fit(student, train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                  weight_decay=args.weight_decay, schedule=args.schedule, milestones=args.milestones,
                  teacher=teacher, teacher_cache=cache, alpha=alpha, temperature=args.temperature,
                  indices=None if keep is None else torch.from_numpy(keep), device=device,
                  precision=args.precision, seed=args.seed, num_workers=args.num_workers,
                  checkpoint_path=os.path.join(args.out, "checkpoint.pt"), resume=args.resume,
                  progress=not args.quiet, eval_dataset=evaluation,
                  on_epoch=lambda h: write_metrics(args.out, h), distributed=True, kd_term=kd_term)
    if not main_rank:
        return 0
    torch.save(student.state_dict(), os.path.join(args.out, "student.pt"))
    write_metrics(args.out, history)
    last = history[-1]
    summary = {"dataset": args.dataset, "model": args.model, "teacher_model": args.teacher_model if (
        teacher is not None or cache is not None) else None, "num_train": len(train),
        "num_kept": len(train) if keep is None else len(keep), "fraction": fraction, "alpha": alpha,
        "temperature": args.temperature, "epochs": args.epochs, "final": last}
    if kd_term is not None:
        summary["kd_term"] = {"name": kd_term.name, "beta": kd_term.beta, "student_layer": kd_term.student_layer,
                              "teacher_layer": kd_term.teacher_layer}
    if "eval_acc" in last:
        best = max(history, key=lambda h: h["eval_acc"])
        summary["best_eval_acc"], summary["best_epoch"] = best["eval_acc"], best["epoch"]
    write_json_atomic(os.path.join(args.out, "summary.json"), summary)
    acc = f"eval acc {last['eval_acc']:.4f} (best {summary['best_eval_acc']:.4f} at epoch {summary['best_epoch']})" \
        if "eval_acc" in last else f"train acc {last['train_acc']:.4f}"
    term = "" if kd_term is None else f", kd_term {kd_term.name} (beta {kd_term.beta:g})"
    print(f"{args.model} student, f = {fraction:.3g}, alpha = {alpha:.3g}{term}: {acc} after {args.epochs} epochs -> "
          f"{os.path.join(args.out, 'student.pt')}")
    return 0


if __name__ == "__main__":
    from .main import distill_main
    sys.exit(distill_main())
