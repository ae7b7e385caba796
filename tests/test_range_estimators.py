"""Range estimators: the exact MSE search against brute force, the grid errors and bounds, min-max estimators.

The brute forces quantize the full tensor for every candidate in float64 (numpy), so they share no
code with the sorted-prefix-sum search they check: a dense grid of thresholds with local
refinement, and (small tensors) an exhaustive search over every interval between breakpoints.
"""
from __future__ import annotations

import functools
import zlib

import numpy as np
import pytest
import torch

import quantization.grid_error as grid_error_mod
from quantization.grid_error import (
    SortedValues,
    accumulation_dtype,
    as_rows,
    count_below,
    error_resolution,
    grid_sse,
    grid_sse_lower_bound,
    interval_minimum,
    narrow_intervals,
    narrow_ratio,
    zero_count,
)
from quantization.quantizers import QuantScheme, integer_range, params_from_range
from quantization.range_estimators import RunningMinMax, current_minmax, mse_range, mse_range_search_many

SCHEMES = list(QuantScheme)
N_SAMPLES = 5000
N_THRESHOLDS = 4000


# --------------------------------------------------------------------------- helpers
def np_qdq(x, s, z, q_min, q_max):
    return (np.clip(np.round(x / s) + z, q_min, q_max) - z) * s


def sym_sse(x: np.ndarray, threshold: float, n_bits: int) -> float:
    q_min, q_max = integer_range(n_bits, "symmetric")
    s = threshold / q_max
    return float(np.sum((x - np_qdq(x, s, 0.0, q_min, q_max)) ** 2))


def sym_sse_many(x: np.ndarray, thresholds: np.ndarray, n_bits: int, chunk: int = 250) -> np.ndarray:
    """SSE of the symmetric quantizer at each threshold: full quantize-dequantize, a chunk at a time."""
    q_min, q_max = integer_range(n_bits, "symmetric")
    out = []
    for i in range(0, len(thresholds), chunk):
        s = (thresholds[i : i + chunk] / q_max)[:, None]
        err = x[None, :] - np.clip(np.round(x[None, :] / s), q_min, q_max) * s
        out.append(np.einsum("ij,ij->i", err, err))
    return np.concatenate(out)


def brute_force_best_sse(x: np.ndarray, n_bits: int, n_thresholds: int = N_THRESHOLDS) -> float:
    """Least SSE over thresholds ``T_j = 1.5 j / N max|x|`` (up to 1.5 max|x|), then a dense grid of
    200 thresholds across the two intervals around each of the 5 best."""
    thresholds = 1.5 * np.abs(x).max() * np.arange(1, n_thresholds + 1) / n_thresholds
    errors = sym_sse_many(x, thresholds, n_bits)
    spacing = thresholds[0]
    refined = [thresholds[i] + spacing * np.linspace(-1, 1, 201) for i in np.argsort(errors)[:5]]
    return float(min(errors.min(), sym_sse_many(x, np.concatenate(refined).clip(1e-300), n_bits).min()))


def exhaustive_best(
    x: np.ndarray, n_bits: int, scheme: QuantScheme, zero_points=None, chunk: int = 2000
) -> tuple[float, float, float]:
    """``(sse, step, zero_point)`` minimising the SSE over every step ``s > 0`` and zero point
    (of ``zero_points`` if given).

    For each zero point: every breakpoint ``x_i / (j + 1/2)`` of every value and level boundary,
    and on each interval between consecutive breakpoints the assignment at its middle, whose
    error is a parabola in ``s``, minimised within the interval by direct evaluation.
    """
    q_min, q_max = integer_range(n_bits, scheme)
    if zero_points is None:
        zero_points = range(q_min, q_max + 1) if scheme is QuantScheme.ASYMMETRIC else [0]
    best = (float(np.sum(x * x)), 1.0, 0.0)
    for z in zero_points:
        boundaries = np.arange(q_min - z, q_max - z) + 0.5
        breaks = (x[:, None] / boundaries[None, :]).ravel()
        breaks = np.unique(np.concatenate([breaks[breaks > 0], [2.0 * np.abs(x).max() + 1.0]]))
        lows, highs = np.concatenate([[0.0], breaks[:-1]]), breaks
        for i in range(0, len(lows), chunk):
            lo, hi = lows[i : i + chunk, None], highs[i : i + chunk, None]
            middle = 0.5 * (lo + hi)
            levels = np.clip(np.round(x[None, :] / middle) + z, q_min, q_max) - z
            a, b = np.sum(levels * x, axis=1, keepdims=True), np.sum(levels * levels, axis=1, keepdims=True)
            step = np.clip(np.divide(a, b, out=middle.copy(), where=b > 0), lo, hi)
            for s in (step, middle):
                err = x[None, :] - (np.clip(np.round(x[None, :] / s) + z, q_min, q_max) - z) * s
                sse = np.einsum("ij,ij->i", err, err)
                k = int(np.argmin(sse))
                if sse[k] < best[0]:
                    best = (float(sse[k]), float(s[k, 0]), float(z))
    return best


def sqnr(x: np.ndarray, sse: float) -> float:
    return 10.0 * np.log10(np.sum(x * x) / sse)


@functools.cache
def base_sample(dist: str) -> np.ndarray:
    rng = np.random.default_rng({"gaussian": 11, "laplace": 12, "student_t3": 13}[dist])
    if dist == "gaussian":
        return rng.standard_normal(N_SAMPLES)
    if dist == "laplace":
        return rng.laplace(size=N_SAMPLES)
    return rng.standard_t(3, size=N_SAMPLES)


