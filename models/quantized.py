"""Quantized and prunable copies of a classifier's Conv2d/Linear layers, batch-norm folding and re-estimation.

:func:`compress_model` replaces every ``nn.Conv2d`` and ``nn.Linear`` of a model (torchvision
ResNets and MobileNet-V2, our EfficientNet-Lite0, or any model built from those layers) by a
:class:`QuantizedConv2d` / :class:`QuantizedLinear` that keeps the original weight and bias
parameters and adds, each optional:

* ``weight_quantizer``: a :class:`quantization.fake_quant.FakeQuantizer` applied to the weight
  (initialised from the weight with the configured range estimator, then frozen, so its step
  size is learned - LSQ);
* ``input_quantizer``: a fake quantizer of the layer's input activation (its range is
  estimated on data with :func:`calibrate_input_quantizers`);
* ``weight_mask``: a boolean buffer shaped like the weight, ``True`` where the weight is kept
  (any pattern, so structured masks fit as well as unstructured ones).

The layer computes ``op(q_in(x), q_w(weight * weight_mask), bias)``: pruned weights are zero
before quantization, and they get no gradient.

Which layers are quantized at which bit-width (``quant_setup``):

* ``all`` - every layer at ``n_bits``;
* ``LSQ_paper`` - the first and the last layer at 8 bits, all others at ``n_bits`` (the paper);
* ``FP_logits`` - every layer at ``n_bits`` except the last (the classifier), kept in floating point;
* ``FP_first_last`` - the first and the last layer in floating point, the others at ``n_bits``.

"First" and "last" are the first and last Conv2d/Linear in module order, which is the
execution order for the supported architectures. Activation quantizers follow the same rule
with the activation bit-width.

Batch norm is kept as a separate layer by default (the paper), or folded into the preceding
convolution before quantization (:func:`fold_batch_norms`, deployment style: the quantized
weights are then the folded ones).
"""
from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import weight_layers
from quantization.fake_quant import FakeQuantizer, QuantizerConfig

logger = logging.getLogger(__name__)

__all__ = [
    "CompressionSpec",
    "QuantSetup",
    "QuantizedConv2d",
    "QuantizedLinear",
    "calibrate_input_quantizers",
    "compress_model",
    "compressed_layers",
    "find_conv_bn_pairs",
    "fold_batch_norms",
    "layer_bit_widths",
    "layer_report",
    "reestimate_bn_stats",
]

FIRST_LAST_BITS = 8  # the paper's (and LSQ's) bit-width of the first and last layer


class QuantSetup(str, enum.Enum):
    ALL = "all"
    LSQ_PAPER = "LSQ_paper"
    FP_LOGITS = "FP_logits"
    FP_FIRST_LAST = "FP_first_last"


def layer_bit_widths(layer_names: list[str], n_bits: int, setup: QuantSetup | str) -> dict[str, int | None]:
    """Bit-width of each layer under ``setup`` (``None``: kept in floating point)."""
    setup = QuantSetup(setup)
    bits: dict[str, int | None] = {name: n_bits for name in layer_names}
    if not layer_names:
        return bits
    first, last = layer_names[0], layer_names[-1]
    if setup is QuantSetup.LSQ_PAPER:
        bits[first] = bits[last] = FIRST_LAST_BITS
    elif setup is QuantSetup.FP_LOGITS:
        bits[last] = None
    elif setup is QuantSetup.FP_FIRST_LAST:
        bits[first] = bits[last] = None
    return bits


@dataclass(frozen=True)
class CompressionSpec:
    """How :func:`compress_model` converts a model.

    ``weight_quant`` / ``act_quant`` are the quantizer templates (``None``: no quantization);
    their ``n_bits`` is the bit-width of the body, ``quant_setup`` decides the first and last layer.
    """

    weight_quant: QuantizerConfig | None = None
    act_quant: QuantizerConfig | None = None
    quant_setup: QuantSetup = QuantSetup.LSQ_PAPER
    prune: bool = False
    fold_bn: bool = False


