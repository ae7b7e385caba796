"""Tests of the layer input matrices (models/layer_inputs.py) and calibration sampling (utils/calibration.py)."""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from torch import nn

from models.layer_inputs import (
    PatchMismatchError,
    capture_layer_inputs,
    check_patches,
    gram_matrices,
    layer_output_from_patches,
    padding_amounts,
    patch_matrix,
)
from models.registry import load_model
from utils.calibration import load_calibration_images, sample_image_files
from utils.images import SAMPLE_PHOTOS, imagenet_eval_transform, sample_photo_batch

# 8 RGB photos bundled with scikit-image (no download): the 5 SAMPLE_PHOTOS and 3 more.
EIGHT_PHOTOS = (*SAMPLE_PHOTOS, "hubble_deep_field", "immunohistochemistry", "retina")


def conv_output_rows(output: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N * prod(spatial), C), batch then spatial row-major."""
    return output.movedim(1, -1).reshape(-1, output.shape[1])


def naive_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patch matrix by explicit loops over positions and kernel offsets, padding with F.pad as nn.ConvNd does."""
    mode = {"zeros": "constant"}.get(module.padding_mode, module.padding_mode)
    x = nn.functional.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    groups, per_group = module.groups, module.in_channels // module.groups
    out_shape = [
        (size - d * (k - 1) - 1) // s + 1
        for size, k, s, d in zip(x.shape[2:], module.kernel_size, module.stride, module.dilation)
    ]
    rows = []
    for n in range(x.shape[0]):
        for out_index in np.ndindex(*out_shape):
            row = torch.empty(groups, per_group, *module.kernel_size, dtype=x.dtype)
            for kernel_index in np.ndindex(*module.kernel_size):
                spatial = [
                    o * s + k * d for o, k, s, d in zip(out_index, kernel_index, module.stride, module.dilation)
                ]
                values = x[(n, slice(None), *spatial)].reshape(groups, per_group)
                row[(slice(None), slice(None), *kernel_index)] = values
            rows.append(row.reshape(groups, -1))
    return torch.stack(rows, dim=1)


CONVS = {
    "conv1d_strided_padded": lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2),
    "conv1d_dilated_grouped_circular":
        lambda: nn.Conv1d(4, 8, 3, dilation=2, padding=3, groups=2, padding_mode="circular"),
    "conv1d_depthwise_reflect": lambda: nn.Conv1d(5, 10, 4, stride=3, padding=2, groups=5, padding_mode="reflect"),
    "conv2d_strided_padded_nonsquare": lambda: nn.Conv2d(3, 5, (3, 2), stride=(2, 3), padding=(1, 2)),
    "conv2d_reflect_dilated": lambda: nn.Conv2d(4, 6, 3, padding=(2, 1), dilation=(2, 1), padding_mode="reflect"),
    "conv2d_circular_grouped": lambda: nn.Conv2d(6, 4, (2, 3), stride=2, padding=1, groups=2, padding_mode="circular"),
    "conv2d_replicate": lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="replicate", bias=False),
    "conv2d_depthwise_stride2": lambda: nn.Conv2d(6, 6, 3, stride=2, groups=6, bias=False),
    "conv2d_same_even_kernel_dilated": lambda: nn.Conv2d(3, 4, (4, 3), padding="same", dilation=(3, 2)),
    "conv2d_same_reflect": lambda: nn.Conv2d(3, 4, (2, 5), padding="same", padding_mode="reflect"),
    "conv2d_valid": lambda: nn.Conv2d(3, 4, (2, 3), padding="valid"),
    "conv2d_1x1": lambda: nn.Conv2d(8, 3, 1),
    "conv3d_strided_padded": lambda: nn.Conv3d(2, 3, (2, 3, 1), stride=(1, 2, 2), padding=(1, 0, 1)),
    "conv3d_grouped_dilated_reflect":
        lambda: nn.Conv3d(4, 6, 2, dilation=(1, 2, 1), padding=1, groups=2, padding_mode="reflect"),
    "conv3d_depthwise_circular_same":
        lambda: nn.Conv3d(3, 3, (3, 2, 3), padding="same", groups=3, padding_mode="circular"),
}  # fmt: skip


