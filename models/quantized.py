"""Quantized and prunable copies of a classifier's weight layers, batch-norm folding and re-estimation.

:func:`compress_model` replaces every weight layer of the weight study (``nn.Conv1d/2d/3d``,
``nn.ConvTranspose1d/2d/3d``, ``nn.Linear``: torchvision ResNets and MobileNet-V2, our
EfficientNet-Lite0, or any model built from those layers) by its compressed copy
(:class:`QuantizedConv2d`, :class:`QuantizedLinear`, ...; see :data:`COMPRESSED_TYPES`) that keeps
the original weight and bias parameters and adds, each optional:

* ``weight_quantizer``: a fake quantizer applied to the weight, made by the spec's
  ``quantizer_factory`` (default :class:`quantization.fake_quant.FakeQuantizer`; initialised
  from the weight with the configured range estimator, then frozen, so its step size is
  learned - LSQ). Per-channel step sizes run along the layer's output channels (axis 1 of a
  ConvTranspose weight);
* ``input_quantizer``: a fake quantizer of the layer's input activation (its range is
  estimated on data with :func:`calibrate_input_quantizers`);
* ``weight_mask``: a boolean buffer shaped like the weight, ``True`` where the weight is kept
  (any pattern, so structured masks fit as well as unstructured ones).

The layer computes ``op(q_in(x), q_w(weight * weight_mask), bias)``: pruned weights are zero
before quantization, and they get no gradient.
A convolution whose input is smaller than its kernel computes in float32 under CPU bfloat16
autocast (:func:`bfloat16_gradient_unsafe`: torch's bfloat16 gradients are wrong there).

Which layers are quantized at which bit-width (``quant_setup``):

* ``all`` - every layer at ``n_bits``;
* ``LSQ_paper`` - the first and the last layer at 8 bits, all others at ``n_bits`` (the paper);
* ``FP_logits`` - every layer at ``n_bits`` except the last (the classifier), kept in floating point;
* ``FP_first_last`` - the first and the last layer in floating point, the others at ``n_bits``;
* ``LIMPQ`` - LIMPQ's fine-tuning (Tang et al., ECCV 2022): the first layer's weights at 8 bits
  and its input (the image) in floating point, the last layer at 8 bits, all others at ``n_bits``
  (a ``--bit-policy`` from ``search-bit-policy`` then sets the searched layers).

"First" and "last" are the first and last compressed layer in module order, which is the
execution order for the supported architectures. Activation quantizers follow the same rule
with the activation bit-width (``LIMPQ``: no input quantizer on the first layer). A :class:`models.bit_policy.BitPolicy` (``spec.bit_policy``)
then overrides the bit-widths of the layers it names; the others keep the ``quant_setup`` ones.

A subclass of those layer types (its forward is unknown, e.g. the output projection of
``nn.MultiheadAttention``) is left in floating point, named in one warning line.

Batch norm is kept as a separate layer by default (the paper), or folded into the preceding
convolution before quantization (:func:`fold_batch_norms`, deployment style: the quantized
weights are then the folded ones).
"""
from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from models.bit_policy import BitPolicy, apply_bit_policy, check_policy_layers
from models.layers import output_channel_axis, weight_layers
from quantization.fake_quant import FakeQuantizer, QuantizerConfig

logger = logging.getLogger(__name__)

