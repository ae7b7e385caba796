"""Range estimators: the MSE search against a dense brute force, the binned SSE, min-max estimators.

The brute force quantizes the full tensor for every candidate threshold in float64 (numpy), so it
shares no code with the sorted-prefix-sum search it checks.
"""
from __future__ import annotations

import functools
import zlib

import numpy as np
import pytest
import torch

import quantization.range_estimators as re_mod
from quantization.quantizers import QuantScheme, integer_range, params_from_range
from quantization.range_estimators import (
    RunningMinMax,
    SortedValues,
    accumulation_dtype,
    as_rows,
    current_minmax,
    grid_sse,
    mse_range,
    zero_count,
)

SCHEMES = list(QuantScheme)
N_SAMPLES = 5000
N_THRESHOLDS = 4000
TOLERANCE_DB = 0.01


# --------------------------------------------------------------------------- helpers
def np_qdq(x, s, z, q_min, q_max):
    return (np.clip(np.round(x / s) + z, q_min, q_max) - z) * s


def sym_sse(x: np.ndarray, threshold: float, n_bits: int) -> float:
    q_min, q_max = integer_range(n_bits, "symmetric")
    s = threshold / q_max
    return float(np.sum((x - np_qdq(x, s, 0.0, q_min, q_max)) ** 2))


def brute_force_best_sse(x: np.ndarray, n_bits: int, n_thresholds: int = N_THRESHOLDS, chunk: int = 250) -> float:
    """Least SSE over thresholds T_j = j / N * max|x|, j = 1..N: full quantize-dequantize, all at once per chunk."""
    q_min, q_max = integer_range(n_bits, "symmetric")
    thresholds = np.abs(x).max() * np.arange(1, n_thresholds + 1) / n_thresholds
    best = np.inf
    for i in range(0, n_thresholds, chunk):
        s = (thresholds[i : i + chunk] / q_max)[:, None]
        err = x[None, :] - np.clip(np.round(x[None, :] / s), q_min, q_max) * s
        best = min(best, float(np.min(np.einsum("ij,ij->i", err, err))))
    return best


def sqnr(x: np.ndarray, sse: float) -> float:
    return 10.0 * np.log10(np.sum(x * x) / sse)


@functools.lru_cache(maxsize=None)
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
    assert float(min_val) == -threshold
    assert 0.0 < threshold <= np.abs(x).max() * (1 + 1e-12)
    found = sqnr(x, sym_sse(x, threshold, n_bits))
    best = sqnr(x, brute_force_best_sse(x, n_bits))
    assert found >= best - TOLERANCE_DB, f"MSE search {found:.4f} dB, brute force {best:.4f} dB"
    # and it is not just min-max (which is far worse at low bits)
    minmax = sqnr(x, sym_sse(x, np.abs(x).max(), n_bits))
    if n_bits <= 4:
        assert found > minmax + 0.5


