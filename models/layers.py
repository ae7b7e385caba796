"""Which layers of a model carry the weights that quantization and pruning act on."""
from __future__ import annotations

from collections.abc import Iterator

from torch import nn

WEIGHT_LAYERS = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear,
)  # fmt: skip
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def weight_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(module name, module)`` of every Conv/ConvTranspose/Linear layer that has a weight."""
    for name, module in model.named_modules():
        if isinstance(module, WEIGHT_LAYERS) and getattr(module, "weight", None) is not None:
            yield name, module


def output_channel_axis(module: nn.Module) -> int:
    """Axis of the output channels in the module's weight (ConvTranspose stores them second)."""
    return 1 if isinstance(module, _TRANSPOSED) else 0