__all__ = [
    "COMPRESSED_TYPES",
    "CompressionSpec",
    "LayerQuantizer",
    "QuantSetup",
    "QuantizedConv1d",
    "QuantizedConv2d",
    "QuantizedConv3d",
    "QuantizedConvTranspose1d",
    "QuantizedConvTranspose2d",
    "QuantizedConvTranspose3d",
    "QuantizedLinear",
    "QuantizerFactory",
    "calibrate_input_quantizers",
    "compress_model",
    "compressed_layers",
    "compressible_layers",
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
    LIMPQ = "LIMPQ"


def layer_bit_widths(
    layer_names: list[str], n_bits: int, setup: QuantSetup | str, inputs: bool = False
) -> dict[str, int | None]:
    """Bit-width of each layer's weights (``inputs``: of its input) under ``setup`` (``None``: floating point)."""
    setup = QuantSetup(setup)
    bits: dict[str, int | None] = {name: n_bits for name in layer_names}
    if not layer_names:
        return bits
    first, last = layer_names[0], layer_names[-1]
    if setup is QuantSetup.LSQ_PAPER:
        bits[first] = bits[last] = FIRST_LAST_BITS
    elif setup is QuantSetup.LIMPQ:
        bits[first] = bits[last] = FIRST_LAST_BITS
        if inputs:
            bits[first] = None
    elif setup is QuantSetup.FP_LOGITS:
        bits[last] = None
    elif setup is QuantSetup.FP_FIRST_LAST:
        bits[first] = bits[last] = None
    return bits


@runtime_checkable
class LayerQuantizer(Protocol):
    """What a compressed layer needs of a fake quantizer (an ``nn.Module`` called on the tensor).

    Its learnable parameters (those with ``requires_grad``) are its step sizes: they join the
    quantizer optimizer (:func:`training.builders.step_size_parameters`).
    """

    @property
    def n_bits(self) -> int: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def estimate_range(self, x: torch.Tensor) -> None: ...

    def start_estimating(self) -> None: ...

    def freeze_range(self) -> None: ...


# ``factory(config, shape)``: the quantizer of one tensor; ``shape`` is the weight's shape, ``None`` for an input.
QuantizerFactory = Callable[[QuantizerConfig, Sequence[int] | None], nn.Module]


@dataclass(frozen=True)
class CompressionSpec:
    """How :func:`compress_model` converts a model.

    ``weight_quant`` / ``act_quant`` are the quantizer templates (``None``: no quantization);
    their ``n_bits`` is the bit-width of the body, ``quant_setup`` decides the first and last layer,
    ``bit_policy`` (optional) overrides the layers it names. ``quantizer_factory`` makes every
    quantizer from its config (a weight quantizer's granularity axis set to the layer's output
    channels) and the tensor shape.
    """

    weight_quant: QuantizerConfig | None = None
    act_quant: QuantizerConfig | None = None
    quant_setup: QuantSetup = QuantSetup.LSQ_PAPER
    prune: bool = False
    fold_bn: bool = False
    bit_policy: BitPolicy | None = None
    quantizer_factory: QuantizerFactory = FakeQuantizer


class _CompressedLayer:
    """The parts shared by every compressed layer type."""

    weight: nn.Parameter
    weight_mask: torch.Tensor | None
    weight_quantizer: nn.Module | None
    input_quantizer: nn.Module | None

    def _attach(
        self,
        weight_quant: QuantizerConfig | None,
        act_quant: QuantizerConfig | None,
        prune: bool,
        factory: QuantizerFactory = FakeQuantizer,
    ) -> None:
        if weight_quant is not None and not weight_quant.granularity.is_per_tensor:
            axis = output_channel_axis(self)  # type: ignore[arg-type]
            weight_quant = dataclasses.replace(weight_quant, granularity=dataclasses.replace(weight_quant.granularity, axis=axis))
        self.weight_quantizer = factory(weight_quant, tuple(self.weight.shape)) if weight_quant is not None else None
        self.input_quantizer = factory(act_quant, None) if act_quant is not None else None
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


def bfloat16_gradient_unsafe(x: torch.Tensor, kernel_size: Sequence[int], dilation: Sequence[int]) -> bool:
    """Whether a convolution of ``x`` under CPU bfloat16 autocast must run in float32 instead.

    torch 2.14.1's CPU bfloat16 convolution gradients read uninitialised memory (NaN or
    garbage, different from run to run) on degenerate shapes, e.g. a 3x3 convolution of stride 2
    on a 1x1 input (ResNet-18's ``layer4`` at 16x16 images). Every case found has a kernel
    extent ``dilation (k - 1) + 1`` larger than the input in some spatial dimension, so those
    calls leave autocast; they occur only on tiny feature maps, where float32 costs nothing.
    """
    if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return False
    extents = [step * (size - 1) + 1 for step, size in zip(dilation, kernel_size)]
    return any(extent > length for extent, length in zip(extents, x.shape[-len(extents):]))


class _CompressedConv(_CompressedLayer):
    """``from_float`` of the convolutions (plain and transposed): same geometry, the original parameters."""

    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._compute(x, lambda inputs, weight: self._conv_forward(inputs, weight, self.bias))  # type: ignore[attr-defined]

    def _compute(self, x: torch.Tensor, conv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``conv(q_in(x), q_w(weight * mask))``, in float32 where :func:`bfloat16_gradient_unsafe`."""
        if not bfloat16_gradient_unsafe(x, self.kernel_size, self.dilation):
            return conv(self.quantize_input(x), self.effective_weight())
        with torch.autocast("cpu", enabled=False):
            return conv(self.quantize_input(x.float()), self.effective_weight().float())

    @classmethod
    def from_float(
        cls,
        conv: nn.modules.conv._ConvNd,
        weight_quant: QuantizerConfig | None,
        act_quant: QuantizerConfig | None,
        prune: bool,
        factory: QuantizerFactory = FakeQuantizer,
    ) -> nn.Module:
        extra = {"output_padding": conv.output_padding} if conv.transposed else {}
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device="meta", **extra,
        )  # fmt: skip
        layer.weight, layer.bias = conv.weight, conv.bias
        layer._attach(weight_quant, act_quant, prune, factory)
        return layer.train(conv.training)


class QuantizedConv1d(_CompressedConv, nn.Conv1d):
    """``nn.Conv1d`` with optional weight/input fake quantization and a pruning mask."""


class QuantizedConv2d(_CompressedConv, nn.Conv2d):
    """``nn.Conv2d`` with optional weight/input fake quantization and a pruning mask."""


class QuantizedConv3d(_CompressedConv, nn.Conv3d):
    """``nn.Conv3d`` with optional weight/input fake quantization and a pruning mask."""


class _CompressedConvTranspose(_CompressedConv):
    """The transposed convolutions' forward (as torch's, with the effective weight and quantized input)."""

    _spatial_dims: int
    _functional: Callable[..., torch.Tensor]

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if self.padding_mode != "zeros":  # type: ignore[attr-defined]
            raise ValueError(f"only 'zeros' padding mode is supported for {type(self).__name__}")
        output_padding = self._output_padding(  # type: ignore[attr-defined]
            x, output_size, self.stride, self.padding, self.kernel_size, self._spatial_dims, self.dilation  # type: ignore[attr-defined]
        )
        return self._compute(x, lambda inputs, weight: type(self)._functional(
            inputs, weight, self.bias, self.stride, self.padding, output_padding, self.groups, self.dilation  # type: ignore[attr-defined]
        ))  # fmt: skip


class QuantizedConvTranspose1d(_CompressedConvTranspose, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with optional weight/input fake quantization and a pruning mask."""

    _spatial_dims = 1
    _functional = staticmethod(F.conv_transpose1d)


class QuantizedConvTranspose2d(_CompressedConvTranspose, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with optional weight/input fake quantization and a pruning mask."""

    _spatial_dims = 2
    _functional = staticmethod(F.conv_transpose2d)


class QuantizedConvTranspose3d(_CompressedConvTranspose, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` with optional weight/input fake quantization and a pruning mask."""

    _spatial_dims = 3
    _functional = staticmethod(F.conv_transpose3d)


class QuantizedLinear(_CompressedLayer, nn.Linear):
    """``nn.Linear`` with optional weight/input fake quantization and a pruning mask."""

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        weight_quant: QuantizerConfig | None,
        act_quant: QuantizerConfig | None,
        prune: bool,
        factory: QuantizerFactory = FakeQuantizer,
    ) -> QuantizedLinear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        layer._attach(weight_quant, act_quant, prune, factory)
        return layer.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.effective_weight(), self.bias)


