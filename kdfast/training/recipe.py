"""How a model is trained: the optimisation recipe `fit` runs, one frozen object validated once when it is made.

    recipe = TrainRecipe(epochs=30, batch_size=64, lr=0.05)
    recipe = TrainRecipe(epochs=240, batch_size=64, lr=0.05, schedule="step", milestones=(150, 180, 210))
    fit(model, dataset, recipe)

The command line's recipes (kdfast.cli.distill.RECIPES) are instances; its options override their fields.
"""
from __future__ import annotations

import dataclasses

from kdfast.runtime.checks import Problem, finite, int_at_least, integer, one_of, positive_int, require
from kdfast.runtime.devices import PRECISIONS

SCHEDULES = ("cosine", "step", "constant")
CHECKPOINT_EVERY_S = 300.0  # a kill loses at most this much training time (plus one checkpoint write)


@dataclasses.dataclass(frozen=True)
class TrainRecipe:
    """SGD (Nesterov off, as the papers' recipes) over `epochs` passes of batch_size examples.

    schedule: "cosine" (annealed to 0 over `epochs`), "step" (LR / 10 at each epoch in `milestones`) or
        "constant"; stepped once per epoch.
    precision: "fp32" or "bf16" autocast.
    seed: seeds the shuffling; epoch e shuffles with seed + e, so a resumed run replays the same order.
    num_workers: data loading processes (the results do not depend on it: not part of a run's identity).
    checkpoint_every_s, checkpoint_steps: how often `fit` checkpoints within an epoch (None: never by that rule);
        a resumed run ends with the same weights either way, so neither is part of a run's identity.
    """
    epochs: int
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple = ()
    precision: str = "fp32"
    seed: int = 0
    num_workers: int = dataclasses.field(default=0, metadata={"identity": False})
    # library settings with no command-line option of their own (the command lines take the defaults)
    checkpoint_every_s: float | None = dataclasses.field(default=CHECKPOINT_EVERY_S,
                                                         metadata={"identity": False, "option": False})
    checkpoint_steps: int | None = dataclasses.field(default=None, metadata={"identity": False, "option": False})

    def __post_init__(self):
        if isinstance(self.milestones, (list, range)):
            object.__setattr__(self, "milestones", tuple(self.milestones))
        require("TrainRecipe", *self._problems())

    def _problems(self):
        yield positive_int("epochs", self.epochs)
        yield positive_int("batch_size", self.batch_size)
        yield finite("lr", self.lr, low=0.0)
        yield finite("momentum", self.momentum, low=0.0, low_open=False)
        yield finite("weight_decay", self.weight_decay, low=0.0, low_open=False)
        yield one_of("schedule", self.schedule, SCHEDULES)
        m = self.milestones
        if not isinstance(m, tuple) or any(positive_int("milestones", v) for v in m) or list(m) != sorted(m):
            # a repeated epoch divides the LR twice there (MultiStepLR), as a rescaled short run may need
            yield Problem("milestones", "non-decreasing positive epochs, e.g. (150, 180, 210)", m)
        elif self.schedule == "step" and not m:
            yield "schedule='step' needs milestones (epochs where the LR is divided by 10)"
        yield one_of("precision", self.precision, PRECISIONS)
        yield integer("seed", self.seed)
        yield int_at_least("num_workers", self.num_workers, 0)
        if self.checkpoint_every_s is not None:
            yield finite("checkpoint_every_s", self.checkpoint_every_s, low=0.0)
        if self.checkpoint_steps is not None:
            yield positive_int("checkpoint_steps", self.checkpoint_steps)

    def rescaled(self, epochs: int) -> "TrainRecipe":
        """The recipe over `epochs`, its step milestones at the same fractions of the run (150/180/210 of 240 ->
        the same shares of a shorter or longer run)."""
        milestones = tuple(max(1, round(m * epochs / self.epochs)) for m in self.milestones)
        return dataclasses.replace(self, epochs=epochs, milestones=milestones)

    def options(self) -> dict:
        """The fields a command line sets (its job record's recipe part)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("option", True)}

    def identity(self) -> dict:
        """Every field that shapes the result: a resumed run must repeat them. epochs shape the cosine schedule
        from the first epoch on; a step or constant schedule may be extended, so there they are left out."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("identity", True)}
        if self.schedule != "cosine":
            fields["epochs"] = None
        fields["milestones"] = list(self.milestones)
        return fields
