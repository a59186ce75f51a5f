"""`kdfast-distill`: train a student on the kept subset of a data set, distilling from a teacher.

    kdfast-distill --dataset cifar100 --model resnet32 --teacher teacher.pt --keep keep.npy \\
                   --alpha auto --temperature 4 --epochs 240 --out runs/student
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings

from kdfast.distill.setup import KDSetup
from kdfast.runtime import distributed
from kdfast.pipelines.distill import EVAL_SPLIT
from kdfast.runtime.checks import Problem, fraction
from kdfast.training.recipe import TrainRecipe
from kdfast.cli.common import (CliError, UsageError, add_dataset_options, add_kd_term_options, add_output_options,
                               add_performance_options, check_common, check_dataset_options, check_kd_term,
                               default_device, flag, log, lower, made, model_name)
from kdfast.data import dataset_kind

# The data-pruning paper's recipes (its App. A): RepDistiller's for CIFAR/SVHN, DeepCore's for ImageNet; the
# digits recipe is this project's, sized to run in seconds on a CPU.
RECIPES = {
    "cifar": TrainRecipe(epochs=240, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="step",
                         milestones=(150, 180, 210)),
    "imagenet": TrainRecipe(epochs=240, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
    "digits": TrainRecipe(epochs=30, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
}
RECIPE_OPTIONS = tuple(f.name for f in dataclasses.fields(TrainRecipe) if f.metadata.get("option", True))
DATASET_RECIPE = {"digits": "digits", "cifar10": "cifar", "cifar100": "cifar", "svhn": "cifar",
                  "imagenet": "imagenet", "folder": "imagenet"}
DEFAULT_VAL_FRACTION = 0.1  # held out of the training data where the data set has no test split (folder)

EPILOG = """examples:
  kdfast-distill --train-teacher --keep keep.npy --out runs/digits-student
      (digits: trains a CNN teacher on all data, then the student on keep.npy with alpha = auto)
  kdfast-distill --dataset cifar100 --data-root ~/data --model resnet32 --teacher teacher.pt \\
                 --keep keep.npy --alpha auto --temperature 4 --out runs/student
  kdfast-distill --dataset cifar100 --data-root ~/data --model resnet32 --teacher-model resnet110 \\
                 --teacher t110.pt --keep keep.npy --alpha 0.5 --out runs/capacity
  kdfast-distill --train-teacher --keep keep.npy --kd-term vid --out runs/digits-vid
      (logit KD plus variational information distillation on the classifier heads' inputs)
  kdfast-distill --dataset folder --data-root ~/photos --model resnet18 --train-teacher --keep keep.npy \\
                 --val-fraction 0.2 --out runs/photos   (evaluates on a stratified 20% held out of the folder)
  kdfast-distill ... --out runs/student --resume      (continues after the last finished epoch; refused when
                                                       the arguments resolve to another job)
  kdfast-distill --train-teacher --sampler lipschitz --scores runs/liprune --fraction 0.3 --out runs/stoch
      (stochastic pruning, LiPrune Eq. 2: each epoch draws 0.3 n examples with p ~ score, loss weights 1/(r n p))
  kdfast-distill --train-teacher --alpha 0.5 --temperature 1 --correction unbiased --teacher-report --out runs/u
      (unbiased self-distillation, Eq. 16 of the KD-variance-reduction paper; OUT/teacher_report.json)
  torchrun --nproc-per-node 8 -m kdfast.cli.distill ...   (DistributedDataParallel, --batch-size per GPU; rank 0
                                                           writes the files)
  kdfast-distill --steps 3 --alpha optimal --temperature 1 --out runs/chain
      (self-distillation chain: 3 students, each distilling from the previous one, each step's weight in closed
       form on a held-out --val-fraction; OUT/self_distill.json/.csv hold the per-step alpha and accuracy;
       --resume continues it, refused when the chain's arguments changed)

Defaults follow the data-pruning paper's recipes: CIFAR/SVHN SGD lr 0.05, momentum 0.9, wd 5e-4, batch 64,
240 epochs, LR / 10 at epochs 150/180/210 (scaled to --epochs when only --epochs is given); ImageNet lr 0.1,
batch 128, cosine; digits a 30-epoch cosine run. --alpha auto takes kdfast.alpha_for_fraction(f), f = kept /
total. Every epoch is evaluated (eval mode) on the test split, or on --val-fraction of the training data held
out (stratified, seeded; the default for image folders, which have no test split). Writes OUT/job.json (every
resolved argument and the data identity, before any work), OUT/student.pt, OUT/checkpoint.pt (every epoch),
OUT/metrics.csv, OUT/accuracy.png and OUT/summary.json (eval accuracy per epoch, final and best); a teacher
trained here goes to OUT/teacher/.
"""


def add_parser(subparsers):
    from kdfast.models import MODELS
    from kdfast.training.recipe import SCHEDULES
    p = subparsers.add_parser("distill", help="train a student on the kept subset with a teacher",
                              description="Train a student on the kept subset of a data set, distilling from a "
                                          "teacher trained on more data.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("Data")
    add_dataset_options(g)
    g.add_argument("--data-root", help="root folder of the data set (not needed for digits and shards)")
    g.add_argument("--keep", help=".npy of kept dataset indices, or a keyed keep list (.parquet, matched by key) "
                                  "(kdfast-prune); default: every example")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop + flip (default: on for CIFAR/SVHN/ImageNet, off for digits)")
    g.add_argument("--image-size", type=int, help="crop side for image folders (default 224)")
    g.add_argument("--val-fraction", type=float,
                   help=f"hold out this share of the training data (stratified by class, seeded by --seed) and "
                        f"evaluate on it every epoch; kept indices falling in it are not trained on (default: "
                        f"{DEFAULT_VAL_FRACTION} for data sets without a test split (folder), else 0: the test split). "
                        f"With --steps it is the chain's validation split, where each step's weight is chosen (default "
                        f"{DEFAULT_VAL_FRACTION}; the chain is evaluated on the test split)")
    g = p.add_argument_group("Model")
    g.add_argument("--model", type=model_name, metavar="NAME",
                   help=f"student architecture: {', '.join(MODELS)}, torchvision:NAME or timm:NAME (randomly "
                        "initialised; weights only from checkpoint files) (default: the data set's)")
    g.add_argument("--teacher", help="teacher checkpoint (.pt)")
    g.add_argument("--teacher-model", type=model_name, metavar="NAME",
                   help="teacher architecture, named as --model (default: --model)")
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
    _add_variance_options(p)
    add_chain_arguments(p)
    add_kd_term_options(p.add_argument_group("Feature distillation (added to the logit KD term)"))
    g = p.add_argument_group("Optimisation (default: the data set's recipe)")
    g.add_argument("--recipe", type=lower, choices=sorted(RECIPES), help="recipe the defaults come from")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--schedule", type=lower, choices=SCHEDULES)
    g.add_argument("--milestones", help="epochs where the LR is divided by 10, e.g. 150,180,210")
    g = p.add_argument_group("Performance")
    add_performance_options(g, num_workers_default=0, num_workers_help="data loader workers (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    g = p.add_argument_group("Output")
    add_output_options(g, out_help="output folder (required)", resume_help="continue the run in --out after its "
                       "last finished epoch")
    return p


def _add_variance_options(p):
    g = p.add_argument_group(
        "Stochastic pruning and variance reduction",
        "LiPrune's stochastic pruning (Eq. 2) instead of --keep; unbiased self-distillation (Eq. 16 of the "
        "KD-variance-reduction paper) and its Eq. 14-15 diagnostic")
    g.add_argument("--sampler", type=lower, choices=("lipschitz",),
                   help="lipschitz: every epoch draws round(r n) examples with p_i ~ score_i (--scores) and weights "
                        "their loss by 1/(r n p_i)")
    g.add_argument("--scores", help="scores for --sampler: a kdfast-score folder (e.g. --method liprune-last) or "
                                    "a .npy, one positive score per training example")
    g.add_argument("--fraction", type=float, help="r in (0, 1]: share of the data drawn per epoch by --sampler")
    g.add_argument("--correction", type=lower, choices=("none", "unbiased"), default="none",
                   help="unbiased: add alpha times the teacher's full-data gradient to every step (needs a teacher "
                        "of the student's architecture, exact at --temperature 1) (default: %(default)s)")
    g.add_argument("--teacher-report", action="store_true",
                   help="after training write OUT/teacher_report.json: beta, rho, lambda* and N(lambda*)/N(0) of "
                        "Eqs. 14-15 from mini-batch gradients of the student and the teacher")
    g.add_argument("--report-batches", type=int, default=200,
                   help="mini-batches the teacher report averages over (default: %(default)s)")


def _resolve_variance_options(args, problems):
    if args.sampler:
        if not args.scores or args.fraction is None:
            problems.append("--sampler lipschitz needs --scores DIR and --fraction r")
        if args.keep:
            problems.append("--sampler (stochastic pruning) and --keep (a fixed subset) cannot go together")
    elif args.scores or args.fraction is not None:
        problems.append("--scores and --fraction go with --sampler lipschitz")
    if args.fraction is not None:
        problems.append(fraction("fraction", args.fraction))
    if args.scores and not os.path.exists(args.scores):
        problems.append(f"--scores {args.scores} does not exist")
    if args.sampler and args.val_fraction:
        problems.append(f"--sampler draws from every training example, so it cannot hold out --val-fraction "
                        f"{args.val_fraction:g} (the default where the data set has no test split); pass --val-fraction 0")
    for name, on in (("--correction unbiased", args.correction == "unbiased"), ("--teacher-report", args.teacher_report)):
        if not on:
            continue
        if not (args.teacher or args.train_teacher) or args.teacher_cache:
            problems.append(f"{name} needs the teacher module (--teacher or --train-teacher), not --teacher-cache")
        if args.teacher_model and args.teacher_model != (args.model or args.teacher_model):
            problems.append(f"{name} needs a teacher of the student's architecture (self-distillation), got "
                            f"--teacher-model {args.teacher_model} and --model {args.model}")
    if args.correction == "unbiased" and args.alpha == 0.0:
        problems.append("--correction unbiased with --alpha 0 changes nothing (it adds alpha times the teacher's "
                        "gradient)")
    if args.report_batches < 2:
        problems.append(f"--report-batches must be >= 2, got {args.report_batches}")


# --------------------------------------------------------------------------------- argument resolution
@dataclasses.dataclass(frozen=True)
class Resolved:
    """The resolved command line: its options and the training recipe they make (the recipe's defaults with the
    options given laid over them)."""
    args: argparse.Namespace
    recipe: TrainRecipe

    def config(self) -> dict:
        """The job's configuration (OUT/job.json): every option, the recipe's fields at their resolved values."""
        return {**vars(self.args), **self.recipe.options()}


def _parse_milestones(text, problems):
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        problems.append(f"--milestones must be comma-separated epochs, e.g. 150,180,210, got {text!r}")
        return None


def _parse_schedule(text, problems):
    try:
        return tuple(tuple(float(v) for v in pair.split(":")) for pair in text.split(","))
    except ValueError:
        problems.append(f"--alpha-schedule must look like '0.1:1,0.7:0.5' (fraction:alpha pairs), got {text!r}")
        return None


def _parse_alpha(text, problems, expected):
    try:
        return float(text)
    except ValueError:
        problems.append(f"--alpha must be {expected}, got {text!r}")
        return None


def _recipe(args, problems) -> TrainRecipe | None:
    """The --recipe (default: the data set's) with the options given laid over it. Given only --epochs, a step
    schedule keeps its shape: its milestones move to the same fractions of the run."""
    base = RECIPES[args.recipe or DATASET_RECIPE[dataset_kind(args.dataset)]]
    given = {name: getattr(args, name) for name in RECIPE_OPTIONS if getattr(args, name) is not None}
    if args.milestones is not None:
        given["milestones"] = _parse_milestones(args.milestones, problems)
        if given["milestones"] is None:
            return None
    elif base.milestones and isinstance(args.epochs, int) and args.epochs >= 1:
        base = base.rescaled(args.epochs)
    return made(lambda: dataclasses.replace(base, **given), problems)


def resolve(args) -> Resolved:
    """Validates everything at once (UsageError listing every problem) and resolves the defaults. The recipe and
    the distillation values are checked by the library's objects (TrainRecipe, KDSetup); their problems are
    reported in the flags' names."""
    problems = []
    recipe = _recipe(args, problems)
    if args.out is None:
        problems.append("--out is required (the output folder)")
    chain = args.steps != 1 or args.alpha == "optimal"  # a self-distillation chain: its own checks
    if args.val_fraction is None:  # a chain chooses its weights on the held-out share: it always needs one
        args.val_fraction = DEFAULT_VAL_FRACTION if chain or EVAL_SPLIT[dataset_kind(args.dataset)] is None else 0.0
    elif not chain and args.val_fraction != 0.0:
        problems.append(fraction("val_fraction", args.val_fraction, closed_high=False,
                                 expected="0 or a number in (0, 1)"))
    check_common(args, problems, positive=("teacher_epochs", "image_size", "steps"),
                 fractions=("val_fraction",) if chain else ())
    problems.append(fraction("teacher_fraction", args.teacher_fraction))
    if chain:
        resolve_chain(args, problems)
    elif args.alpha != "auto":
        args.alpha = _parse_alpha(args.alpha, problems, "a number in [0, 1] or 'auto'")
    if args.alpha not in ("auto", "optimal", None):  # its range (and --temperature's) as the library sees them
        made(lambda: KDSetup(alpha=args.alpha, temperature=args.temperature,
                             extrapolate=chain and args.alpha_range == "any"), problems)
    else:
        made(lambda: KDSetup(alpha=0.0, temperature=args.temperature), problems)
    args.alpha_schedule_points = None if args.alpha_schedule is None else _parse_schedule(args.alpha_schedule,
                                                                                         problems)
    sources = [name for name, on in (("--teacher", args.teacher), ("--train-teacher", args.train_teacher),
                                     ("--teacher-cache", args.teacher_cache)) if on]
    check_kd_term(args, sources, problems)
    if args.train_teacher and args.teacher:
        problems.append("give --teacher or --train-teacher, not both")
    if args.teacher_cache and args.train_teacher:
        problems.append("--teacher-cache holds an existing teacher's logits; it cannot go with --train-teacher")
    if not sources and args.alpha not in (0.0, None) and not chain:
        problems.append(f"--alpha {args.alpha} distills from a teacher: pass --teacher PATH, --train-teacher or "
                        "--teacher-cache DIR (or --alpha 0 to train without one)")
    for option, path in (("--teacher", args.teacher), ("--keep", args.keep)):
        if path and not os.path.isfile(path):
            problems.append(f"{option} {path} does not exist")
    if args.teacher_cache and not os.path.isdir(args.teacher_cache):
        problems.append(f"--teacher-cache {args.teacher_cache} is not a folder")
    if args.augment is None:
        args.augment = args.dataset != "digits" and not args.teacher_cache
    if args.teacher_cache and args.augment:
        problems.append("--teacher-cache needs --no-augment: cached logits are of the un-augmented images")
    check_dataset_options(args, problems)
    _resolve_variance_options(args, problems)
    problems = [p.text(flag(p.name)) if isinstance(p, Problem) else p for p in problems if p is not None]
    if problems:
        raise UsageError("; ".join(problems))
    from kdfast.models import DEFAULT_MODEL
    args.model = args.model or DEFAULT_MODEL[dataset_kind(args.dataset)]
    args.teacher_model = args.teacher_model or args.model
    args.teacher_epochs = args.teacher_epochs or recipe.epochs
    # the contents behind the paths join the job's identity: a keep file, scores or teacher replaced in place is
    # another job
    from kdfast.models import file_sha256
    args.keep_sha256 = file_sha256(args.keep) if args.keep else None
    args.teacher_sha256 = file_sha256(args.teacher) if args.teacher else None
    scores_file = os.path.join(args.scores, "scores.npy") if args.scores and os.path.isdir(args.scores) else args.scores
    args.scores_sha256 = file_sha256(scores_file) if scores_file and os.path.isfile(scores_file) else None
    cache_meta = os.path.join(args.teacher_cache, "meta.json") if args.teacher_cache else None
    args.teacher_cache_sha256 = file_sha256(cache_meta) if cache_meta and os.path.isfile(cache_meta) else None
    return Resolved(args, recipe)


# ----------------------------------------------------------------------------------------- the work
def _device(name):
    import torch
    return torch.device(default_device(name))


def run(args) -> int:
    """Distills as one process, or as one rank of a torchrun job (DistributedDataParallel); 0 on success."""
    resolved = resolve(args)
    with distributed.process_group_for(_device(args.device)) as device:
        return _run(resolved, device)


def _run(resolved: Resolved, device) -> int:
    from kdfast.data import data_identity
    from kdfast.io import Job
    from kdfast.pipelines.distill import load_distill_data, run_distill_job
    from kdfast.pipelines.self_distill import run_chain_job
    args, recipe = resolved.args, resolved.recipe
    if args.kd_term != "logit" and distributed.world_size() > 1:  # before any teacher is trained in vain
        raise UsageError(f"--kd-term {args.kd_term}: the term's parameters would train outside "
                         "DistributedDataParallel; run on one process, not under torchrun")
    args.quiet = args.quiet or not distributed.is_main()  # the main rank writes files and reports
    if args.steps != 1 and distributed.world_size() > 1:
        raise CliError("--steps runs on one process (the chain's fits are sequential); launch it without torchrun")
    data = load_distill_data(args)  # before the job starts: a data or keep-file error leaves --out untouched
    job = Job.start_on_main(args.out, "distill", resolved.config(), data=data_identity(data.train), files=data.train.files,
                            resume=args.resume, overwrite=args.overwrite, label=flag)
    if job.finished:
        log(f"{args.out} already holds a finished run; nothing to do", quiet=args.quiet)
        return 0
    with job:  # a failure before any work product leaves nothing that blocks a corrected rerun
        summary = (run_chain_job if args.steps != 1 else run_distill_job)(args, recipe, job, data, device)
    if args.steps != 1:
        return report_chain(summary, job)
    if summary is None:
        return 0
    acc = (f"eval acc {summary['eval_acc']:.4f} (best {summary['best_eval_acc']:.4f} at epoch "
           f"{summary['best_epoch']}) on the {summary['eval']}") if "eval_acc" in summary else \
        f"train acc {summary['final']['train_acc']:.4f} (no evaluation data)"
    term = "" if summary["kd_term"] is None else \
        f", kd_term {summary['kd_term']['name']} (beta {summary['kd_term']['beta']:g})"
    print(f"{args.model} student, f = {summary['fraction']:.3g}, alpha = {summary['alpha']:.3g}{term}: {acc} after "
          f"{recipe.epochs} epochs -> {job.path('student.pt')}")
    for warning in summary["warnings"]:
        warnings.warn(warning, stacklevel=1)  # one line on stderr through run_cli
    return 0


# -------------------------------------------------------------- self-distillation chain (--steps)
def add_chain_arguments(p):
    g = p.add_argument_group("Self-distillation chain (kdfast.training.self_distill)")
    g.add_argument("--steps", type=int, default=1,
                   help="train a chain of this many students, each distilling from the previous one (the first "
                        "from the labels alone); with --alpha optimal each step's weight is chosen in closed form "
                        f"on the --val-fraction held out (default {DEFAULT_VAL_FRACTION} for a chain), the chain "
                        "evaluated on the test split (default: %(default)s, no chain)")
    g.add_argument("--alpha-range", type=lower, choices=("clip", "any"), default="clip",
                   help="--alpha optimal: clip each step's weight to [0, 1] (recorded), or use it as is "
                        "(extrapolation) (default: %(default)s)")


def resolve_chain(args, problems):
    if args.steps < 1:
        return  # check_common names it
    if args.steps == 1:
        problems.append("--alpha optimal chooses the weight of each distillation step: it needs --steps >= 2")
        return
    if args.alpha == "auto":
        problems.append("--steps needs --alpha optimal or a fixed number (--alpha auto is the pruning schedule)")
    elif args.alpha != "optimal":
        args.alpha = _parse_alpha(args.alpha, problems, "'optimal' or a number in [0, 1] (any finite number with "
                                                        "--alpha-range any)")
    for name, on in (("--teacher", args.teacher), ("--train-teacher", args.train_teacher),
                     ("--teacher-cache", args.teacher_cache)):
        if on:
            problems.append(f"--steps {args.steps} is self-distillation (each student's teacher is the previous "
                            f"one); it cannot go with {name}")


def report_chain(summary, job) -> int:
    for r in summary["records"]:
        optimal = "" if r["alpha_optimal"] is None else f" (optimal {r['alpha_optimal']:.3g}" + (
            ", clipped)" if r["clipped"] else ")")
        acc = f", eval acc {r['eval_acc']:.4f}" if "eval_acc" in r else ""
        print(f"step {r['step']}: alpha = {r['alpha']:.3g}{optimal}, val acc {r['val_acc']:.4f}{acc}")
    print(f"-> {job.path('student.pt')}, {job.path('self_distill.csv')}")
    return 0


if __name__ == "__main__":
    from kdfast.cli.main import distill_main
    sys.exit(distill_main())
