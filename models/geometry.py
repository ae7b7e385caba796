"""Weight counts and multiply-accumulates (MACs) of a model's Conv/Linear layers at an input size.

``P_l`` is the number of weights of the layer (bias excluded). The MACs of a layer are its
weight count times the number of output positions it computes::

    MAC_l = C_in * C_out * k_h * k_w * H_out * W_out / groups = P_l * H_out * W_out

(``H_out * W_out``: any number of spatial dimensions; 1 for a Linear layer on ``[N, C]``; a
ConvTranspose computes ``P_l`` MACs per *input* position). The output sizes are the real
ones, read from one forward pass of a ``1 x 3 x S x S`` zero image with hooks:
``H_out = floor((H + 2 p - d (k - 1) - 1) / s) + 1``.

**LIMPQ's count** (``official_macs``). The official search computes the output sizes in true
division and truncates their product::

    positions = int(((H + 2 p - d (k - 1) - 1) / s + 1) * ((W + 2 p - d (k - 1) - 1) / s + 1))
    MAC_l = C_in * C_out * positions * k_h^2 // groups

with the layer's real input size ``H x W``. A stride-2 3x3 conv (padding 1) on 56x56 counts
``28.5^2 = 812.25 -> 812`` positions instead of ``28^2 = 784``; a stride-2 1x1 downsampling
conv on 56x56 the same (ResNet-50: the stride-2 conv2 and downsample of layer2/3/4, and the
7x7 stem, 112.5^2 -> 12656 instead of 12544); every stride-1 layer and every layer whose
``H + 2p - d(k-1) - 1`` is a multiple of the stride agrees with the floored count. A Linear layer counts
``in_features * out_features``. Here the count is the product over every spatial dimension, and
``k_h^2`` is ``prod(kernel_size)`` (the same for the square kernels of the official models);
``padding="same"`` counts the input size, ``"valid"`` no padding. ConvTranspose layers, which
the official code does not count, get the floored count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.layers import weight_layers

__all__ = ["LayerGeometry", "layer_geometry", "official_positions"]

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class LayerGeometry:
    """A weight layer's weight count ``P_l`` and MACs at the input size, floored and LIMPQ's way."""

    name: str
    kind: str  # the module's type name
    weight_count: int
    macs: int
    official_macs: int


def official_positions(input_size: tuple[int, ...], module: nn.modules.conv._ConvNd) -> int:
    """LIMPQ's number of output positions of a conv: the product of true-division output sizes, truncated."""
    product = 1.0
    for dim, size in enumerate(input_size):
        kernel, stride, dilation = module.kernel_size[dim], module.stride[dim], module.dilation[dim]
        if module.padding == "same":
            padding_total = dilation * (kernel - 1)
        elif module.padding == "valid":
            padding_total = 0
        else:
            padding_total = 2 * module.padding[dim]
        product *= (size + padding_total - dilation * (kernel - 1) - 1) / stride + 1
    return int(product)


@torch.no_grad()
def layer_geometry(model: nn.Module, image_size: int = 224, in_channels: int = 3) -> dict[str, LayerGeometry]:
    """Every Conv/ConvTranspose/Linear layer with a weight (module order) -> its geometry at ``image_size``.

    One forward pass of a ``[1, in_channels, image_size, image_size]`` image records each
    layer's input and output shapes (a layer that does not run is left out; one that runs twice
    counts its first call). The pass runs on the meta device (shapes only, no arithmetic: the
    parameters are swapped for meta tensors with :func:`torch.func.functional_call`); a model
    whose forward needs real values gets a real pass on a zero image instead. The model itself
    is left as it was (it is in eval mode during the pass).
    """
    layers = dict(weight_layers(model))
    shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
    names = {module: name for name, module in layers.items()}

    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        shapes.setdefault(names[module], (args[0].shape, output.shape))

    handles = [module.register_forward_hook(record) for module in layers.values()]
    was_training = model.training
    try:
        model.eval()
        try:
            _meta_forward(model, (1, in_channels, image_size, image_size))
        except (NotImplementedError, RuntimeError):  # data-dependent code: run it for real
            shapes.clear()
            parameter = next(model.parameters(), None)
            device = parameter.device if parameter is not None else torch.device("cpu")
            model(torch.zeros(1, in_channels, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return {name: _geometry(name, module, *shapes[name]) for name, module in layers.items() if name in shapes}


def _meta_forward(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """The model's forward on meta tensors: its parameters and buffers replaced by meta ones of the same shapes."""
    state = {name: torch.empty_like(tensor, device="meta")
             for name, tensor in (*model.named_parameters(), *model.named_buffers())}  # fmt: skip
    torch.func.functional_call(model, state, (torch.empty(input_shape, device="meta"),))


def _geometry(name: str, module: nn.Module, input_shape: torch.Size, output_shape: torch.Size) -> LayerGeometry:
    weight_count = module.weight.numel()
    if isinstance(module, nn.Linear):
        positions = math.prod(output_shape[1:-1])  # [N, ..., out_features]
        official = module.in_features * module.out_features
        return LayerGeometry(name, type(module).__name__, weight_count, weight_count * positions, official)
    if isinstance(module, _TRANSPOSED):
        macs = weight_count * math.prod(input_shape[2:])
        return LayerGeometry(name, type(module).__name__, weight_count, macs, macs)
    macs = weight_count * math.prod(output_shape[2:])
    official = weight_count * official_positions(tuple(input_shape[2:]), module)  # (C_in/g) C_out k^2 positions
    return LayerGeometry(name, type(module).__name__, weight_count, macs, official)
