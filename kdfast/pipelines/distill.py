"""The `kdfast-distill` job: a student trained on the kept subset, distilling from a teacher (online, trained
here, or from a TeacherCache; optionally plus a feature term of kdfast.distill.terms), evaluated every epoch on a
test split or a held-out share of the training data; or trained with stochastic pruning (an ImportanceSampler
over scores, LiPrune Eq. 2) and the unbiased self-distillation correction (Eq. 16), with the Eq. 14-15 teacher
report. The command line resolves the options and prints; this module does the work and writes the files.

    data = load_distill_data(cfg)            # train / eval views, kept and held-out indices, checked
    job = Job.start(cfg.out, "distill", {**vars(cfg), **recipe.options()}, data=..., ...)
    summary = run_distill_job(cfg, recipe, job, data, device)     # recipe: the kdfast.TrainRecipe
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
import sys
from dataclasses import dataclass

import numpy as np

from kdfast.runtime import distributed
from kdfast.runtime.progress import log
from kdfast.io.atomic import atomic_write, read_json, save_torch, write_json

METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "eval_loss", "eval_acc", "seconds", "examples_per_s")
EVAL_SPLIT = {"digits": "test", "cifar10": "test", "cifar100": "test", "svhn": "test", "imagenet": "val",
              "folder": None}


@dataclass
class DistillData:
    train: object               # the training split (augmented view when cfg.augment)
    evaluation: object | None   # what every epoch is evaluated on (None: nothing)
    keep: np.ndarray | None     # kept dataset indices, without held-out ones (None: every example)
    held_out: np.ndarray | None  # dataset indices held out (--val-fraction): evaluation, or a chain's validation
    fraction: float             # kept / total (before holding out), the f of alpha_for_fraction
    eval_name: str              # "test split", "held-out 10% of train (stratified, seed 0)", ...
    sampler: object | None = None  # the ImportanceSampler of --sampler (then keep and held_out are None)


def load_distill_data(cfg) -> DistillData:
    """Loads the training split, checks the keep file against it and carves the held-out share (if any)."""
    import torch

    from kdfast.data import LabeledSubset, dataset_kind, load_dataset, source_options, stratified_split
    from kdfast.pruning.keep import expect_keep_digests, read_keep
    size = {"image_size": cfg.image_size} if cfg.image_size else {}
    size.update(source_options(cfg))  # wds:/parquet: options
    eval_split = EVAL_SPLIT[dataset_kind(cfg.dataset)]
    train = load_dataset(cfg.dataset, root=cfg.data_root, split="train", augment=cfg.augment, **size)
    keep = None
    if cfg.keep is not None:
        keep, record = read_keep(cfg.keep, train, what=f"--keep {cfg.keep}")
        expect_keep_digests(cfg.keep, record, train, what=f"--keep {cfg.keep}")  # views below share the table
    fraction = 1.0 if keep is None else len(keep) / len(train)
    sampler = importance_sampler(cfg, train) if cfg.sampler else None
    if sampler is not None:
        fraction = len(sampler) / len(train)
    held_out, evaluation, eval_name = None, None, "none"
    # a self-distillation chain (--steps) chooses its weights on the held-out share: its evaluation stays the test split
    chain = getattr(cfg, "steps", 1) != 1
    if cfg.val_fraction:
        _, held = stratified_split(train.targets, cfg.val_fraction, seed=cfg.seed)
        held_out = held.numpy()
        keep = np.setdiff1d(np.arange(len(train)) if keep is None else keep, held_out)
    if cfg.val_fraction and not chain:
        view = train if not cfg.augment else train.with_augment(False) if hasattr(train, "with_augment") else \
            load_dataset(cfg.dataset, root=cfg.data_root, split="train", **size)  # image folders: one scan
        evaluation = LabeledSubset(view, torch.from_numpy(held_out))
        eval_name = f"held-out {cfg.val_fraction:g} of train (stratified, seed {cfg.seed}, {len(held_out)} examples)"
    elif eval_split is not None:
        evaluation = load_dataset(cfg.dataset, root=cfg.data_root, split=eval_split, **size)
        eval_name = f"{eval_split} split ({len(evaluation)} examples)"
    return DistillData(train, evaluation, keep, held_out, fraction, eval_name, sampler)


def importance_sampler(cfg, train):
    """The ImportanceSampler of --sampler lipschitz, after checking the scores belong to this data set."""
    from kdfast.errors import InvalidArgumentError
    from kdfast.pruning.sampling import ImportanceSampler
    from kdfast.scoring.folder import expect_score_digests, read_scores
    scores, meta = read_scores(cfg.scores, train, what=f"--scores {cfg.scores}")
    expect_score_digests(cfg.scores, train, meta)
    bad = ~np.isfinite(scores) | (scores <= 0)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InvalidArgumentError(
            f"--scores {cfg.scores} holds {int(bad.sum())} scores that are <= 0 or not finite (first: example "
            f"{first}, {scores[first]}); --sampler lipschitz draws p_i ~ score_i, so every example needs a positive "
            "score (liprune-last, el2n or grand scores are)")
    return ImportanceSampler(scores, cfg.fraction, seed=cfg.seed)


def write_teacher_report(cfg, recipe, job, student, teacher, data, device) -> dict:
    """OUT/teacher_report.json: Eqs. 14-15 of the KD-variance-reduction paper for the trained student and its
    teacher, over the examples the student was trained on (every example under --sampler)."""
    from kdfast.distill.variance_reduction import teacher_report
    report = teacher_report(student, teacher, data.train, lr=recipe.lr,
                            batch_size=min(recipe.batch_size, len(data.train)),
                            num_batches=cfg.report_batches, indices=data.keep, seed=cfg.seed, device=device)
    report = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in report.items()}
    write_json(job.path("teacher_report.json"), report)
    return report


def build_model(name, dataset_name, num_classes, image_size):
    from kdfast.data import INPUT_SHAPES, dataset_kind
    from kdfast.models import create_model
    channels, side = INPUT_SHAPES[dataset_kind(dataset_name)]
    return create_model(name, num_classes=num_classes, in_channels=channels, image_size=image_size or side)


@functools.lru_cache(maxsize=None)
def _warn_no_matplotlib():
    print("kdfast-distill: accuracy.png skipped: matplotlib is not installed (pip install matplotlib)",
          file=sys.stderr)


def write_metrics(out, history):
    """OUT/metrics.csv (one row per epoch) and OUT/accuracy.png (train and eval accuracy per epoch)."""
    def write_csv(fh):
        writer = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    atomic_write(os.path.join(out, "metrics.csv"), write_csv, mode="w")
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
    atomic_write(os.path.join(out, "accuracy.png"), lambda fh: fig.savefig(fh, format="png", dpi=100))
    plt.close(fig)


def fit_options(cfg, device) -> dict:
    """fit's keywords every training run of a job shares (resume=True: the job has checked that the
    checkpoints are this run's)."""
    return dict(device=device, resume=True, progress=not cfg.quiet, distributed=True)


