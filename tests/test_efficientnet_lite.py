"""Tests for our EfficientNet-Lite0/1/2 definitions (bundled ImageNet weights) and the offline photo utilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from models.efficientnet_lite import (
    LITE0_STAGES,
    SamePad2d,
    bundled_weights_path,
    efficientnet_lite,
    efficientnet_lite0,
    eval_sizes,
    scaled_stages,
)
from utils.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SAMPLE_PHOTOS,
    imagenet_class_names,
    imagenet_eval_transform,
    load_sample_photo,
    sample_photo_batch,
)

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967
TWO_WHEELERS = {665, 670, 671}  # moped, motor scooter, mountain bike


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    return torch.load(bundled_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return efficientnet_lite0(pretrained=True)


@pytest.fixture(scope="module")
def probs(model: nn.Module) -> dict[str, torch.Tensor]:
    names = ("chelsea", "coffee")
    with torch.no_grad():
        p = model(sample_photo_batch(names)).softmax(dim=1)
    return dict(zip(names, p))


def test_strict_load_and_module_names(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    fresh = efficientnet_lite0(pretrained=False)
    result = fresh.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(model.state_dict()) == set(state_dict)
    modules = dict(model.named_modules())
    assert isinstance(modules["_blocks.5._project_conv"], nn.Conv2d)
    assert "_blocks.0._expand_conv" not in modules and "_blocks.1._expand_conv" in modules
    assert len(model._blocks) == 16
    assert not model.training
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, state_dict[name], rtol=0, atol=0, msg=name)


def test_architecture_details(model: nn.Module) -> None:
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 for m in bns)
    # Every stride-2 conv is unpadded and preceded by TensorFlow 'SAME' padding.
    strided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
    assert len(strided) == 5 and all(m.padding == (0, 0) for m in strided)
    assert sum(isinstance(m, SamePad2d) for m in model.modules()) == 5
    assert [b.has_residual for b in model._blocks].count(True) == 9
    pad = SamePad2d(kernel_size=5, stride=2)
    assert pad(torch.zeros(1, 1, 28, 28)).shape[-2:] == (31, 31)  # (1, 2) padding for even inputs
    assert model(torch.zeros(2, 3, 224, 224)).shape == (2, 1000)


def test_parameter_count_matches_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    n_buffers = sum(b.numel() for b in model.buffers())
    assert n_params + n_buffers == sum(t.numel() for t in state_dict.values())
    buffer_suffixes = ("running_mean", "running_var", "num_batches_tracked")
    assert n_params == sum(t.numel() for k, t in state_dict.items() if not k.endswith(buffer_suffixes))
    assert n_params == 4_652_008


def test_chelsea_is_a_cat(probs: dict[str, torch.Tensor]) -> None:
    top3 = probs["chelsea"].topk(3).indices.tolist()
    assert all(c in CAT_CLASSES for c in top3), top3


def test_coffee_is_espresso(probs: dict[str, torch.Tensor]) -> None:
    assert probs["coffee"].argmax().item() == ESPRESSO
    assert probs["coffee"][ESPRESSO] > 0.5


def test_random_init_is_deterministic() -> None:
    rng_state = torch.get_rng_state()
    a = efficientnet_lite0(pretrained=False).state_dict()
    b = efficientnet_lite0(pretrained=False).state_dict()
    assert torch.equal(rng_state, torch.get_rng_state())  # global RNG untouched
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_eval_transform_matches_manual_numpy() -> None:
    image = load_sample_photo("chelsea")
    assert image.size == (451, 300)  # (width, height)
    out = imagenet_eval_transform()(image)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32

    # Shorter side -> 256 (bilinear), centre crop 224, scale to [0, 1], normalise per channel.
    resized = np.asarray(image.resize((int(256 * 451 / 300), 256), Image.BILINEAR), dtype=np.float64)
    top, left = round((256 - 224) / 2), round((resized.shape[1] - 224) / 2)
    crop = resized[top : top + 224, left : left + 224] / 255.0
    expected = ((crop - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(2, 0, 1)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)


def test_sample_photos_and_class_names() -> None:
    for name in SAMPLE_PHOTOS:
        image = load_sample_photo(name)
        assert image.mode == "RGB" and min(image.size) >= 224
    with pytest.raises(ValueError):
        load_sample_photo("camera")  # greyscale
    batch = sample_photo_batch(SAMPLE_PHOTOS[:2], image_size=160)
    assert batch.shape == (2, 3, 160, 160) and batch.dtype == torch.float32
    names = imagenet_class_names()
    assert len(names) == 1000 and names[ESPRESSO] == "espresso" and names[285] == "Egyptian cat"


# --------------------------------------------------------------------------- Lite1 and Lite2


def test_scaled_block_tables() -> None:
    """Width/depth scaling as in the Lite models: channels to multiples of 8, first/last stage repeats fixed."""
    assert scaled_stages(1.0, 1.0) == LITE0_STAGES
    lite1 = scaled_stages(1.0, 1.1)
    assert [s.repeats for s in lite1] == [1, 3, 3, 4, 4, 5, 1]  # ceil(1.1 * [2, 2, 3, 3, 4])
    assert [s.out_channels for s in lite1] == [s.out_channels for s in LITE0_STAGES]
    lite2 = scaled_stages(1.1, 1.2)
    assert [s.repeats for s in lite2] == [1, 3, 3, 4, 4, 5, 1]  # ceil(1.2 * [2, 2, 3, 3, 4])
    # round(c * 1.1 / 8) * 8 (bumped by 8 if below 0.9 c * 1.1): 17.6->16, 26.4->24, 44->48, 88, 123.2->120, ...
    assert [s.out_channels for s in lite2] == [16, 24, 48, 88, 120, 208, 352]
    assert lite2[0].in_channels == 32 and [s.in_channels for s in lite2[1:]] == [s.out_channels for s in lite2[:-1]]
    assert [eval_sizes(v) for v in (0, 1, 2)] == [(224, 256), (240, 272), (260, 292)]
    with pytest.raises(ValueError, match="Lite3"):
        eval_sizes(3)


@pytest.mark.parametrize(
    ("variant", "n_params", "out_channels"),
    [(1, 5_416_680, 320), (2, 6_092_072, 352)],  # the papers' 5.4M and 6.1M parameters
)
@pytest.mark.slow
def test_lite1_lite2_load_and_recognise_photos(variant: int, n_params: int, out_channels: int) -> None:
    state_dict = torch.load(bundled_weights_path(variant), map_location="cpu", weights_only=True)
    model = efficientnet_lite(variant)
    assert not model.training and set(model.state_dict()) == set(state_dict)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, state_dict[name], rtol=0, atol=0, msg=name)
    assert len(model._blocks) == 21 and model._conv_head.in_channels == out_channels
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert n_params == sum(
        t.numel()
        for k, t in state_dict.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )

    size, resize = eval_sizes(variant)
    transform = imagenet_eval_transform(image_size=size, resize_size=resize)
    names = ("chelsea", "coffee", "stereo_motorcycle")
    with torch.no_grad():
        probs = model(torch.stack([transform(load_sample_photo(name)) for name in names])).softmax(dim=1)
    chelsea, coffee, motorcycle = probs
    assert all(c in CAT_CLASSES for c in chelsea.topk(3).indices.tolist())
    assert coffee.argmax().item() == ESPRESSO and coffee[ESPRESSO] > 0.4
    assert motorcycle.argmax().item() in TWO_WHEELERS


def test_lite1_random_init_is_deterministic_and_shaped() -> None:
    a, b = efficientnet_lite(1, pretrained=False), efficientnet_lite(1, pretrained=False)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert a(torch.zeros(1, 3, 240, 240)).shape == (1, 1000)
