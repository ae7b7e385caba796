"""Uniform quantizers, fake quantization (STE / LSQ gradients) and the FakeQuantizer module.

Every number is checked against an independent numpy (or hand-written) computation.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from quantization.fake_quant import FakeQuantizer, QuantizerConfig, RangeEstimator
from quantization.granularity import Granularity
from quantization.quantizers import (
    QuantParams,
    QuantScheme,
    channel_view,
    dequantize,
    fake_quantize,
    integer_range,
    params_from_range,
    quantize,
    quantize_dequantize,
    round_ste,
    scale_gradient,
)
from quantization.range_estimators import mse_range

BITS = list(range(2, 9))
SCHEMES = list(QuantScheme)


# --------------------------------------------------------------------------- helpers
def np_integer_range(n_bits: int, scheme: QuantScheme) -> tuple[int, int]:
    if scheme is QuantScheme.SYMMETRIC:
        return -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1
    return 0, 2**n_bits - 1


def np_params(lo: float, hi: float, n_bits: int, scheme: QuantScheme) -> tuple[float, float]:
    """Step size and zero point written out from the paper's conventions (no clamping to tiny)."""
    if scheme is QuantScheme.SYMMETRIC:
        return max(abs(lo), abs(hi)) / (2 ** (n_bits - 1) - 1), 0.0
    if scheme is QuantScheme.UNSIGNED:
        return max(hi, 0.0) / (2**n_bits - 1), 0.0
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = (hi - lo) / (2**n_bits - 1)
    return s, float(np.clip(np.round(-lo / s), 0, 2**n_bits - 1))


def np_qdq(x: np.ndarray, s, z, q_min: int, q_max: int) -> np.ndarray:
    return (np.clip(np.round(x / s) + z, q_min, q_max) - z) * s


def random_range(rng: np.random.Generator, scheme: QuantScheme) -> tuple[float, float]:
    lo, hi = -rng.uniform(0.2, 3.0), rng.uniform(0.2, 3.0)
    if scheme is QuantScheme.ASYMMETRIC:
        lo, hi = lo - 1.0, hi + 2.5  # clearly asymmetric
    return lo, hi


def params_t(s, z, n_bits, scheme) -> QuantParams:
    q_min, q_max = np_integer_range(n_bits, QuantScheme(scheme))
    return QuantParams(torch.as_tensor(s, dtype=torch.float64), torch.as_tensor(z, dtype=torch.float64), q_min, q_max)


def unambiguous(x: np.ndarray, s, z, q_min, q_max, margin: float = 0.02) -> np.ndarray:
    """Mask of values whose STE/LSQ gradients do not depend on how the clipping boundary is handled.

    Keeps values strictly inside the interior bins (``q_min + 1/2 < x/s + z < q_max - 1/2``) or more
    than half a step outside the clipping range, and away from rounding ties. The end bins and the
    half-step band outside them are tested in ``test_gradients_in_end_bins_follow_lsq``.
    """
    u = x / s + z
    near_tie = np.abs(u - np.floor(u) - 0.5) < margin
    interior = (u > q_min + 0.5 + margin) & (u < q_max - 0.5 - margin)
    far_out = (u < q_min - 0.5 - margin) | (u > q_max + 0.5 + margin)
    return ~near_tie & (interior | far_out)


# --------------------------------------------------------------------------- integer grids
@pytest.mark.parametrize("n_bits", BITS)
def test_integer_range(n_bits):
    assert integer_range(n_bits, "symmetric") == (-(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1)
    assert integer_range(n_bits, QuantScheme.UNSIGNED) == (0, 2**n_bits - 1)
    assert integer_range(n_bits, "asymmetric") == (0, 2**n_bits - 1)


def test_integer_range_invalid():
    for bad in (0, 33, -1):
        with pytest.raises(ValueError):
            integer_range(bad, "asymmetric")
    with pytest.raises(ValueError):
        integer_range(1, "symmetric")
    with pytest.raises(ValueError):
        integer_range(4, "no-such-scheme")
    assert integer_range(1, "unsigned") == (0, 1)


@pytest.mark.parametrize("n_bits", BITS)
def test_symmetric_grid(n_bits):
    q_max = 2 ** (n_bits - 1) - 1
    for lo, hi in [(-0.7, 2.3), (-5.0, 0.1), (-1.0, 1.0), (0.0, 1e-3), (-3e4, 0.0)]:
        params = params_from_range(torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64), n_bits, "symmetric")
        threshold = max(abs(lo), abs(hi))
        assert (params.q_min, params.q_max) == (-(2 ** (n_bits - 1)), q_max)
        assert float(params.zero_point) == 0.0
        assert float(params.step_size) == pytest.approx(threshold / q_max, rel=1e-15)
        levels = dequantize(torch.arange(params.q_min, params.q_max + 1, dtype=torch.float64), params).numpy()
        # the top level is the threshold (to within one rounding of s * q_max), the bottom one step below -T
        assert abs(levels[-1] - threshold) <= 2 * np.finfo(np.float64).eps * threshold
        assert levels[0] == pytest.approx(-threshold - threshold / q_max, rel=1e-14)
        np.testing.assert_allclose(np.diff(levels), threshold / q_max, rtol=1e-12)
        assert 0.0 in levels
        # the threshold itself and anything above it land on the top level
        x = torch.tensor([threshold, 1.5 * threshold, 1e3 * threshold], dtype=torch.float64)
        np.testing.assert_array_equal(quantize(x, params).numpy(), [q_max] * 3)


