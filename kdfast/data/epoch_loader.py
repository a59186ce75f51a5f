"""A data loader whose worker processes live for a whole run, yet every pass gets the batches and the
worker-side random state of a DataLoader built afresh for that pass.

A fresh DataLoader per epoch starts `num_workers` processes per epoch (seconds with 8 workers on image
folders). With persistent workers they start once, and two things a fresh loader derives per epoch are
replayed here:
- the order. A fresh loader's iterator first draws its workers' base seed from its generator (the global
  RNG without one), then its RandomSampler permutes from the same generator. EpochLoader draws the base
  seed itself, then iterates a RandomSampler over that generator: the same permutation, and the same
  draws from the global RNG.
- the workers' RNGs. A fresh worker seeds torch, random and numpy from base_seed + worker id; persistent
  workers are seeded once. So every index carries its pass's (pass number, base seed), and a worker reseeds
  itself as a fresh one would on the first index of a new pass. Batches go round-robin from worker 0 in
  every pass (DataLoader resets the cycle), so each worker draws for the batches a fresh one would.

What persists: the workers' copy of the data set as it was at the first pass, with any state it keeps
besides those three RNGs.
"""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler
from torch.utils.data._utils import worker as _worker


class EpochLoader:
    """Batches of `data`, pass after pass, from worker processes started once.

        with EpochLoader(data, batch_size=128, num_workers=8) as loader:
            for epoch in range(epochs):
                for x, y in loader.epoch(seed + epoch):
                    ...

    With num_workers=0 each pass is a plain DataLoader (nothing to keep). Leaving the `with` block (or
    close()) stops the workers, also on an exception.
    """

    def __init__(self, data, *, batch_size: int, num_workers: int = 0, pin_memory: bool = False):
        self.data, self.batch_size, self.num_workers, self.pin_memory = data, batch_size, num_workers, pin_memory
        self._batches = _PassBatches(batch_size)
        self._loader = None

    def epoch(self, seed: int | None = None, sampler=None):
        """One pass: shuffled as DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed)) would,
        in the order of `sampler` (its epoch set by the caller), or in order when both are None."""
        generator = torch.Generator().manual_seed(seed) if seed is not None and sampler is None else None
        if self.num_workers == 0:
            return DataLoader(self.data, batch_size=self.batch_size, shuffle=generator is not None, sampler=sampler,
                              generator=generator, pin_memory=self.pin_memory, drop_last=False)
        base_seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())
        order = sampler if sampler is not None else \
            RandomSampler(self.data, generator=generator) if generator is not None else SequentialSampler(self.data)
        self._batches.start(order, base_seed)
        if self._loader is None:
            # its own generator: the base seed its first iterator draws (unused, see _Reseeding) must not
            # come from the global RNG, which a fresh loader per pass would not have touched
            self._loader = DataLoader(_Reseeding(self.data), batch_sampler=self._batches,
                                      num_workers=self.num_workers, pin_memory=self.pin_memory,
                                      persistent_workers=True, generator=torch.Generator())
        return self._loader

    def close(self) -> None:
        """Stops the worker processes now (not whenever the loader is garbage-collected)."""
        loader, self._loader = self._loader, None
        if loader is not None and loader._iterator is not None:
            loader._iterator._shutdown_workers()  # joins them; terminates any that do not exit
            loader._iterator = None

    def __enter__(self) -> EpochLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _PassBatches:
    """The persistent loader's batch sampler: the current pass's batches of (pass key, index)."""

    def __init__(self, batch_size: int):
        self.batch_size, self.order, self.key, self.passes = batch_size, None, None, 0

    def start(self, order, base_seed: int) -> None:
        self.passes += 1
        self.order, self.key = order, (self.passes, base_seed)

    def __len__(self) -> int:
        return len(BatchSampler(self.order, self.batch_size, drop_last=False))

    def __iter__(self):
        # a generator, so nothing is drawn until the first batch: DataLoader's first iterator calls iter()
        # twice and drops one of them, and ImportanceSampler advances its epoch on every iter()
        key = self.key
        for batch in BatchSampler(self.order, self.batch_size, drop_last=False):
            yield [(key, i) for i in batch]


class _Reseeding(Dataset):
    """The data set inside a persistent worker: item (pass key, i) is data[i], after seeding the worker as a
    fresh DataLoader worker of that pass would be seeded (torch.utils.data._utils.worker._worker_loop)."""

    def __init__(self, data):
        self.data, self._pass = data, None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item):
        key, i = item
        if key != self._pass:
            _seed_worker(key[1])
            self._pass = key
        return self.data[i]


def _seed_worker(base_seed: int) -> None:
    info = torch.utils.data.get_worker_info()
    seed = base_seed + info.id
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(_worker._generate_state(base_seed, info.id))
    _worker._worker_info = dataclasses.replace(info, seed=seed)  # get_worker_info().seed names this pass's seed
