"""Data-free activation ranges from the batch norms (Nagel et al. 2019, "Data-Free Quantization", Sec. 5).

A batch norm's output is ``gamma_c * x_hat + beta_c`` with ``x_hat`` the normalised input, about
standard normal per channel ``c``; so with ``|x_hat| <= n`` (``n`` standard deviations, 6 by default)
it lies in ``[beta_c - n |gamma_c|, beta_c + n |gamma_c|]``, without looking at any data. The PSGD
code's ``x_max = max_c(beta_c + n gamma_c)`` is the upper end of that interval where ``gamma_c >= 0``
(``|gamma_c|`` keeps it an upper bound for a negative ``gamma_c``).

The intervals are carried through the graph (``torch.fx``) to the input of every compressed layer,
per channel as long as the channels stay apart, then per tensor:

* batch norm: the interval above, whatever its input;
* ReLU: ``[max(0, low), max(0, high)]`` (ReLU6 also clips at 6);
* addition of two tensors ``a + b`` (a residual connection): ``[low_a + low_b, high_a + high_b]``,
  channel by channel - the sum of the two branches' bounds. In a ResNet block
  ``relu(bn2(conv2(...)) + shortcut)`` the output is therefore bounded by
  ``max_c max(0, beta2_c + n |gamma2_c| + high_c(shortcut))``, ``high_c(shortcut)`` the projection's batch
  norm bound or, for an identity shortcut, the bound of the block's input (itself such a sum). The
  second batch norm alone (the PSGD code's bound) ignores the shortcut and is exceeded;
* max pooling, dropout, identity, ``contiguous``: unchanged; average pooling: unchanged (with zero
  padding the interval is widened to contain 0); flatten, view, reshape, mean: the per-tensor hull
  ``[min_c low_c, max_c high_c]``;
* anything else (a convolution or linear layer without batch norm after it, the model's input, a
  product, a concatenation): unknown.

A compressed layer whose input interval is unknown (the image entering the first convolution, the
hidden layers of VGG's classifier) has no data-free range: :func:`set_batch_norm_input_ranges` leaves
its input in floating point. The bound holds under the ``n``-sigma assumption only: an activation
beyond it is clipped by the quantizer.
"""
from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from models.quantized import COMPRESSED_TYPES, compressed_layers
from quantization.fake_quant import FakeQuantizer
from quantization.quantizers import params_from_range

__all__ = [
    "ACT_RANGE_CALIBRATE",
    "BatchNormRangeError",
    "Interval",
    "batch_norm_interval",
    "layer_input_intervals",
    "parse_act_range",
    "set_batch_norm_input_ranges",
]

logger = logging.getLogger(__name__)

ACT_RANGE_CALIBRATE = "calibrate"  # --act-range: estimate the ranges on training batches
ACT_RANGE_BN_PREFIX = "bn:"  # --act-range bn:N: the data-free batch-norm bound with N standard deviations
RELU6_CEILING = 6.0


class BatchNormRangeError(ValueError):
    """A model whose activation ranges cannot be bounded by its batch norms (one-line message)."""


def parse_act_range(text: str) -> float | None:
    """``calibrate`` -> ``None``; ``bn:N`` -> ``N`` (a positive finite number of standard deviations).

    Raises ``ValueError`` (one line) for anything else.
    """
    if text == ACT_RANGE_CALIBRATE:
        return None
    if text.startswith(ACT_RANGE_BN_PREFIX):
        try:
            n_sigma = float(text[len(ACT_RANGE_BN_PREFIX):])
        except ValueError:
            n_sigma = math.nan
        if math.isfinite(n_sigma) and n_sigma > 0:
            return n_sigma
    raise ValueError(f"{text!r} is neither {ACT_RANGE_CALIBRATE} nor bn:N with N a positive number of standard "
                     "deviations (e.g. bn:6)")  # fmt: skip


@dataclass(frozen=True)
class Interval:
    """``[low, high]`` of an activation: per channel (1-D tensors, float64) or per tensor (0-dim)."""

    low: torch.Tensor
    high: torch.Tensor

    def relu(self, ceiling: float = math.inf) -> Interval:
        return Interval(self.low.clamp(0.0, ceiling), self.high.clamp(0.0, ceiling))

    def hull(self) -> Interval:
        """``[min_c low_c, max_c high_c]``: one interval for the whole tensor."""
        return Interval(self.low.min(), self.high.max())

    def with_zero(self) -> Interval:
        return Interval(self.low.clamp(max=0.0), self.high.clamp(min=0.0))

    def __add__(self, other: Interval) -> Interval:
        """The interval of a sum: channel by channel where both have the same channels, else of the hulls."""
        if self.low.shape != other.low.shape and self.low.dim() and other.low.dim():
            return self.hull() + other.hull()
        return Interval(self.low + other.low, self.high + other.high)


def batch_norm_interval(norm: nn.modules.batchnorm._BatchNorm, n_sigma: float) -> Interval:
    """``[beta_c - n |gamma_c|, beta_c + n |gamma_c|]`` per channel (``gamma = 1``, ``beta = 0`` without affine)."""
    channels = norm.num_features
    gamma = norm.weight.detach().double().cpu() if norm.weight is not None else torch.ones(channels, dtype=torch.float64)
    beta = norm.bias.detach().double().cpu() if norm.bias is not None else torch.zeros(channels, dtype=torch.float64)
    spread = n_sigma * gamma.abs()
    return Interval(beta - spread, beta + spread)


_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                 nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                 nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)  # fmt: skip
_AVG_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_PASS_FUNCTIONS = {F.dropout, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                   F.adaptive_max_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}  # fmt: skip
_HULL_FUNCTIONS = {torch.flatten, torch.mean, torch.reshape}
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_HULL_METHODS = {"flatten", "view", "reshape", "mean"}
_PASS_METHODS = {"contiguous"}