@pytest.mark.parametrize("n_bits", BITS)
def test_unsigned_grid(n_bits):
    q_max = 2**n_bits - 1
    for lo, hi in [(-3.0, 2.0), (0.5, 4.0), (0.0, 1e-2)]:
        params = params_from_range(torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64), n_bits, "unsigned")
        assert (params.q_min, params.q_max) == (0, q_max)
        assert float(params.zero_point) == 0.0
        assert float(params.step_size) == pytest.approx(hi / q_max, rel=1e-15)
        levels = dequantize(torch.arange(0, q_max + 1, dtype=torch.float64), params).numpy()
        assert levels[0] == 0.0 and levels[-1] == pytest.approx(hi, rel=1e-14)
        x = torch.tensor([-5.0, -1e-9, 0.0, hi, 2 * hi], dtype=torch.float64)
        np.testing.assert_allclose(quantize_dequantize(x, params).numpy(), [0, 0, 0, hi, hi], rtol=1e-14)


@pytest.mark.parametrize("n_bits", BITS)
def test_asymmetric_grid(n_bits):
    rng = np.random.default_rng(100 + n_bits)
    q_max = 2**n_bits - 1
    ranges = [(-0.3, 2.0), (-4.0, -1.0), (1.0, 3.0), (-1.0, 1.0), (-2.5, 0.01)]
    ranges += [(-rng.uniform(0, 5), rng.uniform(0, 5)) for _ in range(10)]
    for lo, hi in ranges:
        params = params_from_range(torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64), n_bits, "asymmetric")
        s_ref, z_ref = np_params(lo, hi, n_bits, QuantScheme.ASYMMETRIC)
        s, z = float(params.step_size), float(params.zero_point)
        assert (params.q_min, params.q_max) == (0, q_max)
        assert s == pytest.approx(s_ref, rel=1e-15)
        assert z == z_ref and z == round(z) and 0 <= z <= q_max
        # zero is exactly representable
        assert float(quantize_dequantize(torch.zeros((), dtype=torch.float64), params)) == 0.0
        # the grid covers [min(lo, 0), max(hi, 0)] up to half a step (the zero point is an integer)
        lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
        bottom, top = s * (0 - z), s * (q_max - z)
        assert bottom <= lo0 + 0.5 * s * (1 + 1e-9) and top >= hi0 - 0.5 * s * (1 + 1e-9)
        assert top - bottom == pytest.approx(hi0 - lo0, rel=1e-12)
        # every value of the range gets within half a step
        x = torch.from_numpy(np.concatenate([rng.uniform(lo0, hi0, 2000), [lo0, hi0, 0.0]]))
        err = (quantize_dequantize(x, params) - x).abs().max()
        assert float(err) <= 0.5 * s * (1 + 1e-9)


def test_params_from_range_per_channel_shapes():
    lo = torch.tensor([-1.0, -2.0, 0.0])
    hi = torch.tensor([0.5, 4.0, 3.0])
    for scheme in SCHEMES:
        params = params_from_range(lo, hi, 4, scheme)
        assert params.step_size.shape == (3,) and params.zero_point.shape == (3,)
        for c in range(3):
            s_ref, z_ref = np_params(float(lo[c]), float(hi[c]), 4, scheme)
            assert float(params.step_size[c]) == pytest.approx(s_ref, rel=1e-6)
            assert float(params.zero_point[c]) == z_ref


