"""1xN block masks and their baselines against independent, sort-based references written here.

The reference enumerates the blocks explicitly (row ranges per group, never across an input channel),
scores them with numpy, orders them with ``np.lexsort`` on (score, block row, input channel) and counts
with exact decimal arithmetic (:class:`fractions.Fraction`).
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from models.quantized import CompressionSpec, compress_model
from pruning.block_masks import (
    BlockMaskRule,
    PruneMethod,
    block_rows,
    filter_l1_mask,
    is_depthwise,
    layer_mask,
    model_masks,
    num_blocks_pruned,
    one_by_n_mask,
    prunable_layers,
    random_block_mask,
    weight_magnitude_mask,
)
from pruning.masks import magnitude_mask_by_selection
from pruning.schedule import GradualMagnitudePruner, PruningSchedule

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors on a busy machine: one torch thread

BLOCK_SIZES = [1, 2, 4, 8, 16, 32]
RATES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
# (C_out, C_in, kernel side or None for a linear weight): C_out divisible by every N, by some, by none
SHAPES = [(32, 3, 3), (64, 2, 5), (48, 5, 1), (37, 4, 3), (40, 6, None), (33, 7, 1)]


def exact_floor(rate: float, count: int) -> int:
    return math.floor(Fraction(str(rate)) * count)


def make_weight(c_out: int, c_in: int, side: int | None, seed: int) -> torch.Tensor:
    shape = (c_out, c_in) if side is None else (c_out, c_in, side, side)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference_blocks(c_out: int, block_size: int, groups: int = 1) -> list[tuple[int, int]]:
    """``[start, stop)`` output-channel ranges of the block rows, in order; each group cut on its own."""
    per_group = c_out // groups
    ranges = []
    for group in range(groups):
        first, last = group * per_group, (group + 1) * per_group
        ranges += [(start, min(start + block_size, last)) for start in range(first, last, block_size)]
    return ranges


def reference_one_by_n(weight: np.ndarray, block_size: int, rate: float, groups: int = 1) -> np.ndarray:
    """Keep-mask: blocks scored by L1 norm, the floor(p B) lowest pruned, ties by (block row, input channel)."""
    magnitudes = np.abs(weight).reshape(weight.shape[0], weight.shape[1], -1)
    ranges = reference_blocks(weight.shape[0], block_size, groups)
    scores = np.stack([magnitudes[start:stop].sum(axis=(0, 2)) for start, stop in ranges])  # (rows, C_in)
    rows, columns = np.indices(scores.shape)
    order = np.lexsort((columns.ravel(), rows.ravel(), scores.ravel()))  # the last key is the primary one
    keep = np.ones(weight.shape, dtype=bool)
    for index in order[: exact_floor(rate, scores.size)]:
        start, stop = ranges[rows.ravel()[index]]
        keep[start:stop, columns.ravel()[index]] = False
    return keep


def block_states(mask: torch.Tensor, block_size: int, groups: int = 1) -> np.ndarray:
    """Per block (row, input channel): 1 kept, 0 pruned; fails if a block is partly kept (not a 1xN region)."""
    keep = mask.numpy().reshape(mask.shape[0], mask.shape[1], -1)
    states = []
    for row, (start, stop) in enumerate(reference_blocks(mask.shape[0], block_size, groups)):
        region = keep[start:stop]
        whole, none = region.all(axis=(0, 2)), ~region.any(axis=(0, 2))
        assert (whole | none).all(), f"a block of row {row} is partly pruned"
        states.append(whole.astype(int))
    return np.stack(states)


@pytest.mark.slow
@pytest.mark.parametrize("c_out, c_in, side", SHAPES)
def test_one_by_n_mask_matches_the_sort_based_reference(c_out: int, c_in: int, side: int | None) -> None:
    weight = make_weight(c_out, c_in, side, seed=c_out * 100 + c_in)
    for block_size in BLOCK_SIZES:
        num_blocks = math.ceil(c_out / block_size) * c_in
        for rate in RATES:
            mask = one_by_n_mask(weight, block_size, rate)
            assert mask.dtype == torch.bool and mask.shape == weight.shape
            np.testing.assert_array_equal(mask.numpy(), reference_one_by_n(weight.numpy(), block_size, rate))
            states = block_states(mask, block_size)  # every pruned region is a whole block
            assert (states == 0).sum() == exact_floor(rate, num_blocks)


def test_smaller_last_block_stays_in_its_input_channel_and_is_not_normalised() -> None:
    # all weights 1: a full block scores N, the smaller last block (C_out mod N channels) less
    weight = torch.ones(10, 3, 3, 3)
    mask = one_by_n_mask(weight, block_size=4, rate=0.3)  # 3 rows x 3 input channels = 9 blocks, 2 pruned
    states = block_states(mask, 4)
    assert states.shape == (3, 3)
    np.testing.assert_array_equal(states, [[1, 1, 1], [1, 1, 1], [0, 0, 1]])  # the 2-channel blocks, first ones first
    assert not mask[8:10, :2].any() and mask[:8].all() and mask[8:10, 2].all()


def test_ties_prune_the_earlier_block_first() -> None:
    # integer weights, so scores are exact: all 6 blocks (N = 2) score 2
    weight = torch.tensor([[1.0, 2.0, 1.0], [1.0, 0.0, 1.0], [2.0, 1.0, 2.0], [0.0, 1.0, 0.0]])
    for pruned in range(6):
        mask = one_by_n_mask(weight, 2, pruned / 6 + 1e-9)
        states = block_states(mask, 2).reshape(-1)
        np.testing.assert_array_equal(states, [0] * pruned + [1] * (6 - pruned))
    np.testing.assert_array_equal(
        one_by_n_mask(weight, 2, 0.5).numpy(), reference_one_by_n(weight.numpy(), 2, 0.5)
    )


def test_grouped_convolution_blocks_restart_at_each_group() -> None:
    weight = make_weight(12, 5, 3, seed=7)  # groups = 2: 6 output channels per group, blocks of 4 then 2
    np.testing.assert_array_equal(block_rows(12, 4, groups=2).numpy(), [0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3])
    for rate in RATES:
        mask = one_by_n_mask(weight, 4, rate, groups=2)
        np.testing.assert_array_equal(mask.numpy(), reference_one_by_n(weight.numpy(), 4, rate, groups=2))


def test_kernel_pruning_is_one_by_n_with_n_1() -> None:
    weight = make_weight(24, 6, 3, seed=3)
    mask = one_by_n_mask(weight, 1, 0.5)
    per_kernel = mask.reshape(24, 6, 9)
    assert ((per_kernel.all(dim=2)) | (~per_kernel.any(dim=2))).all()  # each 3x3 kernel whole
    kernel_norms = weight.abs().sum(dim=(2, 3))
    pruned = ~per_kernel[:, :, 0]
    assert pruned.sum() == 72 and kernel_norms[pruned].max() < kernel_norms[~pruned].min()


def test_num_blocks_pruned_is_the_exact_decimal_floor() -> None:
    for rate in [i / 100 for i in range(100)]:
        for count in [1, 3, 7, 10, 100, 333, 1000, 4097]:
            assert num_blocks_pruned(count, rate) == exact_floor(rate, count), (rate, count)
    assert num_blocks_pruned(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in floats
    assert num_blocks_pruned(9, 0.5) == 4  # floor, while pruning.masks.num_pruned rounds 4.5 up


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda w: one_by_n_mask(w, 0, 0.5), "block size N must be at least 1"),
        (lambda w: one_by_n_mask(w, 32, 0.5), "larger than the layer's 16 output channels"),
        (lambda w: one_by_n_mask(w, 4, 1.0), "in [0, 1)"),
        (lambda w: one_by_n_mask(w, 4, -0.1), "in [0, 1)"),
        (lambda w: random_block_mask(w, 17, 0.5, torch.Generator()), "larger than"),
        (lambda w: filter_l1_mask(w, 1.5), "in [0, 1)"),
        (lambda w: weight_magnitude_mask(w, 1.0), "in [0, 1)"),
        (lambda w: layer_mask(w, "random_blocks", 0.5), "needs a seeded torch.Generator"),
    ],
)
def test_invalid_arguments_raise_one_line_value_errors(call, message: str) -> None:
    with pytest.raises(ValueError) as error:
        call(torch.randn(16, 4, 3, 3))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("c_out, c_in, side", SHAPES[:4])
def test_random_blocks_prune_exactly_floor_p_blocks_without_replacement(c_out: int, c_in: int, side: int | None) -> None:
    weight = make_weight(c_out, c_in, side, seed=1)
    for block_size in [1, 4, 16]:
        num_blocks = math.ceil(c_out / block_size) * c_in
        for rate in [0.1, 0.5, 0.9]:
            mask = random_block_mask(weight, block_size, rate, torch.Generator().manual_seed(5))
            assert (block_states(mask, block_size) == 0).sum() == exact_floor(rate, num_blocks)
            again = random_block_mask(weight, block_size, rate, torch.Generator().manual_seed(5))
            assert torch.equal(mask, again)
    other = random_block_mask(weight, 1, 0.5, torch.Generator().manual_seed(6))
    assert not torch.equal(other, random_block_mask(weight, 1, 0.5, torch.Generator().manual_seed(5)))


@pytest.mark.slow
def test_random_blocks_are_uniform_over_blocks() -> None:
    # 8 blocks (N = 4, C_out = 8, 4 input channels), 4 pruned per draw: each block pruned in half of the draws
    weight = torch.randn(8, 4)
    generator = torch.Generator().manual_seed(0)
    draws = 1000
    pruned = sum((~random_block_mask(weight, 4, 0.5, generator)[::4]).double() for _ in range(draws))  # rows 0, 4
    frequency = pruned / draws
    assert ((frequency - 0.5).abs() < 4 * math.sqrt(0.25 / draws)).all(), frequency  # 4 sigma


def test_weight_baseline_is_the_unstructured_magnitude_mask_with_round_half_up_counts() -> None:
    weight = make_weight(9, 1, None, seed=2)
    mask = weight_magnitude_mask(weight, 0.5)
    assert torch.equal(mask, magnitude_mask_by_selection(weight, 0.5))
    assert (~mask).sum() == 5  # num_pruned(9, 0.5) = floor(4.5 + 1/2), a 1xN layer of 9 blocks loses 4
    magnitudes = weight.abs().reshape(-1).numpy()
    expected = np.ones(9, dtype=bool)
    expected[np.argsort(magnitudes, kind="stable")[:5]] = False
    np.testing.assert_array_equal(mask.reshape(-1).numpy(), expected)


@pytest.mark.parametrize("c_out, c_in, side", SHAPES)
def test_filter_l1_mask_prunes_whole_filters_of_lowest_norm(c_out: int, c_in: int, side: int | None) -> None:
    weight = make_weight(c_out, c_in, side, seed=4)
    weight[3] = weight[5]  # a tie: channel 3 goes first
    norms = weight.abs().reshape(c_out, -1).sum(dim=1).numpy()
    for rate in RATES:
        mask = filter_l1_mask(weight, rate)
        rows = mask.reshape(c_out, -1)
        assert (rows.all(dim=1) | ~rows.any(dim=1)).all()
        expected = np.ones(c_out, dtype=bool)
        expected[np.lexsort((np.arange(c_out), norms))[: exact_floor(rate, c_out)]] = False
        np.testing.assert_array_equal(rows[:, 0].numpy(), expected)


def test_layer_mask_dispatches_every_method() -> None:
    weight = make_weight(16, 8, 3, seed=9)
    assert torch.equal(layer_mask(weight, PruneMethod.ONE_BY_N, 0.5, 4), one_by_n_mask(weight, 4, 0.5))
    assert torch.equal(layer_mask(weight, "weight", 0.5), weight_magnitude_mask(weight, 0.5))
    assert torch.equal(layer_mask(weight, "filter", 0.5), filter_l1_mask(weight, 0.5))
    random = layer_mask(weight, "random_blocks", 0.5, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(random, random_block_mask(weight, 4, 0.5, torch.Generator().manual_seed(1)))


def test_is_depthwise() -> None:
    assert is_depthwise(nn.Conv2d(8, 8, 3, groups=8))
    assert is_depthwise(nn.Conv2d(8, 16, 3, groups=8))  # channel multiplier 2: still one input channel per group
    assert not is_depthwise(nn.Conv2d(8, 8, 3, groups=2))
    assert not is_depthwise(nn.Conv2d(8, 8, 1))
    assert not is_depthwise(nn.Linear(8, 8))


@pytest.mark.slow
def test_prunable_layers_of_torchvision_models() -> None:
    for name in ["mobilenet_v2", "mobilenet_v3_small", "resnet50"]:
        model = getattr(torchvision.models, name)(weights=None)
        if name == "resnet50":
            assert len(prunable_layers(model)) == 52  # 53 convolutions, the stem skipped
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        dense = [n for n in convs[1:] if model.get_submodule(n).groups == 1]
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        assert list(prunable_layers(model)) == dense
        assert list(prunable_layers(model, include_classifier=True)) == sorted(
            dense + linears, key=[n for n, _ in model.named_modules()].index
        )


def test_prunable_layers_of_mobilenet_v1() -> None:
    mobilenet_v1 = pytest.importorskip("models.mobilenet_v1", reason="models/mobilenet_v1.py is not there yet")
    model = mobilenet_v1.mobilenet_v1()
    assert list(prunable_layers(model)) == [f"blocks.{i}.conv_pw" for i in range(13)]
    assert list(prunable_layers(model, include_classifier=True))[-1] == "fc"


@pytest.mark.slow
def test_model_masks_cover_the_prunable_layers_and_name_a_layer_too_narrow() -> None:
    model = torchvision.models.mobilenet_v3_small(weights=None)
    masks = model_masks(model, "1xn", 0.5, block_size=8)
    layers = prunable_layers(model)
    assert list(masks) == list(layers)
    for name, mask in masks.items():
        assert torch.equal(mask, one_by_n_mask(layers[name].weight, 8, 0.5))
    # the first squeeze-excitation squeezes 16 channels to 8: N = 16 does not fit
    with pytest.raises(ValueError, match=r"layer 'features.1.block.1.fc1': block size N = 16 is larger"):
        model_masks(model, "1xn", 0.5, block_size=16)


def _scheduled_model() -> tuple[nn.Module, dict[str, nn.Module]]:
    """Stem, conv 8->10 (a smaller last 1x4 block), depthwise, 1x1 conv 10->6, linear: masks in every layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 10, 3), nn.ReLU(), nn.Conv2d(10, 10, 3, groups=10),
                          nn.Conv2d(10, 6, 1), nn.Flatten(), nn.Linear(6 * 2 * 2, 5))  # fmt: skip
    layers = compress_model(model, CompressionSpec(prune=True))
    return model, layers