class _CompressedLayer:
    """The parts shared by :class:`QuantizedConv2d` and :class:`QuantizedLinear`."""

    weight: nn.Parameter
    weight_mask: torch.Tensor | None
    weight_quantizer: FakeQuantizer | None
    input_quantizer: FakeQuantizer | None

    def _attach(self, weight_quant: QuantizerConfig | None, act_quant: QuantizerConfig | None, prune: bool) -> None:
        self.weight_quantizer = FakeQuantizer(weight_quant) if weight_quant is not None else None
        self.input_quantizer = FakeQuantizer(act_quant) if act_quant is not None else None
        mask = torch.ones_like(self.weight, dtype=torch.bool) if prune else None
        self.register_buffer("weight_mask", mask)  # type: ignore[attr-defined]
        if self.weight_quantizer is not None:
            self.weight_quantizer.estimate_range(self.weight.detach())
            self.weight_quantizer.freeze_range()

    def masked_weight(self) -> torch.Tensor:
        return self.weight if self.weight_mask is None else self.weight * self.weight_mask

    def effective_weight(self) -> torch.Tensor:
        """``q_w(weight * mask)``: the weight the layer computes with."""
        weight = self.masked_weight()
        return weight if self.weight_quantizer is None else self.weight_quantizer(weight)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)


class QuantizedConv2d(_CompressedLayer, nn.Conv2d):
    """``nn.Conv2d`` with optional weight/input fake quantization and a pruning mask."""

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, weight_quant: QuantizerConfig | None, act_quant: QuantizerConfig | None, prune: bool
    ) -> QuantizedConv2d:
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device="meta",
        )  # fmt: skip
        layer.weight, layer.bias = conv.weight, conv.bias
        layer._attach(weight_quant, act_quant, prune)
        return layer.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.effective_weight(), self.bias)


class QuantizedLinear(_CompressedLayer, nn.Linear):
    """``nn.Linear`` with optional weight/input fake quantization and a pruning mask."""

    @classmethod
    def from_float(
        cls, linear: nn.Linear, weight_quant: QuantizerConfig | None, act_quant: QuantizerConfig | None, prune: bool
    ) -> QuantizedLinear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        layer._attach(weight_quant, act_quant, prune)
        return layer.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.effective_weight(), self.bias)