# --------------------------------------------------------------------------- MSE search vs brute force
@pytest.mark.parametrize("n_bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("scale", [1e-3, 1e-1, 1.0, 10.0])
@pytest.mark.parametrize("dist", ["gaussian", "laplace", "student_t3"])
def test_mse_range_reaches_brute_force_optimum(dist, scale, n_bits):
    x = base_sample(dist) * scale
    min_val, max_val = mse_range(torch.from_numpy(x), n_bits, "symmetric")
    assert min_val.dtype == torch.float64 and min_val.shape == ()
    threshold = float(max_val)
    assert float(min_val) == -threshold and threshold > 0.0
    found = sym_sse(x, threshold, n_bits)
    best = brute_force_best_sse(x, n_bits)
    assert found <= best * (1 + 1e-9), f"MSE search {sqnr(x, found):.6f} dB, brute force {sqnr(x, best):.6f} dB"
    # and it is not just min-max (which is far worse at low bits)
    minmax = sqnr(x, sym_sse(x, np.abs(x).max(), n_bits))
    if n_bits <= 4:
        assert sqnr(x, found) > minmax + 0.5


def small_tensors(seed: int, count: int) -> list[np.ndarray]:
    """Tensors of 8..600 values, of several shapes of distribution: where small grids are jagged."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        n = int(rng.integers(8, 601))
        kind = i % 3
        x = rng.standard_normal(n) if kind == 0 else rng.standard_t(3, n) if kind == 1 else rng.uniform(-1, 1, n)
        out.append(x * 10.0 ** rng.uniform(-3, 1))
    return out


@pytest.mark.parametrize("n_bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.slow
def test_mse_range_is_exact_on_small_tensors(n_bits):
    """Against the exhaustive breakpoint search, at every bit-width, including optima above max|x|."""
    for x in small_tensors(100 + n_bits, 6 if n_bits <= 6 else 3):
        if n_bits == 8:
            x = x[:200]
        _, threshold = mse_range(torch.from_numpy(x), n_bits)
        found = sym_sse(x, float(threshold), n_bits)
        best = exhaustive_best(x, n_bits, QuantScheme.SYMMETRIC)[0]
        assert found <= best * (1 + 1e-9) + 1e-300, (len(x), found, best)


def padded_counts(padded: np.ndarray, own: np.ndarray, cuts: np.ndarray):
    """numpy: per cut, the padded values below it, and the sums of the row's own values below it and of their squares."""
    index = np.searchsorted(padded, cuts, side="left")
    below = own[None, :] < cuts[:, None]
    return index, (below * own).sum(axis=1), (below * own * own).sum(axis=1)


def check_reads_as_padded(stacked: SortedValues, rows: list[np.ndarray]) -> None:
    """Each row of ``stacked`` reads as the sorted row padded with zeros to the longest stored: dense values,
    counts and sums below cuts at every value, between values, at 0 and at the extremes."""
    length = stacked.n_values  # the longest stored row (selected or not)
    assert stacked.n_rows == len(rows) and length >= max(row.size for row in rows)
    for r, row in enumerate(rows):
        own = np.sort(row)
        padded = np.sort(np.concatenate([own, np.zeros(length - own.size)]))
        assert np.array_equal(stacked.values[r].numpy(), padded)
        cuts = np.unique(np.concatenate([own, own + 1e-3, own - 1e-3, [0.0, -0.0, -np.inf, np.inf]]))
        index, sums, sums_sq = count_below(stacked.select(torch.tensor([r])), torch.from_numpy(cuts)[None, :, None])
        expected_index, expected_sums, expected_sums_sq = padded_counts(padded, own, cuts)
        assert np.array_equal(index[0, :, 0].numpy(), expected_index)
        np.testing.assert_allclose(sums[0, :, 0].numpy(), expected_sums, rtol=0, atol=1e-14 * np.abs(own).sum())
        np.testing.assert_allclose(sums_sq[0, :, 0].numpy(), expected_sums_sq, rtol=0, atol=1e-14 * np.sum(own * own))
        assert float(stacked.counts[r]) == own.size
        assert float(stacked.energy[r]) == pytest.approx(float(np.sum(own * own)), rel=1e-12)


def test_stacked_rows_read_as_padded_with_zeros():
    """Rows of several lengths stored together, by stacking whole sets, by sorting them together, or by
    selecting rows of one set: each reads as its own values padded with zeros in sorted place (numpy)."""
    rng = np.random.default_rng(5)
    sets = [rng.standard_normal((2, 5)), rng.standard_normal((1, 9)), rng.uniform(1, 2, (3, 7)), -rng.uniform(1, 2, (1, 4))]
    rows = [row for x in sets for row in x]
    parts = [SortedValues.from_rows(torch.from_numpy(x)) for x in sets]
    stacked = SortedValues.stack(parts)
    check_reads_as_padded(stacked, rows)
    check_reads_as_padded(SortedValues.from_row_sets([torch.from_numpy(x) for x in sets]), rows)
    assert torch.equal(error_resolution(stacked), torch.cat([error_resolution(part) for part in parts]))
    # rows of one stored set, selected and stacked again: no copy
    picked = [stacked.select(torch.tensor([4, 1])), stacked.select(torch.tensor([6]))]
    again = SortedValues.stack(picked)
    assert again.flat_values is stacked.flat_values
    check_reads_as_padded(again, [rows[4], rows[1], rows[6]])
    with pytest.raises(ValueError, match="whole stored sets"):
        SortedValues.stack([picked[0], parts[0]])


def test_count_below_is_exact_beyond_float32():
    """Values that are no float32 numbers (within one float32 step of each other and of the cuts) and
    signed zeros: the keys' search is corrected to numpy's counts; float32 data needs no correction."""
    base = np.float64(np.float32(1.5))
    values = np.concatenate([base + 1e-12 * np.arange(-20, 21), -base - 1e-13 * np.arange(10), [0.0, -0.0, 2.0**-160]])
    cuts = np.concatenate([values, values + 5e-13, values - 5e-13, [base, -base, 0.0, -0.0, 2.0**-161]])
    sv = SortedValues.from_rows(torch.from_numpy(values)[None])
    assert not sv.exact_keys
    single = SortedValues.from_rows(torch.from_numpy(values.astype(np.float32))[None])
    assert single.exact_keys
    for rows, own in ((sv, np.sort(values)), (single, np.sort(values.astype(np.float32).astype(np.float64)))):
        index, sums, sums_sq = (t[0, :, 0].numpy() for t in count_below(rows, torch.from_numpy(cuts)[None, :, None]))
        expected_index, expected_sums, expected_sums_sq = padded_counts(own, own, cuts)
        assert np.array_equal(index, expected_index)
        np.testing.assert_allclose(sums, expected_sums, rtol=0, atol=1e-14 * np.abs(own).sum())
        np.testing.assert_allclose(sums_sq, expected_sums_sq, rtol=0, atol=1e-14 * np.sum(own * own))


@pytest.mark.parametrize("n_bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.slow
def test_stacked_search_is_exact(n_bits):
    """Tensors of several lengths searched together (padded with zeros to their bucket's longest)
    reach the exhaustive breakpoint search's optimum each, including optima above max|x|."""
    tensors = small_tensors(200 + n_bits, 3)
    tensors = [tensors[0][:150], tensors[1][:200], np.abs(tensors[2][:180]), -np.abs(tensors[0][:20])]
    if n_bits >= 3:
        tensors.append(clustered_below_grid(n_bits, 20 + n_bits))
    parts = [SortedValues.from_rows(torch.from_numpy(x).reshape(1, -1)) for x in tensors]
    for x, (_, threshold) in zip(tensors, mse_range_search_many(parts, n_bits)):
        found = sym_sse(x, float(threshold[0]), n_bits)
        best = exhaustive_best(x, n_bits, QuantScheme.SYMMETRIC)[0]
        assert found <= best * (1 + 1e-9) + 1e-300, (len(x), found, best)


def clustered_below_grid(n_bits: int, seed: int) -> np.ndarray:
    """Values near the levels ``k s`` of a grid, the outermost clusters pulled inwards by 0.1 s.

    The best step fits the inner clusters, so its threshold ``q_max s`` lies above max|x|.
    (At 2 bits this cannot happen: all values within ``(-s, s)`` make ``s`` the mean of the
    nonzero ones' magnitudes, below the largest.)
    """
    rng = np.random.default_rng(seed)
    q_max = 2 ** (n_bits - 1) - 1
    n = 40 if n_bits <= 4 else 150
    k = rng.integers(-q_max, q_max + 1, n)
    k[:2] = [q_max, -q_max]
    noise = 0.03 * rng.standard_normal(n)
    noise = np.where(np.abs(k) == q_max, -(0.1 + np.abs(noise)) * np.sign(k), noise)
    return (k + noise) * 0.37


def lite0_weights(name: str) -> np.ndarray:
    from models.registry import load_model

    return dict(load_model("efficientnet_lite0").named_modules())[name].weight.detach().double().reshape(-1).numpy()


@pytest.mark.parametrize(
    "case", [*[f"clustered-{b}" for b in range(3, 9)], "_blocks.0._project_conv-7", "_blocks.0._depthwise_conv-8"]
)
@pytest.mark.slow
def test_mse_range_finds_optima_above_the_extreme(case):
    """Tensors whose optimal threshold lies above max|x| (the issue's two EfficientNet-Lite0 layers,
    and clustered values at every bit-width 3..8): a search over ``T <= max|x|`` misses them."""
    source, n_bits = case.rsplit("-", 1)
    n_bits = int(n_bits)
    x = clustered_below_grid(n_bits, n_bits) if source == "clustered" else lite0_weights(source)
    best, step, _ = exhaustive_best(x, n_bits, QuantScheme.SYMMETRIC)
    q_max = 2 ** (n_bits - 1) - 1
    assert step * q_max > np.abs(x).max()  # the construction works
    _, threshold = mse_range(torch.from_numpy(x), n_bits)
    assert float(threshold) > np.abs(x).max()
    assert sym_sse(x, float(threshold), n_bits) <= best * (1 + 1e-9)
    capped = sym_sse_many(x, np.abs(x).max() * np.arange(1, 4001) / 4000, n_bits).min()
    assert best < capped


@pytest.mark.parametrize("scheme", [QuantScheme.UNSIGNED, QuantScheme.ASYMMETRIC])
@pytest.mark.parametrize("n_bits", [2, 3, 4])
def test_unsigned_and_asymmetric_mse_range_is_exact(scheme, n_bits):
    """Unsigned: over every step. Asymmetric: over every step at the zero point of the ranges
    ``[f min, f max]``; no other zero point is searched (the exhaustive search over all of them
    must then be at least as good, and is reported against)."""
    q_min, q_max = integer_range(n_bits, scheme)
    for x in small_tensors(200 + n_bits, 4):
        x = x[:120] + (0.3 * np.abs(x).mean() if scheme is QuantScheme.ASYMMETRIC else 0.0)
        if scheme is QuantScheme.UNSIGNED:
            x = np.maximum(x, 0.0)
        lo, hi = mse_range(torch.from_numpy(x), n_bits, scheme)
        found = sse_for_range(x, float(lo), float(hi), n_bits, scheme)
        zero_points = None
        if scheme is QuantScheme.ASYMMETRIC:
            low, high = min(x.min(), 0.0), max(x.max(), 0.0)
            zero_points = [float(np.clip(np.round(-low / ((high - low) / (q_max - q_min))), q_min, q_max))]
            assert exhaustive_best(x, n_bits, scheme)[0] <= found * (1 + 1e-9)
        assert found <= exhaustive_best(x, n_bits, scheme, zero_points)[0] * (1 + 1e-9) + 1e-300


@pytest.mark.parametrize("n_bits", [2, 4, 8])
@pytest.mark.parametrize("dist", ["gaussian", "student_t3"])
def test_mse_range_scale_invariant(dist, n_bits):
    x = base_sample(dist)
    _, t1 = mse_range(torch.from_numpy(x), n_bits)
    _, t2 = mse_range(torch.from_numpy(1000.0 * x), n_bits)
    assert float(t2) == pytest.approx(1000.0 * float(t1), rel=1e-9)
    s1 = sqnr(x, sym_sse(x, float(t1), n_bits))
    s2 = sqnr(1000.0 * x, sym_sse(1000.0 * x, float(t2), n_bits))
    assert abs(s1 - s2) < 1e-9


def channel_sample(ch_axis: int, scheme: QuantScheme, shape: list[int]) -> torch.Tensor:
    rng = np.random.default_rng(40 + ch_axis)
    scales = np.logspace(-2, 1, shape[ch_axis])
    view = [1] * len(shape)
    view[ch_axis] = -1
    shift = 0.3 if scheme is QuantScheme.ASYMMETRIC else 0.0
    return torch.from_numpy(rng.standard_t(4, size=shape) * scales.reshape(view) + shift * scales.reshape(view))


def range_sse(x: np.ndarray, lo: float, hi: float, n_bits: int, scheme: QuantScheme) -> float:
    params = params_from_range(torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64), n_bits, scheme)
    err = x - np_qdq(x, float(params.step_size), float(params.zero_point), params.q_min, params.q_max)
    return float(np.sum(err * err))


@pytest.mark.parametrize("ch_axis", [0, 1, 2])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_per_channel_mse_range_equals_per_row(ch_axis, scheme):
    """Every row's search is independent of the others': the same range as the row alone."""
    shape = [6, 5, 8]
    n_bits = 3
    x = channel_sample(ch_axis, scheme, shape)
    n_ch = shape[ch_axis]
    lo, hi = mse_range(x, n_bits, scheme, ch_axis=ch_axis)
    assert lo.shape == (n_ch,) and hi.shape == (n_ch,)
    for c in range(n_ch):
        lo_c, hi_c = mse_range(x.select(ch_axis, c).contiguous(), n_bits, scheme)
        assert float(lo[c]) == pytest.approx(float(lo_c), rel=1e-12, abs=1e-300)
        assert float(hi[c]) == pytest.approx(float(hi_c), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("ch_axis", [0, 2])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.slow
def test_per_channel_mse_range_as_good_as_per_row(ch_axis, scheme):
    """Many channels of different scales searched together: each as good as alone, and exact."""
    shape = [40, 30, 50]
    n_bits = 4
    x = channel_sample(ch_axis, scheme, shape)
    lo, hi = mse_range(x, n_bits, scheme, ch_axis=ch_axis)
    for c in range(0, shape[ch_axis], 7):
        row = x.select(ch_axis, c).contiguous()
        lo_c, hi_c = mse_range(row, n_bits, scheme)
        xs = row.reshape(-1).numpy()
        per_channel = range_sse(xs, float(lo[c]), float(hi[c]), n_bits, scheme)
        per_row = range_sse(xs, float(lo_c), float(hi_c), n_bits, scheme)
        assert per_channel == pytest.approx(per_row, rel=1e-9)
        if scheme is not QuantScheme.ASYMMETRIC:  # the asymmetric search keeps one zero point (see above)
            assert per_channel <= exhaustive_best(xs, n_bits, scheme)[0] * (1 + 1e-9)


@pytest.mark.slow
def test_mse_range_fp16_large_tensor():
    gen = torch.Generator().manual_seed(2023)
    x16 = (torch.randn(2_000_000, generator=gen) * 30.0).half()
    assert torch.isinf((x16 * x16).sum(dtype=torch.float16))  # a float16 sum of squares overflows
    assert SortedValues.from_rows(as_rows(x16, None)).flat_prefix_sum_sq.dtype == torch.float64
    x64 = x16.double()
    for n_bits in (4, 8):
        lo16, hi16 = mse_range(x16, n_bits)
        lo64, hi64 = mse_range(x64, n_bits)
        assert hi16.dtype == torch.float64 and torch.isfinite(hi16)
        assert float(hi16) == float(hi64) and float(lo16) == float(lo64)
        xs = x64.numpy()
        value = sqnr(xs, sym_sse(xs, float(hi16), n_bits))
        assert np.isfinite(value)
        # Gaussian with MSE-optimal uniform clipping: ~19.2 dB at 4 bits, ~40.6 dB at 8 bits
        expected = {4: 19.25, 8: 40.6}[n_bits]
        assert abs(value - expected) < 0.3, value
        # no better threshold nearby on the same (float64) values
        for factor in (0.9, 0.95, 0.98, 0.99, 1.01, 1.02, 1.05, 1.1):
            assert value >= sqnr(xs, sym_sse(xs, factor * float(hi16), n_bits)) - 1e-3


# --------------------------------------------------------------------------- unsigned and asymmetric search
def scheme_sample(scheme: QuantScheme, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if scheme is QuantScheme.UNSIGNED:
        return np.maximum(rng.laplace(size=N_SAMPLES), 0.0)  # post-ReLU: half zeros, heavy tail
    return rng.exponential(size=N_SAMPLES) - 0.4  # skewed, mostly positive


def sse_for_range(x: np.ndarray, lo: float, hi: float, n_bits: int, scheme: QuantScheme) -> float:
    params = params_from_range(torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64), n_bits, scheme)
    xh = np_qdq(x, float(params.step_size), float(params.zero_point), params.q_min, params.q_max)
    return float(np.sum((x - xh) ** 2))


@pytest.mark.parametrize("n_bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("scheme", [QuantScheme.UNSIGNED, QuantScheme.ASYMMETRIC])
def test_unsigned_and_asymmetric_mse_beat_minmax_and_the_fraction_family(scheme, n_bits):
    """Never worse than min-max, nor than any range ``[f min, f max]`` of a dense grid of ``f``."""
    x = scheme_sample(scheme, 50 + n_bits)
    lo, hi = mse_range(torch.from_numpy(x), n_bits, scheme)
    lo, hi = float(lo), float(hi)
    if scheme is QuantScheme.UNSIGNED:
        assert lo == 0.0
    sse_mse = sse_for_range(x, lo, hi, n_bits, scheme)
    sse_minmax = sse_for_range(x, x.min(), x.max(), n_bits, scheme)
    assert sse_mse <= sse_minmax * (1 + 1e-12)
    if n_bits <= 4:
        assert sse_mse < 0.9 * sse_minmax
    q_min, q_max = integer_range(n_bits, scheme)
    f = np.arange(1, N_THRESHOLDS + 1) / N_THRESHOLDS
    lo_full = 0.0 if scheme is QuantScheme.UNSIGNED else x.min()
    params = params_from_range(torch.from_numpy(f * lo_full), torch.from_numpy(f * x.max()), n_bits, scheme)
    s, z = params.step_size.numpy()[:, None], params.zero_point.numpy()[:, None]
    best = np.inf
    for i in range(0, len(f), 250):
        err = x[None, :] - np_qdq(x[None, :], s[i : i + 250], z[i : i + 250], q_min, q_max)
        best = min(best, float(np.min(np.einsum("ij,ij->i", err, err))))
    assert sse_mse <= best * (1 + 1e-9)


# --------------------------------------------------------------------------- grid_sse
def random_grids(rng, x_rows: np.ndarray, n_bits: int, scheme: QuantScheme, n_candidates: int):
    q_min, q_max = integer_range(n_bits, scheme)
    amax = np.abs(x_rows).max(axis=1, keepdims=True)
    # from far too fine (most values clipped) to far too coarse (everything in the zero bin)
    step = amax / q_max * np.exp(rng.uniform(np.log(0.05), np.log(8.0), size=(x_rows.shape[0], n_candidates)))
    if scheme is QuantScheme.ASYMMETRIC:
        zp = rng.integers(q_min, q_max + 1, size=step.shape).astype(np.float64)
    else:
        zp = np.zeros_like(step)
    return step, zp


def direct_sse(x_rows, step, zp, q_min, q_max):
    x = x_rows[:, None, :]
    err = x - np_qdq(x, step[..., None], zp[..., None], q_min, q_max)
    return np.sum(err * err, axis=2)


@pytest.fixture
def path_spy(monkeypatch):
    calls = {"direct": 0, "binned": 0}
    real_direct, real_binned = grid_error_mod._direct_sse, grid_error_mod._segment_sse

    def direct(*args, **kwargs):
        calls["direct"] += 1
        return real_direct(*args, **kwargs)

    def binned(*args, **kwargs):
        calls["binned"] += 1
        return real_binned(*args, **kwargs)

    monkeypatch.setattr(grid_error_mod, "_direct_sse", direct)
    monkeypatch.setattr(grid_error_mod, "_segment_sse", binned)
    return calls


@pytest.mark.parametrize("n_bits", [2, 4, 8])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("path", ["binned", "direct"])
def test_grid_sse_equals_direct_sum(path, scheme, n_bits, path_spy):
    rng = np.random.default_rng(zlib.crc32(f"{path}-{scheme.value}-{n_bits}".encode()))
    n = 4000 if path == "binned" else 12  # above / at most 3 values per level
    x_rows = rng.standard_t(3, size=(3, n)) * np.array([[0.01], [1.0], [30.0]])
    if scheme is QuantScheme.ASYMMETRIC:
        x_rows = x_rows + 0.5 * np.abs(x_rows).mean(axis=1, keepdims=True)
    q_min, q_max = integer_range(n_bits, scheme)
    step, zp = random_grids(rng, x_rows, n_bits, scheme, 37)
    got = grid_sse(SortedValues.from_rows(torch.from_numpy(x_rows)), torch.from_numpy(step), torch.from_numpy(zp), q_min, q_max)
    assert path_spy[path] > 0 and path_spy["binned" if path == "direct" else "direct"] == 0
    expected = direct_sse(x_rows, step, zp, q_min, q_max)
    assert got.shape == expected.shape == (3, 37)
    energy = np.sum(x_rows**2, axis=1, keepdims=True)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-7, atol=1e-12 * float(energy.max()))
    # each row on its own is relative to its own energy
    assert np.all(np.abs(got.numpy() - expected) <= 1e-7 * expected + 1e-11 * energy)


def test_grid_sse_chunked_equals_unchunked(monkeypatch):
    rng = np.random.default_rng(3)
    x_rows = rng.standard_normal((2, 3000))
    step, zp = random_grids(rng, x_rows, 4, QuantScheme.SYMMETRIC, 50)
    sv = SortedValues.from_rows(torch.from_numpy(x_rows))
    whole = grid_sse(sv, torch.from_numpy(step), torch.from_numpy(zp), -8, 7)
    monkeypatch.setattr(grid_error_mod, "_MAX_CHUNK_ELEMENTS", 100)  # one candidate per chunk
    chunked = grid_sse(sv, torch.from_numpy(step), torch.from_numpy(zp), -8, 7)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0)
    np.testing.assert_allclose(whole.numpy(), direct_sse(x_rows, step, zp, -8, 7), rtol=1e-8)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_grid_sse_values_on_levels_and_midpoints(scheme, path_spy):
    """Values exactly on levels and mid-points (ties): the binned SSE still equals quantize-dequantize's."""
    q_min, q_max = integer_range(4, scheme)
    s = 0.25
    zp = 5.0 if scheme is QuantScheme.ASYMMETRIC else 0.0
    grid = np.arange(2 * (q_min - 8), 2 * (q_max + 8) + 1) * (s / 2)  # levels, mid-points, beyond the range
    x = np.tile(grid, 60)[None, :]
    got = grid_sse(SortedValues.from_rows(torch.from_numpy(x)), torch.tensor([[s]], dtype=torch.float64), torch.tensor([[zp]], dtype=torch.float64), q_min, q_max)
    assert path_spy["binned"] > 0
    expected = direct_sse(x, np.array([[s]]), np.array([[zp]]), q_min, q_max)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


# --------------------------------------------------------------------------- bounds over step intervals
def interval_cases(rng, n: int, n_bits: int, scheme: QuantScheme, narrow: bool, count: int = 12):
    """Rows of values and ``(R, G)`` step intervals around each row's natural step (narrow or wide)."""
    q_min, q_max = integer_range(n_bits, scheme)
    x_rows = rng.standard_t(4, size=(2, n)) * np.array([[0.05], [3.0]])
    if scheme is QuantScheme.UNSIGNED:
        x_rows = np.abs(x_rows)
    scale = np.abs(x_rows).max(axis=1, keepdims=True) / q_max
    low = scale * rng.uniform(0.2, 1.5, size=(2, count))
    zero = np.zeros_like(low) if scheme is not QuantScheme.ASYMMETRIC else rng.integers(q_min, q_max + 1, size=low.shape) * 1.0
    largest = max(-(q_min - zero.max()), q_max - zero.min())
    ratio = largest / (largest - 0.5) if narrow else 1.2
    high = low * (1 + (ratio - 1) * rng.uniform(0.05, 1.0, size=low.shape)) if narrow else low * ratio
    return x_rows, low, high, zero, q_min, q_max


def dense_minimum(x_rows, low, high, zero, q_min, q_max, points: int = 3001) -> np.ndarray:
    """Least SSE over ``points`` equally spaced steps in each interval (an upper bound on the minimum)."""
    t = np.linspace(0.0, 1.0, points)
    out = np.empty(low.shape)
    for r in range(low.shape[0]):
        for g in range(low.shape[1]):
            s = (low[r, g] + (high[r, g] - low[r, g]) * t)[:, None]
            err = x_rows[r][None, :] - np_qdq(x_rows[r][None, :], s, zero[r, g], q_min, q_max)
            out[r, g] = np.min(np.einsum("ij,ij->i", err, err))
    return out


def as_tensors(*arrays):
    return [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)) for a in arrays]


