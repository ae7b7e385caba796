"""LIMPQ's multi-bit LSQ quantizer: grids, STE/LSQ gradients, initialisation, the compress_model plug-in.

Values and gradients are checked against numpy closed forms (and a finite difference of the LSQ
surrogate), the initialisations against their formulas computed in numpy.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from models.quantized import CompressionSpec, LayerQuantizer, QuantSetup, compress_model, layer_report
from quantization.fake_quant import QuantizerConfig
from quantization.granularity import Granularity
from quantization.multi_bit_lsq import (
    LIMPQ_BITS,
    MultiBitLSQ,
    QuantizedTensor,
    indicators,
    multi_bit_lsq_factory,
    searchable_layers,
    set_layer_bits,
    set_uniform_bits,
)
from quantization.quantizers import QuantScheme
from utils.io import read_json, write_json

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMES = (QuantScheme.SYMMETRIC, QuantScheme.UNSIGNED)


def np_range(n_bits: int, scheme: QuantScheme) -> tuple[int, int]:
    if scheme is QuantScheme.SYMMETRIC:
        return -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1
    return 0, 2**n_bits - 1


def quantizer_with_steps(steps: dict[int, float], scheme: QuantScheme, tensor: QuantizedTensor, **options) -> MultiBitLSQ:
    """A float64 quantizer whose step sizes are set (and marked initialised) through its state dict."""
    bits = tuple(steps)
    quantizer = MultiBitLSQ(bits, scheme, tensor, **options).double()
    quantizer.load_state_dict({"step_sizes": torch.tensor(list(steps.values()), dtype=torch.float64),
                               "initialized": torch.ones(len(bits), dtype=torch.bool)})  # fmt: skip
    return quantizer


def lsq_step_gradient(x: np.ndarray, upstream: np.ndarray, s: float, q_min: int, q_max: int) -> float:
    """``sum(c * d x_hat / d s) * g``: ``round(x/s) - x/s`` inside, ``Q_N`` / ``Q_P`` outside; ``g = 1/sqrt(Q_P n)``."""
    u = x / s
    local = np.where(u < q_min, q_min, np.where(u > q_max, q_max, np.round(u) - u))
    return float((upstream * local).sum()) / math.sqrt(q_max * x.size)


# --------------------------------------------------------------------------- forward and gradients
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n_bits", [2, 3, 4, 5, 6])
def test_forward_is_the_grid_of_the_active_bit_width(n_bits: int, scheme: QuantScheme) -> None:
    rng = np.random.default_rng(n_bits)
    steps = {6: 0.011, 5: 0.023, 4: 0.05, 3: 0.1, 2: 0.3}
    quantizer = quantizer_with_steps(steps, scheme, QuantizedTensor.WEIGHT)
    quantizer.set_bits(n_bits)
    assert quantizer.n_bits == n_bits
    q_min, q_max = np_range(n_bits, scheme)
    s = steps[n_bits]
    x = s * rng.uniform(q_min - 3, q_max + 3, size=(8, 3, 5, 5))
    out = quantizer(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(out, s * np.clip(np.round(x / s), q_min, q_max), rtol=0, atol=1e-15)
    levels = np.unique(np.round(out / s))
    assert len(levels) <= 2**n_bits and levels.min() >= q_min and levels.max() <= q_max
    assert len(levels) == 2**n_bits  # 1200 samples spread over the grid and beyond reach every level


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("tensor", list(QuantizedTensor))
def test_gradients_are_ste_and_lsq(scheme: QuantScheme, tensor: QuantizedTensor) -> None:
    rng = np.random.default_rng(7)
    steps = {5: 0.04, 3: 0.2, 2: 0.5}
    quantizer = quantizer_with_steps(steps, scheme, tensor)
    for n_bits, s in steps.items():
        quantizer.set_bits(n_bits)
        x_np = rng.normal(0.2, 1.0, size=(4, 6, 3, 3))
        upstream = rng.normal(size=x_np.shape)
        x = torch.from_numpy(x_np).requires_grad_()
        quantizer.step_sizes.grad = None
        (quantizer(x) * torch.from_numpy(upstream)).sum().backward()
        q_min, q_max = np_range(n_bits, scheme)
        inside = (x_np / s >= q_min) & (x_np / s <= q_max)
        assert inside.any() and (~inside).any()
        np.testing.assert_allclose(x.grad.numpy(), np.where(inside, upstream, 0.0), rtol=1e-14, atol=0)
        expected = np.zeros(len(steps))
        expected[list(steps).index(n_bits)] = lsq_step_gradient(x_np, upstream, s, q_min, q_max)
        np.testing.assert_allclose(quantizer.step_sizes.grad.numpy(), expected, rtol=1e-12, atol=1e-15)


def test_step_gradient_is_the_finite_difference_of_the_lsq_surrogate() -> None:
    """LSQ's surrogate ``s * (clip(x/s) + r0)``, the rounding residual ``r0`` frozen at ``s0``, differentiated numerically."""
    rng = np.random.default_rng(3)
    x_np, upstream = rng.normal(size=(2, 50)), rng.normal(size=(2, 50))
    s0, q_min, q_max = 0.3, -4, 3
    quantizer = quantizer_with_steps({3: s0}, QuantScheme.SYMMETRIC, QuantizedTensor.WEIGHT)
    (quantizer(torch.from_numpy(x_np)) * torch.from_numpy(upstream)).sum().backward()
    residual = np.round(np.clip(x_np / s0, q_min, q_max)) - np.clip(x_np / s0, q_min, q_max)

    def surrogate(s: float) -> float:
        return float((upstream * s * (np.clip(x_np / s, q_min, q_max) + residual)).sum())

    h = 1e-7
    numeric = (surrogate(s0 + h) - surrogate(s0 - h)) / (2 * h) / math.sqrt(q_max * x_np.size)
    assert quantizer.step_sizes.grad.item() == pytest.approx(numeric, rel=1e-6)