# --------------------------------------------------------------------------- quantize-dequantize
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n_bits", BITS)
def test_quantize_dequantize_matches_numpy(scheme, n_bits):
    rng = np.random.default_rng(7 * n_bits + len(scheme.value))
    lo, hi = random_range(rng, scheme)
    x = rng.normal(0.0, 1.5, size=3000) * max(abs(lo), abs(hi))  # many values outside the range
    params = params_from_range(torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64), n_bits, scheme)
    s_ref, z_ref = np_params(lo, hi, n_bits, scheme)
    q_min, q_max = np_integer_range(n_bits, scheme)
    expected = np_qdq(x, s_ref, z_ref, q_min, q_max)
    got = quantize_dequantize(torch.from_numpy(x), params).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-13 * s_ref)
    ints = quantize(torch.from_numpy(x), params).numpy()
    assert np.all(ints == np.round(ints)) and ints.min() >= q_min and ints.max() <= q_max
    # both ends of the integer range are used by a tensor this wide
    assert ints.max() == q_max
    if scheme is not QuantScheme.UNSIGNED:
        assert ints.min() == q_min


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n_bits", BITS)
def test_nearest_level_brute_force(scheme, n_bits):
    rng = np.random.default_rng(1000 + 10 * n_bits + len(scheme.value))
    lo, hi = random_range(rng, scheme)
    params = params_from_range(torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64), n_bits, scheme)
    s, z = float(params.step_size), float(params.zero_point)
    levels = s * (np.arange(params.q_min, params.q_max + 1) - z)
    x = rng.uniform(levels[0] - 2.0, levels[-1] + 2.0, size=4000)
    got = quantize_dequantize(torch.from_numpy(x), params).numpy()
    # every output is a level
    assert np.all(np.min(np.abs(got[:, None] - levels[None, :]), axis=1) <= 1e-12 * max(1.0, abs(levels).max()))
    inside = (x >= levels[0]) & (x <= levels[-1])
    nearest = np.min(np.abs(x[:, None] - levels[None, :]), axis=1)
    np.testing.assert_allclose(np.abs(got - x)[inside], nearest[inside], rtol=0, atol=1e-12)
    assert np.all(np.abs(got - x)[inside] <= 0.5 * s + 1e-12)
    np.testing.assert_allclose(got[x > levels[-1]], levels[-1], rtol=1e-14)
    np.testing.assert_allclose(got[x < levels[0]], levels[0], rtol=1e-14)
    assert inside.sum() > 100 and (x > levels[-1]).sum() > 10 and (x < levels[0]).sum() > 10


@pytest.mark.parametrize("scheme", SCHEMES)
def test_all_zero_tensor_quantizes_to_zero(scheme):
    for dtype in (torch.float16, torch.float32, torch.float64):
        x = torch.zeros(5, 7, dtype=dtype)
        params = params_from_range(x.min(), x.max(), 4, scheme)
        assert float(params.step_size) > 0
        out = quantize_dequantize(x, params)
        assert not torch.isnan(out).any() and torch.equal(out, torch.zeros_like(x))
        xr = x.clone().requires_grad_()
        step = params.step_size.clone().requires_grad_()
        y = fake_quantize(xr, step, params.zero_point, params.q_min, params.q_max)
        y.sum().backward()
        assert torch.equal(y.detach(), torch.zeros_like(x))
        assert torch.isfinite(xr.grad).all() and torch.isfinite(step.grad).all()


# --------------------------------------------------------------------------- fake quantization
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n_bits", [2, 4, 8])
def test_fake_quantize_forward_equals_qdq(scheme, n_bits):
    rng = np.random.default_rng(11 * n_bits)
    lo, hi = random_range(rng, scheme)
    params = params_from_range(torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64), n_bits, scheme)
    x = torch.from_numpy(rng.normal(0, 2.0, size=(64, 9)))
    ref = quantize_dequantize(x, params)
    for grad_scale in (1.0, 0.37):
        out = fake_quantize(x, params.step_size, params.zero_point, params.q_min, params.q_max, grad_scale)
        torch.testing.assert_close(out, ref, rtol=1e-14, atol=1e-14)


def test_round_ste_and_scale_gradient():
    x = torch.tensor([-1.7, -0.5, 0.2, 0.5, 1.5, 2.49], dtype=torch.float64, requires_grad=True)
    y = round_ste(x)
    np.testing.assert_array_equal(y.detach().numpy(), np.round(x.detach().numpy()))
    g = torch.arange(1.0, 7.0, dtype=torch.float64)
    (y * g).sum().backward()
    torch.testing.assert_close(x.grad, g)
    s = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    out = scale_gradient(s, 0.25)
    assert float(out.detach()) == pytest.approx(0.3, rel=1e-15)
    (out * 4.0).backward()
    assert float(s.grad) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n_bits", [2, 3, 4, 8])
