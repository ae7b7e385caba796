"""Switchable batch norm (LIMPQ): one BatchNorm2d per candidate bit-width of the layer before it.

A layer quantized at different bit-widths produces differently distributed outputs, so the batch
norm that consumes them keeps one copy (affine parameters and running statistics) per candidate
bit-width and normalises with the copy of the layer's current bit-width. The copy is chosen by the
layer's weight quantizer (:class:`quantization.multi_bit_lsq.MultiBitLSQ`): the batch norm follows
:func:`quantization.multi_bit_lsq.set_layer_bits` without being told.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from models.quantized import LayerQuantizer, find_conv_bn_pairs
from quantization.multi_bit_lsq import MultiBitLSQ

logger = logging.getLogger(__name__)

__all__ = ["SwitchableBatchNorm2d", "switch_batch_norms"]


class SwitchableBatchNorm2d(nn.Module):
    """``copies[str(b)](x)`` with ``b = bit_source.n_bits``: the batch norm of the preceding layer's bit-width.

    Every copy starts as a copy of ``batch_norm`` (parameters, running statistics, momentum, eps,
    mode). ``bit_source`` (the preceding layer's weight quantizer) is referenced, not owned: it is
    not a submodule, so its parameters and state stay the layer's alone.
    """

    def __init__(self, batch_norm: nn.BatchNorm2d, candidate_bits: Sequence[int], bit_source: LayerQuantizer) -> None:
        super().__init__()
        self.copies = nn.ModuleDict({str(bits): copy.deepcopy(batch_norm) for bits in candidate_bits})
        self.__dict__["bit_source"] = bit_source  # bypasses nn.Module.__setattr__, which would register a submodule
        self.train(batch_norm.training)

    @property
    def active(self) -> nn.BatchNorm2d:
        """The copy of the bit-width ``bit_source`` currently quantizes to."""
        bits = self.bit_source.n_bits
        key = str(bits)
        if key not in self.copies:
            raise KeyError(f"no batch-norm copy for {bits} bits (copies: {', '.join(self.copies)})")
        return self.copies[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.active(x)

    def extra_repr(self) -> str:
        return f"bits={list(self.copies)}"


def switch_batch_norms(model: nn.Module, layer_names: Iterable[str], example_input: torch.Tensor) -> dict[str, str]:
    """Replace, in place, the BatchNorm2d that directly consumes each named layer's output by a switchable one.

    The layers must be compressed convolutions with a :class:`MultiBitLSQ` weight quantizer; the
    batch norms get one copy per candidate bit-width of that quantizer and follow it. The pairs
    are found with :func:`models.quantized.find_conv_bn_pairs` (hooks comparing tensor identity in
    one eval-mode pass of ``example_input``), run on a copy of ``model`` so that no quantizer of
    ``model`` is initialised from the example. Layers without such a batch norm are skipped.
    Returns ``{batch-norm name: layer name}`` of the switched batch norms.
    """
    if any(isinstance(module, SwitchableBatchNorm2d) for module in model.modules()):
        raise ValueError("the model already has switchable batch norms")
    quantizers: dict[str, MultiBitLSQ] = {}
    for name in layer_names:
        quantizer = getattr(model.get_submodule(name), "weight_quantizer", None)
        if not isinstance(quantizer, MultiBitLSQ):
            raise TypeError(f"{name!r} has no multi-bit weight quantizer to follow")
        quantizers[name] = quantizer
    switched: dict[str, str] = {}
    for layer_name, bn_name in find_conv_bn_pairs(copy.deepcopy(model), example_input):
        quantizer = quantizers.get(layer_name)
        batch_norm = model.get_submodule(bn_name)
        if quantizer is None or type(batch_norm) is not nn.BatchNorm2d:
            continue
        model.set_submodule(bn_name, SwitchableBatchNorm2d(batch_norm, quantizer.candidate_bits, quantizer))
        switched[bn_name] = layer_name
    logger.info("switchable batch norm after %d of %d layers", len(switched), len(quantizers))
    return switched
