"""1xN block pruning masks (Lin et al., "1xN Pattern for Pruning Convolutional Neural Networks", TPAMI 2022) and baselines.

A mask is a boolean tensor shaped like the weight, ``True`` where the weight is kept.

The block. For a convolution weight ``W`` of shape ``(C_out, C_in / groups, *kernel)`` (or a linear
weight ``(C_out, C_in)``) a 1xN block is ``N`` consecutive output channels x one input channel x the
whole kernel::

    block (r, j) = W[r N : (r + 1) N, j, ...]        r = 0 .. ceil(C_out / N) - 1,  j = 0 .. C_in / groups - 1

so a 1x1 convolution (a ``C_out x C_in`` matrix) is cut into ``N x 1`` column segments: block-sparse
rows (BSR) with block size ``(N, 1)``. When ``N`` does not divide ``C_out`` the last block of every
input channel is smaller (its ``C_out mod N`` channels); blocks never wrap around into the next input
channel (the official code does, see ``/work/shared/specs/one_by_n.md``). In a grouped convolution the
blocks restart at every group's first output channel (a block never holds two groups' channels: those
do not share an input channel).

The score of a block is the L1 norm of its weights, ``s(r, j) = sum |W[r N : (r + 1) N, j, ...]|``,
taken as is: the smaller last block is not normalised by its size. (The official code never has
smaller blocks; normalising would be a second, undocumented choice, while the plain L1 norm is what the
paper defines. A smaller block therefore tends to score lower and to be pruned a little more often.)

The count. In a layer with ``B`` blocks the ``floor(p B)`` lowest-scoring blocks are zeroed (the
paper's rule), with ``p B`` read as the exact decimal product (``0.29 * 100`` prunes 29 blocks, not
``floor(28.999999999999996)``); see :func:`num_blocks_pruned`. This differs from
:func:`pruning.masks.num_pruned`, ``floor(p n + 1/2)`` (round half up), which the unstructured
baseline :func:`weight_magnitude_mask` reuses: at ``p n = 4.5`` the blocks lose 4, the weights 5.

Ties are broken by position, as in :mod:`pruning.masks`: among blocks of equal score, the one whose
first weight comes first in the flattened weight is pruned first, i.e. blocks are ordered by
``(r, j)`` (block row, then input channel).

Baselines, all with the same ``(weight, rate, ...) -> mask`` shape: random blocks
(:func:`random_block_mask`, exactly ``floor(p B)`` blocks drawn without replacement), unstructured
per-layer magnitude pruning (:func:`weight_magnitude_mask`), filter pruning (:func:`filter_l1_mask`,
``floor(p C_out)`` whole output channels of lowest L1 norm) and kernel pruning, which is the 1xN mask
with ``N = 1`` (one ``k x k`` kernel per block).

Which layers are pruned: :func:`prunable_layers` (every convolution except the first one and the
depthwise ones; the classifier only on request).

Masks once (the paper: :func:`model_masks`) or on Zhu & Gupta's gradual schedule (not in the paper):
:class:`BlockMaskRule` is a pattern as the mask rule of :class:`pruning.schedule.GradualMagnitudePruner`.
"""
from __future__ import annotations

import enum
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from pruning.masks import magnitude_mask_by_selection
from quantization.granularity import Granularity

__all__ = [
    "PRUNABLE_TYPES",
    "BlockMaskRule",
    "PruneMethod",
    "block_rows",
    "block_scores",
    "filter_l1_mask",
    "is_depthwise",
    "layer_mask",
    "layers_masks",
    "model_masks",
    "num_blocks_pruned",
    "one_by_n_mask",
    "prunable_layers",
    "random_block_mask",
    "weight_magnitude_mask",
]

logger = logging.getLogger(__name__)

# Layers whose weight is (C_out, C_in / groups, *kernel): transposed convolutions store (C_in, C_out / groups, ...)
PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class PruneMethod(str, enum.Enum):
    """A per-layer pruning pattern: 1xN blocks by L1 norm, random 1xN blocks, single weights, whole filters."""

    ONE_BY_N = "1xn"
    RANDOM_BLOCKS = "random_blocks"
    WEIGHT = "weight"
    FILTER = "filter"


def _check_rate(rate: float) -> None:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"the pruning rate must be in [0, 1), got {rate}")


def num_blocks_pruned(num_blocks: int, rate: float) -> int:
    """``floor(rate * num_blocks)``, the product read as the exact decimal (within 1e-12 of an integer: that integer)."""
    _check_rate(rate)
    product = rate * num_blocks
    nearest = round(product)
    return nearest if math.isclose(product, nearest, rel_tol=1e-12) else math.floor(product)


