"""Sort-based magnitude masks: the references for the selection-based masks of :mod:`pruning.masks`.

Same contract as :mod:`pruning.masks`: of ``n`` candidates the ``num_pruned(n, sparsity)`` with the
smallest ``|w|`` are pruned, ties in order of position (flattened order, with the channel axis
first for channel and block scopes; for global masks the earlier tensor in the given order
first). Here by a stable sort: the first ``k`` entries of ``argsort(|w|, stable=True)`` are
pruned, which is that rule by construction. Blocks are cut one at a time by a Python loop.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from pruning.masks import num_pruned


def _prune_smallest_by_sorting(magnitudes: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask for a 2-D ``(rows, n)`` tensor pruning each row's ``num_pruned(n, sparsity)`` smallest entries."""
    k = num_pruned(magnitudes.shape[1], sparsity)
    order = torch.sort(magnitudes, dim=1, stable=True).indices
    keep = torch.ones_like(magnitudes, dtype=torch.bool)
    keep.scatter_(1, order[:, :k], False)
    return keep


def magnitude_mask_by_sorting(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the ``numel - num_pruned(numel, sparsity)`` largest-magnitude entries of ``weight``."""
    return _prune_smallest_by_sorting(weight.detach().abs().reshape(1, -1), sparsity).reshape(weight.shape)


def per_channel_magnitude_mask(weight: torch.Tensor, sparsity: float, ch_axis: int = 0) -> torch.Tensor:
    """Prune every slice along ``ch_axis`` (an output channel) to the same ``sparsity``."""
    moved = weight.detach().abs().movedim(ch_axis, 0)
    keep = _prune_smallest_by_sorting(moved.reshape(moved.shape[0], -1), sparsity)
    return keep.reshape(moved.shape).movedim(0, ch_axis)


def block_magnitude_mask_by_sorting(weight: torch.Tensor, sparsity: float, block_size: int,
                                    ch_axis: int = 0) -> torch.Tensor:  # fmt: skip
    """Prune every block of ``block_size`` consecutive slices along ``ch_axis`` to ``sparsity`` on its own.

    The last block holds the remaining ``C mod block_size`` slices when ``block_size`` does not divide ``C``.
    """
    moved = weight.detach().abs().movedim(ch_axis, 0)
    keep = torch.ones_like(moved, dtype=torch.bool)
    for start in range(0, moved.shape[0], block_size):
        block = moved[start : start + block_size]
        keep[start : start + block_size] = _prune_smallest_by_sorting(block.reshape(1, -1), sparsity).reshape(block.shape)
    return keep.movedim(0, ch_axis)


def global_magnitude_masks_by_sorting(weights: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold for all tensors: prune the ``sparsity`` share of all their entries by magnitude."""
    names = list(weights)
    flat = [weights[name].detach().abs().reshape(-1) for name in names]
    keep = _prune_smallest_by_sorting(torch.cat(flat).reshape(1, -1), sparsity)[0]
    masks, start = {}, 0
    for name, values in zip(names, flat):
        masks[name] = keep[start : start + values.numel()].reshape(weights[name].shape)
        start += values.numel()
    return masks
