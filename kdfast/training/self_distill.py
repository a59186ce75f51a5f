"""Iterated self-distillation with the validation-optimal weight (self-distillation paper, Algorithm 1).

    result = self_distill(make_model, dataset, TrainRecipe(epochs=20), steps=3, alpha="optimal")
    result.records[-1]["alpha"], result.records[-1]["val_acc"], result.model

A chain of `steps` models of one architecture: model 1 is fit on the ground truth alone; model t >= 2
distills from model t - 1 with KD weight alpha_t. With alpha="optimal" each alpha_t comes from the paper's
two auxiliary fits: the labels-only fit (model 1, validation predictions y~1, fit once) and, at every step,
a teacher-only fit (alpha = 1, distilling from model t - 1, predictions y~0(t)); then

    alpha_t = optimal_alpha(y~, y~1, y~0(t))            (Theorem 4.4; exact for kernel ridge, where the
                                                         alpha fit predicts y~1 + alpha (y~0(t) - y~1))

so a chain costs 2 (steps - 1) + 1 fits instead of a grid's g (steps - 1) + 1. ALPHA IS THE WEIGHT OF THE
DISTILLATION TERM, as everywhere in kdfast (the paper's alpha is one minus it). The optimum often lies outside
[0, 1] (extrapolating past the teacher, or away from it); it is used as is only with extrapolate=True, else
clipped to [0, 1] and the record says so.

`run_chain` is the algorithm over any learner; `kernel_ridge_chain` runs it on kernel ridge regression (the
paper's setting, float64) and `self_distill` on networks trained with `kdfast.training.fit`.
"""
from __future__ import annotations

import csv
import dataclasses
import os

import torch

from kdfast.distill.setup import KDSetup
from kdfast.distill.step import optimal_alpha
from kdfast.errors import InvalidArgumentError
from kdfast.io.atomic import atomic_write, save_torch, write_json
from kdfast.runtime.checks import finite, fraction, positive_int, require
from kdfast.training.fit import _check_indices, evaluate, fit
from kdfast.training.recipe import TrainRecipe

RECORD_COLUMNS = ("step", "alpha", "alpha_optimal", "clipped", "val_mse", "teacher_only_val_mse", "val_acc",
                  "eval_acc", "train_acc")


# ------------------------------------------------------------------------------------- the algorithm
def _check_chain_args(fn, steps, alpha, extrapolate):
    require(fn, positive_int("steps", steps, expected="an integer >= 1 (the number of models in the chain, the first "
                                                      "fit on the labels alone)"))
    if alpha == "optimal":
        return
    require(fn, finite("alpha", alpha, expected="'optimal' or a finite number (the KD weight of every step after "
                                                "the first)"))
    if not extrapolate and not 0.0 <= alpha <= 1.0:
        raise InvalidArgumentError(f"{fn}: alpha={alpha} lies outside [0, 1]; pass extrapolate=True to use it")


def _val_mse(pred, y_val):
    return float((pred - y_val).square().sum()) / y_val.shape[0]


def run_chain(fit, predict, y_val, *, steps, alpha="optimal", extrapolate=False, on_step=None):
    """Algorithm 1 over any learner; returns (records, last model).

    fit(teacher, alpha, auxiliary) -> model: a fresh fit, on the labels alone when teacher is None (alpha 0),
        else distilling from `teacher` with KD weight alpha; auxiliary=True marks the teacher-only fit that
        only serves to choose the weight (alpha 1).
    predict(model) -> validation predictions, comparable to y_val ((m,) or (m, C), e.g. class probabilities
        against one-hot targets).
    on_step(step, model, record) is called after each step (to add metrics to the record, save the model).

    Each record: step, alpha (the KD weight used; 0 at step 1), alpha_optimal (the closed form before
    clipping; None at step 1 or for a fixed alpha), clipped, val_mse (mean over validation examples of the
    squared error summed over outputs), teacher_only_val_mse (the auxiliary fit's).
    """
    _check_chain_args("run_chain", steps, alpha, extrapolate)
    y_val = torch.as_tensor(y_val, dtype=torch.float64)

    def predictions(model):
        return torch.as_tensor(predict(model), dtype=torch.float64)

    model = fit(None, 0.0, False)
    labels_only = predictions(model)
    records = [{"step": 1, "alpha": 0.0, "alpha_optimal": None, "clipped": False,
                "val_mse": _val_mse(labels_only, y_val), "teacher_only_val_mse": None}]
    if on_step is not None:
        on_step(1, model, records[0])
    for step in range(2, steps + 1):
        record = {"step": step, "alpha_optimal": None, "clipped": False, "teacher_only_val_mse": None}
        if alpha == "optimal":
            teacher_only = predictions(fit(model, 1.0, True))
            best = optimal_alpha(y_val, labels_only, teacher_only)
            used = best if extrapolate else min(1.0, max(0.0, best))
            record.update(alpha_optimal=best, clipped=used != best,
                          teacher_only_val_mse=_val_mse(teacher_only, y_val))
        else:
            used = float(alpha)
        model = fit(model, used, False)
        record.update(alpha=used, val_mse=_val_mse(predictions(model), y_val))
        records.append(record)
        if on_step is not None:
            on_step(step, model, record)
    return records, model