def block_rows(out_channels: int, block_size: int, groups: int = 1) -> torch.Tensor:
    """Block row of each output channel: ``g ceil(C_g / N) + (c mod C_g) // N`` with ``C_g = C_out / groups``, ``g = c // C_g``.

    Without groups this is ``c // N`` (:meth:`Granularity.channel_groups`); the last row of each group
    is smaller when ``N`` does not divide ``C_g``. Raises ``ValueError`` when ``N < 1`` or ``N > C_g``.
    """
    if block_size < 1:
        raise ValueError(f"the block size N must be at least 1, got {block_size}")
    if groups < 1 or out_channels % groups:
        raise ValueError(f"{out_channels} output channels cannot be split into {groups} groups")
    per_group = out_channels // groups
    if block_size > per_group:
        raise ValueError(f"block size N = {block_size} is larger than the layer's {per_group} output channels (per group)")
    within_group = Granularity.blocks(block_size).channel_groups(per_group)
    rows_per_group = math.ceil(per_group / block_size)
    return (torch.arange(groups).repeat_interleave(per_group) * rows_per_group) + within_group.repeat(groups)


def _per_kernel_l1(weight: torch.Tensor) -> torch.Tensor:
    """``(C_out, C_in / groups)``: the L1 norm of every kernel ``W[c, j, ...]``."""
    if weight.dim() < 2:
        raise ValueError(f"a prunable weight has at least 2 dimensions (C_out, C_in, ...), got shape {tuple(weight.shape)}")
    return weight.detach().abs().reshape(weight.shape[0], weight.shape[1], -1).sum(dim=2)


def block_scores(weight: torch.Tensor, block_size: int, groups: int = 1) -> torch.Tensor:
    """``s[r, j] = sum |W[c, j, ...]|`` over the output channels ``c`` of block row ``r``: ``(rows, C_in / groups)``."""
    rows = block_rows(weight.shape[0], block_size, groups).to(weight.device)
    kernels = _per_kernel_l1(weight)
    scores = torch.zeros(int(rows[-1]) + 1, kernels.shape[1], dtype=kernels.dtype, device=weight.device)
    return scores.index_add_(0, rows, kernels)


def _prune_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask (shaped like ``scores``) of its ``count`` lowest entries, ties to the earlier flattened position."""
    pruned = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    pruned[torch.argsort(scores.reshape(-1), stable=True)[:count]] = True
    return pruned.reshape(scores.shape)


def _blocks_to_weight_mask(pruned_blocks: torch.Tensor, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Keep-mask of the weight from the pruned ``(rows, C_in / groups)`` blocks."""
    kept = ~pruned_blocks[rows]  # (C_out, C_in / groups)
    return kept.reshape(*kept.shape, *([1] * (len(shape) - 2))).expand(shape).contiguous()


def one_by_n_mask(weight: torch.Tensor, block_size: int, rate: float, groups: int = 1) -> torch.Tensor:
    """1xN mask: the ``floor(p B)`` blocks of lowest L1 norm (of ``B`` blocks) pruned; ``N = 1`` is kernel pruning."""
    scores = block_scores(weight, block_size, groups)
    pruned = _prune_lowest(scores, num_blocks_pruned(scores.numel(), rate))
    return _blocks_to_weight_mask(pruned, block_rows(weight.shape[0], block_size, groups).to(weight.device), weight.shape)


def random_block_mask(
    weight: torch.Tensor, block_size: int, rate: float, generator: torch.Generator, groups: int = 1
) -> torch.Tensor:
    """Random 1xN blocks: exactly ``floor(p B)`` of the ``B`` blocks, drawn without replacement from ``generator``."""
    rows = block_rows(weight.shape[0], block_size, groups)
    num_blocks = (int(rows[-1]) + 1) * weight.shape[1]
    pruned = torch.zeros(num_blocks, dtype=torch.bool)
    pruned[torch.randperm(num_blocks, generator=generator)[: num_blocks_pruned(num_blocks, rate)]] = True
    pruned = pruned.reshape(-1, weight.shape[1]).to(weight.device)
    return _blocks_to_weight_mask(pruned, rows.to(weight.device), weight.shape)


def weight_magnitude_mask(weight: torch.Tensor, rate: float) -> torch.Tensor:
    """Unstructured per-layer magnitude pruning: ``num_pruned(numel, p) = floor(p numel + 1/2)`` smallest ``|w|``."""
    _check_rate(rate)
    return magnitude_mask_by_selection(weight, rate)


def filter_l1_mask(weight: torch.Tensor, rate: float) -> torch.Tensor:
    """Filter pruning: the ``floor(p C_out)`` output channels of lowest L1 norm ``sum |W[c, ...]|`` zeroed (ties by index)."""
    filter_norms = _per_kernel_l1(weight).sum(dim=1)
    pruned = _prune_lowest(filter_norms, num_blocks_pruned(weight.shape[0], rate))
    return (~pruned).reshape(-1, *([1] * (weight.dim() - 1))).expand(weight.shape).contiguous()


