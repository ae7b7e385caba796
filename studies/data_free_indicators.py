"""Layer importance indicators for LIMPQ's bit-width search that need no training.

LIMPQ (Tang et al., ECCV 2022) learns one step size per layer and bit-width and feeds them to an
integer program that picks each layer's weight and activation bit-width
(:mod:`studies.indicators`: minimise ``sum_l act[l, j_l] + alpha * weight[l, i_l]`` under cost
constraints). The indicators here replace the learned step sizes by quantization errors measured
directly on the pretrained model, in one pass and without gradients. Two kinds (:data:`KINDS`):

``"weight-mse"`` (no data)
    ``weight[l, i] = ||W_l - Q_b(W_l)||^2 / ||W_l||^2 = 10^(-SQNR / 10)`` at ``b = bits[i]``:
    the weight's quantization error relative to its energy, ``Q_b`` the symmetric signed
    quantizer with the MSE-optimal range (:func:`quantization.range_estimators.mse_range_search`,
    per tensor or per output channel). Relative, so that layers are comparable: it is scale free
    (a layer whose weights are 10x larger is not 100x more important), and for a white input
    (``E[x x^T] = sigma^2 I``) it is exactly the relative error of the layer's output,
    ``E||(W - Q_b(W)) x||^2 / E||W x||^2``, the quantity ``"output-mse"`` measures on real inputs.

    ``act[l, i]`` has no data to be measured on. It is an analytical noise model: the relative
    error of the MSE-optimally clipped symmetric ``b``-bit quantizer of a Gaussian signal,
    ``E[(x - Q_b(x))^2] / E[x^2]`` for ``x ~ N(0, 1)`` (:func:`studies.analytical_sqnr.optimal_threshold`;
    0.149, 0.0406, 0.0119, 0.00353 at 2, 3, 4, 5 bits), the same for every layer. For a white
    input it too is the relative output error, so both tables are in one unit; being equal across
    layers, it lets the cost constraints alone decide which layers' inputs get more bits.

``"output-mse"`` (calibration images)
    The layers' inputs are recorded on the images (:func:`models.layer_inputs.capture_layer_inputs`,
    forward pre-hooks; default images: the scikit-image sample photos,
    :func:`utils.images.sample_photo_batch`). For each layer with input ``x``, weight ``W`` and
    output ``y = f(x, W) + bias``:

    * ``weight[l, i] = ||f(x, Q_b(W)) - f(x, W)||^2 / ||y||^2``, only the weight quantized
      (symmetric, MSE-optimal range as above);
    * ``act[l, i] = ||f(Q_b(x), W) - f(x, W)||^2 / ||y||^2``, only the input quantized, per tensor
      with the MSE-optimal range of the whole recorded input: unsigned ``[0, 2^b - 1]`` when it has no
      negative value (post-ReLU), asymmetric otherwise (``act_scheme`` overrides).

    Sums run over all images, positions and channels (the bias cancels in the differences).

Both are relative squared errors, decreasing in the bit-width. The computation is deterministic
(no sampling: there is nothing to seed); every tensor is quantized and every layer evaluated in
float64, all bit-widths of a layer at once (stacked along the batch for inputs, along the output
channels of each group for weights).
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.bit_policy import MAX_BITS, MIN_BITS
from models.layer_inputs import capture_layer_inputs, resolve_layers
from models.layers import output_channel_axis
from quantization.grid_error import SortedValues, as_rows
from quantization.quantizers import QuantParams, QuantScheme, channel_view, params_from_range, quantize_dequantize
from quantization.range_estimators import mse_range_search
from studies.indicators import Indicators

__all__ = [
    "KINDS",
    "data_free_indicators",
    "gaussian_relative_mse",
    "layer_output_errors",
    "mse_quantized",
    "relative_weight_errors",
]

log = logging.getLogger(__name__)

KINDS = ("weight-mse", "output-mse")
# Elements of the largest float64 output (bit-widths x images x channels x positions) built at once.
_MAX_CHUNK_ELEMENTS = 1 << 24


def _check_bits(bits: Sequence[int]) -> tuple[int, ...]:
    bits = tuple(bits)
    if not bits or len(set(bits)) != len(bits):
        raise ValueError(f"bits must be distinct bit-widths, got {bits}")
    for n_bits in bits:
        if isinstance(n_bits, bool) or not isinstance(n_bits, (int, np.integer)) or not MIN_BITS <= n_bits <= MAX_BITS:
            raise ValueError(f"bit-widths must be integers in {MIN_BITS}..{MAX_BITS}, got {n_bits!r}")
    return tuple(int(n_bits) for n_bits in bits)


def mse_quantized(
    x: torch.Tensor, bits: Sequence[int], scheme: QuantScheme | str, ch_axis: int | None = None
) -> torch.Tensor:
    """``Q_b(x)`` for every ``b`` in ``bits``, stacked: shape ``(len(bits), *x.shape)``, float64.

    ``Q_b`` is the ``b``-bit quantizer of ``scheme`` whose range has the least squared error on
    ``x`` (:func:`quantization.range_estimators.mse_range_search`; the values are sorted once for
    all bit-widths), per tensor or per channel of ``ch_axis``.
    """
    x = x.detach().to(torch.float64)
    sorted_rows = SortedValues.from_rows(as_rows(x, ch_axis))
    quantized = []
    for n_bits in bits:
        params = params_from_range(*mse_range_search(sorted_rows, n_bits, scheme), n_bits, scheme)
        if ch_axis is not None:
            params = QuantParams(channel_view(params.step_size, x.dim(), ch_axis),
                                 channel_view(params.zero_point, x.dim(), ch_axis), params.q_min, params.q_max)  # fmt: skip
        quantized.append(quantize_dequantize(x, params))
    return torch.stack(quantized)


def _relative(errors: np.ndarray, energy: float) -> np.ndarray:
    """``errors / energy``; 0 where both are 0 (nothing to lose), ``inf`` for an error on zero energy."""
    if energy > 0:
        return errors / energy
    return np.where(errors > 0, np.inf, 0.0)


def relative_weight_errors(weight: torch.Tensor, bits: Sequence[int], ch_axis: int | None = None) -> np.ndarray:
    """``||W - Q_b(W)||^2 / ||W||^2`` for each ``b`` (symmetric signed, MSE-optimal range), float64 ``(len(bits),)``."""
    w = weight.detach().to(torch.float64)
    errors = (mse_quantized(w, bits, QuantScheme.SYMMETRIC, ch_axis) - w).square().flatten(1).sum(dim=1)
    return _relative(errors.numpy(), float(w.square().sum()))


@functools.cache
def _gaussian_relative_mse(n_bits: int) -> float:
    from studies.analytical_sqnr import Gaussian, optimal_threshold  # SciPy's integrate and optimize: weight-mse only

    gaussian = Gaussian()
    return optimal_threshold(gaussian, n_bits)[1] / gaussian.second_moment()


def gaussian_relative_mse(bits: Sequence[int]) -> np.ndarray:
    """``E[(x - Q_b(x))^2] / E[x^2]`` of the MSE-optimally clipped symmetric ``b``-bit quantizer of ``x ~ N(0, 1)``."""
    return np.array([_gaussian_relative_mse(int(n_bits)) for n_bits in bits], dtype=np.float64)


def _without_bias(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``f(x, weight)``: the layer's linear map (its own stride, padding, groups, ...) without the bias."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight)
    return module._conv_forward(x, weight, None)  # the conv's own padding modes, for any weight


def _groups(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.Linear) else module.groups


def _stacked_weights(module: nn.Module, weights: torch.Tensor) -> torch.Tensor:
    """``(K, C_out, ...)`` weights as one layer with ``K C_out`` outputs, each group's ``K`` copies side by side.

    With ``G`` groups, output ``c`` of group ``g`` reads only that group's inputs, so the ``K``
    weights of group ``g`` are put together: the outputs come out as ``(G, K, C_out / G)``.
    """
    n_weights, out_channels = weights.shape[:2]
    groups = _groups(module)
    grouped = weights.reshape(n_weights, groups, out_channels // groups, *weights.shape[2:])
    return grouped.transpose(0, 1).reshape(n_weights * out_channels, *weights.shape[2:])


def _with_bias(module: nn.Module, output: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``output + bias`` along the layer's output channels (the last axis of a Linear, axis 1 of a conv)."""
    if bias is None:
        return output
    return output + (bias if isinstance(module, nn.Linear) else channel_view(bias, output.dim(), 1))


