"""The `kdfast-distill --steps` job: a self-distillation chain (kdfast.training.self_distill) in the job's folder.

    data = load_distill_data(cfg)        # the chain's validation split is the job's held-out share
    job = Job.start(cfg.out, "distill", {**vars(cfg), ...}, ...)   # --steps, --alpha, --alpha-range join the identity
    summary = run_chain_job(cfg, recipe, job, data, device)       # recipe: every fit's kdfast.TrainRecipe

The held-out share (--val-fraction, stratified by class, seeded by --seed) is what the chain chooses each step's
weight on; the job's data loading carves it for every distill run, so plain and chained runs hold out alike. The
chain is evaluated on the test split (when the data set has one). Step models, auxiliary fits and per-epoch
checkpoints lie in OUT/step{t}/; the job has checked that they are this chain's, so every fit resumes from them.
"""
from __future__ import annotations

from kdfast.runtime.progress import log
from kdfast.io.atomic import save_torch, write_json
from kdfast.pipelines.distill import DistillData, build_model


def run_chain_job(cfg, recipe, job, data: DistillData, device) -> dict:
    """Runs (or resumes) the chain; writes OUT/student.pt (the last student), OUT/summary.json and marks the job
    complete. Returns the summary (with every step's record)."""
    import torch

    from kdfast.training.self_distill import self_distill
    log(f"self-distillation: {cfg.steps} students {cfg.model} on {len(data.keep)} {cfg.dataset} examples, "
        f"{len(data.held_out)} held out to choose the weights, alpha = {cfg.alpha} ({cfg.alpha_range}), "
        f"T = {cfg.temperature}, {recipe.epochs} epochs each, device {device}; eval: {data.eval_name}", quiet=cfg.quiet)
    result = self_distill(
        lambda: build_model(cfg.model, cfg.dataset, data.train.num_classes, cfg.image_size), data.train, recipe,
        steps=cfg.steps, alpha=cfg.alpha, extrapolate=cfg.alpha_range == "any", indices=torch.from_numpy(data.keep),
        val_indices=torch.from_numpy(data.held_out), temperature=cfg.temperature, eval_dataset=data.evaluation,
        out=job.out, device=device, resume=True, progress=not cfg.quiet)  # the job checked the checkpoints
    save_torch(job.path("student.pt"), result.model.state_dict())
    summary = {"dataset": cfg.dataset, "model": cfg.model, "steps": cfg.steps, "alpha": cfg.alpha,
               "alpha_range": cfg.alpha_range, "temperature": cfg.temperature, "epochs": recipe.epochs,
               "num_train": len(result.train_indices), "num_val": len(result.val_indices), "eval": data.eval_name,
               "records": result.records}
    write_json(job.path("summary.json"), summary)
    job.complete()
    return summary
