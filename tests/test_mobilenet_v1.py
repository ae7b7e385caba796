"""Tests for MobileNet-V1: the paper's parameter and multiply-add counts, its structure and its registry entry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import WeightsUnavailableError, is_weights_available, list_models, load_model, model_weights
from models.mobilenet_v1 import MobileNetV1, mobilenet_v1
from models.quantized import compressible_layers

pytestmark = pytest.mark.usefixtures("one_thread")

# Howard et al. (2017), Table 1, written out independently of the module: (depthwise stride, pointwise output channels).
PAPER_BLOCKS = [(1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512)] + [(1, 512)] * 5 + [(2, 1024), (1, 1024)]
# Table 6 of the paper: width multiplier -> (million multiply-adds, million parameters), at 224 px.
PAPER_COSTS = {1.0: (569, 4.2), 0.75: (325, 2.6), 0.5: (149, 1.3), 0.25: (41, 0.5)}


def closed_form_costs(width: float, num_classes: int = 1000, image_size: int = 224) -> tuple[int, int]:
    """``(parameters, multiply-adds)`` of MobileNet-V1 counted layer by layer from the paper's table.

    Convolutions have no bias; every one is followed by a batch norm (2 parameters per channel).
    A k x k convolution producing ``(h, h, c_out)`` from ``c_in / groups`` inputs per output costs
    ``h^2 c_out k^2 c_in / groups`` multiply-adds; the classifier ``c_in * classes``.
    """

    def channels(c: int) -> int:
        return max(8, int(c * width))

    size = image_size // 2
    c_in = channels(32)
    params = 3 * 9 * c_in + 2 * c_in
    macs = size * size * c_in * 9 * 3
    for stride, c in PAPER_BLOCKS:
        c_out = channels(c)
        size //= stride
        params += 9 * c_in + 2 * c_in + c_in * c_out + 2 * c_out
        macs += size * size * (9 * c_in + c_in * c_out)
        c_in = c_out
    params += c_in * num_classes + num_classes
    macs += c_in * num_classes
    return params, macs


def hooked_macs(model: nn.Module, image_size: int = 224) -> int:
    """Multiply-adds of one image counted by forward hooks on every Conv2d and Linear layer."""
    total = 0

    def count(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += output[0].numel() * per_output
        else:
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for handle in handles:
        handle.remove()
    return total


@pytest.fixture(scope="module")
def model() -> MobileNetV1:
    return mobilenet_v1()


def test_width_one_matches_the_paper(model: MobileNetV1) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    params, macs = closed_form_costs(1.0)
    assert n_params == params == 4_231_976  # the published 4.2 M (4.23 M)
    assert hooked_macs(model) == macs
    assert round(macs / 1e6) == 569


@pytest.mark.parametrize("width", [0.75, 0.5, 0.25])
def test_width_multiplier_matches_the_paper(width: float) -> None:
    model = MobileNetV1(width=width, num_classes=1000).eval()
    params, macs = closed_form_costs(width)
    assert sum(p.numel() for p in model.parameters()) == params
    assert hooked_macs(model) == macs
    assert (round(macs / 1e6), round(params / 1e6, 1)) == PAPER_COSTS[width]


def test_structure_and_output_shape(model: MobileNetV1) -> None:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 27 and len(linears) == 1
    depthwise = [m for m in convs if m.groups > 1]
    assert len(depthwise) == 13 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert [m.stride[0] for m in depthwise] == [stride for stride, _ in PAPER_BLOCKS]
    assert [m.out_channels for m in convs if m.kernel_size == (1, 1)] == [c for _, c in PAPER_BLOCKS]
    assert all(m.bias is None for m in convs) and sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 27
    with torch.no_grad():
        assert model.forward_features(torch.zeros(1, 3, 224, 224)).shape == (1, 1024, 7, 7)
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 1000)
    layers, skipped = compressible_layers(model)
    assert len(layers) == 28 and not skipped
    assert list(layers)[:3] == ["conv_stem", "blocks.0.conv_dw", "blocks.0.conv_pw"] and list(layers)[-1] == "fc"


def test_options_and_errors() -> None:
    small = MobileNetV1(width=0.25, num_classes=10)
    assert small.conv_stem.out_channels == 8 and small.fc.in_features == 256 and small.fc.out_features == 10
    with torch.no_grad():
        assert small(torch.zeros(1, 3, 64, 64)).shape == (1, 10)
    with pytest.raises(ValueError, match="width multiplier must be positive"):
        MobileNetV1(width=0.0)


def test_registry_entry_is_random_and_deterministic(model: MobileNetV1) -> None:
    rng_state = torch.get_rng_state()
    first = load_model("mobilenet_v1", pretrained=False)
    second = load_model("mobilenet_v1", pretrained=False)
    assert torch.equal(rng_state, torch.get_rng_state())
    assert not first.training and isinstance(first, MobileNetV1)
    for (name, x), (_, y) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(x, y), name
    assert "mobilenet_v1" in list_models("classification") and model_weights("mobilenet_v1") is None
    assert not is_weights_available("mobilenet_v1")


def test_pretrained_is_refused_in_one_line() -> None:
    with pytest.raises(WeightsUnavailableError, match=r"^mobilenet_v1: no pretrained weights exist offline") as info:
        load_model("mobilenet_v1", pretrained=True)
    assert "\n" not in str(info.value)