@pytest.mark.parametrize("n", [40, 3000])  # per value / by segments
@pytest.mark.parametrize("n_bits", [2, 4, 8])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.slow
def test_union_lower_bound(scheme, n_bits, n):
    rng = np.random.default_rng(zlib.crc32(f"union-{scheme.value}-{n_bits}-{n}".encode()))
    x_rows, low, high, zero, q_min, q_max = interval_cases(rng, n, n_bits, scheme, narrow=False)
    sv = SortedValues.from_rows(torch.from_numpy(x_rows))
    lo_t, hi_t, z_t = as_tensors(low, high, zero)
    bound = grid_sse_lower_bound(sv, lo_t, hi_t, q_min - z_t, q_max - z_t).numpy()
    energy = np.sum(x_rows**2, axis=1, keepdims=True)
    assert np.all(bound <= dense_minimum(x_rows, low, high, zero, q_min, q_max) + 1e-12 * energy)
    assert np.all(bound >= 0)
    # a point interval: the exact error
    exact = grid_sse_lower_bound(sv, lo_t, lo_t, q_min - z_t, q_max - z_t).numpy()
    np.testing.assert_allclose(exact, direct_sse(x_rows, low, zero, q_min, q_max), rtol=1e-9, atol=1e-12 * energy.max())
    # a range of zero points bounds each of them
    wide = grid_sse_lower_bound(sv, lo_t, hi_t, q_min - z_t - 2, q_max - z_t).numpy()
    assert np.all(wide <= bound + 1e-12 * energy)