def layer_mask(
    weight: torch.Tensor,
    method: PruneMethod | str,
    rate: float,
    block_size: int = 4,
    groups: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The keep-mask of one weight under ``method`` (``block_size`` and ``groups`` matter to the block methods)."""
    method = PruneMethod(method)
    if method is PruneMethod.ONE_BY_N:
        return one_by_n_mask(weight, block_size, rate, groups)
    if method is PruneMethod.RANDOM_BLOCKS:
        if generator is None:
            raise ValueError("random block pruning needs a seeded torch.Generator")
        return random_block_mask(weight, block_size, rate, generator, groups)
    if method is PruneMethod.WEIGHT:
        return weight_magnitude_mask(weight, rate)
    return filter_l1_mask(weight, rate)


def is_depthwise(module: nn.Module) -> bool:
    """A depthwise convolution: ``groups > 1`` and one input channel per group (``in_channels / groups == 1``)."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.in_channels // module.groups == 1


def prunable_layers(model: nn.Module, include_classifier: bool = False) -> dict[str, nn.Module]:
    """``{name: layer}`` pruned by the paper's rule, in module order.

    Candidates are ``nn.Conv1d/2d/3d`` and ``nn.Linear`` (exact types or subclasses). Skipped: the
    first convolution in module order (the stem; module order is the execution order of the
    supported CNNs), every depthwise convolution (:func:`is_depthwise`), and, unless
    ``include_classifier``, the classifier: every ``nn.Linear`` (in these CNNs the only linear layers
    are the head: one in MobileNet-V1/V2 and ResNet-50, two in MobileNet-V3). Grouped, not depthwise,
    convolutions are pruned with blocks inside each group.
    """
    layers: dict[str, nn.Module] = {}
    seen_first_conv = False
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        if isinstance(module, nn.Linear):
            if include_classifier:
                layers[name] = module
            continue
        if not seen_first_conv:
            seen_first_conv = True
            continue
        if not is_depthwise(module):
            layers[name] = module
    return layers


def _groups(module: nn.Module) -> int:
    return getattr(module, "groups", 1)


def model_masks(
    model: nn.Module,
    method: PruneMethod | str,
    rate: float,
    block_size: int = 4,
    layer_names: Iterable[str] | None = None,
    include_classifier: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """``{layer name: keep-mask}`` of ``layer_names`` (default :func:`prunable_layers`), the same ``rate`` in every layer.

    A layer the block size does not fit is one ``ValueError`` naming it.
    """
    if layer_names is None:
        layers = prunable_layers(model, include_classifier)
    else:
        layers = {name: model.get_submodule(name) for name in layer_names}
    masks = layers_masks(layers, method, rate, block_size, generator)
    kept = sum(int(mask.sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    logger.info(
        "%s masks of %d layers at rate %g: %.4f of their weights pruned",
        PruneMethod(method).value, len(masks), rate, 1 - kept / max(total, 1),
    )
    return masks


def layers_masks(
    layers: Mapping[str, nn.Module],
    method: PruneMethod | str,
    rate: float,
    block_size: int = 4,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """``{name: keep-mask}`` of every layer of ``layers`` under ``method`` at ``rate``, in their order (random blocks
    drawn from ``generator`` layer after layer). A layer the block size does not fit is one ``ValueError`` naming it."""
    masks = {}
    for name, layer in layers.items():
        try:
            masks[name] = layer_mask(layer.weight, method, rate, block_size, _groups(layer), generator)
        except ValueError as error:
            raise ValueError(f"layer {name!r}: {error}") from None
    return masks


@dataclass(frozen=True)
class BlockMaskRule:
    """The masks of a pattern as a mask rule of the gradual pruner (:data:`pruning.schedule.MaskRule`).

    ``rule(layers, rate)`` is :func:`layers_masks` of the layers' current weights (pruned ones at zero). Random
    blocks are drawn from a generator seeded with ``seed`` afresh at every call, so each layer gets the same
    permutation of its blocks every time: the random masks of rising rates are nested (the first ``floor(p B)``
    blocks of one permutation), a resumed run draws the same ones, and the random mask at rate ``p`` is the one-shot
    one (:func:`model_masks` with a generator seeded with ``seed``, the same layers).
    """

    method: PruneMethod
    block_size: int
    seed: int

    def __call__(self, layers: Mapping[str, nn.Module], rate: float) -> dict[str, torch.Tensor]:
        return layers_masks(layers, self.method, rate, self.block_size, torch.Generator().manual_seed(self.seed))
