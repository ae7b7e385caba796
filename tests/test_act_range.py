"""The data-free batch-norm activation ranges (quantization/bn_ranges.py) against a hand computation on a tiny residual
net, and against the activations the net really produces."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.quantized import CompressionSpec, QuantSetup, compress_model, compressed_layers
from quantization.bn_ranges import (
    BatchNormRangeError,
    layer_input_intervals,
    parse_act_range,
    set_batch_norm_input_ranges,
)
from quantization.fake_quant import QuantizerConfig
from quantization.quantizers import QuantScheme

N_SIGMA = 6.0


class TinyResidualNet(nn.Module):
    """stem conv-bn-relu; an identity block; a projection block; average pool; linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv4, self.bn4 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.down = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.conv0(x)))
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)
        x = F.relu(self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x))))) + self.down(x))
        return self.fc(self.pool(x).flatten(1))


def tiny_net(seed: int = 0) -> TinyResidualNet:
    """Random affine parameters, some scales negative."""
    torch.manual_seed(seed)
    net = TinyResidualNet()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.randn(module.num_features))
                module.bias.copy_(torch.randn(module.num_features))
    return net.eval()


def compressed(net: nn.Module, n_bits: int = 4) -> nn.Module:
    spec = CompressionSpec(weight_quant=None, act_quant=QuantizerConfig(n_bits=n_bits, scheme=QuantScheme.ASYMMETRIC),
                           quant_setup=QuantSetup.ALL)  # fmt: skip
    compress_model(net, spec)
    return net


def bn_high(norm: nn.BatchNorm2d) -> np.ndarray:
    return norm.bias.detach().double().numpy() + N_SIGMA * np.abs(norm.weight.detach().double().numpy())


def bn_low(norm: nn.BatchNorm2d) -> np.ndarray:
    return norm.bias.detach().double().numpy() - N_SIGMA * np.abs(norm.weight.detach().double().numpy())


def hand_intervals(net: TinyResidualNet) -> dict[str, tuple[float, float] | None]:
    """Per channel by hand: ReLU clips at 0, a residual sum adds both branches' intervals; per tensor at a layer input."""
    relu = lambda v: np.maximum(v, 0.0)
    stem = (relu(bn_low(net.bn0)), relu(bn_high(net.bn0)))
    inner1 = (relu(bn_low(net.bn1)), relu(bn_high(net.bn1)))
    block1 = (relu(bn_low(net.bn2) + stem[0]), relu(bn_high(net.bn2) + stem[1]))
    inner2 = (relu(bn_low(net.bn3)), relu(bn_high(net.bn3)))
    block2 = (relu(bn_low(net.bn4) + bn_low(net.down[1])), relu(bn_high(net.bn4) + bn_high(net.down[1])))
    hull = lambda pair: (float(pair[0].min()), float(pair[1].max()))
    return {"conv0": None, "conv1": hull(stem), "conv2": hull(inner1), "conv3": hull(block1), "conv4": hull(inner2),
            "down.0": hull(block1), "fc": hull(block2)}  # fmt: skip


def test_parse_act_range() -> None:
    assert parse_act_range("calibrate") is None
    assert parse_act_range("bn:6") == 6.0 and parse_act_range("bn:2.5") == 2.5
    for bad in ("bn:", "bn:0", "bn:-1", "bn:x", "bn:inf", "bn:nan", "6", "minmax"):
        with pytest.raises(ValueError, match="bn:N"):
            parse_act_range(bad)


def test_intervals_equal_the_hand_computation_with_the_residual_sums() -> None:
    net = tiny_net()
    expected = hand_intervals(net)
    found = layer_input_intervals(compressed(net), N_SIGMA)
    assert found.keys() == expected.keys()
    for name, interval in expected.items():
        if interval is None:
            assert found[name] is None, name
        else:
            np.testing.assert_allclose(found[name], interval, rtol=1e-12, err_msg=name)
    # the residual sums matter: the second BN of a block alone bounds less than the sum
    assert found["conv3"][1] > float(np.maximum(bn_high(net.bn2), 0).max())


@pytest.mark.slow
def test_quantizers_get_the_unsigned_grid_of_the_bound_and_the_image_stays_float() -> None:
    net = compressed(tiny_net(), n_bits=4)
    intervals = layer_input_intervals(net, N_SIGMA)
    assert set_batch_norm_input_ranges(net, N_SIGMA) == ["conv0"]
    layers = compressed_layers(net)
    assert layers["conv0"].input_quantizer is None
    for name in ("conv1", "conv3", "fc"):
        quantizer = layers[name].input_quantizer
        low, high = intervals[name]
        assert low == 0.0
        assert not quantizer.estimating
        assert float(quantizer.step_size.detach()) == pytest.approx(high / 15, rel=1e-6)
        assert float(quantizer.zero_point) == 0.0
    x = torch.randn(2, 3, 8, 8)
    before = [layer.input_quantizer.step_size.clone() for layer in layers.values() if layer.input_quantizer is not None]
    net(x)  # frozen: a forward pass does not move the ranges
    after = [layer.input_quantizer.step_size for layer in layers.values() if layer.input_quantizer is not None]
    assert all(torch.equal(b, a) for b, a in zip(before, after))


@pytest.mark.slow
@torch.no_grad()
def test_real_activations_rarely_exceed_the_bound_unlike_the_second_batch_norm_alone() -> None:
    net = tiny_net(0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 16, 16, generator=generator) * 2 + 0.5
    net.train()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    net(images)  # running statistics of these images: the batch norms normalise them
    net.eval()
    inputs: dict[str, torch.Tensor] = {}
    hooks = [getattr(net, name).register_forward_pre_hook(lambda _m, args, name=name: inputs.__setitem__(name, args[0]))
             for name in ("conv1", "conv3", "fc")]  # fmt: skip
    net(torch.randn(64, 3, 16, 16, generator=generator) * 2 + 0.5)
    for hook in hooks:
        hook.remove()
    intervals = hand_intervals(net)
    for name, activation in inputs.items():
        low, high = intervals[name]
        share = float(((activation > high) | (activation < low)).double().mean())
        assert share < 1e-3, (name, share)
    naive = float(np.maximum(bn_high(net.bn2), 0).max())  # the PSGD code's bound for the block's output
    assert float(inputs["conv3"].max()) > naive  # exceeded by a share of the activations (0.4% here)


def test_a_model_without_batch_norm_is_refused_in_one_line() -> None:
    net = compressed(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)))
    with pytest.raises(BatchNormRangeError, match="no batch norm") as error:
        set_batch_norm_input_ranges(net, N_SIGMA)
    assert "\n" not in str(error.value)