@pytest.mark.parametrize("n", [40, 3000])
@pytest.mark.parametrize("n_bits", [2, 4, 8])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.slow
def test_narrow_bound_and_sweep(scheme, n_bits, n):
    """The narrow bound lies below the least error on the interval and the sweep attains it."""
    rng = np.random.default_rng(zlib.crc32(f"narrow-{scheme.value}-{n_bits}-{n}".encode()))
    x_rows, low, high, zero, q_min, q_max = interval_cases(rng, n, n_bits, scheme, narrow=True)
    assert np.all(high / low <= narrow_ratio(int(q_min - zero.max()), int(q_max - zero.min())))
    sv = SortedValues.from_rows(torch.from_numpy(x_rows))
    lo_t, hi_t, z_t = as_tensors(low, high, zero)
    stats = narrow_intervals(sv, lo_t, hi_t, z_t, q_min, q_max)
    bound, step = (t.numpy() for t in stats.bound(lo_t, hi_t))
    chosen = torch.ones(low.shape, dtype=torch.bool)
    chosen[0, 0] = False
    least, least_step = (t.numpy() for t in interval_minimum(stats, chosen, lo_t, hi_t))
    dense = dense_minimum(x_rows, low, high, zero, q_min, q_max)
    energy = np.sum(x_rows**2, axis=1, keepdims=True)
    slack = 1e-11 * energy
    assert np.all(bound <= dense + slack)
    assert np.all((low <= step) & (step <= high) & (low <= least_step) & (least_step <= high))
    assert np.isinf(least[0, 0]) and np.all(np.isfinite(least[chosen.numpy()]))
    # the sweep's minimum is attained at its step, is below the dense grid, and above the bound
    attained = direct_sse(x_rows, least_step, zero, q_min, q_max)
    ok = chosen.numpy()
    np.testing.assert_allclose(least[ok], attained[ok], rtol=1e-9, atol=1e-11 * energy.max())
    assert np.all(least[ok] <= dense[ok] + slack.repeat(low.shape[1], 1)[ok])
    assert np.all(bound[ok] <= least[ok] + slack.repeat(low.shape[1], 1)[ok])
    # counts of unstable values: those whose level differs at the ends
    level_a = np.clip(np.round(x_rows[:, None, :] / low[..., None]) + zero[..., None], q_min, q_max)
    level_b = np.clip(np.round(x_rows[:, None, :] / high[..., None]) + zero[..., None], q_min, q_max)
    np.testing.assert_array_equal(stats.unstable.numpy(), np.sum(level_a != level_b, axis=2))


