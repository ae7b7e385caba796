"""Training-loop callbacks (:class:`training.engine.TrainCallback`) of the methods of this repository."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pruning.schedule import GradualMagnitudePruner
from quantization.position_scaling import (
    DEFAULT_LAMBDA,
    RANGE_MOMENTUM,
    SymmetricRangeTracker,
    nearest_grid_point,
    position_scaled_gradient,
)
from training.engine import TrainCallback


class GradualPruningCallback(TrainCallback):
    """Zhu & Gupta gradual pruning in the loop: masks updated before the update steps, re-applied after every step."""

    def __init__(self, pruner: GradualMagnitudePruner) -> None:
        self.pruner = pruner

    def on_batch_start(self, step: int) -> None:
        self.pruner.update(step)

    def after_optimizer_step(self, step: int) -> None:
        self.pruner.apply_masks()


class PositionScaledGradientCallback(TrainCallback):
    """PSGD in the loop: ``g <- lambda_s * |w - T(w)| * g`` for the selected tensors, after backward.

    ``tensor_bits`` maps parameter names to their grid bit-width (``None``: the zero target), e.g.
    :func:`quantization.position_scaling.scaled_tensor_bits`. Every step, the grid tensors' range
    trackers see the current weights first (once per step, as the official code's forward pass
    does), then the gradients are scaled in place (:func:`position_scaled_gradient`), the scaled
    weight decay added first when ``weight_decay > 0`` (the optimizer must then not decay those
    tensors: :func:`quantization.position_scaling.weight_decay_groups`).

    The scaling only edits ``.grad``, so it works with any optimizer. Under AMP the loop hands
    :meth:`after_backward` unscaled gradients, and ``GradScaler.unscale_`` has already recorded
    whether they overflowed, so the scaler still skips those steps (an inf times a zero scale
    becomes NaN there, harmlessly); the range trackers still see the (unchanged) weights on such a
    step, as the official code's forward pass does. Under DistributedDataParallel the gradients
    are already averaged over the processes when ``backward()`` returns, and the weights (so the
    ranges and scales) are equal on all processes: the update is the single-process one on the
    global batch.
    """

    def __init__(
        self,
        model: nn.Module,
        tensor_bits: Mapping[str, int | None],
        lambda_s: float = DEFAULT_LAMBDA,
        weight_decay: float = 0.0,
        momentum: float = RANGE_MOMENTUM,
    ) -> None:
        model = model.module if isinstance(model, DistributedDataParallel) else model
        parameters = dict(model.named_parameters())
        unknown = set(tensor_bits) - parameters.keys()
        if unknown:
            raise KeyError(f"not parameters of the model: {', '.join(sorted(unknown))}")
        self.lambda_s, self.weight_decay = lambda_s, weight_decay
        self.bits = dict(tensor_bits)
        self.tensors = {name: parameters[name] for name in self.bits}
        self.trackers = {name: SymmetricRangeTracker(momentum) for name, bits in self.bits.items() if bits is not None}

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        for name, weight in self.tensors.items():
            bits, tracker = self.bits[name], self.trackers.get(name)
            target = None
            if tracker is not None:
                tracker.update(weight)
                target = nearest_grid_point(weight, tracker.step_size(bits), bits)
            if weight.grad is not None:
                weight.grad.copy_(position_scaled_gradient(weight.grad, weight, target, self.lambda_s, self.weight_decay))

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The range trackers' states by parameter name (plain tensors: ``torch.load(weights_only=True)`` reads them)."""
        return {name: tracker.state_dict() for name, tracker in self.trackers.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        if state.keys() != self.trackers.keys():
            raise KeyError(f"range tracker states for {sorted(state)}, expected {sorted(self.trackers)}")
        for name, tracker in self.trackers.items():
            tracker.load_state_dict(state[name])