def layer_output_errors(
    module: nn.Module,
    layer_input: torch.Tensor,
    weight_bits: Sequence[int],
    act_bits: Sequence[int],
    act_scheme: QuantScheme | str,
    weight_ch_axis: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Relative output errors of one Conv/Linear layer on its recorded input (see the module doc).

    Returns ``(weight, act)``: ``||f(x, Q_b(W)) - f(x, W)||^2 / ||y||^2`` for each ``b`` of
    ``weight_bits`` (symmetric, per tensor or per channel of ``weight_ch_axis``) and
    ``||f(Q_b(x), W) - f(x, W)||^2 / ||y||^2`` for each ``b`` of ``act_bits`` (``act_scheme``, per
    tensor), ``y = f(x, W) + bias``, float64. Since ``f`` is linear,
    ``f(x, Q(W)) - f(x, W) = f(x, Q(W) - W)``: one pass per chunk of images gives the errors of all
    weight bit-widths (:func:`_stacked_weights`), one more those of all input bit-widths (stacked
    along the batch). A chunk's float64 outputs hold at most about 2^24 elements.
    """
    weight = module.weight.detach().to(torch.float64)
    bias = None if module.bias is None else module.bias.detach().to(torch.float64)
    x = layer_input.detach().to(torch.float64)
    n_weight, n_act = len(weight_bits), len(act_bits)
    weight_deltas = _stacked_weights(module, mse_quantized(weight, weight_bits, QuantScheme.SYMMETRIC, weight_ch_axis) - weight)
    input_deltas = mse_quantized(x, act_bits, act_scheme) - x

    output_per_image = _without_bias(module, x[:1], weight).numel()
    chunk = max(1, _MAX_CHUNK_ELEMENTS // (output_per_image * max(n_weight, n_act, 1)))
    energy = torch.zeros((), dtype=torch.float64)
    weight_sse = torch.zeros(n_weight, dtype=torch.float64)
    act_sse = torch.zeros(n_act, dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        images = slice(start, start + chunk)
        energy += _with_bias(module, _without_bias(module, x[images], weight), bias).square().sum()
        if n_weight:
            # Output channels (a Linear's last axis) to axis 1, ordered (G, K, C_out / G).
            weight_error = _without_bias(module, x[images], weight_deltas)
            if isinstance(module, nn.Linear):
                weight_error = weight_error.movedim(-1, 1)
            by_bits = weight_error.reshape(weight_error.shape[0], _groups(module), n_weight, -1)
            weight_sse += by_bits.square().sum(dim=(0, 1, 3))
        if n_act:
            deltas = input_deltas[:, images]
            act_error = _without_bias(module, deltas.reshape(-1, *deltas.shape[2:]), weight)
            act_sse += act_error.reshape(n_act, -1).square().sum(dim=1)
    return _relative(weight_sse.numpy(), float(energy)), _relative(act_sse.numpy(), float(energy))


def _input_scheme(layer_input: torch.Tensor, act_scheme: QuantScheme | str | None) -> QuantScheme:
    """``act_scheme`` if given, else unsigned for an input without negative values, asymmetric otherwise."""
    if act_scheme is not None:
        return QuantScheme(act_scheme)
    return QuantScheme.UNSIGNED if bool((layer_input >= 0).all()) else QuantScheme.ASYMMETRIC


def data_free_indicators(
    model: nn.Module,
    layers: Sequence[str],
    bits: Sequence[int],
    kind: str,
    images: torch.Tensor | None = None,
    per_channel: bool = False,
    act_scheme: QuantScheme | str | None = None,
) -> Indicators:
    """Indicators of ``layers`` (Conv1d/2d/3d or Linear module names) at ``bits``, without training.

    Args:
        model: the (pretrained) float model; it is not modified.
        layers: module names, in the order of the rows of the result.
        bits: candidate bit-widths (distinct, in ``2..8``), the order of the columns.
        kind: ``"weight-mse"`` (no data) or ``"output-mse"`` (on ``images``); see the module doc.
        images: ``"output-mse"``'s calibration batch, ``(N, 3, H, W)`` (default: the scikit-image
            sample photos at 224 px); must be ``None`` for ``"weight-mse"``, which uses no data.
        per_channel: quantize weights per output channel instead of per tensor.
        act_scheme: the input quantizer's scheme for ``"output-mse"`` (default: per layer, unsigned
            for non-negative inputs, else asymmetric).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown indicator kind {kind!r}; expected one of {', '.join(KINDS)}")
    bits = _check_bits(bits)
    modules = resolve_layers(model, layers)
    if len(modules) != len(layers):
        raise ValueError(f"layers named more than once: {sorted({name for name in layers if list(layers).count(name) > 1})}")

    def ch_axis(module: nn.Module) -> int | None:
        return output_channel_axis(module) if per_channel else None

    if kind == "weight-mse":
        if images is not None:
            raise ValueError("the weight-mse indicators use no data: pass images=None (or use kind='output-mse')")
        weight = np.stack([relative_weight_errors(module.weight, bits, ch_axis(module)) for module in modules.values()])
        act = np.tile(gaussian_relative_mse(bits), (len(modules), 1))
        return Indicators(layers=tuple(modules), bits=bits, weight=weight, act=act)

    if images is None:
        from utils.images import sample_photo_batch  # lazy: reads the photos from scikit-image

        images = sample_photo_batch()
    inputs = capture_layer_inputs(model, list(modules), images)
    weight = np.empty((len(modules), len(bits)), dtype=np.float64)
    act = np.empty_like(weight)
    for row, (name, module) in enumerate(modules.items()):
        layer_input = inputs.pop(name)  # freed as soon as the layer is done
        scheme = _input_scheme(layer_input, act_scheme)
        weight[row], act[row] = layer_output_errors(module, layer_input, bits, bits, scheme, ch_axis(module))
        log.info("%s: weight %s, input (%s) %s", name, np.array2string(weight[row], precision=3),
                 scheme.value, np.array2string(act[row], precision=3))  # fmt: skip
    return Indicators(layers=tuple(modules), bits=bits, weight=weight, act=act)