class _CompressedLayerTracer(fx.Tracer):
    """A tracer that keeps the compressed layers (and torch.nn's own modules) as single calls."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, tuple(COMPRESSED_TYPES.values())) or super().is_leaf_module(module, qualified_name)


def _node_interval(node: fx.Node, intervals: dict[fx.Node, Interval | None], modules: dict[str, nn.Module],
                   n_sigma: float) -> Interval | None:  # fmt: skip
    """The interval of ``node``'s output from those of its inputs (see the module doc), ``None``: unknown."""
    inputs = [intervals.get(arg) if isinstance(arg, fx.Node) else None for arg in node.args]
    first = inputs[0] if inputs else None
    if node.op == "call_module":
        module = modules[str(node.target)]
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return batch_norm_interval(module, n_sigma)
        if first is None:
            return None
        if isinstance(module, nn.ReLU6):
            return first.relu(RELU6_CEILING)
        if isinstance(module, nn.ReLU):
            return first.relu()
        if isinstance(module, _PASS_MODULES):
            return first
        if isinstance(module, _AVG_POOL_MODULES):
            return first.with_zero() if module.padding else first
        if isinstance(module, nn.Flatten):
            return first.hull()
        return None
    if node.op == "call_function":
        if node.target in _ADD_FUNCTIONS and len(inputs) == 2 and "alpha" not in node.kwargs:
            return inputs[0] + inputs[1] if inputs[0] is not None and inputs[1] is not None else None
        if first is None:
            return None
        if node.target in _RELU_FUNCTIONS:
            return first.relu()
        if node.target is F.relu6:
            return first.relu(RELU6_CEILING)
        if node.target in _PASS_FUNCTIONS:
            return first
        if node.target in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d):
            return first.with_zero()
        if node.target in _HULL_FUNCTIONS:
            return first.hull()
        return None
    if node.op == "call_method" and first is not None:
        if node.target in ("relu", "relu_"):
            return first.relu()
        if node.target in ("add", "add_") and len(inputs) == 2 and inputs[1] is not None and "alpha" not in node.kwargs:
            return first + inputs[1]
        if node.target in _HULL_METHODS:
            return first.hull()
        if node.target in _PASS_METHODS:
            return first
    return None


def layer_input_intervals(model: nn.Module, n_sigma: float) -> dict[str, tuple[float, float] | None]:
    """Per compressed layer of ``model`` (:func:`models.quantized.compressed_layers`): the per-tensor interval
    ``(low, high)`` of its input from the batch-norm bounds, ``None`` where unknown (see the module doc).

    Raises :class:`BatchNormRangeError` when the model has no batch norm or cannot be traced.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise BatchNormRangeError(f"{type(model).__name__} has no batch norm to bound its activations with")
    try:
        graph = _CompressedLayerTracer().trace(model)
    except Exception as error:  # noqa: BLE001 - fx raises many types; any of them means: no graph
        first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise BatchNormRangeError(f"cannot trace {type(model).__name__} to follow its batch norms: {first_line}") from None
    modules = dict(model.named_modules())
    layers = compressed_layers(model)
    intervals: dict[fx.Node, Interval | None] = {}
    found: dict[str, tuple[float, float] | None] = dict.fromkeys(layers)
    for node in graph.nodes:
        if node.op == "call_module" and str(node.target) in layers and node.args and isinstance(node.args[0], fx.Node):
            interval = intervals.get(node.args[0])
            if interval is not None:
                hull = interval.hull()
                found[str(node.target)] = (float(hull.low), float(hull.high))
        intervals[node] = _node_interval(node, intervals, modules, n_sigma)
    return found


@torch.no_grad()
def set_batch_norm_input_ranges(model: nn.Module, n_sigma: float) -> list[str]:
    """Fix every input quantizer of ``model`` to its layer's batch-norm interval (:func:`layer_input_intervals`).

    Each quantizer (a :class:`quantization.fake_quant.FakeQuantizer`) gets the parameters of its scheme
    covering the interval (``[0, x_max]`` after a ReLU: an unsigned grid ``x_max / (2^a - 1) * (0 .. 2^a - 1)``
    for the asymmetric scheme) and is frozen. A layer without an interval loses its input quantizer (its
    input stays in floating point); their names are returned. Raises :class:`BatchNormRangeError` when
    no quantized input gets an interval.
    """
    intervals = layer_input_intervals(model, n_sigma)
    quantized = {name: layer for name, layer in compressed_layers(model).items() if layer.input_quantizer is not None}
    unbounded = [name for name in quantized if intervals[name] is None]
    if quantized and len(unbounded) == len(quantized):
        raise BatchNormRangeError(f"no quantized layer of {type(model).__name__} has a batch norm before its input")
    for name, layer in quantized.items():
        if intervals[name] is None:
            layer.input_quantizer = None
            continue
        quantizer = layer.input_quantizer
        if not isinstance(quantizer, FakeQuantizer):
            raise BatchNormRangeError(f"the batch-norm ranges set FakeQuantizer inputs, not {type(quantizer).__name__}")
        low, high = (torch.tensor(value, dtype=torch.float64) for value in intervals[name])
        params = params_from_range(low, high, quantizer.n_bits, quantizer.config.scheme)
        quantizer.step_size.copy_(params.step_size.to(quantizer.step_size).expand_as(quantizer.step_size))
        quantizer.zero_point.copy_(params.zero_point.to(quantizer.zero_point).expand_as(quantizer.zero_point))
        quantizer.freeze_range()
    if unbounded:
        logger.warning("--act-range bn:%g: no batch norm bounds the input of %s: kept in floating point",
                       n_sigma, ", ".join(unbounded))  # fmt: skip
    return unbounded