def test_ste_gradient_wrt_x(scheme, n_bits):
    rng = np.random.default_rng(21 * n_bits + len(scheme.value))
    lo, hi = random_range(rng, scheme)
    s_ref, z_ref = np_params(lo, hi, n_bits, scheme)
    q_min, q_max = np_integer_range(n_bits, scheme)
    bottom, top = s_ref * (q_min - z_ref), s_ref * (q_max - z_ref)
    x = rng.uniform(bottom - 3 * s_ref - 1.0, top + 3 * s_ref + 1.0, size=3000)
    x = x[unambiguous(x, s_ref, z_ref, q_min, q_max)]
    xt = torch.from_numpy(x).requires_grad_()
    g = torch.from_numpy(rng.normal(size=x.shape))
    out = fake_quantize(xt, torch.tensor(s_ref, dtype=torch.float64), torch.tensor(z_ref, dtype=torch.float64), q_min, q_max)
    (out * g).sum().backward()
    inside = (x >= bottom) & (x <= top)
    expected = np.where(inside, g.numpy(), 0.0)
    np.testing.assert_allclose(xt.grad.numpy(), expected, rtol=1e-14, atol=0)
    assert np.array_equal(xt.grad.numpy() != 0, inside)
    assert inside.sum() > 100 and (~inside).sum() > 100


def lsq_step_gradient(x, s, z, q_min, q_max):
    """d x_hat / d s of LSQ (Esser et al. 2020) with zero point ``z``."""
    u = x / s
    v = u + z
    return np.where(v < q_min, q_min - z, np.where(v > q_max, q_max - z, np.round(u) - u))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n_bits", [2, 3, 4, 8])
