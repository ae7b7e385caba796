"""Gradual magnitude pruning (Zhu & Gupta, 2017): the cubic sparsity schedule and a mask updater.

The sparsity rises from ``s_i`` to ``s_f`` over ``n`` mask updates spaced ``delta_t`` training
steps apart, starting at step ``t0``:

    s(t) = s_f + (s_i - s_f) * (1 - (t - t0) / (n * delta_t))^3,   t0 <= t <= t0 + n * delta_t,

``s_i`` before ``t0`` and ``s_f`` after ``t0 + n * delta_t``. Masks are recomputed only at the
update steps ``t0 + k * delta_t`` (``k = 0..n``) by a *mask rule* (:data:`MaskRule`), a plug-in that
maps the layers and the sparsity ``s(t)`` to their keep-masks, computed from the current weights (the
pruned ones at zero, as Zhu & Gupta do). The paper's rule is magnitude (:func:`magnitude_rule`): per
layer (every layer at the same sparsity, as in the paper), per output channel (every channel of every
layer at that sparsity) or globally (one threshold over all layers); the 1xN block patterns are
:class:`pruning.block_masks.BlockMaskRule`. Between updates the masks are kept fixed, the masked weights
receive no gradient and are reset to zero after every optimizer step (so weight decay and momentum
cannot revive them).

Masks are not forced to be nested: each update ranks the current weights afresh. A pruned weight (or
block) is zero, so it ranks lowest and stays pruned as the sparsity rises, unless kept weights are
exactly zero too, among which ties go by position.
"""
from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from pruning.masks import global_magnitude_masks_by_selection, magnitude_mask_by_selection
from quantization.granularity import Granularity

logger = logging.getLogger(__name__)


class PruningScope(str, enum.Enum):
    LAYER = "layer"  # each layer at the sparsity
    CHANNEL = "channel"  # each output channel (axis 0 of the weight) at the sparsity
    GLOBAL = "global"  # one magnitude threshold over all layers


def zhu_gupta_sparsity(step: int, s_i: float, s_f: float, t0: int, n: int, delta_t: int) -> float:
    """Target sparsity at training step ``step``: ``s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3``, clipped to the ramp."""
    if n < 1 or delta_t < 1:
        raise ValueError(f"n and delta_t must be >= 1, got n={n}, delta_t={delta_t}")
    progress = min(max((step - t0) / (n * delta_t), 0.0), 1.0)
    return s_f + (s_i - s_f) * (1.0 - progress) ** 3