@pytest.mark.parametrize("n_bits", [2, 4, 8])
@pytest.mark.parametrize("dist", ["gaussian", "student_t3"])
def test_mse_range_scale_invariant(dist, n_bits):
    x = base_sample(dist)
    _, t1 = mse_range(torch.from_numpy(x), n_bits)
    _, t2 = mse_range(torch.from_numpy(1000.0 * x), n_bits)
    assert float(t2) == pytest.approx(1000.0 * float(t1), rel=1e-12)
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
    """Same search per row; when both searches use the same basin density the ranges are identical."""
    shape = [6, 5, 8]
    n_bits = 3
    x = channel_sample(ch_axis, scheme, shape)
    n_ch, n_per_row = shape[ch_axis], x.numel() // shape[ch_axis]
    levels = 2**n_bits
    assert re_mod.basin_grid_size(n_ch, n_per_row, levels) == re_mod.basin_grid_size(1, n_per_row, levels)
    lo, hi = mse_range(x, n_bits, scheme, ch_axis=ch_axis)
    assert lo.shape == (n_ch,) and hi.shape == (n_ch,)
    for c in range(n_ch):
        lo_c, hi_c = mse_range(x.select(ch_axis, c).contiguous(), n_bits, scheme)
        assert float(lo[c]) == pytest.approx(float(lo_c), rel=1e-12, abs=1e-300)
        assert float(hi[c]) == pytest.approx(float(hi_c), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("ch_axis", [0, 2])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_per_channel_mse_range_as_good_as_per_row(ch_axis, scheme):
    """With many channels the basin grid may be coarser than per row: the error is the same to 0.01 dB."""
    shape = [40, 30, 50]
    n_bits = 4
    x = channel_sample(ch_axis, scheme, shape)
    lo, hi = mse_range(x, n_bits, scheme, ch_axis=ch_axis)
    for c in range(0, shape[ch_axis], 7):
        row = x.select(ch_axis, c).contiguous()
        lo_c, hi_c = mse_range(row, n_bits, scheme)
        xs = row.reshape(-1).numpy()
        per_channel = sqnr(xs, range_sse(xs, float(lo[c]), float(hi[c]), n_bits, scheme))
        per_row = sqnr(xs, range_sse(xs, float(lo_c), float(hi_c), n_bits, scheme))
        assert abs(per_channel - per_row) < TOLERANCE_DB


def test_mse_range_fp16_large_tensor():
    gen = torch.Generator().manual_seed(2023)
    x16 = (torch.randn(2_000_000, generator=gen) * 30.0).half()
    assert torch.isinf((x16 * x16).sum(dtype=torch.float16))  # a float16 sum of squares overflows
    assert SortedValues.from_rows(as_rows(x16, None)).prefix_sum_sq.dtype == torch.float64
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
def test_unsigned_and_asymmetric_mse_beat_minmax(scheme, n_bits):
    x = scheme_sample(scheme, 50 + n_bits)
    lo, hi = mse_range(torch.from_numpy(x), n_bits, scheme)
    lo, hi = float(lo), float(hi)
    if scheme is QuantScheme.UNSIGNED:
        assert lo == 0.0
    assert x.min() <= lo <= 0.0 and 0.0 < hi <= x.max()
    sse_mse = sse_for_range(x, lo, hi, n_bits, scheme)
    sse_minmax = sse_for_range(x, x.min(), x.max(), n_bits, scheme)
    assert sse_mse <= sse_minmax * (1 + 1e-12)
    if n_bits <= 4:
        assert sse_mse < 0.9 * sse_minmax


@pytest.mark.parametrize("n_bits", [2, 4, 8])
@pytest.mark.parametrize("scheme", [QuantScheme.UNSIGNED, QuantScheme.ASYMMETRIC])
def test_unsigned_and_asymmetric_mse_reach_brute_force_in_family(scheme, n_bits):
    """The search is over ranges ``[f min, f max]``; brute-force ``f`` on a dense grid."""
    x = scheme_sample(scheme, 60 + n_bits)
    lo_full = 0.0 if scheme is QuantScheme.UNSIGNED else x.min()
    lo, hi = mse_range(torch.from_numpy(x), n_bits, scheme)
    found = sse_for_range(x, float(lo), float(hi), n_bits, scheme)
    q_min, q_max = integer_range(n_bits, scheme)
    f = np.arange(1, N_THRESHOLDS + 1) / N_THRESHOLDS
    params = params_from_range(torch.from_numpy(f * lo_full), torch.from_numpy(f * x.max()), n_bits, scheme)
    s, z = params.step_size.numpy()[:, None], params.zero_point.numpy()[:, None]
    best = np.inf
    for i in range(0, len(f), 250):
        err = x[None, :] - np_qdq(x[None, :], s[i : i + 250], z[i : i + 250], q_min, q_max)
        best = min(best, float(np.min(np.einsum("ij,ij->i", err, err))))
    assert sqnr(x, found) >= sqnr(x, best) - TOLERANCE_DB


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
    real_direct, real_binned = re_mod._direct_sse, re_mod._binned_sse

    def direct(*args, **kwargs):
        calls["direct"] += 1
        return real_direct(*args, **kwargs)

    def binned(*args, **kwargs):
        calls["binned"] += 1
        return real_binned(*args, **kwargs)

    monkeypatch.setattr(re_mod, "_direct_sse", direct)
    monkeypatch.setattr(re_mod, "_binned_sse", binned)
    return calls


@pytest.mark.parametrize("n_bits", [2, 4, 8])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("path", ["binned", "direct"])
def test_grid_sse_equals_direct_sum(path, scheme, n_bits, path_spy):
    rng = np.random.default_rng(zlib.crc32(f"{path}-{scheme.value}-{n_bits}".encode()))
    n = 4000 if path == "binned" else 12  # levels x log2(n) below / above n
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
    monkeypatch.setattr(re_mod, "_MAX_CHUNK_ELEMENTS", 100)  # one candidate per chunk
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