def test_activation_gradient_scale_counts_the_batch() -> None:
    """The same sample repeated 4 times: 4 times the summed gradient, scaled by 1/sqrt(4) more: twice as large."""
    sample = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64).abs()
    grads = []
    for batch in (sample, sample.repeat(4, 1, 1, 1)):
        quantizer = quantizer_with_steps({4: 0.07}, QuantScheme.UNSIGNED, QuantizedTensor.ACTIVATION)
        quantizer(batch).sum().backward()
        grads.append(quantizer.step_sizes.grad.item())
    assert grads[0] != 0.0
    assert grads[1] == pytest.approx(2 * grads[0], rel=1e-12)


def test_without_grad_scaling_the_step_gradient_is_plain_lsq() -> None:
    x_np = np.random.default_rng(4).uniform(-2.0, 2.0, 101)
    quantizer = quantizer_with_steps({4: 0.1}, QuantScheme.SYMMETRIC, QuantizedTensor.WEIGHT, grad_scaling=False)
    quantizer(torch.from_numpy(x_np)).sum().backward()
    expected = lsq_step_gradient(x_np, np.ones_like(x_np), 0.1, -8, 7) * math.sqrt(7 * x_np.size)
    assert quantizer.step_sizes.grad.item() == pytest.approx(expected, rel=1e-12)


def test_step_size_clamp_from_below_only_by_default() -> None:
    x = torch.tensor([0.5, -2e-5, 3.0, 40.0], dtype=torch.float64)
    tiny = quantizer_with_steps({4: 1e-8}, QuantScheme.SYMMETRIC, QuantizedTensor.WEIGHT)
    torch.testing.assert_close(tiny(x), 1e-5 * torch.tensor([7.0, -2.0, 7.0, 7.0], dtype=torch.float64))
    tiny(x).sum().backward()
    assert tiny.step_sizes.grad.item() == 0.0  # clamped: no gradient (as the official code)
    large = quantizer_with_steps({4: 5.0}, QuantScheme.SYMMETRIC, QuantizedTensor.WEIGHT)
    torch.testing.assert_close(large(x), torch.tensor([0.0, 0.0, 5.0, 35.0], dtype=torch.float64))
    official = quantizer_with_steps({4: 5.0}, QuantScheme.SYMMETRIC, QuantizedTensor.WEIGHT, max_step_size=1.0)
    torch.testing.assert_close(official(x), torch.tensor([0.0, 0.0, 3.0, 7.0], dtype=torch.float64))
    official(x).sum().backward()
    assert official.step_sizes.grad.item() == 0.0


