"""Magnitude pruning masks: exact counts, largest magnitudes kept, deterministic tie-breaking.

The production masks (by selection, :mod:`pruning.masks`; per tensor, per channel, per block of
channels, global) are checked against a numpy reference and against the sort-based masks of
``tests/reference_masks.py``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference_masks import (
    block_magnitude_mask_by_sorting,
    global_magnitude_masks_by_sorting,
    magnitude_mask_by_sorting,
    per_channel_magnitude_mask,
)

from pruning.masks import (
    global_magnitude_masks_by_selection,
    magnitude_mask_by_selection,
    magnitude_pruning_sse,
    num_pruned,
    sorted_magnitudes,
)
from quantization.granularity import Granularity

SPARSITIES = [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.625, 0.75, 0.9, 0.99, 1.0]


def expected_count(n: int, sparsity: float) -> int:
    return min(n, math.floor(sparsity * n + 0.5))


def np_keep(magnitudes: np.ndarray, sparsity: float) -> np.ndarray:
    """Independent reference: prune the k smallest |w|, first occurrence first among ties."""
    flat = np.abs(magnitudes).reshape(-1)
    k = expected_count(flat.size, sparsity)
    order = np.argsort(flat, kind="stable")
    keep = np.ones(flat.size, dtype=bool)
    keep[order[:k]] = False
    return keep.reshape(magnitudes.shape)


def np_keep_per_channel(weight: np.ndarray, sparsity: float, axis: int) -> np.ndarray:
    moved = np.moveaxis(weight, axis, 0)
    keep = np.stack([np_keep(moved[c], sparsity) for c in range(moved.shape[0])])
    return np.moveaxis(keep, 0, axis)


# --------------------------------------------------------------------------- counts
def test_num_pruned_values():
    for n in list(range(41)) + [99, 100, 101, 1000, 12345]:
        for s in list(np.linspace(0, 1, 41)) + SPARSITIES:
            assert num_pruned(n, float(s)) == expected_count(n, float(s))
    # round half up: 0.5 * 3 = 1.5 -> 2; 0.5 * 5 = 2.5 -> 3; 0.25 * 2 = 0.5 -> 1; 0.125 * 4 = 0.5 -> 1
    assert num_pruned(3, 0.5) == 2 and num_pruned(5, 0.5) == 3
    assert num_pruned(2, 0.25) == 1 and num_pruned(4, 0.125) == 1
    assert num_pruned(10, 0.04) == 0 and num_pruned(10, 0.05) == 1
    assert num_pruned(7, 1.0) == 7 and num_pruned(7, 0.0) == 0


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 100, 257, 1000])
def test_magnitude_mask_exact_count(n):
    rng = np.random.default_rng(n)
    w = torch.from_numpy(rng.normal(size=n)).float()
    for s in list(np.linspace(0, 1, 21)) + [1 / 3, 2 / 3, 0.999]:
        mask = magnitude_mask_by_selection(w, float(s))
        assert mask.dtype == torch.bool and mask.shape == w.shape
        assert int((~mask).sum()) == expected_count(n, float(s))


@pytest.mark.parametrize("shape", [(50,), (8, 9), (4, 3, 3, 3), (2, 5, 1, 7)])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_magnitude_mask_keeps_largest(shape, sparsity):
    rng = np.random.default_rng(len(shape) * 100 + int(sparsity * 1000))
    w = rng.normal(size=shape)
    mask = magnitude_mask_by_selection(torch.from_numpy(w), sparsity).numpy()
    np.testing.assert_array_equal(mask, np_keep(w, sparsity))
    if 0 < mask.sum() < mask.size:
        assert np.abs(w[mask]).min() >= np.abs(w[~mask]).max()


def test_magnitude_mask_uses_magnitude_not_sign():
    w = torch.tensor([-5.0, 0.1, 3.0, -0.2, 4.0, -1.0])
    mask = magnitude_mask_by_selection(w, 0.5)
    assert mask.tolist() == [True, False, True, False, True, False]


# --------------------------------------------------------------------------- ties
def test_ties_first_occurrence_pruned_first():
    w = torch.tensor([1.0, -1.0, 1.0, 2.0, -1.0, 0.5])
    # |w| = 1,1,1,2,1,0.5: prune 0.5 first, then the 1s in position order
    expected = {
        1: [True, True, True, True, True, False],
        2: [False, True, True, True, True, False],
        3: [False, False, True, True, True, False],
        4: [False, False, False, True, True, False],
        5: [False, False, False, True, False, False],
    }
    for k, keep in expected.items():
        assert magnitude_mask_by_selection(w, k / 6).tolist() == keep
        assert per_channel_magnitude_mask(w[None, :], k / 6)[0].tolist() == keep
        assert magnitude_mask_by_selection(w[None, :], k / 6, Granularity.per_channel())[0].tolist() == keep
        assert magnitude_mask_by_selection(w[:, None], k / 6, Granularity.per_channel(1))[:, 0].tolist() == keep
        masks = global_magnitude_masks_by_selection({"a": w[:3], "b": w[3:]}, k / 6)
        assert masks["a"].tolist() + masks["b"].tolist() == keep


@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.7])
def test_ties_many_equal_magnitudes(sparsity):
    rng = np.random.default_rng(17)
    w = rng.integers(-3, 4, size=(6, 40)).astype(np.float32)  # magnitudes 0..3, massive ties
    mask = magnitude_mask_by_selection(torch.from_numpy(w), sparsity).numpy()
    np.testing.assert_array_equal(mask, np_keep(w, sparsity))
    for axis in (0, 1):
        mask = per_channel_magnitude_mask(torch.from_numpy(w), sparsity, ch_axis=axis).numpy()
        np.testing.assert_array_equal(mask, np_keep_per_channel(w, sparsity, axis))
    parts = {"first": w[:2], "second": w[2:5], "third": w[5:]}
    masks = global_magnitude_masks_by_selection({k: torch.from_numpy(v) for k, v in parts.items()}, sparsity)
    flat = np.concatenate([masks[k].numpy().reshape(-1) for k in parts])
    np.testing.assert_array_equal(flat, np_keep(np.concatenate([v.reshape(-1) for v in parts.values()]), sparsity))
    # deterministic: the same call gives the same mask
    again = global_magnitude_masks_by_selection({k: torch.from_numpy(v) for k, v in parts.items()}, sparsity)
    assert all(torch.equal(masks[k], again[k]) for k in parts)


def test_global_ties_across_tensors_earlier_tensor_first():
    masks = global_magnitude_masks_by_selection({"late": torch.ones(3), "early": torch.ones(2)}, 0.4)
    # order is the mapping's order: "late" comes first and is pruned first
    assert masks["late"].tolist() == [False, False, True]
    assert masks["early"].tolist() == [True, True]


# --------------------------------------------------------------------------- per channel
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_per_channel_same_count_every_channel(axis, sparsity):
    rng = np.random.default_rng(int(sparsity * 100) + 7 * axis)
    w = rng.normal(size=(6, 5, 3, 3)) * rng.uniform(0.01, 10, size=(6, 5, 1, 1))
    mask = per_channel_magnitude_mask(torch.from_numpy(w), sparsity, ch_axis=axis).numpy()
    assert mask.shape == w.shape
    per_ch = w.size // w.shape[axis]
    other = tuple(a for a in range(4) if a != axis)
    pruned = (~mask).sum(axis=other)
    np.testing.assert_array_equal(pruned, expected_count(per_ch, sparsity))
    np.testing.assert_array_equal(mask, np_keep_per_channel(w, sparsity, axis))
    # per channel differs from per tensor when channel scales differ
    if 0.1 <= sparsity <= 0.9:
        assert not np.array_equal(mask, np_keep(w, sparsity))


def test_channel_and_block_ties_by_position_within_each_group() -> None:
    w = torch.tensor([[1.0, -1.0, 1.0], [2.0, 2.0, 0.5], [-1.0, 1.0, 1.0], [3.0, -3.0, 3.0], [0.0, 0.0, 0.0]])
    # one third of each channel: the first of its smallest magnitudes
    per_channel = magnitude_mask_by_selection(w, 1 / 3, Granularity.per_channel())
    assert (~per_channel).nonzero().tolist() == [[0, 0], [1, 2], [2, 0], [3, 0], [4, 0]]
    # blocks of 2 channels (6, 6, 3 entries): 2, 2 and 1 pruned
    blocks = magnitude_mask_by_selection(w, 1 / 3, Granularity.blocks(2))
    assert (~blocks).nonzero().tolist() == [[0, 0], [1, 2], [2, 0], [2, 1], [4, 0]]


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3, 0.5, 0.77, 0.999, 1.0])
def test_scoped_masks_equal_the_sorting_references(sparsity: float) -> None:
    """Per channel and blocks of N (N dividing the channel count or not) along either axis, many ties."""
    generator = torch.Generator().manual_seed(int(sparsity * 1000))
    weights = {
        "ties": torch.randint(-3, 4, (7, 5, 3, 3), generator=generator).float(),  # 7 channels: blocks of 2, 3, 4 leave a rest
        "dense": torch.randn(10, 9, generator=generator) * torch.rand(10, 1, generator=generator),
        "one_channel": torch.tensor([[0.5, -0.5, 0.5, 0.25]]),
    }
    for name, weight in weights.items():
        for axis in (0, 1):
            channels = weight.shape[axis]
            by_channel = magnitude_mask_by_selection(weight, sparsity, Granularity.per_channel(axis))
            assert torch.equal(by_channel, per_channel_magnitude_mask(weight, sparsity, axis)), (name, axis)
            for block in (1, 2, 3, 4, channels, channels + 5):
                got = magnitude_mask_by_selection(weight, sparsity, Granularity.blocks(block, axis))
                assert torch.equal(got, block_magnitude_mask_by_sorting(weight, sparsity, block, axis)), (name, axis, block)
            one_block = magnitude_mask_by_selection(weight, sparsity, Granularity.blocks(channels, axis))
            if axis == 0:  # one block of all channels is the per-tensor mask (same order)
                assert torch.equal(one_block, magnitude_mask_by_sorting(weight, sparsity))
        assert torch.equal(magnitude_mask_by_selection(weight, sparsity, Granularity.per_tensor()),
                           magnitude_mask_by_sorting(weight, sparsity))  # fmt: skip


@pytest.mark.parametrize("block", [1, 3, 4])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.9])
def test_block_masks_exact_counts_and_largest_kept(block: int, sparsity: float) -> None:
    rng = np.random.default_rng(block * 10 + int(sparsity * 100))
    w = rng.normal(size=(10, 3, 2, 2)) * rng.uniform(0.01, 10, size=(10, 1, 1, 1))  # 10 channels of 12 weights
    mask = magnitude_mask_by_selection(torch.from_numpy(w), sparsity, Granularity.blocks(block)).numpy()
    for start in range(0, 10, block):
        group, kept = np.abs(w[start : start + block]), mask[start : start + block]
        assert (~kept).sum() == expected_count(group.size, sparsity), start
        np.testing.assert_array_equal(kept, np_keep(group, sparsity))
    sizes = [min(block, 10 - start) * 12 for start in range(0, 10, block)]
    assert (~mask).sum() == sum(expected_count(size, sparsity) for size in sizes)


def test_scope_axis_must_exist() -> None:
    with pytest.raises(ValueError, match="axis 2"):
        magnitude_mask_by_selection(torch.ones(3, 4), 0.5, Granularity.per_channel(2))


# --------------------------------------------------------------------------- global
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_global_masks_one_threshold(sparsity):
    rng = np.random.default_rng(int(sparsity * 1000) + 1)
    weights = {
        "conv": torch.from_numpy(rng.normal(0, 0.1, size=(8, 3, 3, 3))),
        "fc": torch.from_numpy(rng.normal(0, 1.0, size=(10, 20))),
        "bias_like": torch.from_numpy(rng.normal(0, 3.0, size=(7,))),
    }
    masks = global_magnitude_masks_by_selection(weights, sparsity)
    assert list(masks) == list(weights)
    total = sum(w.numel() for w in weights.values())
    assert sum(int((~m).sum()) for m in masks.values()) == expected_count(total, sparsity)
    kept = np.concatenate([weights[k].abs().numpy()[masks[k].numpy()] for k in weights])
    pruned = np.concatenate([weights[k].abs().numpy()[~masks[k].numpy()] for k in weights])
    if kept.size and pruned.size:
        assert kept.min() >= pruned.max()
    for k, weight in weights.items():
        assert masks[k].shape == weight.shape and masks[k].dtype == torch.bool
    # the small-scale tensor is pruned much harder than the large-scale one
    if 0.2 <= sparsity <= 0.8:
        share = {k: float((~masks[k]).float().mean()) for k in weights}
        assert share["conv"] > share["fc"] and share["conv"] > share["bias_like"]


def test_selection_masks_equal_the_sorting_masks() -> None:
    generator = torch.Generator().manual_seed(3)
    weights = {
        "ties": torch.randint(-3, 4, (7, 5, 3, 3), generator=generator).float(),  # many equal magnitudes, zeros
        "dense": torch.randn(40, 9, generator=generator),
        "small": torch.tensor([0.5, -0.5, 0.5, 0.25]),
    }
    for sparsity in (0.0, 0.1, 0.37, 0.5, 0.8, 0.999, 1.0):
        for name, weight in weights.items():
            by_sorting = magnitude_mask_by_sorting(weight, sparsity)
            assert torch.equal(magnitude_mask_by_selection(weight, sparsity), by_sorting), name
        by_selection = global_magnitude_masks_by_selection(weights, sparsity)
        by_sorting = global_magnitude_masks_by_sorting(weights, sparsity)
        assert all(torch.equal(by_selection[name], by_sorting[name]) for name in weights)


# --------------------------------------------------------------------------- pruning error
@pytest.mark.parametrize("n", [1, 5, 64, 1001])
def test_magnitude_pruning_sse_equals_masked_error(n):
    rng = np.random.default_rng(n)
    w = torch.from_numpy(rng.standard_t(3, size=n))
    squares = torch.sort(w * w).values
    prefix = torch.cat([squares.new_zeros(1), squares.cumsum(0)])
    for s in list(np.linspace(0, 1, 26)) + [1 / 3]:
        mask = magnitude_mask_by_selection(w, float(s))
        direct = float(torch.sum((w * ~mask) ** 2))
        assert float(magnitude_pruning_sse(prefix, float(s))) == pytest.approx(direct, rel=1e-12, abs=1e-300)


def test_magnitude_pruning_sse_batched_prefix():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 30))
    prefix = np.concatenate([np.zeros((4, 1)), np.cumsum(np.sort(w * w, axis=1), axis=1)], axis=1)
    got = magnitude_pruning_sse(torch.from_numpy(prefix), 0.4)
    expected = [np.sum(np.sort(row * row)[:12]) for row in w]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize(
    "values",
    [
        [-3.0, -1.0, -0.0, 0.0, 0.5, 1.0, 2.0],  # ties across the runs, signed zeros
        [-2.0, -1.5, -0.25],  # negatives only
        [0.0, 0.1, 7.0],  # no negatives
        [4.0],
    ],
)
def test_sorted_magnitudes_small(values):
    x = torch.tensor(values, dtype=torch.float64)
    assert torch.equal(sorted_magnitudes(x), torch.sort(x.abs()).values)


@pytest.mark.parametrize("seed", range(4))
def test_sorted_magnitudes_equals_sorting_the_magnitudes(seed):
    rng = np.random.default_rng(seed)
    x = np.sort(np.round(rng.standard_t(3, size=2000 + seed), 2))  # many ties
    np.testing.assert_array_equal(sorted_magnitudes(torch.from_numpy(x)).numpy(), np.sort(np.abs(x)))


# --------------------------------------------------------------------------- edge cases
def test_sparsity_zero_and_one():
    w = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(0))
    assert magnitude_mask_by_selection(w, 0.0).all() and not magnitude_mask_by_selection(w, 1.0).any()
    for axis in (0, 1):
        assert per_channel_magnitude_mask(w, 0.0, axis).all()
        assert not per_channel_magnitude_mask(w, 1.0, axis).any()
    assert all(m.all() for m in global_magnitude_masks_by_selection({"a": w, "b": w[0]}, 0.0).values())
    assert not any(m.any() for m in global_magnitude_masks_by_selection({"a": w, "b": w[0]}, 1.0).values())
    squares = torch.sort((w * w).reshape(-1)).values
    prefix = torch.cat([squares.new_zeros(1), squares.cumsum(0)])
    assert float(magnitude_pruning_sse(prefix, 0.0)) == 0.0
    assert float(magnitude_pruning_sse(prefix, 1.0)) == pytest.approx(float((w * w).sum()), rel=1e-6)


def test_mask_does_not_modify_weight_and_ignores_grad():
    w = torch.randn(10, requires_grad=True)
    before = w.detach().clone()
    mask = magnitude_mask_by_selection(w, 0.5)
    assert not mask.requires_grad and torch.equal(w.detach(), before)


@pytest.mark.parametrize("bad", [-0.1, 1.0001, 2.0, -1e-9, float("nan"), float("inf")])
def test_invalid_sparsity_raises(bad):
    w = torch.randn(4, 4)
    with pytest.raises(ValueError):
        num_pruned(16, bad)
    with pytest.raises(ValueError):
        magnitude_mask_by_selection(w, bad)
    with pytest.raises(ValueError):
        per_channel_magnitude_mask(w, bad)
    with pytest.raises(ValueError):
        magnitude_mask_by_selection(w, bad, Granularity.blocks(3))
    with pytest.raises(ValueError):
        global_magnitude_masks_by_selection({"w": w}, bad)
    with pytest.raises(ValueError):
        magnitude_pruning_sse(torch.zeros(17), bad)
