"""CIFAR classifiers (32x32 inputs) of the PSGD experiments: ResNet-32 and VGG16-bn.

* ResNet-``6n+2`` (He et al. 2016, Sec. 4.2), with projection shortcuts: a 3x3 convolution
  3 -> 16, three stages of ``n`` basic blocks (16, 32, 64 channels; strides 1, 2, 2), global
  average pooling and a linear classifier 64 -> ``num_classes``. A basic block is
  ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, the shortcut a 1x1 convolution + batch
  norm where the shape changes (the first block of stages 2 and 3), else the identity.
  ResNet-32 (``n = 5``) has 0.47 M parameters at 100 classes.
* VGG16-bn, configuration D (Simonyan & Zisserman 2015) for CIFAR: thirteen 3x3 convolutions, each
  followed by batch norm and ReLU, five 2x2 max-pools (32 px -> 1 px), then a classifier
  512 -> 4096 -> 4096 -> ``num_classes`` with ReLU and dropout (p = 0.5) after the two hidden
  layers.

Convolutions are bias-free (batch norm follows each) and He-initialised (fan-out: normal with
variance ``2 / (k^2 * out channels)``), linear layers keep PyTorch's default initialisation, as in
the PSGD code. Module names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer<i>.<j>.conv1``,
``...downsample.0``, ``fc``) and VGG (``features.<i>``, ``classifier.<i>``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "MODEL_NAMES", "VGG16_CONFIG", "CifarBasicBlock", "CifarResNet", "CifarVGG",
           "resnet32_cifar", "vgg16_bn_cifar"]

MODEL_NAMES = ("resnet32_cifar", "vgg16_bn_cifar")  # the registry's names of the builders below
# The input normalisation of the CIFAR models (the PSGD code's): per-channel mean and standard deviation of [0, 1] pixels.
CIFAR_MEAN: tuple[float, float, float] = (129.3 / 255, 124.1 / 255, 112.4 / 255)
CIFAR_STD: tuple[float, float, float] = (68.2 / 255, 65.4 / 255, 70.4 / 255)

STAGE_CHANNELS = (16, 32, 64)
STAGE_STRIDES = (1, 2, 2)
# Configuration D: output channels of each 3x3 convolution, "M" a 2x2 max-pool.
VGG16_CONFIG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                       512, 512, 512, "M")  # fmt: skip
VGG_HIDDEN = 4096


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _init_weights(model: nn.Module) -> None:
    """He init (fan-out) for convolutions, batch norms to identity; linear layers keep PyTorch's default."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class CifarBasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; a 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_channels))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + shortcut)


class CifarResNet(nn.Module):
    """ResNet-``(6 * blocks_per_stage + 2)`` for 32x32 images (see the module doc)."""

    def __init__(self, blocks_per_stage: int = 5, num_classes: int = 100) -> None:
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"a stage needs at least one block, got {blocks_per_stage}")
        channels = STAGE_CHANNELS[0]
        self.conv1 = _conv3x3(3, channels)
        self.bn1 = nn.BatchNorm2d(channels)
        for index, (out_channels, stride) in enumerate(zip(STAGE_CHANNELS, STAGE_STRIDES), start=1):
            blocks = [CifarBasicBlock(channels if j == 0 else out_channels, out_channels, stride if j == 0 else 1)
                      for j in range(blocks_per_stage)]  # fmt: skip
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
            channels = out_channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


class CifarVGG(nn.Module):
    """VGG with batch norm for 32x32 images: ``features`` (conv-BN-ReLU and max-pools), ``classifier`` (3 linear)."""

    def __init__(self, config: tuple[int | str, ...] = VGG16_CONFIG, num_classes: int = 100, dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [_conv3x3(channels, int(item)), nn.BatchNorm2d(int(item)), nn.ReLU(inplace=True)]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(channels, VGG_HIDDEN), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(VGG_HIDDEN, VGG_HIDDEN), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(VGG_HIDDEN, num_classes),
        )  # fmt: skip
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def resnet32_cifar(num_classes: int = 100) -> CifarResNet:
    """ResNet-32 for CIFAR (5 blocks per stage), randomly initialised."""
    return CifarResNet(blocks_per_stage=5, num_classes=num_classes)


def vgg16_bn_cifar(num_classes: int = 100) -> CifarVGG:
    """VGG16-bn (configuration D) for CIFAR, randomly initialised."""
    return CifarVGG(VGG16_CONFIG, num_classes=num_classes)