def test_gradual_one_by_n_schedule_prunes_the_exact_blocks_of_the_current_weights_at_every_update() -> None:
    model, layers = _scheduled_model()
    pruned_layers = {name: layers[name] for name in prunable_layers(model)}
    assert list(pruned_layers) == ["2", "5"]  # the stem, the depthwise conv and the classifier are skipped
    s_i, s_f, t0, n, dt = Fraction("0.1"), Fraction("0.7"), 1, 4, 2
    schedule = PruningSchedule(float(s_i), float(s_f), t0, n, dt)
    pruner = GradualMagnitudePruner(pruned_layers, schedule, BlockMaskRule(PruneMethod.ONE_BY_N, 4, seed=0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    previous = {name: torch.ones_like(layer.weight_mask) for name, layer in pruned_layers.items()}
    updates = 0
    for step in range(14):
        before = {name: layer.weight.detach().double().numpy().copy() for name, layer in pruned_layers.items()}
        if pruner.update(step):
            k = step - t0
            assert k >= 0 and k % dt == 0
            sparsity = s_f + (s_i - s_f) * (1 - Fraction(k, n * dt)) ** 3  # the cubic schedule, in exact arithmetic
            for name, layer in pruned_layers.items():
                states = block_states(layer.weight_mask, 4)
                assert (states == 0).sum() == math.floor(sparsity * states.size), (step, name)
                expected = reference_one_by_n(before[name], 4, float(sparsity))  # the current (pruned: zero) weights
                np.testing.assert_array_equal(layer.weight_mask.numpy(), expected)
                assert not (layer.weight_mask & ~previous[name]).any()  # nested: the weights kept are nonzero
                previous[name] = layer.weight_mask.clone()
            updates += 1
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.apply_masks()
    assert updates == n + 1
    for name, layer in layers.items():
        if name in pruned_layers:  # exactly floor(s_f * blocks) blocks, their weights zero
            assert (block_states(layer.weight_mask, 4) == 0).sum() == exact_floor(0.7, math.ceil(layer.weight.shape[0] / 4)
                                                                                  * layer.weight.shape[1])  # fmt: skip
            assert torch.all(layer.weight[~layer.weight_mask] == 0)
        else:
            assert layer.weight_mask.all(), name


def test_random_block_rule_draws_nested_masks_that_end_at_the_one_shot_mask() -> None:
    model, layers = _scheduled_model()
    pruned_layers = {name: layers[name] for name in prunable_layers(model)}
    rule = BlockMaskRule(PruneMethod.RANDOM_BLOCKS, 4, seed=5)
    previous = None
    for rate in (0.0, 0.2, 0.45, 0.7):
        masks = rule(pruned_layers, rate)
        again = rule(pruned_layers, rate)
        assert all(torch.equal(masks[name], again[name]) for name in masks)  # the same draw at every call
        for name, mask in masks.items():
            blocks = math.ceil(mask.shape[0] / 4) * mask.shape[1]
            assert (block_states(mask, 4) == 0).sum() == exact_floor(rate, blocks)
            if previous is not None:
                assert not (mask & ~previous[name]).any(), (rate, name)
        previous = masks
    one_shot = model_masks(model, "random_blocks", 0.7, 4, list(pruned_layers), generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(previous[name], one_shot[name]) for name in pruned_layers)
