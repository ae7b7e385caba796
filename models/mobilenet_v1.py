"""MobileNet-V1 (Howard et al., 2017) for ImageNet in plain PyTorch.

The network of the paper's Table 1: a 3x3 stride-2 convolution to 32 channels, then 13
depthwise-separable blocks (3x3 depthwise convolution + BN + ReLU, then 1x1 pointwise convolution
+ BN + ReLU), global average pooling and a 1000-way fully connected layer. The blocks' output
channels and strides are :data:`MOBILENET_V1_BLOCKS`; the paper's table gives the last depthwise
convolution stride 2, a typo (its input and output are both 7x7 there) that the reference
implementations (TF-slim, Keras) read as stride 1.

The width multiplier ``alpha`` scales every channel count to ``max(8, int(alpha * c))`` (the
classifier's input included). At 224 px the model has the paper's costs (Table 6): 4.23 M parameters
and 569 M multiply-adds at ``alpha = 1``; 2.6 M / 325 M, 1.3 M / 149 M and 0.47 M / 41 M at 0.75, 0.5
and 0.25.

Every convolution is a plain bias-free ``nn.Conv2d`` with symmetric padding (followed by its batch
norm), so tools that swap layers for quantized or pruned copies, or fold batch norms, apply as is.
Module names: ``conv_stem``/``bn_stem``, ``blocks.<i>.conv_dw``/``bn_dw``/``conv_pw``/``bn_pw``, ``fc``.

No pretrained weights ship offline: the registry's ``mobilenet_v1`` is a seeded random model
(``pretrained=False``) meant to be trained, e.g. by the LIMPQ mixed-precision experiments.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MOBILENET_V1_BLOCKS",
    "STEM_CHANNELS",
    "BlockSpec",
    "DepthwiseSeparableBlock",
    "MobileNetV1",
    "mobilenet_v1",
    "scaled_channels",
]

logger = logging.getLogger(__name__)

STEM_CHANNELS = 32
MIN_CHANNELS = 8  # no layer gets fewer channels, whatever the width multiplier
_INIT_SEED = 0  # seed of :func:`mobilenet_v1`'s random initialisation


class BlockSpec(NamedTuple):
    """One depthwise-separable block: its pointwise output channels and its depthwise stride."""

    out_channels: int
    stride: int


# Howard et al. (2017), Table 1 (the last block's depthwise stride read as 1, see the module doc).
MOBILENET_V1_BLOCKS: tuple[BlockSpec, ...] = (
    BlockSpec(64, 1),
    BlockSpec(128, 2),
    BlockSpec(128, 1),
    BlockSpec(256, 2),
    BlockSpec(256, 1),
    BlockSpec(512, 2),
    *(BlockSpec(512, 1) for _ in range(5)),
    BlockSpec(1024, 2),
    BlockSpec(1024, 1),
)


def scaled_channels(channels: int, width: float) -> int:
    """``max(8, int(width * channels))``: a channel count under the width multiplier."""
    return max(MIN_CHANNELS, int(channels * width))


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """Bias-free convolution with 'same' padding for odd kernels (the batch norm after it has the bias)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)


class DepthwiseSeparableBlock(nn.Module):
    """``relu(bn_pw(conv_pw(relu(bn_dw(conv_dw(x))))))``: 3x3 depthwise (stride ``stride``), then 1x1 pointwise."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv_dw = _conv(in_channels, in_channels, 3, stride=stride, groups=in_channels)
        self.bn_dw = nn.BatchNorm2d(in_channels)
        self.conv_pw = _conv(in_channels, out_channels, 1)
        self.bn_pw = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn_dw(self.conv_dw(x)))
        return F.relu(self.bn_pw(self.conv_pw(x)))


class MobileNetV1(nn.Module):
    """MobileNet-V1: stem convolution, depthwise-separable blocks, global average pooling, fc."""

    def __init__(
        self, width: float = 1.0, num_classes: int = 1000, blocks: tuple[BlockSpec, ...] = MOBILENET_V1_BLOCKS
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"the width multiplier must be positive, got {width}")
        self.width = width
        channels = scaled_channels(STEM_CHANNELS, width)
        self.conv_stem = _conv(3, channels, 3, stride=2)
        self.bn_stem = nn.BatchNorm2d(channels)
        layers = []
        for spec in blocks:
            out_channels = scaled_channels(spec.out_channels, width)
            layers.append(DepthwiseSeparableBlock(channels, out_channels, spec.stride))
            channels = out_channels
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """He init (fan-out) for convolutions, N(0, 0.01) for the classifier, batch norms to identity."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's feature map, ``(N, 1024 alpha, H/32, W/32)``."""
        return self.blocks(F.relu(self.bn_stem(self.conv_stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.forward_features(x)).flatten(1))


def mobilenet_v1(width: float = 1.0, num_classes: int = 1000) -> MobileNetV1:
    """MobileNet-V1 with width multiplier ``width``, randomly initialised under a fixed seed, in eval mode.

    Repeated calls give identical models; the global random state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_INIT_SEED)
        model = MobileNetV1(width=width, num_classes=num_classes)
    logger.debug("built MobileNet-V1 (width %g, %d classes) with random (seeded) weights", width, num_classes)
    return model.eval()