@pytest.mark.parametrize("n_bits", [2, 4, 8])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_segment_sums_equal_per_value_sums(scheme, n_bits):
    """The narrow statistics and the union bound read off prefix sums at cuts (telescoped sums)
    equal the same quantities summed value by value."""
    rng = np.random.default_rng(zlib.crc32(f"telescoped-{scheme.value}-{n_bits}".encode()))
    q_min, q_max = integer_range(n_bits, scheme)
    n = 9 * (q_max - q_min + 1) + 500  # above the per-value crossover: the segment path
    x_rows, low, high, zero, q_min, q_max = interval_cases(rng, n, n_bits, scheme, narrow=True, count=20)
    x_rows[0, :40] = 0.0  # values on the level 0
    sv = SortedValues.from_rows(torch.from_numpy(x_rows))
    lo_t, hi_t, z_t = as_tensors(low, high, zero)
    energy = torch.from_numpy(np.sum(x_rows**2, axis=1, keepdims=True))
    by_segments = narrow_intervals(sv, lo_t, hi_t, z_t, q_min, q_max)
    per_value = grid_error_mod._direct_narrow_intervals(sv.values, lo_t, hi_t, z_t, q_min, q_max)
    torch.testing.assert_close(by_segments.unstable, per_value.unstable, rtol=0, atol=0)
    torch.testing.assert_close(by_segments.curvature, per_value.curvature, rtol=1e-12, atol=0)
    scale = torch.from_numpy(np.abs(x_rows).sum(axis=1, keepdims=True))
    torch.testing.assert_close(by_segments.moment / scale, per_value.moment / scale, rtol=0, atol=1e-12)
    for segments, values in ((by_segments.constant, per_value.constant), (by_segments.excess, per_value.excess)):
        torch.testing.assert_close(segments / energy, values / energy, rtol=0, atol=1e-12)
    torch.testing.assert_close(by_segments.bound(lo_t, hi_t)[0] / energy, per_value.bound(lo_t, hi_t)[0] / energy, rtol=0, atol=1e-12)
    for widen in (1.0, 1.3, 3.0):  # narrow, wide, very wide
        for shift in (0, 2):  # one zero point, a range of them
            args = lo_t, hi_t * widen, q_min - z_t - shift, q_max - z_t
            union = grid_sse_lower_bound(sv, *args)
            union_per_value = grid_error_mod._direct_lower_bound(sv.values, *args)
            torch.testing.assert_close(union / energy, union_per_value / energy, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [40, 3000])  # per value / by segments
