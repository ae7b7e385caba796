"""A compressed model as an integer model: int8 weights with per-channel scales, 8-bit activation quantizers.

A weight quantizer with step ``s``, zero point ``z`` and range ``[q_min, q_max]`` (``b <= 8`` bits) gives
the integers ``q = clamp(round(w / s) + z, q_min, q_max) - z``: the layer computes with ``s * q``. An INT-b
grid is a subset of the int8 grid with the same step, so ``q`` is stored as int8 and ``s`` becomes the int8
scale exactly (``z`` must leave ``q`` in ``[-128, 127]``). Pruned weights are zero before quantization,
so their integers are 0.

Batch norm after a convolution is folded into it (:func:`models.quantized.fold_batch_norms`): with
``a = gamma / sqrt(running_var + eps)`` per output channel the folded weight is ``a * s * q``, so the int8
weight stays ``sign(a) * q`` and its scale becomes ``|a| * s`` (exact, per output channel).

A layer without a weight quantizer (a float checkpoint, or a layer the quantization setup keeps in float)
is quantized post training: 8 bits, symmetric, per output channel, range from the folded weight's min/max.

Activations: a layer with an input quantizer keeps its learned step and zero point as an 8-bit per-tensor
quantizer (``b < 8``: the same step, the int8 range); the backend calibrates the others (and the tensors its
int8 kernels need quantized) on training batches.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from models.quantized import QuantizedConv2d, QuantizedLinear, compressed_layers, fold_batch_norms
from quantization.fake_quant import FakeQuantizer, QuantizerConfig
from quantization.granularity import Granularity
from quantization.quantizers import QuantParams, QuantScheme, params_from_range, quantize

logger = logging.getLogger(__name__)

INT8_RANGE = (-128, 127)
MAX_BITS = 8


class ExportError(ValueError):
    """The model cannot be exported as asked (one line for the user)."""


@dataclass(frozen=True)
class ActivationQuant:
    """An 8-bit per-tensor quantizer of an activation: ``x_hat = scale * (q - zero_point)``, q in int8 or uint8."""

    scale: float
    zero_point: int
    signed: bool


@dataclass(frozen=True)
class IntegerLayer:
    """One Conv2d/Linear layer in integers: ``y = op(x, scale * int_weight) + bias`` (scale per output channel)."""

    int_weight: torch.Tensor  # int8, the layer's weight shape
    n_bits: int  # the bit-width of the weight grid (<= 8)
    scale: torch.Tensor  # float64, (C_out,)
    bias: torch.Tensor  # float64, (C_out,)
    input_quant: ActivationQuant | None  # the learned input quantizer (None: the backend calibrates one)

    def dequantized_weight(self) -> torch.Tensor:
        """``scale * int_weight`` in float32 (the weight the fake-quantized, folded layer computes with)."""
        view = (-1,) + (1,) * (self.int_weight.dim() - 1)
        return (self.int_weight.to(torch.float64) * self.scale.reshape(view)).to(torch.float32)


def activation_quant_from_range(min_val: float, max_val: float) -> ActivationQuant:
    """8-bit per-tensor quantizer of ``[min_val, max_val]``: unsigned if ``min_val >= 0``, else asymmetric uint8."""
    scheme = QuantScheme.UNSIGNED if min_val >= 0 else QuantScheme.ASYMMETRIC
    params = params_from_range(torch.tensor(min_val, dtype=torch.float64), torch.tensor(max_val, dtype=torch.float64),
                               MAX_BITS, scheme)  # fmt: skip
    return ActivationQuant(float(params.step_size), int(params.zero_point), signed=False)


def _learned_activation_quant(name: str, quantizer: FakeQuantizer) -> ActivationQuant:
    if not quantizer.config.granularity.is_per_tensor:
        raise ExportError(f"layer {name}: only per-tensor activation quantizers can be exported")
    if quantizer.n_bits > MAX_BITS:
        raise ExportError(f"layer {name}: {quantizer.n_bits}-bit activations do not fit in 8 bits")
    signed = quantizer.config.scheme is QuantScheme.SYMMETRIC
    return ActivationQuant(float(quantizer.step_size.detach()), int(quantizer.zero_point), signed)


def _weight_integers(name: str, layer: nn.Module, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(q, s per output channel, bits)`` of ``weight`` under the layer's quantizer (8-bit PTQ without one)."""
    quantizer = layer.weight_quantizer
    if quantizer is None:
        quantizer = FakeQuantizer(QuantizerConfig(MAX_BITS, QuantScheme.SYMMETRIC, Granularity.per_channel(0)),
                                  tuple(weight.shape))  # fmt: skip
        quantizer.estimate_range(weight)
    if quantizer.n_bits > MAX_BITS:
        raise ExportError(f"layer {name}: {quantizer.n_bits}-bit weights do not fit in int8 (at most {MAX_BITS} bits)")
    granularity = quantizer.config.granularity
    if granularity.channel_axis not in (None, 0):
        raise ExportError(f"layer {name}: weight step sizes must be per tensor or along the output channels")
    step = granularity.expand(quantizer.step_size.detach().to(torch.float64), weight.shape).expand(weight.shape)
    zero_point = granularity.expand(quantizer.zero_point.to(torch.float64), weight.shape).expand(weight.shape)
    params = QuantParams(step, zero_point, quantizer.q_min, quantizer.q_max)
    integers = quantize(weight.detach().to(torch.float64), params) - zero_point
    if integers.min() < INT8_RANGE[0] or integers.max() > INT8_RANGE[1]:
        raise ExportError(f"layer {name}: its weight zero point puts integers outside int8")
    return integers, step.reshape(weight.shape[0], -1)[:, 0].clone(), quantizer.n_bits


