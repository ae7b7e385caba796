"""Training-loop callbacks (:class:`training.engine.TrainCallback`) of the methods of this repository."""
from __future__ import annotations

from pruning.schedule import GradualMagnitudePruner
from training.engine import TrainCallback


class GradualPruningCallback(TrainCallback):
    """Zhu & Gupta gradual pruning in the loop: masks updated before the update steps, re-applied after every step."""

    def __init__(self, pruner: GradualMagnitudePruner) -> None:
        self.pruner = pruner

    def on_batch_start(self, step: int) -> None:
        self.pruner.update(step)

    def after_optimizer_step(self, step: int) -> None:
        self.pruner.apply_masks()
