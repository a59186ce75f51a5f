"""Wall time of a short `fit` with loader workers started once per run (kdfast.data.epoch_loader.EpochLoader)
against workers started per epoch (what fit did before: a DataLoader per epoch for training and one for the
held-out evaluation), interleaved in one process, best of the rounds; both must end with the same weights. The
in-process loader (num_workers=0) is timed alongside: the work without any worker.

    python -m bench.perf.bench_epoch_loader [--rounds 5] [--epochs 3] [--workers 2]
"""
from __future__ import annotations

import argparse
from unittest import mock

import torch

from kdfast.training import fit as training
from kdfast.data import load_dataset
from kdfast.data.epoch_loader import EpochLoader
from kdfast.models import create_model

from bench.common import wall_per_call_ms


class PerEpochWorkers(EpochLoader):
    """Workers stopped before every pass and started anew: the cost of a DataLoader built per epoch."""

    def epoch(self, seed=None, sampler=None):
        self.close()
        return super().epoch(seed, sampler)


def fit_with(loader_class, train, test, epochs: int, workers: int):
    torch.manual_seed(0)
    model = create_model("cnn", num_classes=10, in_channels=1, image_size=8)
    with mock.patch.object(training, "EpochLoader", loader_class):
        training.fit(model, train, training.TrainRecipe(epochs=epochs, batch_size=128, lr=0.05, num_workers=workers),
                     eval_dataset=test, progress=False)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    variants = {"per-epoch workers": (PerEpochWorkers, args.workers), "persistent workers": (EpochLoader, args.workers),
                "no workers": (EpochLoader, 0)}
    models = {}

    def run(name, cls, workers):
        def once():
            models[name] = fit_with(cls, train, test, args.epochs, workers)
        return once

    samples = wall_per_call_ms({name: run(name, *variant) for name, variant in variants.items()},
                               torch.device("cpu"), rounds=args.rounds, calls=1, warmup=0)
    times = {name: [ms / 1e3 for ms in ms_list] for name, ms_list in samples.items()}
    first, *others = models.values()
    same = all(torch.equal(a, b) for other in others for a, b in zip(first.parameters(), other.parameters()))
    for name, ts in times.items():
        print(f"{name:>20}: best {min(ts):.3f} s, median {sorted(ts)[len(ts) // 2]:.3f} s over {len(ts)} rounds")
    best = {name: min(ts) for name, ts in times.items()}
    print(f"speed-up {best['per-epoch workers'] / best['persistent workers']:.2f}x; same final weights: {same}")


if __name__ == "__main__":
    main()