def test_half_precision_input_is_quantized_in_float32() -> None:
    x = torch.randn(64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    quantizer = MultiBitLSQ((4,), QuantScheme.SYMMETRIC, QuantizedTensor.WEIGHT)
    quantizer.load_state_dict({"step_sizes": torch.tensor([0.13]), "initialized": torch.ones(1, dtype=torch.bool)})
    out = quantizer(x)
    assert out.dtype == torch.bfloat16
    s = torch.tensor(0.13)
    torch.testing.assert_close(out, (s * torch.clamp(torch.round(x.float() / s), -8, 7)).to(torch.bfloat16), rtol=0, atol=0)


# --------------------------------------------------------------------------- initialisation
def test_weight_init_sets_every_bit_width_from_mean_and_std() -> None:
    rng = np.random.default_rng(5)
    weight = rng.normal(0.3, 0.8, size=(16, 8, 3, 3))
    quantizer = MultiBitLSQ(LIMPQ_BITS, QuantScheme.SYMMETRIC, QuantizedTensor.WEIGHT).double()
    quantizer.estimate_range(torch.from_numpy(weight))
    mu, sigma = weight.mean(), weight.std(ddof=1)
    for bits in LIMPQ_BITS:
        expected = max(abs(mu - 3 * sigma), abs(mu + 3 * sigma)) / 2 ** (bits - 1)
        assert quantizer.step_size_of(bits) == pytest.approx(expected, rel=1e-12)
    assert quantizer.initialized.all()


def test_activation_init_is_lazy_per_bit_width() -> None:
    rng = np.random.default_rng(6)
    first, second = np.abs(rng.normal(size=(4, 3, 5, 5))), np.abs(rng.normal(2.0, 1.0, size=(4, 3, 5, 5)))
    quantizer = MultiBitLSQ((6, 4, 2), QuantScheme.UNSIGNED, QuantizedTensor.ACTIVATION).double()
    quantizer.set_bits(4)
    quantizer(torch.from_numpy(first))
    assert quantizer.step_size_of(4) == pytest.approx(2 * first.mean() / math.sqrt(15), rel=1e-12)
    assert quantizer.initialized.tolist() == [False, True, False]
    assert quantizer.step_size_of(6) == quantizer.step_size_of(2) == 1.0
    quantizer(torch.from_numpy(second))  # already initialised: kept
    assert quantizer.step_size_of(4) == pytest.approx(2 * first.mean() / math.sqrt(15), rel=1e-12)
    quantizer.set_bits(2)
    quantizer(torch.from_numpy(second))
    assert quantizer.step_size_of(2) == pytest.approx(2 * second.mean() / math.sqrt(3), rel=1e-12)
    # between start_estimating and freeze_range every pass re-estimates the active step size
    quantizer.start_estimating()
    quantizer.set_bits(4)
    quantizer(torch.from_numpy(second))
    assert quantizer.step_size_of(4) == pytest.approx(2 * second.mean() / math.sqrt(15), rel=1e-12)
    quantizer.freeze_range()
    quantizer(torch.from_numpy(first))
    assert quantizer.step_size_of(4) == pytest.approx(2 * second.mean() / math.sqrt(15), rel=1e-12)


def test_activation_init_averages_over_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in second process whose mean|x| is 3.0: the step size uses the average of both."""

    def all_reduce(tensor: torch.Tensor, op=None) -> None:
        tensor += 3.0

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    x = torch.full((2, 8), 1.0, dtype=torch.float64)
    quantizer = MultiBitLSQ((3,), QuantScheme.UNSIGNED, QuantizedTensor.ACTIVATION).double()
    quantizer(x)
    assert quantizer.step_size_of(3) == pytest.approx(2 * (1.0 + 3.0) / 2 / math.sqrt(7), rel=1e-12)


def test_state_dict_round_trip_keeps_the_initialisation() -> None:
    source = MultiBitLSQ((4, 2), QuantScheme.UNSIGNED, QuantizedTensor.ACTIVATION)
    source.set_bits(2)
    source(torch.rand(3, 10))
    target = MultiBitLSQ((4, 2), QuantScheme.UNSIGNED, QuantizedTensor.ACTIVATION)
    target.load_state_dict(source.state_dict())
    target.set_bits(2)
    target(torch.full((3, 10), 100.0))  # initialised: not re-estimated from this batch
    assert target.step_size_of(2) == source.step_size_of(2)
    target.set_bits(4)
    target(torch.full((3, 10), 100.0))  # not initialised in the source: estimated now
    assert target.step_size_of(4) == pytest.approx(2 * 100.0 / math.sqrt(15))


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="distinct"):
        MultiBitLSQ((4, 4))
    with pytest.raises(ValueError, match="zero point"):
        MultiBitLSQ((4,), QuantScheme.ASYMMETRIC)
    with pytest.raises(ValueError, match="candidate"):
        MultiBitLSQ((4, 2)).set_bits(3)


# --------------------------------------------------------------------------- the compress_model plug-in
def tiny_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))  # fmt: skip


def compressed_tiny_cnn(setup: QuantSetup = QuantSetup.ALL) -> nn.Sequential:
    model = tiny_cnn()
    weight_quant = QuantizerConfig(n_bits=6, grad_scaling=True)
    act_quant = QuantizerConfig(n_bits=6, scheme=QuantScheme.UNSIGNED, grad_scaling=True)
    compress_model(model, CompressionSpec(weight_quant, act_quant, setup, quantizer_factory=multi_bit_lsq_factory()))
    return model


def test_factory_makes_weight_and_activation_quantizers() -> None:
    factory = multi_bit_lsq_factory((6, 4))
    weight_q = factory(QuantizerConfig(n_bits=4, scheme=QuantScheme.SYMMETRIC), (8, 3, 3, 3))
    act_q = factory(QuantizerConfig(n_bits=6, scheme=QuantScheme.UNSIGNED, learn_step_size=False), None)
    assert isinstance(weight_q, LayerQuantizer) and isinstance(act_q, LayerQuantizer)
    assert (weight_q.tensor, weight_q.n_bits, weight_q.scheme) == (QuantizedTensor.WEIGHT, 4, QuantScheme.SYMMETRIC)
    assert (act_q.tensor, act_q.n_bits, act_q.scheme) == (QuantizedTensor.ACTIVATION, 6, QuantScheme.UNSIGNED)
    assert not act_q.step_sizes.requires_grad
    with pytest.raises(ValueError, match="candidate"):
        factory(QuantizerConfig(n_bits=8), None)
    with pytest.raises(ValueError, match="per tensor"):
        factory(QuantizerConfig(n_bits=4, granularity=Granularity.per_channel()), (8, 3, 3, 3))


def test_compress_model_with_the_factory() -> None:
    model = compressed_tiny_cnn()
    layers = searchable_layers(model)
    assert list(layers) == ["0", "2", "6"]
    for layer in layers.values():
        weight = layer.weight.detach().double().numpy()
        mu, sigma = weight.mean(), weight.std(ddof=1)
        for bits in LIMPQ_BITS:  # initialised from the weight by compress_model, every bit-width
            expected = max(abs(mu - 3 * sigma), abs(mu + 3 * sigma)) / 2 ** (bits - 1)
            assert layer.weight_quantizer.step_size_of(bits) == pytest.approx(expected, rel=1e-6)
        assert not layer.input_quantizer.initialized.any()
    set_layer_bits(model, {"0": 3, "2": 5, "6": 2}, {"0": 4, "2": 2, "6": 6})
    report = layer_report(model)
    assert [(report[n]["weight_bits"], report[n]["act_bits"]) for n in layers] == [(3, 4), (5, 2), (2, 6)]
    s = layers["2"].weight_quantizer.step_size_of(5)
    weight = layers["2"].weight.detach().numpy()
    np.testing.assert_allclose(layers["2"].effective_weight().detach().numpy(),
                               s * np.clip(np.round(weight / s), -16, 15), rtol=0, atol=1e-7)  # fmt: skip
    model(torch.rand(2, 3, 8, 8))
    assert [layer.input_quantizer.initialized.tolist() for layer in layers.values()] == [
        [False, False, True, False, False], [False, False, False, False, True], [True, False, False, False, False]]
    set_uniform_bits(model, 3)
    assert {q.n_bits for q in model.modules() if isinstance(q, MultiBitLSQ)} == {3}
    with pytest.raises(KeyError, match="nope"):
        set_layer_bits(model, {"nope": 4}, {})


def test_only_the_body_is_searchable_with_float_first_and_last() -> None:
    model = compressed_tiny_cnn(QuantSetup.FP_FIRST_LAST)
    assert list(searchable_layers(model)) == ["2"]
    with pytest.raises(KeyError, match="'0'"):
        set_layer_bits(model, {"0": 4}, {})


def test_indicators_in_the_official_layout(tmp_path) -> None:
    model = compressed_tiny_cnn()
    set_uniform_bits(model, 4)
    model(torch.rand(2, 3, 8, 8))
    found = indicators(model)
    assert set(found) == {"weight", "act", "layer_name"}
    assert found["layer_name"] == ["0", "2", "6"]
    for name, layer in searchable_layers(model).items():
        assert list(found["weight"][name]) == ["6", "5", "4", "3", "2"]
        assert found["weight"][name] == dict(zip(["6", "5", "4", "3", "2"], layer.weight_quantizer.step_sizes.tolist()))
        assert found["act"][name] == dict(zip(["6", "5", "4", "3", "2"], layer.input_quantizer.step_sizes.tolist()))
    write_json(tmp_path / "indicators.json", found)
    assert read_json(tmp_path / "indicators.json") == json.loads(json.dumps(found))