def test_lsq_step_size_gradient(scheme, n_bits):
    rng = np.random.default_rng(31 * n_bits + len(scheme.value))
    lo, hi = random_range(rng, scheme)
    s_ref, z_ref = np_params(lo, hi, n_bits, scheme)
    q_min, q_max = np_integer_range(n_bits, scheme)
    bottom, top = s_ref * (q_min - z_ref), s_ref * (q_max - z_ref)
    x = rng.uniform(bottom - 2 * s_ref - 0.5, top + 2 * s_ref + 0.5, size=40)
    x = x[unambiguous(x, s_ref, z_ref, q_min, q_max)]
    g = rng.normal(size=x.shape)
    expected = float(np.sum(g * lsq_step_gradient(x, s_ref, z_ref, q_min, q_max)))
    for grad_scale in (1.0, 0.125, 3.0):
        step = torch.tensor(s_ref, dtype=torch.float64, requires_grad=True)
        out = fake_quantize(torch.from_numpy(x), step, torch.tensor(z_ref, dtype=torch.float64), q_min, q_max, grad_scale)
        (out * torch.from_numpy(g)).sum().backward()
        assert float(step.grad) == pytest.approx(grad_scale * expected, rel=1e-10, abs=1e-10)
    # element-wise, without the reduction: one value at a time
    for xi in x[:10]:
        step = torch.tensor(s_ref, dtype=torch.float64, requires_grad=True)
        fake_quantize(torch.tensor(xi, dtype=torch.float64), step, torch.tensor(z_ref, dtype=torch.float64), q_min, q_max).backward()
        assert float(step.grad) == pytest.approx(float(lsq_step_gradient(xi, s_ref, z_ref, q_min, q_max)), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("n_bits", [2, 4])
def test_gradients_in_end_bins_follow_lsq(n_bits):
    s = 0.1
    q_min, q_max = np_integer_range(n_bits, QuantScheme.SYMMETRIC)
    # u = x / s: the top bin, the band above it, the bottom bin, the band below it
    u = np.array([q_max - 0.3, q_max - 0.1, q_max + 0.2, q_max + 0.4, q_min + 0.3, q_min + 0.1, q_min - 0.2, q_min - 0.4])
    x = torch.tensor(u * s, dtype=torch.float64, requires_grad=True)
    step = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    out = fake_quantize(x, step, torch.zeros((), dtype=torch.float64), q_min, q_max)
    ends = np.array([q_max] * 4 + [q_min] * 4) * s
    np.testing.assert_allclose(out.detach().numpy(), ends, rtol=1e-14)  # forward is right
    g = torch.arange(1.0, 9.0, dtype=torch.float64)
    (out * g).sum().backward()
    inside = np.array([1, 1, 0, 0, 1, 1, 0, 0], dtype=float)
    np.testing.assert_allclose(x.grad.numpy(), g.numpy() * inside, rtol=1e-12)
    expected_step = float(np.sum(g.numpy() * lsq_step_gradient(x.detach().numpy(), s, 0.0, q_min, q_max)))
    assert float(step.grad) == pytest.approx(expected_step, rel=1e-10)


def test_lsq_per_channel_step_gradient():
    rng = np.random.default_rng(5)
    q_min, q_max = -8, 7
    x = rng.normal(size=(4, 3, 5))
    steps = np.array([0.05, 0.1, 0.3, 0.02])
    g = rng.normal(size=x.shape)
    s_b = steps[:, None, None]
    keep = unambiguous(x, s_b, 0.0, q_min, q_max)
    x = np.where(keep, x, 0.0)  # 0 is strictly inside every range
    step = torch.tensor(steps, requires_grad=True)
    out = fake_quantize(torch.from_numpy(x), channel_view(step, 3, 0), torch.zeros(4, 1, 1, dtype=torch.float64), q_min, q_max)
    (out * torch.from_numpy(g)).sum().backward()
    expected = (g * lsq_step_gradient(x, s_b, 0.0, q_min, q_max)).sum(axis=(1, 2))
    np.testing.assert_allclose(step.grad.numpy(), expected, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- per-channel broadcasting
@pytest.mark.parametrize("scheme", SCHEMES)
def test_channel_view_conv_and_conv_transpose(scheme):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3)
    deconv = nn.ConvTranspose2d(4, 5, 3)  # weight (in=4, out=5, 3, 3): output channels on axis 1
    for weight, axis in ((conv.weight.detach().double(), 0), (deconv.weight.detach().double(), 1)):
        n_ch = weight.shape[axis]
        weight = weight * channel_view(torch.logspace(-2, 1, n_ch, dtype=torch.float64), weight.dim(), axis)
        moved = weight.movedim(axis, 0).reshape(n_ch, -1)
        lo, hi = moved.min(dim=1).values, moved.max(dim=1).values
        params = params_from_range(lo, hi, 4, scheme)
        assert channel_view(params.step_size, weight.dim(), axis).shape == tuple(n_ch if d == axis else 1 for d in range(weight.dim()))
        view = QuantParams(
            channel_view(params.step_size, weight.dim(), axis),
            channel_view(params.zero_point, weight.dim(), axis),
            params.q_min,
            params.q_max,
        )
        out = quantize_dequantize(weight, view)
        assert out.shape == weight.shape
        for c in range(n_ch):
            s_ref, z_ref = np_params(float(lo[c]), float(hi[c]), 4, scheme)
            ref = np_qdq(weight.select(axis, c).numpy(), s_ref, z_ref, params.q_min, params.q_max)
            np.testing.assert_allclose(out.select(axis, c).numpy(), ref, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- FakeQuantizer module
def _granularity(per_channel: bool, axis: int = 0) -> Granularity:
    return Granularity.per_channel(axis) if per_channel else Granularity.per_tensor()


def reference_range(x: torch.Tensor, estimator: RangeEstimator, n_bits, scheme, ch_axis):
    x64 = x.detach().double()
    if estimator is RangeEstimator.MSE:
        return mse_range(x64, n_bits, scheme, ch_axis)
    if ch_axis is None:
        return x64.min(), x64.max()
    rows = x64.movedim(ch_axis, 0).reshape(x.shape[ch_axis], -1)
    return rows.min(dim=1).values, rows.max(dim=1).values


@pytest.mark.parametrize("estimator", list(RangeEstimator))
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_fake_quantizer_module(estimator, scheme, per_channel):
    torch.manual_seed(3)
    ch_axis = 1
    x = (torch.randn(6, 5, 4, dtype=torch.float64) * torch.tensor([0.1, 1.0, 3.0, 0.5, 2.0], dtype=torch.float64)[None, :, None])
    x = x.requires_grad_()
    fq = FakeQuantizer(QuantizerConfig(n_bits=4, scheme=scheme, granularity=_granularity(per_channel, ch_axis), range_estimator=estimator), x.shape)
    assert isinstance(fq.step_size, nn.Parameter)
    assert any(p is fq.step_size for p in fq.parameters())
    out = fq(x)
    lo, hi = reference_range(x, estimator, 4, scheme, ch_axis if per_channel else None)
    params = params_from_range(lo, hi, 4, scheme)
    s, z = params.step_size.numpy(), params.zero_point.numpy()
    if per_channel:
        s, z = s[None, :, None], z[None, :, None]
        assert fq.step_size.shape == (5,)
    else:
        assert fq.step_size.shape == ()
    expected = np_qdq(x.detach().numpy(), s, z, params.q_min, params.q_max)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-12, atol=1e-14)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert fq.step_size.grad is not None and torch.isfinite(fq.step_size.grad).all()
    assert fq.step_size.grad.abs().sum() > 0
    assert fq.zero_point.requires_grad is False


@pytest.mark.parametrize("per_channel", [False, True])
def test_running_minmax_ema_by_hand(per_channel):
    momentum = 0.8
    fq = FakeQuantizer(
        QuantizerConfig(n_bits=8, granularity=_granularity(per_channel), range_estimator=RangeEstimator.RUNNING_MINMAX, running_momentum=momentum),
        (3, 50),
    )
    rng = np.random.default_rng(9)
    batches = [rng.normal(0, sigma, size=(3, 50)) * np.array([[1.0], [2.0], [0.5]]) for sigma in (1.0, 4.0, 0.25)]
    m_lo = m_hi = None
    for i, batch in enumerate(batches):
        b_lo = batch.min(axis=1) if per_channel else batch.min()
        b_hi = batch.max(axis=1) if per_channel else batch.max()
        if i == 0:
            m_lo, m_hi = b_lo, b_hi
        else:
            m_lo = momentum * m_lo + (1 - momentum) * b_lo
            m_hi = momentum * m_hi + (1 - momentum) * b_hi
        out = fq(torch.from_numpy(batch))
        expected_step = np.maximum(np.abs(m_lo), np.abs(m_hi)) / 127
        np.testing.assert_allclose(fq.step_size.detach().numpy(), expected_step, rtol=1e-12)
        s = expected_step[:, None] if per_channel else expected_step
        np.testing.assert_allclose(out.detach().numpy(), np_qdq(batch, s, 0.0, -128, 127), rtol=1e-12, atol=1e-14)
    # the EMA differs from the last batch's own extremes
    assert not np.allclose(m_hi, batches[-1].max(axis=1) if per_channel else batches[-1].max())


def test_freeze_range_then_learn_step_size_with_grad_scaling():
    torch.manual_seed(1)
    x = torch.randn(32, 16, dtype=torch.float64)
    plain = FakeQuantizer(QuantizerConfig(n_bits=4))
    scaled = FakeQuantizer(QuantizerConfig(n_bits=4, grad_scaling=True))
    for fq in (plain, scaled):
        fq(x)
        fq.freeze_range()
        fq.step_size.grad = None
    torch.testing.assert_close(plain.step_size.detach(), scaled.step_size.detach())
    frozen = plain.step_size.detach().clone()
    # zero upstream gradient on the end bins (tested on their own in test_gradients_in_end_bins_follow_lsq)
    keep = unambiguous(2.0 * x.numpy(), float(frozen), 0.0, -8, 7)
    assert keep.mean() > 0.8
    g = torch.randn(32, 16, dtype=torch.float64) * torch.from_numpy(keep)
    (plain(2.0 * x) * g).sum().backward()  # a wider tensor: a frozen range must not follow it
    (scaled(2.0 * x) * g).sum().backward()
    assert torch.equal(plain.step_size.detach(), frozen)
    expected = np.sum(g.numpy() * lsq_step_gradient(2.0 * x.numpy(), float(frozen), 0.0, -8, 7))
    assert float(plain.step_size.grad) == pytest.approx(expected, rel=1e-10)
    assert float(scaled.step_size.grad) == pytest.approx(expected / math.sqrt(x.numel() * 7), rel=1e-10)
    opt = torch.optim.SGD(plain.parameters(), lr=1e-3)
    opt.step()
    assert float(plain.step_size.detach()) == pytest.approx(float(frozen) - 1e-3 * expected, rel=1e-12)


def test_learn_step_size_false():
    fq = FakeQuantizer(QuantizerConfig(n_bits=4, learn_step_size=False))
    x = torch.randn(10, requires_grad=True)
    fq(x).sum().backward()
    assert fq.step_size.requires_grad is False and fq.step_size.grad is None
    assert x.grad is not None


@pytest.mark.parametrize("estimator", list(RangeEstimator))
@pytest.mark.parametrize("per_channel", [False, True])
def test_fake_quantizer_fp16(estimator, per_channel):
    torch.manual_seed(4)
    x32 = torch.randn(8, 64) * 3.0
    x16 = x32.half().requires_grad_()
    fq = FakeQuantizer(QuantizerConfig(n_bits=6, granularity=_granularity(per_channel), range_estimator=estimator), x16.shape)
    out = fq(x16)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    step = fq.step_size.detach().double().numpy()
    s = step[:, None] if per_channel else step
    expected = np_qdq(x16.detach().double().numpy(), s, 0.0, -32, 31)
    # fp16 arithmetic: the output is the fp16-rounded level (rarely a neighbouring level at a near-tie)
    diff = np.abs(out.detach().double().numpy() - expected)
    assert np.mean(diff <= 1e-3 * np.abs(expected) + 1e-6) > 0.99
    assert np.all(diff <= s * 1.01 + 1e-6)
    out.float().sum().backward()
    assert x16.grad is not None and torch.isfinite(x16.grad).all()
    assert fq.step_size.grad is not None and torch.isfinite(fq.step_size.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("estimator", [RangeEstimator.MSE, RangeEstimator.CURRENT_MINMAX])
def test_fake_quantizer_half_precision_activations_match_float32(dtype, estimator):
    """Issue 10: activations in float16/bfloat16 (as under AMP) are quantized as their float32 values.

    The step size stays a float32 parameter equal to the one estimated on the upcast values, the
    output is the float64 fake-quantization of those values (cast to ``dtype``), and the step-size
    gradient is LSQ's ``g sum(round(v) - v inside, q_bound - z outside)``, ``v = x / s + z``, in float64.
    Before, float16 gave a NaN step gradient (``(x / s) / s`` overflows where the clamp zeroes the
    incoming gradient) and estimating turned the parameter into ``dtype``.
    """
    generator = torch.Generator().manual_seed(10)
    x_low = ((torch.randn(4, 8, 6, 6, generator=generator) + 0.3).relu() * 4.0).to(dtype).requires_grad_()
    config = QuantizerConfig(n_bits=6, scheme=QuantScheme.ASYMMETRIC, range_estimator=estimator, grad_scaling=True)
    reference = FakeQuantizer(config)
    reference.estimate_range(x_low.detach().float())
    fq = FakeQuantizer(config)
    out = fq(x_low)
    assert fq.step_size.dtype == fq.zero_point.dtype == torch.float32 and out.dtype == dtype
    assert torch.equal(fq.step_size.detach(), reference.step_size.detach())
    assert torch.equal(fq.zero_point, reference.zero_point)
    fq.freeze_range()
    for step in (fq.step_size.item(), 1e-2, 1e-3):  # small steps: most values clamped, |x| / s^2 >> 65504
        fq.step_size.data.fill_(step)
        fq.step_size.grad, x_low.grad = None, None
        out = fq(x_low)
        out.float().sum().backward()
        x = x_low.detach().double().numpy()
        s, z = float(fq.step_size.detach().double()), float(fq.zero_point.double())
        q_min, q_max = 0, 63
        v = x / s + z
        expected = s * (np.clip(np.round(v), q_min, q_max) - z)
        np.testing.assert_allclose(out.detach().double().numpy(), torch.tensor(expected).to(dtype).double().numpy())
        per_value = np.where(v < q_min, q_min - z, np.where(v > q_max, q_max - z, np.round(v) - v))
        grad_s = per_value.sum() / math.sqrt(x.size * q_max)
        assert torch.isfinite(fq.step_size.grad)
        assert fq.step_size.grad.item() == pytest.approx(grad_s, rel=1e-4, abs=1e-4)
        grad_x = x_low.grad.double().numpy()
        assert np.all(grad_x[(v > q_min) & (v < q_max)] == 1.0) and np.all(grad_x[(v < q_min) | (v > q_max)] == 0.0)
        x32 = x_low.detach().float().requires_grad_()
        fq(x32).sum().backward()
        assert torch.equal(x_low.grad.float(), x32.grad)  # as the float32 values' (ends of the range included)


def test_fake_quantizer_under_cpu_autocast_keeps_a_float32_step():
    """Estimating and training under ``torch.autocast`` (bfloat16 conv outputs) leaves float32 parameters."""
    generator = torch.Generator().manual_seed(11)
    conv = nn.Conv2d(3, 4, 3)
    fq = FakeQuantizer(QuantizerConfig(n_bits=6, scheme=QuantScheme.ASYMMETRIC, range_estimator=RangeEstimator.MSE))
    x = torch.randn(2, 3, 8, 8, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        activation = conv(x)
        out = fq(activation)
    assert activation.dtype == out.dtype == torch.bfloat16
    reference = FakeQuantizer(fq.config)
    reference.estimate_range(activation.detach().float())
    assert fq.step_size.dtype == torch.float32 and torch.equal(fq.step_size.detach(), reference.step_size.detach())
    fq.freeze_range()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fq(conv(x)).float().square().sum()
    loss.backward()
    assert fq.step_size.grad.dtype == torch.float32 and torch.isfinite(fq.step_size.grad)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("estimator", [RangeEstimator.CURRENT_MINMAX, RangeEstimator.RUNNING_MINMAX])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fake_quantizer_all_zero_tensor_minmax(scheme, estimator, dtype):
    for per_channel in (False, True):
        x = torch.zeros(3, 4, dtype=dtype, requires_grad=True)
        fq = FakeQuantizer(QuantizerConfig(n_bits=4, scheme=scheme, granularity=_granularity(per_channel), range_estimator=estimator), x.shape)
        out = fq(x)
        assert torch.equal(out.detach(), torch.zeros_like(x))
        out.sum().backward()
        assert torch.isfinite(fq.step_size.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fake_quantizer_all_zero_tensor_mse(dtype):
    fq = FakeQuantizer(QuantizerConfig(n_bits=4, range_estimator=RangeEstimator.MSE))
    out = fq(torch.zeros(3, 4, dtype=dtype))
    assert not torch.isnan(out).any()
    assert torch.equal(out, torch.zeros_like(out))


def test_fake_quantizer_mse_per_channel_with_zero_channel():
    torch.manual_seed(0)
    w = torch.randn(3, 8)
    w[1] = 0.0
    fq = FakeQuantizer(QuantizerConfig(n_bits=4, granularity=Granularity.per_channel(), range_estimator=RangeEstimator.MSE), w.shape)
    out = fq(w)
    assert not torch.isnan(out).any()
    assert torch.equal(out[1], torch.zeros(8))


def test_extra_repr():
    fq = FakeQuantizer(QuantizerConfig(n_bits=3, scheme=QuantScheme.UNSIGNED, granularity=Granularity.per_channel(1), range_estimator=RangeEstimator.MSE), (2, 5))
    assert fq.extra_repr() == "n_bits=3, scheme=unsigned, per_channel(axis=1), range=mse"


# --------------------------------------------------------------------------- granularity


def test_granularity_groups_and_expansion():
    shape = (10, 3, 2)
    assert [g.groups(shape) for g in (Granularity.per_tensor(), Granularity.per_channel(), Granularity.blocks(4))] == [1, 10, 3]
    assert Granularity.blocks(4).param_shape(shape) == (3,) and Granularity.per_tensor().param_shape(shape) == ()
    assert Granularity.blocks(4).channel_groups(10).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]  # last block smaller
    expanded = Granularity.blocks(4, axis=1).expand(torch.tensor([1.0, 2.0, 3.0]), (2, 10))
    assert expanded.shape == (1, 10) and expanded[0].tolist() == [1.0] * 4 + [2.0] * 4 + [3.0] * 2
    with pytest.raises(ValueError, match="needs the shape"):
        FakeQuantizer(QuantizerConfig(granularity=Granularity.per_channel()))
    with pytest.raises(ValueError, match="block size"):
        Granularity.blocks(0)


@pytest.mark.parametrize("estimator", list(RangeEstimator))
def test_block_step_sizes_are_those_of_each_block_alone(estimator):
    torch.manual_seed(5)
    w = torch.randn(10, 3, 3) * torch.linspace(0.1, 2.0, 10)[:, None, None]
    config = QuantizerConfig(n_bits=4, granularity=Granularity.blocks(4), range_estimator=estimator)
    fq = FakeQuantizer(config, w.shape)
    assert fq.step_size.shape == (3,)
    out = fq(w)
    for block, start in enumerate(range(0, 10, 4)):
        alone = FakeQuantizer(QuantizerConfig(n_bits=4, range_estimator=estimator))
        part = w[start : start + 4]
        assert torch.equal(out[start : start + 4], alone(part))
        assert torch.equal(fq.step_size[block], alone.step_size)


def test_step_size_has_its_final_shape_from_the_start():
    fq = FakeQuantizer(QuantizerConfig(n_bits=4, granularity=Granularity.per_channel()), (6, 2))
    step = fq.step_size
    assert step.shape == (6,)
    fq(torch.randn(6, 2))
    assert fq.step_size is step and step.shape == (6,)
    with pytest.raises(ValueError, match="cannot quantize a tensor of shape"):
        fq.estimate_range(torch.randn(5, 2))
