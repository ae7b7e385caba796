"""Which elements of a tensor share one parameter: the whole tensor, one output channel, or blocks of N channels.

One :class:`Granularity` value describes the grouping for step sizes (and, later, pruning-mask
scopes). Channels are counted along ``axis``; with blocks, channel ``c`` belongs to group
``c // block_size`` and the last block is smaller when the channel count is not a multiple of
``block_size`` (it never wraps around).
"""
from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Granularity", "GranularityKind"]


class GranularityKind(str, enum.Enum):
    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_BLOCK = "per_block"


@dataclass(frozen=True)
class Granularity:
    """A grouping of a tensor's elements: ``per_tensor()``, ``per_channel(axis)`` or ``blocks(n, axis)``."""

    kind: GranularityKind = GranularityKind.PER_TENSOR
    axis: int = 0
    block_size: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", GranularityKind(self.kind))
        if self.block_size < 1:
            raise ValueError(f"block size must be at least 1, got {self.block_size}")
        if self.kind is not GranularityKind.PER_BLOCK and self.block_size != 1:
            raise ValueError(f"{self.kind.value} has no block size (got {self.block_size})")

    @classmethod
    def per_tensor(cls) -> Granularity:
        return cls(GranularityKind.PER_TENSOR)

    @classmethod
    def per_channel(cls, axis: int = 0) -> Granularity:
        return cls(GranularityKind.PER_CHANNEL, axis)

    @classmethod
    def blocks(cls, block_size: int, axis: int = 0) -> Granularity:
        return cls(GranularityKind.PER_BLOCK, axis, block_size)

    @property
    def is_per_tensor(self) -> bool:
        return self.kind is GranularityKind.PER_TENSOR

    @property
    def channel_axis(self) -> int | None:
        """The axis the groups run along (``None`` per tensor)."""
        return None if self.is_per_tensor else self.axis

    def _channels(self, shape: Sequence[int]) -> int:
        if not -len(shape) <= self.axis < len(shape):
            raise ValueError(f"axis {self.axis} is not an axis of a tensor of shape {tuple(shape)}")
        return int(shape[self.axis])

    def groups(self, shape: Sequence[int]) -> int:
        """Number of groups of a tensor of ``shape`` (1 per tensor; C per channel; ``ceil(C / N)`` in blocks)."""
        if self.is_per_tensor:
            return 1
        channels = self._channels(shape)
        return channels if self.kind is GranularityKind.PER_CHANNEL else math.ceil(channels / self.block_size)

    def param_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of one parameter per group: ``()`` per tensor, ``(groups,)`` otherwise."""
        return () if self.is_per_tensor else (self.groups(shape),)

    def channel_groups(self, channels: int) -> torch.Tensor:
        """Group index of each of ``channels`` channels (``c // block_size``; ``c`` per channel)."""
        return torch.arange(channels) // (self.block_size if self.kind is GranularityKind.PER_BLOCK else 1)

    def expand(self, values: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """Per-group ``values`` (shape :meth:`param_shape`) broadcastable against a tensor of ``shape``."""
        if self.is_per_tensor:
            return values
        if self.kind is GranularityKind.PER_BLOCK:
            values = values.repeat_interleave(self.block_size)[: self._channels(shape)]
        view = [1] * len(shape)
        view[self.axis] = -1
        return values.reshape(view)

    def reduce_channels(self, per_channel: torch.Tensor, reduce: str) -> torch.Tensor:
        """Per-channel values (shape ``(C,)``) reduced to one per group with ``"amin"`` or ``"amax"``."""
        if self.kind is not GranularityKind.PER_BLOCK:
            return per_channel
        index = self.channel_groups(per_channel.numel()).to(per_channel.device)
        out = torch.empty(int(index[-1]) + 1, dtype=per_channel.dtype, device=per_channel.device)
        return out.scatter_reduce_(0, index, per_channel, reduce, include_self=False)

    def describe(self) -> str:
        if self.kind is GranularityKind.PER_TENSOR:
            return "per_tensor"
        if self.kind is GranularityKind.PER_CHANNEL:
            return f"per_channel(axis={self.axis})"
        return f"blocks(n={self.block_size}, axis={self.axis})"