def dense_folded_model(model: nn.Module, example_input: torch.Tensor) -> tuple[nn.Module, list[tuple[str, str]]]:
    """A plain float copy of a compressed model: each layer's effective weight ``q_w(w * mask)``, batch norm folded.

    Returns the copy (eval mode, no masks nor quantizers) and the folded (conv, batch norm) pairs.
    """
    plain = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, layer in compressed_layers(plain).items():
            if isinstance(layer, QuantizedConv2d):
                float_layer = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                        layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                                        layer.padding_mode)  # fmt: skip
            elif isinstance(layer, QuantizedLinear):
                float_layer = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
            else:
                raise ExportError(f"layer {name}: {type(layer).__name__} cannot be exported (Conv2d and Linear only)")
            float_layer.weight.copy_(layer.effective_weight())
            if layer.bias is not None:
                float_layer.bias.copy_(layer.bias)
            plain.set_submodule(name, float_layer.eval())
    pairs = fold_batch_norms(plain, example_input)
    return plain.eval(), pairs


def integer_layers(model: nn.Module, folded: nn.Module, folded_pairs: list[tuple[str, str]]) -> dict[str, IntegerLayer]:
    """The integer form of every compressed layer of ``model`` (see the module doc).

    ``folded`` and ``folded_pairs`` (conv, batch norm) come from :func:`dense_folded_model` (the folded biases).
    """
    batch_norm_of = dict(folded_pairs)
    result = {}
    for name, layer in compressed_layers(model).items():
        integers, step, n_bits = _weight_integers(name, layer, layer.masked_weight())
        if name in batch_norm_of:  # folded: scale |a| * s, integers sign(a) * q
            bn = model.get_submodule(batch_norm_of[name])
            factor = bn.weight.detach().to(torch.float64) / torch.sqrt(bn.running_var.to(torch.float64) + bn.eps)
            step = step * factor.abs()
            integers = integers * torch.sign(factor).reshape((-1,) + (1,) * (integers.dim() - 1))
            if integers.max() > INT8_RANGE[1]:
                logger.warning("layer %s: a negative batch-norm scale maps -128 to 128, stored as 127", name)
                integers = integers.clamp_max(INT8_RANGE[1])
        bias = folded.get_submodule(name).bias
        bias = torch.zeros(integers.shape[0]) if bias is None else bias.detach()
        input_quant = None if layer.input_quantizer is None else _learned_activation_quant(name, layer.input_quantizer)
        result[name] = IntegerLayer(integers.to(torch.int8), n_bits, step, bias.to(torch.float64), input_quant)
    return result


def has_weight_quantization(model: nn.Module) -> bool:
    """Whether any compressed layer of ``model`` quantizes its weights (else the export quantizes post training)."""
    return any(layer.weight_quantizer is not None for layer in compressed_layers(model).values())


def set_dequantized_weights(folded: nn.Module, layers: dict[str, IntegerLayer]) -> None:
    """Give the folded float model exactly the weights ``scale * int_weight`` (float layers quantized post training)."""
    with torch.no_grad():
        for name, layer in layers.items():
            folded.get_submodule(name).weight.copy_(layer.dequantized_weight())