# float layer type -> its compressed copy (exact types: a subclass may compute something else)
COMPRESSED_TYPES: dict[type[nn.Module], type[_CompressedLayer]] = {
    nn.Conv1d: QuantizedConv1d,
    nn.Conv2d: QuantizedConv2d,
    nn.Conv3d: QuantizedConv3d,
    nn.ConvTranspose1d: QuantizedConvTranspose1d,
    nn.ConvTranspose2d: QuantizedConvTranspose2d,
    nn.ConvTranspose3d: QuantizedConvTranspose3d,
    nn.Linear: QuantizedLinear,
}


def compressed_layers(model: nn.Module) -> dict[str, _CompressedLayer]:
    """The compressed layers of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _CompressedLayer)}


def compressible_layers(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The weight layers :func:`compress_model` replaces by name, and those it leaves in float (name -> type name)."""
    layers, skipped = {}, {}
    for name, module in weight_layers(model):
        if type(module) in COMPRESSED_TYPES:
            layers[name] = module
        else:
            skipped[name] = type(module).__name__
    return layers, skipped


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
    """Replace the weight layers of ``model`` in place by compressed copies (see the module doc).

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
    layers, skipped = compressible_layers(model)
    names = list(layers)
    if spec.bit_policy is not None:
        check_policy_layers(spec.bit_policy, names, skipped, spec.weight_quant is not None, spec.act_quant is not None)
    if skipped:
        logger.warning("not compressed (subclasses of the supported layer types compute an unknown forward): %s",
                       ", ".join(f"{name} ({kind})" for name, kind in skipped.items()))  # fmt: skip
    weight_bits = layer_bit_widths(names, spec.weight_quant.n_bits, spec.quant_setup) if spec.weight_quant else {}
    act_bits = layer_bit_widths(names, spec.act_quant.n_bits, spec.quant_setup, inputs=True) if spec.act_quant else {}
    if spec.bit_policy is not None:
        weight_bits, act_bits = apply_bit_policy(spec.bit_policy, weight_bits, act_bits)
    new_layers: dict[str, nn.Module] = {}
    for name in names:
        w_bits, a_bits = weight_bits.get(name), act_bits.get(name)
        w_config = dataclasses.replace(spec.weight_quant, n_bits=w_bits) if w_bits is not None else None
        a_config = dataclasses.replace(spec.act_quant, n_bits=a_bits) if a_bits is not None else None
        layer = layers[name]
        cls = COMPRESSED_TYPES[type(layer)]
        new_layers[name] = cls.from_float(layer, w_config, a_config, spec.prune, spec.quantizer_factory)  # type: ignore[attr-defined]
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
                "weight_bits": layer.weight_quantizer.n_bits if layer.weight_quantizer is not None else None,
                "act_bits": layer.input_quantizer.n_bits if layer.input_quantizer is not None else None,
            }
    return report