# ------------------------------------------------------------------------------------- kernel ridge
def kernel_ridge_chain(K, K_val, y, y_val, *, lam, steps, alpha="optimal", extrapolate=False):
    """Algorithm 1 on kernel ridge regression, in float64: the paper's Sec. 4 setting.

    K: (n, n) training Gram matrix; K_val: (m, n) validation-by-training kernel; y: (n,) or (n, C) targets;
    y_val: the validation targets; lam > 0 the ridge. Each fit solves (K + lam I) c = (1 - a) y + a y_teacher
    with y_teacher the previous fit's training predictions (the paper's Eq. 1-5, a = its 1 - alpha).

    Returns (records, fits): fits[t - 1] = {"train": training predictions, "val": validation predictions}
    of chain member t.
    """
    K = torch.as_tensor(K, dtype=torch.float64)
    K_val = torch.as_tensor(K_val, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    n = y.shape[0]
    if K.shape != (n, n) or K_val.dim() != 2 or K_val.shape[1] != n:
        raise InvalidArgumentError(f"kernel_ridge_chain: K must be ({n}, {n}) and K_val (m, {n}) for {n} training "
                                   f"targets, got {tuple(K.shape)} and {tuple(K_val.shape)}")
    require("kernel_ridge_chain", finite("lam", lam, low=0.0))
    solve = torch.linalg.cholesky(K + lam * torch.eye(n, dtype=torch.float64))
    fits = []

    def fit(teacher, a, auxiliary):
        target = y if teacher is None else (1.0 - a) * y + a * teacher["train"]
        coef = torch.cholesky_solve(target.reshape(n, -1), solve).reshape(target.shape)
        member = {"train": K @ coef, "val": K_val @ coef}
        if not auxiliary:
            fits.append(member)
        return member

    records, _ = run_chain(fit, lambda m: m["val"], y_val, steps=steps, alpha=alpha, extrapolate=extrapolate)
    return records, fits


# ----------------------------------------------------------------------------------------- networks
@dataclasses.dataclass
class SelfDistillResult:
    """records: one dict per chain step (RECORD_COLUMNS); model: the last student; val_indices: the held-out
    examples the weights were chosen on; train_indices: the examples every model trained on."""
    records: list
    model: torch.nn.Module
    val_indices: torch.Tensor
    train_indices: torch.Tensor


def _split(dataset, indices, val_indices, val_fraction, seed):
    pool = torch.arange(len(dataset)) if indices is None else _check_indices(indices, len(dataset))
    if val_indices is not None:
        val = _check_indices(val_indices, len(dataset))
        train = pool[~torch.isin(pool, val)]
    else:
        require("self_distill", fraction("val_fraction", val_fraction, closed_high=False, expected="a number in "
                                         "(0, 1) (the share of the training examples held out to choose each "
                                         "step's weight)"))
        k = round(val_fraction * len(pool))
        if k < 1 or k >= len(pool):
            raise InvalidArgumentError(f"self_distill: val_fraction={val_fraction} of {len(pool)} training examples "
                                       f"leaves {k} for validation and {len(pool) - k} for training; both must be "
                                       "non-empty (use more examples or another val_fraction)")
        perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
        val, train = pool[perm[:k]].sort().values, pool[perm[k:]].sort().values
    if len(train) == 0:
        raise InvalidArgumentError(f"self_distill: val_indices hold every one of the {len(pool)} training examples; "
                                   "none are left to train on")
    return train, val


@torch.no_grad()
def _probabilities(model, inputs, device, batch_size):
    model.eval()
    return torch.cat([torch.softmax(model(inputs[i:i + batch_size].to(device)).double(), dim=1).cpu()
                      for i in range(0, len(inputs), batch_size)])


def write_records(out, records):
    """OUT/self_distill.json and OUT/self_distill.csv (one row per step), replaced atomically."""
    write_json(os.path.join(out, "self_distill.json"), records)
    atomic_write(os.path.join(out, "self_distill.csv"), lambda fh: _write_csv(fh, records), mode="w")


def _write_csv(fh, records):
    writer = csv.DictWriter(fh, fieldnames=RECORD_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)


def self_distill(model_fn, dataset, recipe: TrainRecipe, *, steps, alpha="optimal", extrapolate=False,
                 temperature=1.0, val_fraction=0.1, val_indices=None, indices=None, eval_dataset=None, out=None,
                 resume=False, device=None, progress=False) -> SelfDistillResult:
    """Iterated self-distillation of networks with Algorithm 1's per-step weight (see the module docstring).

    Args:
        model_fn: () -> a fresh, untrained model (every fit starts from one; the step's teacher-only and
            final fits share one initialisation, recipe.seed + step, so they differ only by their targets).
        dataset: map-style (input, label) data; `indices` restricts it (e.g. a kept subset).
        recipe: the kdfast.TrainRecipe of every fit (fit t shuffles from recipe.seed + t); its seed also draws
            the validation split.
        steps: chain length >= 1 (steps == 1 is plain training on the labels).
        alpha: "optimal" (closed form per step) or a fixed KD weight for steps >= 2.
        extrapolate: use an optimal (or given) weight outside [0, 1] as is; otherwise it is clipped to [0, 1]
            (record["clipped"]).
        temperature: T = 1 by default: the mixed objective is then cross-entropy against the mixed target
            (1 - alpha) onehot + alpha p_teacher, the analogue of the paper's Eq. 1. With alpha and extrapolate
            it makes each fit's kdfast.KDSetup (the teacher: the previous chain member).
        val_fraction / val_indices: the held-out validation split the weights are chosen on (drawn from the
            training examples with the recipe's seed, or given); never trained on.
        eval_dataset: a test set, evaluated after each step (record["eval_acc"]).
        out: a folder: step models OUT/step{t}/student.pt (auxiliary fits in OUT/step{t}/teacher_only/), per-epoch
            checkpoints, and OUT/self_distill.json/.csv rewritten after every step. resume=True continues from
            the checkpoints there.

    Validation predictions are class probabilities (softmax, T = 1) against one-hot labels (the paper's
    Sec. 5, Frobenius norm). Returns a SelfDistillResult.
    """
    if not isinstance(recipe, TrainRecipe):
        raise InvalidArgumentError(f"self_distill: recipe must be a kdfast.TrainRecipe, got {type(recipe).__name__}")
    seed = recipe.seed
    _check_chain_args("self_distill", steps, alpha, extrapolate)
    if isinstance(model_fn, torch.nn.Module) or not callable(model_fn):  # a model is callable too
        raise InvalidArgumentError(f"self_distill: model_fn must be a callable returning a fresh model (every fit "
                                   f"starts from one), got {type(model_fn).__name__}")
    train_idx, val_idx = _split(dataset, indices, val_indices, val_fraction, seed)
    samples = [dataset[int(i)] for i in val_idx]
    val_x = torch.stack([x for x, _ in samples])
    val_y = torch.as_tensor([int(y) for _, y in samples])
    num_classes = getattr(dataset, "num_classes", None) or int(val_y.max()) + 1
    y_val = torch.nn.functional.one_hot(val_y, num_classes).double()
    if out is not None:
        os.makedirs(out, exist_ok=True)
    state = {"step": 1, "history": None}  # the step being fit; the last chain member's fit history
    done = []

    def folder(*parts):
        return None if out is None else os.path.join(out, *parts)

    def fit_one(teacher, a, auxiliary):
        step = state["step"]
        where = folder(f"step{step}", "teacher_only") if auxiliary else folder(f"step{step}")
        torch.manual_seed(seed + step)
        model = model_fn()
        kd = KDSetup(teacher=teacher, alpha=a, temperature=temperature, extrapolate=extrapolate)
        history = fit(model, dataset, dataclasses.replace(recipe, seed=seed + step), kd, subset=train_idx,
                      device=device, checkpoint_path=None if where is None else os.path.join(where, "checkpoint.pt"),
                      resume=resume, progress=progress)
        if not auxiliary:
            state["history"] = history
        return model

    def predict(model):
        device_ = next(model.parameters()).device
        return _probabilities(model, val_x, device_, 512)

    def on_step(step, model, record):
        state["step"] = step + 1
        record["val_acc"] = float((predict(model).argmax(1) == val_y).double().mean())
        record["train_acc"] = state["history"][-1]["train_acc"]
        if eval_dataset is not None:
            record["eval_acc"] = evaluate(model, eval_dataset)["acc"]  # on the model's device
        if out is not None:
            save_torch(os.path.join(folder(f"step{step}"), "student.pt"), model.state_dict())
        done.append(record)
        if out is not None:
            write_records(out, done)

    records, model = run_chain(fit_one, predict, y_val, steps=steps, alpha=alpha, extrapolate=extrapolate,
                               on_step=on_step)
    return SelfDistillResult(records=records, model=model, val_indices=val_idx, train_indices=train_idx)