def compressed_layers(model: nn.Module) -> dict[str, QuantizedConv2d | QuantizedLinear]:
    """The :class:`QuantizedConv2d` / :class:`QuantizedLinear` layers of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (QuantizedConv2d, QuantizedLinear))}


@torch.no_grad()
def find_conv_bn_pairs(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, str]]:
    """``(conv name, batch-norm name)`` for every BatchNorm2d whose input is directly a Conv2d's output.

    Found by running ``example_input`` through the model with hooks (works for any forward
    code, no tracing).
    """
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # id -> (conv name, tensor kept alive so ids stay unique)
    pairs: list[tuple[str, str]] = []
    handles = []

    def after_conv(name: str):
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            outputs[id(output)] = (name, output)

        return hook

    def before_bn(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            source = outputs.get(id(args[0]))
            if source is not None:
                pairs.append((source[0], name))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(after_conv(name)))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(before_bn(name)))
    was_training = model.training
    try:
        model.eval()(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return pairs


@torch.no_grad()
def fold_batch_norms(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, str]]:
    """Fold every conv -> batch-norm pair into the conv; the batch norm becomes ``nn.Identity``.

    With ``a = gamma / sqrt(running_var + eps)`` per output channel:
    ``W' = a * W`` and ``b' = beta + a * (b - running_mean)`` (``b = 0`` for a bias-free conv),
    so that ``conv'(x) = bn(conv(x))`` in eval mode. Returns the folded pairs.
    """
    pairs = find_conv_bn_pairs(model, example_input)
    for conv_name, bn_name in pairs:
        conv: nn.Conv2d = model.get_submodule(conv_name)
        bn: nn.BatchNorm2d = model.get_submodule(bn_name)
        dtype = torch.float64
        scale = bn.weight.to(dtype) / torch.sqrt(bn.running_var.to(dtype) + bn.eps)
        bias = conv.bias.to(dtype) if conv.bias is not None else torch.zeros_like(scale)
        folded_bias = bn.bias.to(dtype) + scale * (bias - bn.running_mean.to(dtype))
        conv.weight.copy_((conv.weight.to(dtype) * scale.reshape(-1, 1, 1, 1)).to(conv.weight.dtype))
        conv.bias = nn.Parameter(folded_bias.to(conv.weight.dtype))
        model.set_submodule(bn_name, nn.Identity())
    logger.info("folded %d batch-norm layers into their convolutions", len(pairs))
    return pairs


def compress_model(model: nn.Module, spec: CompressionSpec, example_input: torch.Tensor | None = None) -> dict[str, nn.Module]:
    """Replace the Conv2d/Linear layers of ``model`` in place by compressed copies (see the module doc).

    ``example_input`` (one small batch) is needed only for ``spec.fold_bn``. Weight quantizers
    are initialised from the (folded) weights and frozen; input quantizers still estimate
    their range until :func:`calibrate_input_quantizers`. Returns the new layers by name.
    """
    if compressed_layers(model):
        raise ValueError("the model is already compressed")
    if spec.fold_bn:
        if example_input is None:
            raise ValueError("folding batch norm needs an example input")
        fold_batch_norms(model, example_input)
    layers = {name: m for name, m in weight_layers(model) if type(m) in (nn.Conv2d, nn.Linear)}
    skipped = [name for name, _ in weight_layers(model) if name not in layers]
    if skipped:
        logger.warning("not compressed (only Conv2d and Linear are supported): %s", ", ".join(skipped))
    names = list(layers)
    weight_bits = layer_bit_widths(names, spec.weight_quant.n_bits, spec.quant_setup) if spec.weight_quant else {}
    act_bits = layer_bit_widths(names, spec.act_quant.n_bits, spec.quant_setup) if spec.act_quant else {}
    new_layers: dict[str, nn.Module] = {}
    for name in names:
        w_bits, a_bits = weight_bits.get(name), act_bits.get(name)
        w_config = dataclasses.replace(spec.weight_quant, n_bits=w_bits) if w_bits is not None else None
        a_config = dataclasses.replace(spec.act_quant, n_bits=a_bits) if a_bits is not None else None
        layer = layers[name]
        cls = QuantizedConv2d if isinstance(layer, nn.Conv2d) else QuantizedLinear
        new_layers[name] = cls.from_float(layer, w_config, a_config, spec.prune)
        model.set_submodule(name, new_layers[name])
    return new_layers


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def calibrate_input_quantizers(model: nn.Module, batches: Iterable[torch.Tensor], train_mode: bool = False) -> int:
    """Estimate the input quantizers' ranges on ``batches``, then freeze them.

    In eval mode by default (the activations the model is evaluated with); ``train_mode``
    uses the activations training sees (batch statistics in batch norm; the running
    statistics are restored afterwards). Returns the number of batches used (0 when the
    model has no input quantizers).
    """
    quantizers = [layer.input_quantizer for layer in compressed_layers(model).values() if layer.input_quantizer]
    if not quantizers:
        return 0
    for quantizer in quantizers:
        quantizer.start_estimating()
    was_training = model.training
    saved_stats = [{k: v.clone() for k, v in m.state_dict().items()} for m in _batch_norms(model)]
    model.train(train_mode)
    count = 0
    try:
        for batch in batches:
            model(batch)
            count += 1
    finally:
        model.train(was_training)
        for m, state in zip(_batch_norms(model), saved_stats):
            m.load_state_dict(state)
        for quantizer in quantizers:
            quantizer.freeze_range()
    if count == 0:
        raise ValueError("no batches to estimate the activation ranges on")
    return count


@torch.no_grad()
def reestimate_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Recompute every batch norm's running mean/variance on ``batches``.

    The statistics are reset and accumulated as a plain (cumulative) average over the batches
    (``momentum=None``) in train mode, without gradients; the momenta and the model's mode are
    restored afterwards. Returns the number of batches used.
    """
    norms = _batch_norms(model)
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    count = 0
    try:
        for batch in batches:
            model(batch)
            count += 1
    finally:
        model.train(was_training)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    return count


def layer_report(model: nn.Module) -> dict[str, dict[str, float | int | None]]:
    """Per compressed layer: ``sparsity`` (share of zeros in ``weight * mask``), ``weight_bits``, ``act_bits``, ``numel``."""
    report = {}
    with torch.no_grad():
        for name, layer in compressed_layers(model).items():
            weight = layer.masked_weight()
            report[name] = {
                "numel": weight.numel(),
                "sparsity": float((weight == 0).sum().item()) / weight.numel(),
                "weight_bits": layer.weight_quantizer.config.n_bits if layer.weight_quantizer else None,
                "act_bits": layer.input_quantizer.config.n_bits if layer.input_quantizer else None,
            }
    return report
