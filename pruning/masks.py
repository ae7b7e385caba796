"""Magnitude pruning masks: per tensor and global across tensors, by selection (``O(n)``, no sort).

A mask is a boolean tensor shaped like the weight, ``True`` where the weight is kept.
Counts are exact: of ``n`` candidates, ``num_pruned(n, sparsity) = floor(sparsity * n + 1/2)``
with the smallest ``|w|`` are removed. Ties are broken deterministically by position: among
equal magnitudes the element that comes first (flattened order; for global masks, the
earlier tensor in the given order) is pruned first.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch


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


def _prune_smallest_by_selection(magnitudes: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of a 1-D tensor pruning its ``k = num_pruned(n, sparsity)`` smallest entries (ties by position).

    Selection instead of sorting, ``O(n)``: with ``t`` the ``k``-th smallest magnitude, all
    entries below ``t`` are pruned, and of those equal to ``t`` the first ``k - #below``.
    (The sort-based references, equal by test, are in ``tests/reference_masks.py``.)
    """
    k = num_pruned(magnitudes.numel(), sparsity)
    keep = torch.ones_like(magnitudes, dtype=torch.bool)
    if k == 0:
        return keep
    threshold = torch.kthvalue(magnitudes, k).values
    below = magnitudes < threshold
    at_threshold = (magnitudes == threshold).nonzero()[:, 0]
    keep &= ~below
    keep[at_threshold[: k - int(below.sum())]] = False
    return keep


def magnitude_mask_by_selection(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the ``numel - num_pruned(numel, sparsity)`` largest-magnitude entries of ``weight`` (by selection)."""
    return _prune_smallest_by_selection(weight.detach().abs().reshape(-1), sparsity).reshape(weight.shape)


def global_magnitude_masks_by_selection(weights: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold for all tensors: prune the ``sparsity`` share of all their entries by magnitude (by selection)."""
    names = list(weights)
    flat = [weights[name].detach().abs().reshape(-1) for name in names]
    keep = _prune_smallest_by_selection(torch.cat(flat), sparsity)
    masks, start = {}, 0
    for name, values in zip(names, flat):
        masks[name] = keep[start : start + values.numel()].reshape(weights[name].shape)
        start += values.numel()
    return masks