def make_conv(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    module = CONVS[name]().double()
    spatial = {1: (13,), 2: (9, 8), 3: (5, 6, 7)}[len(module.kernel_size)]
    return module, torch.randn(2, module.in_channels, *spatial, dtype=torch.float64)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("name", CONVS)
def test_conv_patches_reproduce_layer_output(name: str) -> None:
    module, x = make_conv(name)
    patches = patch_matrix(module, x)
    expected = conv_output_rows(module(x).detach())
    fan_in = module.in_channels // module.groups * int(np.prod(module.kernel_size))
    assert patches.shape == (module.groups, expected.shape[0], fan_in)
    torch.testing.assert_close(layer_output_from_patches(module, patches), expected, rtol=1e-12, atol=1e-12)
    # Each channel separately, as the bounds use it: A[g] @ w_c + b_c.
    per_group = module.out_channels // module.groups
    for c in range(module.out_channels):
        column = patches[c // per_group] @ module.weight[c].detach().reshape(-1)
        if module.bias is not None:
            column = column + module.bias[c].detach()
        torch.testing.assert_close(column, expected[:, c], rtol=1e-12, atol=1e-12)
    check_patches(module, x, patches)


@pytest.mark.parametrize("name", CONVS)
@pytest.mark.slow
def test_conv_patches_equal_naive_loops(name: str) -> None:
    module, x = make_conv(name)
    torch.testing.assert_close(patch_matrix(module, x), naive_patches(module, x), rtol=0, atol=0)


@pytest.mark.parametrize("name", CONVS)
def test_padding_amounts_match_torch(name: str) -> None:
    module, _ = make_conv(name)
    flat = [amount for pair in reversed(padding_amounts(module)) for amount in pair]
    assert flat == list(module._reversed_padding_repeated_twice)


def test_unbatched_conv_input() -> None:
    module, x = make_conv("conv2d_circular_grouped")
    patches = patch_matrix(module, x[0])
    torch.testing.assert_close(patches, patch_matrix(module, x[:1]), rtol=0, atol=0)
    check_patches(module, x[0], patches)


@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 5), (5,)])
def test_linear_patches(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    module = nn.Linear(5, 4).double()
    x = torch.randn(*shape, dtype=torch.float64)
    patches = patch_matrix(module, x)
    assert patches.shape == (1, x.numel() // 5, 5)
    expected = module(x).detach().reshape(-1, 4)
    torch.testing.assert_close(layer_output_from_patches(module, patches), expected, rtol=1e-12, atol=1e-12)
    check_patches(module, x, patches)


def test_check_patches_catches_wrong_geometry() -> None:
    """Patches built ignoring stride and padding (the paper code's bug) are rejected."""
    module, x = make_conv("conv2d_strided_padded_nonsquare")
    wrong = nn.Conv2d(3, 5, (3, 2)).double()
    with pytest.raises(PatchMismatchError, match="shape"):
        check_patches(module, x, patch_matrix(wrong, x))
    same_size, y = make_conv("conv2d_same_reflect")
    zero_padded = nn.Conv2d(3, 4, (2, 5), padding="same").double()
    with pytest.raises(PatchMismatchError, match="differ from the layer output at position"):
        check_patches(same_size, y, patch_matrix(zero_padded, y))


def test_unsupported_modules_and_bad_inputs() -> None:
    with pytest.raises(ValueError, match="ConvTranspose2d is not supported"):
        patch_matrix(nn.ConvTranspose2d(2, 3, 3), torch.randn(1, 2, 5, 5))
    with pytest.raises(ValueError, match="input channels"):
        patch_matrix(nn.Conv2d(2, 3, 3), torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="Linear with 5 inputs"):
        patch_matrix(nn.Linear(5, 2), torch.randn(3, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_gram_matrices_equal_independent_products(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    patches = torch.randn(3, 1000, 7).to(dtype)
    reference = np.stack([a.T @ a for a in patches.double().numpy()])
    for chunk_elements in (2**24, 50, 1):  # one chunk, 2 positions per chunk, 1 position per chunk
        gram = gram_matrices(patches, chunk_elements=chunk_elements)
        assert gram.dtype == torch.float64 and gram.shape == (3, 7, 7)
        np.testing.assert_allclose(gram.numpy(), reference, rtol=1e-12, atol=1e-12)


def test_gram_matrices_of_conv_patches() -> None:
    module, x = make_conv("conv2d_circular_grouped")
    patches = patch_matrix(module, x)
    gram = gram_matrices(patches, chunk_elements=64)
    for g in range(module.groups):
        a = naive_patches(module, x)[g].numpy()
        np.testing.assert_allclose(gram[g].numpy(), a.T @ a, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- capture on a real model


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    return load_model("efficientnet_lite0")


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return sample_photo_batch(EIGHT_PHOTOS)


LITE0_LAYERS = {
    # name: (groups, fan_in, out_channels, output size)
    "_blocks.5._project_conv": (1, 240, 80, 14),
    "_blocks.1._depthwise_conv": (96, 9, 96, 56),
}


@pytest.mark.slow
def test_capture_on_efficientnet_lite0(lite0: nn.Module, photos: torch.Tensor) -> None:
    modules = dict(lite0.named_modules())
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in LITE0_LAYERS}
    handles = [
        modules[name].register_forward_hook(lambda _m, _args, out, name=name: outputs[name].append(out.clone()))
        for name in LITE0_LAYERS
    ]
    try:
        inputs = capture_layer_inputs(lite0, list(LITE0_LAYERS), photos, batch_size=3)
    finally:
        for handle in handles:
            handle.remove()
    assert set(inputs) == set(LITE0_LAYERS)
    assert inputs["_blocks.1._depthwise_conv"].shape == (8, 96, 113, 113)  # 112 + SamePad2d's 0 before, 1 after
    for name, (groups, fan_in, out_channels, out_size) in LITE0_LAYERS.items():
        layer, x = modules[name], inputs[name]
        assert not x.is_inference() and not x.requires_grad
        patches = patch_matrix(layer, x)
        assert patches.shape == (groups, 8 * out_size * out_size, fan_in)
        output = conv_output_rows(torch.cat(outputs[name]))  # what the layer produced inside the model
        assert output.shape == (8 * out_size * out_size, out_channels)
        # float32: products of a different summation order, compared at the output's scale.
        scale = output.abs().max().item()
        torch.testing.assert_close(layer_output_from_patches(layer, patches), output, rtol=1e-5, atol=1e-5 * scale)
        check_patches(layer, x, patches)
        # float64 copy of the layer: exact up to float64 rounding.
        layer64, x64 = copy.deepcopy(layer).double(), x.double()
        patches64 = patch_matrix(layer64, x64)
        torch.testing.assert_close(patches64, patches.double(), rtol=0, atol=0)
        expected64 = conv_output_rows(layer64(x64).detach())
        torch.testing.assert_close(layer_output_from_patches(layer64, patches64), expected64, rtol=1e-12, atol=1e-12)
        check_patches(layer64, x64, patches64)


@pytest.mark.slow
def test_capture_batches_and_restores_state(lite0: nn.Module, photos: torch.Tensor) -> None:
    name = "_blocks.5._project_conv"
    lite0.train()
    try:
        whole = capture_layer_inputs(lite0, [name], photos[:4], batch_size=4)[name]
        batched = capture_layer_inputs(lite0, [name, name], photos[:4], batch_size=3)[name]
        assert lite0.training and all(m.training for m in lite0.modules())
    finally:
        lite0.eval()
    torch.testing.assert_close(batched, whole, rtol=1e-5, atol=1e-5)
    assert not any(m._forward_pre_hooks for m in lite0.modules())


def test_unknown_and_unsupported_layer_names(lite0: nn.Module, photos: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"unknown layer '_blocks.5._projct_conv'.*closest: _blocks.5._project_conv"):
        capture_layer_inputs(lite0, ["_blocks.5._projct_conv"], photos[:1])
    with pytest.raises(ValueError, match="'_blocks.5._bn0' is a BatchNorm2d; only Conv1d, Conv2d, Conv3d and Linear"):
        capture_layer_inputs(lite0, ["_blocks.5._bn0"], photos[:1])
    with pytest.raises(ValueError, match="no layer names"):
        capture_layer_inputs(lite0, [], photos[:1])
    assert not any(m._forward_pre_hooks for m in lite0.modules())


class Failing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.conv(x)
        raise RuntimeError("boom")


def test_hooks_removed_when_forward_raises() -> None:
    model = Failing()
    with pytest.raises(RuntimeError, match="boom"):
        capture_layer_inputs(model, ["conv"], torch.randn(2, 3, 5, 5))
    assert not model.conv._forward_pre_hooks


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        return self.attention(y, y, y, need_weights=False)[0]


def test_layer_never_called_is_an_error() -> None:
    """nn.MultiheadAttention uses out_proj's weight functionally: out_proj's forward never runs."""
    model = SelfAttention()
    assert capture_layer_inputs(model, ["proj"], torch.randn(3, 5, 4))["proj"].shape == (3, 5, 4)
    with pytest.raises(ValueError, match="'attention.out_proj' was not called"):
        capture_layer_inputs(model, ["proj", "attention.out_proj"], torch.randn(3, 5, 4))


def test_linear_capture_with_3d_inputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x = torch.randn(5, 3, 4)
    captured = capture_layer_inputs(model, ["2"], x, batch_size=2)["2"]
    # Batches of 2, 2 and 1 samples: BLAS may block (and so round) each batch size differently, so both the
    # captured input and a whole-batch forward are compared with an exact float64 reference, within the
    # float32 error bound of a length-K dot product plus bias: |y - y64| <= (K + 1) eps sum_i |x_i w_i| + |b|.
    layer = model[0]
    weight64, bias64 = layer.weight.detach().double(), layer.bias.detach().double()
    reference = torch.relu(x.double() @ weight64.T + bias64)  # relu is 1-Lipschitz: the bound carries over
    magnitude = x.double().abs() @ weight64.abs().T + bias64.abs()
    bound = (layer.in_features + 1) * torch.finfo(torch.float32).eps * magnitude
    for actual in (captured, torch.relu(layer(x)).detach()):
        assert actual.shape == reference.shape and actual.dtype == torch.float32
        assert bool(((actual.double() - reference).abs() <= bound).all())
    assert patch_matrix(model[2], captured).shape == (1, 15, 6)


# --------------------------------------------------------------------------- calibration images


def write_image_folder(root: Path, n_classes: int = 5, per_class: int = 4) -> Path:
    """ImageNet-style folder: class_i/img_j.png cut from a scikit-image photo (plus clutter to ignore)."""
    photo = data.astronaut()
    for i in range(n_classes):
        folder = root / f"class_{i}"
        folder.mkdir(parents=True)
        for j in range(per_class):
            crop = photo[40 * i : 40 * i + 64, 50 * j : 50 * j + 80]
            Image.fromarray(crop).save(folder / f"img_{j}.png")
        (folder / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    (root / "README").write_text("not a class")
    return root


def class_of(path: Path) -> str:
    return path.parent.name


def test_sampling_spreads_over_classes(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "images")
    files = sample_image_files(root, 5, seed=0)
    assert len({class_of(p) for p in files}) == 5
    more = sample_image_files(root, 12, seed=0)
    assert more[:5] == files and len(set(more)) == 12
    counts = {c: sum(class_of(p) == c for p in more) for c in {class_of(p) for p in more}}
    assert sorted(counts.values()) == [2, 2, 2, 3, 3]  # round-robin: 5 + 5 + 2
    assert all(p.suffix == ".png" for p in more)


def test_sampling_is_deterministic_per_seed(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "images")
    assert sample_image_files(root, 7, seed=3) == sample_image_files(root, 7, seed=3)
    draws = {tuple(sample_image_files(root, 7, seed=seed)) for seed in range(5)}
    assert len(draws) > 1


def test_sampling_more_than_available(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = write_image_folder(tmp_path / "images", n_classes=3, per_class=2)
    (root / "empty_class").mkdir()
    with caplog.at_level(logging.WARNING, logger="utils.calibration"):
        files = sample_image_files(root, 10, seed=0)
    assert len(files) == 6 == len(set(files))
    assert "holds only 6 images" in caplog.text


def test_sampling_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        sample_image_files(tmp_path / "missing", 4, seed=0)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(ValueError, match="is not a folder"):
        sample_image_files(tmp_path / "file.png", 4, seed=0)
    with pytest.raises(ValueError, match="no class folders"):
        sample_image_files(tmp_path, 4, seed=0)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        sample_image_files(tmp_path, 4, seed=0)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        sample_image_files(tmp_path, 0, seed=0)


def test_load_calibration_images_from_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = write_image_folder(tmp_path / "images")
    files = sample_image_files(root, 6, seed=1)
    files[2].write_bytes(b"this is not a png")
    with caplog.at_level(logging.WARNING, logger="utils.calibration"):
        images = load_calibration_images(root, 6, seed=1, image_size=32)
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.float32
    assert f"skipping unreadable image {files[2]}" in caplog.text
    assert "skipped 1 of 6" in caplog.text
    # The first image is the first sampled file through the same preprocessing.
    expected = imagenet_eval_transform(image_size=32, resize_size=37)(Image.open(files[0]).convert("RGB"))
    torch.testing.assert_close(images[0], expected, rtol=0, atol=0)


def test_load_calibration_images_sample_photos(caplog: pytest.LogCaptureFixture) -> None:
    images = load_calibration_images(None, 2, seed=0, image_size=64)
    torch.testing.assert_close(images, sample_photo_batch(SAMPLE_PHOTOS[:2], image_size=64), rtol=0, atol=0)
    with caplog.at_level(logging.WARNING, logger="utils.calibration"):
        assert load_calibration_images(None, 8, seed=0, image_size=64).shape == (5, 3, 64, 64)
    assert "only 5 sample photos" in caplog.text
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        load_calibration_images(None, 0, seed=0)