def _train_teacher(cfg, recipe, job, data, device):
    import torch

    from kdfast.models import load_checkpoint
    from kdfast.pruning.selection import prune
    from kdfast.training.fit import fit
    folder = job.path("teacher")
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, "teacher.pt")
    torch.manual_seed(cfg.seed + 1)
    teacher = build_model(cfg.teacher_model, cfg.dataset, data.train.num_classes, cfg.image_size)
    if os.path.isfile(final):
        log(f"teacher: reusing {final}", quiet=cfg.quiet)
        return load_checkpoint(teacher, final), read_json(os.path.join(folder, "history.json"))
    pool = np.arange(len(data.train)) if data.held_out is None else np.setdiff1d(np.arange(len(data.train)),
                                                                                   data.held_out)
    indices = None if data.held_out is None else torch.from_numpy(pool)
    if cfg.teacher_fraction < 1.0:
        chosen = prune(torch.zeros(len(pool)), cfg.teacher_fraction, "random", seed=cfg.seed + 1)
        indices = torch.from_numpy(pool)[chosen]
    log(f"teacher: training {cfg.teacher_model} on {len(data.train) if indices is None else len(indices)} examples "
        f"for {cfg.teacher_epochs} epochs", quiet=cfg.quiet)
    history = fit(teacher, data.train, dataclasses.replace(recipe, epochs=cfg.teacher_epochs, seed=recipe.seed + 1),
                  subset=indices, checkpoint_path=os.path.join(folder, "checkpoint.pt"), eval_dataset=data.evaluation,
                  on_epoch=lambda history: write_metrics(folder, history), **fit_options(cfg, device))
    if distributed.is_main():
        write_json(os.path.join(folder, "history.json"), history)  # before teacher.pt, which marks it done
        save_torch(final, teacher.state_dict())
    return teacher, history


def resolve_alpha(cfg, fraction):
    from kdfast.distill.step import alpha_for_fraction
    return alpha_for_fraction(fraction, schedule=cfg.alpha_schedule_points) if cfg.alpha == "auto" else cfg.alpha


def make_term(cfg, student, teacher, train, device):
    """The feature term of cfg.kd_term (None for logit), sized on one training example."""
    if cfg.kd_term == "logit":
        return None
    from kdfast.distill.terms import make_kd_term
    student_layer, teacher_layer = cfg.kd_layers or (None, None)
    return make_kd_term(cfg.kd_term, student.to(device), teacher.to(device), train[0][0][None].to(device),
                        student_layer=student_layer, teacher_layer=teacher_layer, beta=cfg.kd_beta)


