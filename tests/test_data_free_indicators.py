"""Tests for the data-free LIMPQ indicators: brute-force ranges, a direct recomputation of the output errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import studies.data_free_indicators as dfi
from quantization.quantizers import QuantScheme, params_from_range, quantize_dequantize
from quantization.range_estimators import mse_range
from studies.data_free_indicators import data_free_indicators, gaussian_relative_mse, relative_weight_errors

pytestmark = pytest.mark.usefixtures("one_thread")

BITS = (6, 5, 4, 3, 2)
LAYERS = ("stem", "depthwise", "pointwise", "fc")


class TinyNet(nn.Module):
    """Conv (bias, stride 2) -> ReLU -> depthwise conv (reflect padding) -> ReLU -> 1x1 conv -> pool -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False, padding_mode="reflect")
        self.pointwise = nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.depthwise(torch.relu(self.stem(x))))
        return self.fc(self.pointwise(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, torch.Tensor]:
    """A float64 tiny model and 6 signed 10x10 'images' (seeded)."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = TinyNet().double().eval()
    return model, torch.randn(6, 3, 10, 10, generator=generator, dtype=torch.float64)


def brute_force_relative_error(values: np.ndarray, n_bits: int, n_grid: int = 8_001) -> float:
    """Least ``sum (w - Q(w))^2 / sum w^2`` over a dense grid of symmetric thresholds ``T`` in ``(0, 1.5 max|w|]``."""
    q_min, q_max = -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1
    thresholds = np.linspace(0, 1.5 * np.abs(values).max(), n_grid)[1:]
    steps = thresholds[:, None] / q_max
    quantized = steps * np.clip(np.round(values[None, :] / steps), q_min, q_max)
    return float(((quantized - values) ** 2).sum(axis=1).min() / (values**2).sum())


@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_error_matches_a_dense_range_grid(per_channel: bool) -> None:
    weight = torch.from_numpy(np.random.default_rng(3).laplace(size=(3, 40)))
    ours = relative_weight_errors(weight, BITS, ch_axis=0 if per_channel else None)
    rows = weight.numpy() if per_channel else weight.numpy().reshape(1, -1)
    energy = (rows**2).sum()
    for index, n_bits in enumerate(BITS):
        grid = sum(brute_force_relative_error(row, n_bits) * (row**2).sum() for row in rows) / energy
        assert ours[index] <= grid * (1 + 1e-9)  # the search is optimal over every threshold
        assert ours[index] >= grid * (1 - 2e-3)  # and the dense grid comes close to it
    assert np.all(np.diff(ours) > 0)  # fewer bits, larger error


def test_weights_on_the_grid_have_no_error() -> None:
    """Weights ``k / 10`` for ``k = -4..3`` are exactly the 3-bit levels (and a subset of the 4-bit ones)."""
    weight = torch.arange(-4, 4, dtype=torch.float64).repeat(5) / 10
    errors = relative_weight_errors(weight, (4, 3, 2))
    np.testing.assert_allclose(errors[:2], 0.0, atol=1e-28)
    assert errors[2] > 0.01


def test_gaussian_noise_model_against_monte_carlo() -> None:
    samples = torch.from_numpy(np.random.default_rng(0).standard_normal(100_000))
    for n_bits, analytical in zip((4, 3, 2), gaussian_relative_mse((4, 3, 2))):
        params = params_from_range(*mse_range(samples, n_bits, QuantScheme.SYMMETRIC), n_bits, QuantScheme.SYMMETRIC)
        empirical = float((quantize_dequantize(samples, params) - samples).square().mean() / samples.square().mean())
        assert empirical == pytest.approx(analytical, rel=0.02)


def test_weight_mse_kind(tiny: tuple[nn.Module, torch.Tensor]) -> None:
    model, _ = tiny
    bits = (3, 2)
    indicators = data_free_indicators(model, LAYERS, bits, "weight-mse")
    assert indicators.layers == LAYERS and indicators.bits == bits
    assert indicators.weight.shape == indicators.act.shape == (4, 2) and indicators.weight.dtype == np.float64
    modules = dict(model.named_modules())
    for row, name in enumerate(LAYERS):
        np.testing.assert_array_equal(indicators.weight[row], relative_weight_errors(modules[name].weight, bits))
        np.testing.assert_array_equal(indicators.act[row], gaussian_relative_mse(bits))
    assert np.all(np.diff(indicators.weight, axis=1) > 0) and np.all(np.diff(indicators.act, axis=1) > 0)


def recomputed_output_errors(
    model: nn.Module, images: torch.Tensor, name: str, n_bits: int, per_channel: bool, scheme: QuantScheme | None = None
) -> tuple[float, float]:
    """Relative output errors of one layer, by running the whole model with that layer's weight, then its input,
    quantized (hooks record the layer's output). The input's ``scheme`` defaults to unsigned for a
    non-negative input, else asymmetric."""
    outputs: list[torch.Tensor] = []

    def run(net: nn.Module, quantize_input: bool = False) -> torch.Tensor:
        layer = dict(net.named_modules())[name]
        hooks = [layer.register_forward_hook(lambda _m, _i, output: outputs.append(output))]
        if quantize_input:

            def quantize(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
                x = args[0]
                chosen = scheme or (QuantScheme.UNSIGNED if bool((x >= 0).all()) else QuantScheme.ASYMMETRIC)
                return (quantize_dequantize(x, params_from_range(*mse_range(x, n_bits, chosen), n_bits, chosen)),)

            hooks.append(layer.register_forward_pre_hook(quantize))
        with torch.no_grad():
            net(images)
        for hook in hooks:
            hook.remove()
        return outputs.pop()

    reference = run(model)
    quantized = copy.deepcopy(model)
    layer = dict(quantized.named_modules())[name]
    weight = layer.weight.detach()
    axis = 0 if per_channel else None
    min_val, max_val = mse_range(weight, n_bits, QuantScheme.SYMMETRIC, ch_axis=axis)
    if per_channel:
        shape = (-1,) + (1,) * (weight.dim() - 1)
        min_val, max_val = min_val.reshape(shape), max_val.reshape(shape)
    with torch.no_grad():
        layer.weight.copy_(quantize_dequantize(weight, params_from_range(min_val, max_val, n_bits, QuantScheme.SYMMETRIC)))
    energy = reference.square().sum()
    weight_error = (run(quantized) - reference).square().sum() / energy
    act_error = (run(model, quantize_input=True) - reference).square().sum() / energy
    return float(weight_error), float(act_error)


@pytest.mark.parametrize(
    ("per_channel", "bits", "layers"),
    [
        (False, (3,), ("depthwise", "fc")),
        pytest.param(False, BITS, LAYERS, marks=pytest.mark.slow),
        pytest.param(True, BITS, LAYERS, marks=pytest.mark.slow),
    ],
)
def test_output_mse_against_a_direct_recomputation(
    tiny: tuple[nn.Module, torch.Tensor], per_channel: bool, bits: tuple[int, ...], layers: tuple[str, ...]
) -> None:
    model, images = tiny
    state = copy.deepcopy(model.state_dict())
    indicators = data_free_indicators(model, layers, bits, "output-mse", images=images, per_channel=per_channel)
    for row, name in enumerate(layers):
        for column, n_bits in enumerate(bits):
            weight_error, act_error = recomputed_output_errors(model, images, name, n_bits, per_channel)
            assert indicators.weight[row, column] == pytest.approx(weight_error, rel=1e-9), (name, n_bits)
            assert indicators.act[row, column] == pytest.approx(act_error, rel=1e-9), (name, n_bits)
    assert np.all(np.diff(indicators.weight, axis=1) > 0) and np.all(np.diff(indicators.act, axis=1) > 0)  # in bits
    for key, tensor in model.state_dict().items():  # the model is left as it was
        assert torch.equal(tensor, state[key]), key


@pytest.mark.slow
def test_output_mse_chunks_and_act_scheme(tiny: tuple[nn.Module, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> None:
    model, images = tiny
    whole = data_free_indicators(model, LAYERS, (4, 2), "output-mse", images=images)
    monkeypatch.setattr(dfi, "_MAX_CHUNK_ELEMENTS", 1)  # one image at a time
    chunked = data_free_indicators(model, LAYERS, (4, 2), "output-mse", images=images)
    np.testing.assert_allclose(chunked.weight, whole.weight, rtol=1e-12)
    np.testing.assert_allclose(chunked.act, whole.act, rtol=1e-12)
    # The stem's input is signed (asymmetric by default); forcing unsigned clips its negative half.
    forced = data_free_indicators(model, ["stem"], (4, 2), "output-mse", images=images, act_scheme="unsigned")
    np.testing.assert_array_equal(forced.weight[0], whole.weight[0])
    assert np.all(forced.act[0] > 2 * whole.act[0])
    for column, n_bits in enumerate((4, 2)):
        _, act_error = recomputed_output_errors(model, images, "stem", n_bits, False, QuantScheme.UNSIGNED)
        assert forced.act[0, column] == pytest.approx(act_error, rel=1e-9)


@pytest.mark.slow
def test_output_mse_defaults_to_the_sample_photos(tiny: tuple[nn.Module, torch.Tensor]) -> None:
    from utils.images import sample_photo_batch

    model, _ = tiny
    default = data_free_indicators(model, ["pointwise"], (3,), "output-mse")
    explicit = data_free_indicators(model, ["pointwise"], (3,), "output-mse", images=sample_photo_batch().double())
    np.testing.assert_array_equal(default.weight, explicit.weight)
    np.testing.assert_array_equal(default.act, explicit.act)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"kind": "hessian"}, "unknown indicator kind 'hessian'"),
        ({"bits": (4, 4)}, "distinct"),
        ({"bits": (9,)}, r"integers in 2\.\.8"),
        ({"bits": (1,)}, r"integers in 2\.\.8"),
        ({"layers": ("stem", "stem")}, "more than once"),
        ({"layers": ("stems",)}, "unknown layer 'stems'"),
        ({"images": torch.zeros(1, 3, 8, 8)}, "use no data"),
    ],
)
def test_errors(tiny: tuple[nn.Module, torch.Tensor], arguments: dict, message: str) -> None:
    model, _ = tiny
    call = {"layers": LAYERS, "bits": BITS, "kind": "weight-mse"} | arguments
    with pytest.raises(ValueError, match=message):
        data_free_indicators(model, **call)