@pytest.mark.parametrize("n_bits", [3, 5, 8])
@pytest.mark.parametrize("scheme", [QuantScheme.SYMMETRIC, QuantScheme.UNSIGNED])
def test_capped_narrow_bound(scheme, n_bits, n):
    """With a level cap, intervals narrow only for the levels up to it get a lower bound on the least
    error (steps below and above the extreme's); the bound never exceeds the uncapped one on
    intervals narrow for all levels, equals it with a cap at the top level, and segments and per-value
    sums agree."""
    rng = np.random.default_rng(zlib.crc32(f"capped-{scheme.value}-{n_bits}-{n}".encode()))
    q_min, q_max = integer_range(n_bits, scheme)
    x_rows = rng.standard_t(3, size=(2, n)) * np.array([[0.05], [3.0]])
    if scheme is QuantScheme.UNSIGNED:
        x_rows = np.abs(x_rows)
    scale = np.abs(x_rows).max(axis=1, keepdims=True) / q_max
    energy = np.sum(x_rows**2, axis=1, keepdims=True)
    sv = SortedValues.from_rows(torch.from_numpy(x_rows))
    zero = np.zeros((2, 6))
    for cap in sorted({0, 1, q_max // 4, q_max - 2}):
        low = scale * rng.uniform(0.1, 3.0, size=zero.shape)
        high = low * (1 + (narrow_ratio(-cap - 1, cap + 1) - 1) * rng.uniform(0.05, 1.0, size=low.shape))
        lo_t, hi_t, z_t = as_tensors(low, high, zero)
        capped = narrow_intervals(sv, lo_t, hi_t, z_t, q_min, q_max, level_cap=cap)
        assert capped.capped
        bound, step = (t.numpy() for t in capped.bound(lo_t, hi_t))
        assert np.all((low <= step) & (step <= high))
        assert np.all(bound <= dense_minimum(x_rows, low, high, zero, q_min, q_max, points=301) + 1e-11 * energy)
        per_value = grid_error_mod._direct_narrow_intervals(sv.values, lo_t, hi_t, z_t, q_min, q_max, cap)
        np.testing.assert_allclose(bound / energy, per_value.bound(lo_t, hi_t)[0].numpy() / energy, rtol=0, atol=1e-12)
        torch.testing.assert_close(capped.unstable, per_value.unstable, rtol=0, atol=0)
        with pytest.raises(ValueError, match="level_cap"):
            interval_minimum(capped, torch.ones(low.shape, dtype=torch.bool), lo_t, hi_t)
    # On intervals narrow for every level: below the full statistics' bound; a cap at the top changes nothing.
    x_rows, low, high, zero, q_min, q_max = interval_cases(rng, n, n_bits, scheme, narrow=True)
    sv = SortedValues.from_rows(torch.from_numpy(x_rows))
    lo_t, hi_t, z_t = as_tensors(low, high, zero)
    full = narrow_intervals(sv, lo_t, hi_t, z_t, q_min, q_max).bound(lo_t, hi_t)[0].numpy()
    energy = np.sum(x_rows**2, axis=1, keepdims=True)
    for cap in (0, q_max // 2):
        capped = narrow_intervals(sv, lo_t, hi_t, z_t, q_min, q_max, level_cap=cap).bound(lo_t, hi_t)[0].numpy()
        assert np.all(capped <= full + 1e-12 * energy)
    at_top = narrow_intervals(sv, lo_t, hi_t, z_t, q_min, q_max, level_cap=max(q_max, -q_min))
    assert not at_top.capped
    np.testing.assert_allclose(at_top.bound(lo_t, hi_t)[0].numpy(), full, rtol=1e-12)


@pytest.mark.parametrize("near_ties", [False, True])
def test_order_by_node_then_breakpoint(near_ties):
    """The sweep's order of the unstable values equals a lexicographic sort, also where breakpoints
    closer than the sort key's resolution come in the wrong order (the fallback)."""
    rng = np.random.default_rng(5)
    n_nodes = 3 << 20  # node numbers this large leave the key about 2^-30 of an interval's width
    low = rng.uniform(0.5, 1.0, n_nodes)
    high = low * rng.uniform(1.0, 1.01, n_nodes)
    node = np.sort(rng.integers(0, n_nodes, 4000))
    breakpoint = low[node] + (high - low)[node] * rng.uniform(0.0, 1.0, node.size)
    if near_ties:  # the largest node's values: distinct breakpoints in descending order, one key apart at most
        node[-50:] = n_nodes - 1
        breakpoint[-50:] = low[-1] + (high[-1] - low[-1]) * (0.5 - 1e-13 * np.arange(50))
    order = grid_error_mod._by_node_then_breakpoint(torch.from_numpy(node), *as_tensors(breakpoint, low, high))
    expected = np.lexsort((breakpoint, node))
    np.testing.assert_array_equal(node[order.numpy()], node[expected])
    np.testing.assert_array_equal(breakpoint[order.numpy()], breakpoint[expected])


def test_narrow_bound_exact_without_breakpoints():
    """No value changes level on the interval: the bound is the exact least error there."""
    x = np.array([[-2.1, -0.9, 0.05, 1.1, 2.95, 3.2]])
    low, high, zero = np.array([[1.0]]), np.array([[1.01]]), np.array([[0.0]])
    sv = SortedValues.from_rows(torch.from_numpy(x))
    lo_t, hi_t, z_t = as_tensors(low, high, zero)
    stats = narrow_intervals(sv, lo_t, hi_t, z_t, -4, 3)
    assert float(stats.unstable) == 0
    bound, step = stats.bound(lo_t, hi_t)
    levels = np.clip(np.round(x / 1.0), -4, 3)
    best = np.clip(np.sum(levels * x) / np.sum(levels * levels), 1.0, 1.01)
    assert float(step) == pytest.approx(best, rel=1e-12)
    assert float(bound) == pytest.approx(float(np.sum((x - levels * best) ** 2)), rel=1e-12)


# --------------------------------------------------------------------------- zero_count
def test_zero_count():
    rng = np.random.default_rng(8)
    s = np.array([0.5, 0.1, 2.0])
    rows = rng.normal(size=(3, 500))
    rows[0, :6] = [0.25, -0.25, 0.2500001, -0.2500001, 0.0, -0.0]  # +-s/2 round (half to even) to 0
    got = zero_count(SortedValues.from_rows(torch.from_numpy(rows)), torch.from_numpy(s))
    expected = np.sum(np.round(rows / s[:, None]) == 0, axis=1)
    np.testing.assert_array_equal(got.numpy(), expected)
    assert expected[0] >= 4


# --------------------------------------------------------------------------- min-max estimators
def test_current_minmax():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 5, 6))
    lo, hi = current_minmax(torch.from_numpy(x))
    assert lo.shape == () and float(lo) == x.min() and float(hi) == x.max()
    for axis in range(3):
        lo, hi = current_minmax(torch.from_numpy(x), ch_axis=axis)
        other = tuple(a for a in range(3) if a != axis)
        np.testing.assert_array_equal(lo.numpy(), x.min(axis=other))
        np.testing.assert_array_equal(hi.numpy(), x.max(axis=other))


@pytest.mark.parametrize("ch_axis", [None, 1])
def test_running_minmax_ema(ch_axis):
    rng = np.random.default_rng(2)
    momentum = 0.7
    est = RunningMinMax(momentum, ch_axis)
    assert est.min_val is None
    m_lo = m_hi = None
    for i, sigma in enumerate([1.0, 5.0, 0.2]):
        batch = rng.normal(0, sigma, size=(10, 3))
        b_lo = batch.min() if ch_axis is None else batch.min(axis=0)
        b_hi = batch.max() if ch_axis is None else batch.max(axis=0)
        if i == 0:
            m_lo, m_hi = b_lo, b_hi
        else:
            m_lo = momentum * m_lo + (1 - momentum) * b_lo
            m_hi = momentum * m_hi + (1 - momentum) * b_hi
        x = torch.from_numpy(batch).requires_grad_()
        lo, hi = est.update(x)
        assert not lo.requires_grad and not hi.requires_grad
        np.testing.assert_allclose(lo.numpy(), m_lo, rtol=1e-14)
        np.testing.assert_allclose(hi.numpy(), m_hi, rtol=1e-14)
        np.testing.assert_allclose(est.max_val.numpy(), m_hi, rtol=1e-14)
    # after the third batch the EMA is (0.7^2 b1 + 0.3*0.7 b2 + 0.3 b3), not the last batch
    assert not np.allclose(m_hi, b_hi)


def test_running_minmax_momentum_zero_and_invalid():
    est = RunningMinMax(0.0)
    est.update(torch.tensor([-1.0, 2.0]))
    lo, hi = est.update(torch.tensor([-3.0, 0.5]))
    assert (float(lo), float(hi)) == (-3.0, 0.5)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            RunningMinMax(bad)


def test_accumulation_dtype_and_as_rows():
    assert accumulation_dtype(torch.device("cpu")) == torch.float64
    assert accumulation_dtype("mps") == torch.float32
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert as_rows(x, None).shape == (1, 24)
    rows = as_rows(x, 1)
    assert rows.shape == (3, 8)
    torch.testing.assert_close(rows[1], x[:, 1, :].reshape(-1))


def test_all_zero_tensor_mse_range():
    for scheme in SCHEMES:
        lo, hi = mse_range(torch.zeros(100), 4, scheme)
        assert float(lo) == 0.0 and float(hi) == 0.0
        params = params_from_range(lo, hi, 4, scheme)
        assert float(params.step_size) > 0