def run_distill_job(cfg, recipe, job, data: DistillData, device) -> dict | None:
    """Trains (or resumes) the student; the main rank writes student.pt, metrics and summary.json and returns
    the summary, the other ranks None."""
    import torch

    from kdfast.models import load_checkpoint, model_fingerprint
    from kdfast.training.fit import KDSetup, fit
    from kdfast.pipelines.score import learning_warnings
    alpha = resolve_alpha(cfg, data.fraction)
    teacher, cache, teacher_history = None, None, None
    if cfg.train_teacher:
        teacher, teacher_history = _train_teacher(cfg, recipe, job, data, device)
    elif cfg.teacher:
        teacher = load_checkpoint(build_model(cfg.teacher_model, cfg.dataset, data.train.num_classes, cfg.image_size),
                                  cfg.teacher)
    online_teacher = teacher  # the report's teacher, also when alpha = 0 drops it from training
    if cfg.teacher_cache:
        from kdfast.distill.teacher_cache import TeacherCache
        cache = TeacherCache.open(cfg.teacher_cache,
                                  teacher_fingerprint=None if teacher is None else model_fingerprint(teacher))
        cache = cache.for_dataset(data.train)  # a keyed subset of the cached source: its rows found by key
        cache.check_dataset(data.train)
        teacher = None  # the cache replaces the online teacher
    if alpha == 0:  # a feature term still needs the teacher's features
        teacher, cache = (None, None) if cfg.kd_term == "logit" else (teacher, None)
    n_train = len(data.sampler) if data.sampler is not None else len(data.train) if data.keep is None else \
        len(data.keep)
    skipped = getattr(data.train, "skipped_files", None)
    if skipped:
        log(f"{cfg.dataset}: {len(skipped)} non-image files skipped (e.g. {skipped[0]})", quiet=cfg.quiet)
    log(f"student: {cfg.model} on {n_train} of {len(data.train)} {cfg.dataset} examples (f = {data.fraction:.3g}), "
        f"alpha = {alpha:.3g}, T = {cfg.temperature}, {recipe.epochs} epochs, device {device}; eval: {data.eval_name}",
        quiet=cfg.quiet)
    torch.manual_seed(cfg.seed)
    student = build_model(cfg.model, cfg.dataset, data.train.num_classes, cfg.image_size)
    kd_term = make_term(cfg, student, teacher, data.train, device)
    kd = KDSetup(teacher=teacher, teacher_cache=cache, alpha=alpha, temperature=cfg.temperature, kd_term=kd_term,
                 correction=None if cfg.correction == "none" else cfg.correction)
    subset = data.sampler if data.sampler is not None else None if data.keep is None else torch.from_numpy(data.keep)
    history = fit(student, data.train, recipe, kd, subset=subset, checkpoint_path=job.path("checkpoint.pt"),
                  eval_dataset=data.evaluation, on_epoch=lambda h: write_metrics(job.out, h),
                  **fit_options(cfg, device))
    if not distributed.is_main():
        return None
    save_torch(job.path("student.pt"), student.state_dict())
    write_metrics(job.out, history)
    last = history[-1]
    summary = {"dataset": cfg.dataset, "model": cfg.model, "teacher_model": cfg.teacher_model if (
        teacher is not None or cache is not None) else None, "num_train": len(data.train), "num_kept": n_train,
        "num_held_out": 0 if data.held_out is None else len(data.held_out), "fraction": data.fraction,
        "alpha": alpha, "temperature": cfg.temperature, "kd_term": None if kd_term is None else kd_term.identity(),
        "epochs": recipe.epochs, "eval": data.eval_name,
        "eval_acc_per_epoch": [h["eval_acc"] for h in history] if "eval_acc" in last else None,
        "final": last}
    eval_targets = None if data.evaluation is None else data.evaluation.targets
    summary["warnings"] = learning_warnings(history, eval_targets, data.train.num_classes, "student")
    if teacher_history is not None:  # trained here: its notes first, the student's follow from them
        summary["teacher_final"] = teacher_history[-1]
        summary["warnings"][:0] = learning_warnings(teacher_history, eval_targets, data.train.num_classes, "teacher")
    if data.sampler is not None or cfg.correction != "none":
        summary.update(sampler=cfg.sampler, scores=cfg.scores, correction=cfg.correction)
    if cfg.teacher_report:
        rep = write_teacher_report(cfg, recipe, job, student, online_teacher, data, device)
        log(f"teacher report: lambda* = {rep['lambda_star']}, N(lambda*)/N(0) = {rep['noise_ratio']}, "
            f"beta = {rep['beta']}, rho = {rep['rho']} -> {job.path('teacher_report.json')}", quiet=cfg.quiet)
    if "eval_acc" in last:
        best = max(history, key=lambda h: h["eval_acc"])
        summary.update(eval_acc=last["eval_acc"], best_eval_acc=best["eval_acc"], best_epoch=best["epoch"])
    write_json(job.path("summary.json"), summary)
    job.complete()
    return summary
