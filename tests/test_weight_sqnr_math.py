"""The numbers of the weight-SQNR study: kurtosis, quantization and pruning SQNR, against numpy/scipy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch
from torch import nn

from studies import weight_sqnr
from studies.weight_sqnr import (
    METRICS,
    excess_kurtosis,
    iter_study_model,
    layer_groups,
    prepare_tensor,
    pruning_sparsity,
    sqnr_db,
    study_prepared,
    study_tensor,
)

BITS = (2, 3, 4, 6, 8)


# --------------------------------------------------------------------------- independent reference
def np_study(w: np.ndarray, n_bits: int, step, ch_axis: int | None) -> dict[str, float]:
    """Every metric recomputed with numpy from the step size(s) the study chose."""
    w = w.astype(np.float64)
    n = w.size
    q_min, q_max = -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1
    s = np.asarray(step, dtype=np.float64)
    if ch_axis is not None:
        shape = [1] * w.ndim
        shape[ch_axis] = -1
        s = s.reshape(shape)
    ints = np.clip(np.round(w / s), q_min, q_max)
    quant_mse = float(np.mean((w - ints * s) ** 2))
    quant_sparsity = float(np.mean(ints == 0))
    mean_square = float(np.mean(w * w))
    squares = np.sort((w * w).reshape(-1))

    def pruned_mse(sparsity: float) -> float:
        k = min(n, math.floor(sparsity * n + 0.5))
        return float(np.sum(squares[:k])) / n

    sparsity = 1.0 - n_bits / 16.0
    corrected = 1.0 - (1.0 - quant_sparsity) * n_bits / 16.0
    out = {
        "sample_kurtosis": float(scipy.stats.kurtosis(w.reshape(-1), fisher=True, bias=True)),
        "quant_mse": quant_mse,
        "quant_sparsity": quant_sparsity,
        "pruning_mse": pruned_mse(sparsity),
        "pruning_mse_corrected": pruned_mse(corrected),
    }
    for key in ("quant", "pruning"):
        out[f"{key}_sqnr"] = 10 * np.log10(mean_square / out[f"{key}_mse"])
    out["pruning_sqnr_corrected"] = 10 * np.log10(mean_square / out["pruning_mse_corrected"])
    return out


def check_against_numpy(result: dict, w: np.ndarray, n_bits: int, ch_axis: int | None) -> None:
    ref = np_study(w, n_bits, result["quant_step_size"], ch_axis)
    for key, value in ref.items():
        assert result[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def sample_weight(seed: int, shape=(32, 16, 3, 3), dtype=torch.float32) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_t(5, size=shape) * 0.05).to(dtype)


# --------------------------------------------------------------------------- small helpers
def test_excess_kurtosis_matches_scipy():
    rng = np.random.default_rng(0)
    samples = [
        rng.normal(size=1000),
        rng.laplace(size=777),
        rng.standard_t(3, size=5000),
        rng.uniform(size=300),
        rng.exponential(size=50) + 10.0,
        np.array([1.0, 2.0, 3.0, 10.0]),
    ]
    for x in samples:
        expected = scipy.stats.kurtosis(x, fisher=True, bias=True)
        assert excess_kurtosis(torch.from_numpy(x)) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    # the study's float32 weights are promoted to float64 before the moments are taken
    w = sample_weight(1)
    result = study_tensor(w, [4], "minmax")[4]
    expected = scipy.stats.kurtosis(w.double().numpy().reshape(-1), fisher=True, bias=True)
    assert result["sample_kurtosis"] == pytest.approx(expected, rel=1e-10)
    # Laplace: 3, uniform: -1.2 (population values, large sample)
    assert excess_kurtosis(torch.from_numpy(rng.laplace(size=400_000))) == pytest.approx(3.0, abs=0.1)
    assert excess_kurtosis(torch.from_numpy(rng.uniform(size=400_000))) == pytest.approx(-1.2, abs=0.01)
    assert math.isnan(excess_kurtosis(torch.full((10,), 3.0, dtype=torch.float64)))


def test_pruning_sparsity_and_sqnr_db():
    assert [pruning_sparsity(b) for b in (2, 4, 8, 16)] == [0.875, 0.75, 0.5, 0.0]
    assert sqnr_db(1.0, 0.01) == pytest.approx(20.0)
    assert sqnr_db(2.0, 2.0) == 0.0
    assert sqnr_db(3.0, 0.0) == math.inf


def test_invalid_range_estimator():
    with pytest.raises(ValueError):
        study_tensor(torch.randn(10), [4], "percentile")


# --------------------------------------------------------------------------- study_tensor vs numpy
@pytest.mark.parametrize("estimator", ["mse", "minmax"])
@pytest.mark.parametrize("ch_axis", [None, 0, 1])
def test_study_tensor_matches_numpy(estimator, ch_axis):
    w = sample_weight(10 + (ch_axis or 0))
    results = study_tensor(w, BITS, estimator, ch_axis)
    assert list(results) == list(BITS)
    wn = w.double().numpy()
    for n_bits, result in results.items():
        assert set(result) == set(METRICS)
        for key, value in result.items():
            if key == "quant_step_size" and ch_axis is not None:
                assert isinstance(value, list) and len(value) == w.shape[ch_axis]
                assert all(isinstance(v, float) for v in value)
            else:
                assert isinstance(value, float), key
        check_against_numpy(result, wn, n_bits, ch_axis)
        q_max = 2 ** (n_bits - 1) - 1
        step = np.asarray(result["quant_step_size"])
        if ch_axis is None:
            amax = np.abs(wn).max()
        else:
            amax = np.abs(np.moveaxis(wn, ch_axis, 0).reshape(w.shape[ch_axis], -1)).max(axis=1)
        if estimator == "minmax":
            np.testing.assert_allclose(step, amax / q_max, rtol=1e-15)
        else:  # the MSE step is never worse than min-max's (its threshold may exceed max|w|)
            assert np.all(step > 0)
            minmax = np_study(wn, n_bits, (amax / q_max).tolist() if ch_axis is not None else float(amax / q_max), ch_axis)
            assert result["quant_mse"] <= minmax["quant_mse"] * (1 + 1e-12)
        # equal compression: corrected pruning prunes at least as much, so its error is at least as large
        assert result["pruning_mse_corrected"] >= result["pruning_mse"]
        assert 0.0 <= result["quant_sparsity"] < 1.0


def test_study_tensor_quant_sparsity_counts_zeros_exactly():
    """Values exactly on +-s/2 round (half to even) to 0 and count as quantization zeros."""
    w = torch.tensor([-127.0, 127.0, 0.5, -0.5, 0.50001, 1.5, -2.5, 0.25], dtype=torch.float64)
    result = study_tensor(w, [8], "minmax")[8]  # s = 1 exactly
    assert result["quant_step_size"] == 1.0
    assert result["quant_sparsity"] == 3 / 8  # 0.5, -0.5, 0.25
    check_against_numpy(result, w.numpy(), 8, None)


# --------------------------------------------------------------------------- closed forms
def gaussian_pruning_sqnr(sparsity: float) -> float:
    """Unit Gaussian, prune |w| < t with P(|w| < t) = s: error share (2 Phi(t) - 1) - 2 t phi(t)."""
    t = scipy.stats.norm.ppf(0.5 + sparsity / 2.0)
    share = (2 * scipy.stats.norm.cdf(t) - 1) - 2 * t * scipy.stats.norm.pdf(t)
    return -10.0 * np.log10(share)


def test_gaussian_pruning_sqnr_closed_form():
    gen = torch.Generator().manual_seed(1234)
    w = torch.randn(2_000_000, generator=gen, dtype=torch.float64)
    bits = (2, 3, 4, 5, 6, 7, 8)
    results = study_tensor(w, bits, "minmax")
    for n_bits in bits:
        r = results[n_bits]
        assert r["pruning_sqnr"] == pytest.approx(gaussian_pruning_sqnr(pruning_sparsity(n_bits)), abs=0.02)
        corrected = 1.0 - (1.0 - r["quant_sparsity"]) * n_bits / 16.0
        assert r["pruning_sqnr_corrected"] == pytest.approx(gaussian_pruning_sqnr(corrected), abs=0.02)
        assert r["sample_kurtosis"] == pytest.approx(0.0, abs=0.02)
    # the closed form itself, against numerical integration of w^2 phi(w) over |w| < t
    for sparsity in (0.1, 0.5, 0.875):
        t = scipy.stats.norm.ppf(0.5 + sparsity / 2.0)
        share, _ = scipy.integrate.quad(lambda v: v * v * scipy.stats.norm.pdf(v), -t, t)
        assert gaussian_pruning_sqnr(sparsity) == pytest.approx(-10 * np.log10(share), abs=1e-9)


# --------------------------------------------------------------------------- estimator and granularity
@pytest.mark.parametrize("dist", ["normal", "laplace", "student_t3"])
def test_mse_estimator_beats_minmax(dist):
    rng = np.random.default_rng({"normal": 1, "laplace": 2, "student_t3": 3}[dist])
    x = {"normal": rng.normal, "laplace": rng.laplace, "student_t3": lambda size: rng.standard_t(3, size=size)}[dist](size=(64, 50))
    w = torch.from_numpy(x).float()
    mse = study_tensor(w, BITS, "mse")
    minmax = study_tensor(w, BITS, "minmax")
    for n_bits in BITS:
        assert mse[n_bits]["quant_sqnr"] >= minmax[n_bits]["quant_sqnr"] - 1e-9
        # pruning does not depend on the range estimator
        assert mse[n_bits]["pruning_sqnr"] == pytest.approx(minmax[n_bits]["pruning_sqnr"], rel=1e-12)
    assert mse[2]["quant_sqnr"] > minmax[2]["quant_sqnr"] + 1.0


@pytest.mark.parametrize("ch_axis", [0, 1])
@pytest.mark.parametrize("estimator", ["mse", "minmax"])
def test_per_channel_beats_per_tensor(ch_axis, estimator):
    rng = np.random.default_rng(5)
    shape = [16, 12, 3, 3]
    scales = np.logspace(-2, 0.5, shape[ch_axis])
    view = [1, 1, 1, 1]
    view[ch_axis] = -1
    w = torch.from_numpy(rng.normal(size=shape) * scales.reshape(view))
    per_tensor = study_tensor(w, BITS, estimator)
    per_channel = study_tensor(w, BITS, estimator, ch_axis=ch_axis)
    for n_bits in BITS:
        assert per_channel[n_bits]["quant_sqnr"] >= per_tensor[n_bits]["quant_sqnr"]
        assert per_channel[n_bits]["pruning_sqnr"] == pytest.approx(per_tensor[n_bits]["pruning_sqnr"], rel=1e-12)
        check_against_numpy(per_channel[n_bits], w.numpy(), n_bits, ch_axis)
    assert per_channel[4]["quant_sqnr"] > per_tensor[4]["quant_sqnr"] + 3.0


# --------------------------------------------------------------------------- dtypes and degenerate tensors
def test_fp16_weight_matches_float64():
    gen = torch.Generator().manual_seed(7)
    w16 = (torch.randn(200_000, generator=gen) * 30.0).half()
    assert torch.isinf((w16 * w16).sum(dtype=torch.float16))
    r16 = study_tensor(w16, (4, 8), "mse")
    r64 = study_tensor(w16.double(), (4, 8), "mse")
    for n_bits in (4, 8):
        for key in METRICS:
            assert np.isfinite(r16[n_bits][key])
            assert r16[n_bits][key] == r64[n_bits][key], key
    assert r16[4]["quant_sqnr"] == pytest.approx(19.25, abs=0.3)


@pytest.mark.parametrize("estimator", ["mse", "minmax"])
@pytest.mark.parametrize("ch_axis", [None, 0])
def test_all_zero_weight(estimator, ch_axis):
    results = study_tensor(torch.zeros(4, 3, 3, 3), (2, 4, 8), estimator, ch_axis)
    for result in results.values():
        for key, value in result.items():
            values = value if isinstance(value, list) else [value]
            assert all(isinstance(v, float) for v in values), key
        assert result["quant_mse"] == 0.0 and result["pruning_mse"] == 0.0
        assert result["quant_sparsity"] == 1.0
        assert math.isnan(result["sample_kurtosis"])
        for key in ("quant_sqnr", "pruning_sqnr", "pruning_sqnr_corrected"):
            assert math.isnan(result[key]) or result[key] == math.inf


def test_zero_channel_per_channel_is_finite():
    w = sample_weight(3, shape=(8, 4, 3, 3)).double()
    w[2] = 0.0
    results = study_tensor(w, (2, 4), "mse", ch_axis=0)
    for n_bits, result in results.items():
        assert np.isfinite(result["quant_sqnr"]) and np.isfinite(result["pruning_sqnr"])
        check_against_numpy(result, w.numpy(), n_bits, 0)


# --------------------------------------------------------------------------- one sort for every bit-width
@pytest.mark.parametrize("estimator", ["mse", "minmax"])
@pytest.mark.parametrize("ch_axis", [None, 1])
def test_prepared_once_equals_prepared_per_bit(estimator, ch_axis):
    """All bit-widths from one prepared tensor give exactly the numbers of a fresh preparation per bit-width."""
    w = sample_weight(21, shape=(24, 8, 3, 3))
    prepared = prepare_tensor(w, ch_axis)
    assert prepared.numel == w.numel() and prepared.per_channel == (ch_axis is not None)
    # values, their search keys, their two prefix sums, the rows' starts and negative counts, and the
    # squares' prefix sum: 8 bytes each
    rows = 1 if ch_axis is None else w.shape[ch_axis]
    n = w.numel()
    assert prepared.nbytes == 8 * (2 * n + 2 * (n + rows) + (rows + 1) + rows + n + 1)
    together = study_prepared(prepared, BITS, estimator)
    assert list(together) == list(BITS)
    for n_bits in BITS:
        assert together[n_bits] == study_tensor(w, [n_bits], estimator, ch_axis)[n_bits]
        check_against_numpy(together[n_bits], w.double().numpy(), n_bits, ch_axis)


def small_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.ConvTranspose2d(8, 4, 2), nn.Linear(20, 6))


@pytest.mark.parametrize(("estimator", "per_channel"), [("mse", False), ("minmax", True)])
def test_iter_study_model_prepares_each_tensor_once(monkeypatch, estimator, per_channel):
    """With room for every run of layers each tensor is sorted once for all bit-widths; without room, once per
    bit-width; with room for the first run only, the others once per bit-width. The numbers are the same."""
    model = small_model()
    bits = [2, 5, 8]
    calls: list[list[int]] = []
    original = weight_sqnr.prepare_group

    def counting(weights):
        calls.append([weight.numel() for weight, _ in weights])
        return original(weights)

    monkeypatch.setattr(weight_sqnr, "prepare_group", counting)
    sizes = [module.weight.numel() for module in model.modules() if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]

    def run(cache_bytes: int) -> list:
        calls.clear()
        return list(iter_study_model(model, bits, estimator, per_channel, progress=False, cache_bytes=cache_bytes))

    cached = run(1 << 30)
    assert calls == [sizes]  # one run of layers
    uncached = run(0)
    assert calls == [sizes] * len(bits)
    assert cached == uncached
    # Runs of layers [0], [1, 2], [3] (searched apart: the ranges may differ within the search's tolerance).
    monkeypatch.setattr(weight_sqnr, "SEARCH_GROUP_VALUES", max(sizes) + 1)
    first_bytes = weight_sqnr.group_nbytes(original([(model[0].weight.detach(), 0 if per_channel else None)]))
    first_only = run(first_bytes)
    assert calls == [[sizes[0]], sizes[1:3], [sizes[3]]] + [sizes[1:3], [sizes[3]]] * (len(bits) - 1)
    assert first_only == run(1 << 30) == run(0)
    assert [n_bits for n_bits, _ in cached] == bits
    for n_bits, layers in cached:
        assert list(layers) == ["0", "1", "2", "3"]
        for name, metrics in layers.items():
            weight = model.get_submodule(name).weight.detach()
            assert metrics["numel"] == weight.numel() and metrics["shape"] == list(weight.shape)
            axis = (1 if name == "2" else 0) if per_channel else None
            expected = study_tensor(weight, [n_bits], estimator, axis)[n_bits]
            # Searched alone, the range may differ within the search's tolerance (MSE_RTOL), its error not beyond it.
            quantization = ("quant_sqnr", "quant_mse", "quant_sparsity", "quant_step_size")
            assert {key: metrics[key] for key in METRICS if key not in quantization} == {
                key: expected[key] for key in METRICS if key not in quantization
            }
            assert metrics["quant_mse"] == pytest.approx(expected["quant_mse"], rel=2e-9)


def test_layer_groups_split_the_layers_in_order_within_the_budget():
    """Consecutive runs of the layers, each within the budget unless it is one layer larger than it."""
    layers = [(str(i), nn.Linear(n, 1, bias=False)) for i, n in enumerate([3, 4, 9, 2, 2, 1, 12, 5])]
    groups = list(layer_groups(layers, 8))
    assert [[name for name, _ in group] for group in groups] == [["0", "1"], ["2"], ["3", "4", "5"], ["6"], ["7"]]
    assert [sum(m.weight.numel() for _, m in group) for group in groups] == [7, 9, 5, 12, 5]