@dataclass(frozen=True)
class PruningSchedule:
    """Update steps ``t0 + k * delta_t`` (``k = 0..n``) and the cubic sparsity at each."""

    s_i: float
    s_f: float
    t0: int
    n: int
    delta_t: int

    @classmethod
    def from_epochs(
        cls, s_i: float, s_f: float, start_epoch: int, last_epoch: int, delta_t: int, steps_per_epoch: int, max_epochs: int
    ) -> PruningSchedule:
        """Schedule that starts at the first step of ``start_epoch`` and reaches ``s_f`` by the last step of ``last_epoch``.

        Epochs are 0-based and clipped to the run (``last_epoch < max_epochs``). If the ramp is
        shorter than ``delta_t`` steps, the spacing shrinks to the ramp length; ``n`` is the
        number of whole ``delta_t`` intervals that fit, so the final update (at ``s_f``) never
        falls after the ramp's end.
        """
        if not 0.0 <= s_i <= s_f < 1.0:
            raise ValueError(f"need 0 <= s_i <= s_f < 1, got s_i={s_i}, s_f={s_f}")
        total_steps = steps_per_epoch * max_epochs
        t0 = min(start_epoch, max_epochs - 1) * steps_per_epoch
        t_end = min((min(last_epoch, max_epochs - 1) + 1) * steps_per_epoch, total_steps) - 1
        span = t_end - t0
        if span < 1:  # a one-step ramp: prune to s_f at once
            return cls(s_f, s_f, t0, 1, 1)
        delta = min(delta_t, span)
        return cls(s_i, s_f, t0, span // delta, delta)

    @property
    def last_update_step(self) -> int:
        return self.t0 + self.n * self.delta_t

    def is_update_step(self, step: int) -> bool:
        offset = step - self.t0
        return 0 <= offset <= self.n * self.delta_t and offset % self.delta_t == 0

    def sparsity_at(self, step: int) -> float:
        return zhu_gupta_sparsity(step, self.s_i, self.s_f, self.t0, self.n, self.delta_t)


MaskRule = Callable[[Mapping[str, nn.Module], float], Mapping[str, torch.Tensor]]
"""``rule(layers, sparsity) -> {name: keep-mask}``: the masks of ``layers`` (``{name: layer}``) at ``sparsity``."""


def magnitude_masks(layers: Mapping[str, nn.Module], sparsity: float, scope: PruningScope) -> dict[str, torch.Tensor]:
    """The keep-masks of ``layers`` by weight magnitude at ``sparsity``.

    Per layer: each layer loses ``num_pruned(numel, sparsity)`` weights; per channel: each output
    channel of each layer loses ``num_pruned(numel / out_channels, sparsity)``; global: all layers
    together lose ``num_pruned(total, sparsity)``, the smallest magnitudes over all of them.
    """
    scope = PruningScope(scope)
    if scope is PruningScope.GLOBAL:
        return global_magnitude_masks_by_selection({name: layer.weight for name, layer in layers.items()}, sparsity)
    granularity = Granularity.per_channel(0) if scope is PruningScope.CHANNEL else Granularity.per_tensor()
    return {name: magnitude_mask_by_selection(layer.weight, sparsity, granularity) for name, layer in layers.items()}


def magnitude_rule(scope: PruningScope | str) -> MaskRule:
    """The mask rule of Zhu & Gupta: :func:`magnitude_masks` within ``scope``."""
    return functools.partial(magnitude_masks, scope=PruningScope(scope))


@torch.no_grad()
def set_masks(layers: Mapping[str, nn.Module], masks: Mapping[str, torch.Tensor]) -> None:
    """Copy ``masks`` into the layers' ``weight_mask`` buffers and zero the pruned weights."""
    for name, layer in layers.items():
        layer.weight_mask.copy_(masks[name])
        layer.weight.mul_(layer.weight_mask)


def set_magnitude_masks(layers: Mapping[str, nn.Module], sparsity: float, scope: PruningScope) -> None:
    """Set the ``weight_mask`` of every layer by magnitude at ``sparsity`` (:func:`magnitude_masks`) and zero the
    pruned weights."""
    set_masks(layers, magnitude_masks(layers, sparsity, scope))


class GradualMagnitudePruner:
    """Keeps the ``weight_mask`` buffers of ``layers`` on a :class:`PruningSchedule`, the masks given by ``rule``.

    Every layer must have a boolean ``weight_mask`` buffer shaped like its weight (see
    :mod:`models.quantized`), which its forward pass multiplies into the weight. The pruner holds no
    state of its own (the masks live in the model; the schedule depends on the step, the rule on the
    weights and the sparsity only), so a run resumed from a checkpoint continues as if uninterrupted.
    """

    def __init__(self, layers: Mapping[str, nn.Module], schedule: PruningSchedule, rule: MaskRule) -> None:
        missing = [name for name, layer in layers.items() if getattr(layer, "weight_mask", None) is None]
        if missing:
            raise ValueError(f"layers without a weight_mask buffer: {', '.join(missing)}")
        self.layers = dict(layers)
        self.schedule = schedule
        self.rule = rule

    def update(self, step: int) -> bool:
        """At an update step of the schedule, recompute the masks; returns whether it did."""
        if not self.schedule.is_update_step(step):
            return False
        sparsity = self.schedule.sparsity_at(step)
        set_masks(self.layers, self.rule(self.layers, sparsity))
        logger.debug("step %d: masks updated to sparsity %.4f", step, sparsity)
        return True

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned weights (call after every optimizer step)."""
        for layer in self.layers.values():
            layer.weight.mul_(layer.weight_mask)
