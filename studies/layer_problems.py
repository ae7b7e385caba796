"""Per-layer data of the post-training bounds (paper Sec. 4): weights, Gram matrices, input chunks.

Shared by the quantization bounds (:mod:`studies.quant_bounds`) and the pruning bounds. For an
output channel ``c`` of group ``g`` with flattened weights ``w_c`` and the layer's patch matrix
``A_g`` (:func:`models.layer_inputs.patch_matrix`), the channel's pre-bias output is ``A_g w_c``;
any compressed ``w~`` costs ``||A_g (w_c - w~)||^2 = (w_c - w~)' G_g (w_c - w~)`` with the Gram
matrix ``G_g = A_g' A_g``, so ``G`` and the weights are all the bounds need.

**Chunks.** As in the paper (``--opt-dim``), a channel's inputs are split into chunks that are
solved as separate problems: a chunk holds whole input channels, ``max(1, opt_dim // k)`` of them
for a kernel of ``k`` elements (for a 1x1 conv or a Linear layer: ``opt_dim`` inputs; for a 3x3
conv and ``opt_dim = 32``: 3 input channels, 27 inputs). A chunk's problem ignores the
cross-terms with the other chunks' errors: its "output" is the partial sum ``A_g[:, J] w_c[J]``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from models.layer_inputs import capture_layer_inputs, check_patches, gram_matrices, patch_matrix

__all__ = [
    "DEFAULT_MAX_WHOLE_DIM",
    "LayerData",
    "collect_layer_data",
    "input_chunks",
    "problem_scopes",
    "problem_set_count",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_WHOLE_DIM = 128
"""The largest fan-in whose whole channels are also solved as one problem each (quantization and pruning)."""


@dataclass(frozen=True)
class LayerData:
    """What the post-training bounds need of one layer.

    Attributes:
        name: module name in the model.
        module_type: ``"Conv2d"``, ``"Linear"``...
        weight_shape: the layer's weight shape.
        weights: ``(out_channels, fan_in)`` float64, row ``c`` = ``weight[c].reshape(-1)``.
        grams: ``(groups, fan_in, fan_in)`` float64 ``A_g' A_g``.
        channel_group: ``(out_channels,)`` the group ``g`` of every output channel.
        kernel_elements: inputs per input channel (``prod(kernel_size)``; 1 for Linear).
        positions: rows of ``A`` (output positions over all calibration images).
    """

    name: str
    module_type: str
    weight_shape: tuple[int, ...]
    weights: torch.Tensor
    grams: torch.Tensor
    channel_group: torch.Tensor
    kernel_elements: int
    positions: int

    @property
    def out_channels(self) -> int:
        return self.weights.shape[0]

    @property
    def fan_in(self) -> int:
        return self.weights.shape[1]

    def channel_grams(self, channels: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """``(len(channels), m, m)`` Gram matrices of the input subset ``inputs`` for each channel."""
        grams = self.grams[:, inputs][:, :, inputs]
        return grams[self.channel_group[channels]]

    def live_channels(self, num_output_channels: int) -> tuple[int, torch.Tensor, int]:
        """``(count, live, dead)``: the first ``num_output_channels`` channels (-1: all), those of them with
        nonzero output energy, and how many have none (dead: zero weights or inputs that never fire)."""
        count = self.out_channels if num_output_channels < 0 else min(num_output_channels, self.out_channels)
        channels = torch.arange(count, device=self.weights.device)
        dead = self.output_energy()[channels] <= 0
        return count, channels[~dead], int(dead.sum())

    def description(self, channels: int, dead_channels: int) -> dict:
        """The layer's entry header in a run's JSON."""
        return {
            "layer": self.name,
            "type": self.module_type,
            "weight_shape": list(self.weight_shape),
            "positions": self.positions,
            "channels": channels,
            "dead_channels": dead_channels,
        }

    def output_energy(self) -> torch.Tensor:
        """``(out_channels,)`` ``||A_g w_c||^2 = w_c' G_g w_c``, the energy of each channel's pre-bias output."""
        grams = self.grams[self.channel_group]
        return torch.einsum("ci,cij,cj->c", self.weights, grams, self.weights)


def problem_scopes(data: LayerData, opt_dim: int, max_whole_dim: int) -> list[tuple[str, int, torch.Tensor]]:
    """``(scope, chunk index, input indices)``: every chunk, plus the whole channel (index -1) when the layer
    has more than one chunk and a fan-in of at most ``max_whole_dim``."""
    chunks = input_chunks(data.fan_in, data.kernel_elements, opt_dim)
    scopes = [("chunk", index, chunk.to(data.weights.device)) for index, chunk in enumerate(chunks)]
    if len(chunks) > 1 and data.fan_in <= max_whole_dim:
        scopes.append(("whole_channel", -1, torch.arange(data.fan_in, device=data.weights.device)))
    return scopes


def problem_set_count(layers: Iterable[LayerData], opt_dim: int, max_whole_dim: int) -> int:
    """The number of :func:`problem_scopes` of all ``layers`` (a study's problem sets, when every layer has live
    channels)."""
    return sum(len(problem_scopes(data, opt_dim, max_whole_dim)) for data in layers)


def input_chunks(fan_in: int, kernel_elements: int, opt_dim: int) -> list[torch.Tensor]:
    """Index tensors of the chunks of ``fan_in`` inputs: whole input channels, ``max(1, opt_dim // kernel_elements)`` each.

    ``opt_dim <= 0`` gives a single chunk of all inputs.
    """
    if fan_in % kernel_elements:
        raise ValueError(f"fan_in {fan_in} is not a multiple of the kernel size {kernel_elements}")
    if opt_dim <= 0:
        return [torch.arange(fan_in)]
    per_chunk = max(1, opt_dim // kernel_elements) * kernel_elements
    return list(torch.arange(fan_in).split(per_chunk))


def collect_layer_data(
    model: nn.Module, layer_names: Sequence[str], images: torch.Tensor
) -> dict[str, LayerData]:
    """Capture the named layers' inputs on ``images`` and build their :class:`LayerData`.

    ``model`` must be on ``device`` (the forward pass and the Gram matrices run there).
    The patch matrix of every layer is checked against the layer's own output
    (:func:`models.layer_inputs.check_patches`) before its Gram matrix is formed in float64.
    """
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    inputs = capture_layer_inputs(model, layer_names, images)
    data = {}
    for name in layer_names:
        module = modules[name]
        layer_input = inputs.pop(name).to(device)
        patches = patch_matrix(module, layer_input)
        check_patches(module, layer_input, patches)
        grams = gram_matrices(patches)
        groups, positions = patches.shape[:2]
        del patches, layer_input
        weight = module.weight.detach().to(device=device, dtype=torch.float64)
        out_channels = weight.shape[0]
        kernel_elements = math.prod(getattr(module, "kernel_size", (1,)))
        data[name] = LayerData(
            name=name,
            module_type=type(module).__name__,
            weight_shape=tuple(module.weight.shape),
            weights=weight.reshape(out_channels, -1),
            grams=grams,
            channel_group=torch.arange(out_channels, device=device) // (out_channels // groups),
            kernel_elements=kernel_elements,
            positions=positions,
        )
        logger.info("%s: %d positions, %d x %d weights, %d groups", name, positions, out_channels, weight[0].numel(), groups)
    return data
