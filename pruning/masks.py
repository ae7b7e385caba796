"""Magnitude pruning masks: per tensor, per channel, per block of channels and global across tensors, by selection.

A mask is a boolean tensor shaped like the weight, ``True`` where the weight is kept. Masks are
computed by selection (``O(n)``, no sort). Counts are exact: of ``n`` candidates,
``num_pruned(n, sparsity) = floor(sparsity * n + 1/2)`` with the smallest ``|w|`` are removed.

The candidates are set by a :class:`~quantization.granularity.Granularity` scope: the whole
tensor (one group), each channel along ``axis`` on its own (``C`` groups, each losing
``num_pruned(numel / C, sparsity)``), or each block of ``N`` consecutive channels on its own
(``ceil(C / N)`` groups; the last one is smaller when ``N`` does not divide ``C``); global
masks take one group over several tensors.

Ties are broken deterministically by position: among equal magnitudes the element that comes
first in its group is pruned first. A group's order is the flattened order of the tensor with
the channel axis moved to the front (for ``axis=0``, and per tensor, the plain flattened order);
for global masks the tensors are concatenated in the given order.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from quantization.granularity import Granularity, GranularityKind

PER_TENSOR = Granularity.per_tensor()


def num_pruned(numel: int, sparsity: float) -> int:
    """Number of elements removed from ``numel`` at ``sparsity`` (round half up)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return min(numel, math.floor(sparsity * numel + 0.5))


def magnitude_pruning_sse(sorted_squares_prefix: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Squared error of magnitude pruning, from ``[0, cumsum(sort(w^2))]``.

    Pruning the ``k`` smallest magnitudes removes exactly the ``k`` smallest squares, so the
    error is the ``k``-th prefix sum: ``O(1)`` per sparsity once the squares are sorted.
    """
    numel = sorted_squares_prefix.shape[-1] - 1
    return sorted_squares_prefix[..., num_pruned(numel, sparsity)]


def sorted_magnitudes(values: torch.Tensor) -> torch.Tensor:
    """``sort(|x|)`` of a 1-D ascending ``values``, by merging two runs already in order of magnitude.

    The negative values reversed and the non-negative ones are each ascending in ``|x|``; numpy's
    stable sort (a merge of runs) takes ``O(n)`` for them on CPU, about five times faster than
    sorting ``|x|`` afresh. Other devices sort.
    """
    split = int(torch.searchsorted(values, values.new_zeros(1)))
    runs = torch.cat([-values[:split].flip(0), values[split:]])
    if values.device.type != "cpu":
        return torch.sort(runs).values
    return torch.from_numpy(np.sort(runs.numpy(), kind="stable"))


def _prune_smallest_by_selection(magnitudes: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of a ``(rows, n)`` tensor pruning each row's ``k = num_pruned(n, sparsity)`` smallest entries.

    Selection instead of sorting, ``O(n)`` per row: with ``t`` the row's ``k``-th smallest
    magnitude, all entries below ``t`` are pruned, and of those equal to ``t`` the first
    ``k - #below`` in the row (ties by position). (The sort-based references, equal by test,
    are in ``tests/reference_masks.py``.)
    """
    k = num_pruned(magnitudes.shape[1], sparsity)
    if k == 0:
        return torch.ones_like(magnitudes, dtype=torch.bool)
    threshold = torch.kthvalue(magnitudes, k, dim=1, keepdim=True).values
    below = magnitudes < threshold
    at_threshold = magnitudes == threshold
    ties_to_prune = k - below.sum(dim=1, keepdim=True)
    pruned = below | (at_threshold & (at_threshold.cumsum(dim=1) <= ties_to_prune))
    return ~pruned


def _channels_per_group(scope: Granularity) -> int:
    return scope.block_size if scope.kind is GranularityKind.PER_BLOCK else 1


def magnitude_mask_by_selection(weight: torch.Tensor, sparsity: float, scope: Granularity = PER_TENSOR) -> torch.Tensor:
    """Keep-mask pruning the ``sparsity`` share of each group of ``scope`` by magnitude (by selection).

    Per tensor: the ``num_pruned(numel, sparsity)`` smallest ``|w|`` of the whole tensor; per
    channel along ``scope.axis``: the ``num_pruned(numel / C, sparsity)`` smallest of each
    channel; blocks of ``N`` channels: the ``num_pruned(N numel / C, sparsity)`` smallest of each
    block (of the smaller last block, its own share).
    """
    magnitudes = weight.detach().abs()
    if scope.is_per_tensor:
        return _prune_smallest_by_selection(magnitudes.reshape(1, -1), sparsity).reshape(weight.shape)
    scope.groups(weight.shape)  # checks the axis
    by_channel = magnitudes.movedim(scope.axis, 0)
    channels = by_channel.shape[0]
    rows = by_channel.reshape(channels, -1)
    size = _channels_per_group(scope)
    whole = channels - channels % size  # the channels of the full groups
    keep = []
    if whole:
        keep.append(_prune_smallest_by_selection(rows[:whole].reshape(whole // size, -1), sparsity).reshape(whole, -1))
    if whole < channels:  # the last, smaller block
        keep.append(_prune_smallest_by_selection(rows[whole:].reshape(1, -1), sparsity).reshape(channels - whole, -1))
    return torch.cat(keep).reshape(by_channel.shape).movedim(0, scope.axis)


def global_magnitude_masks_by_selection(weights: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold for all tensors: prune the ``sparsity`` share of all their entries by magnitude (by selection)."""
    names = list(weights)
    flat = [weights[name].detach().abs().reshape(-1) for name in names]
    keep = _prune_smallest_by_selection(torch.cat(flat).reshape(1, -1), sparsity)[0]
    masks, start = {}, 0
    for name, values in zip(names, flat):
        masks[name] = keep[start : start + values.numel()].reshape(weights[name].shape)
        start += values.numel()
    return masks
