"""Uniform integer quantizers as pure functions.

A uniform quantizer with step size ``s``, integer zero point ``z`` and integer range
``[q_min, q_max]`` maps ``x`` to the integer ``q = clamp(round(x / s) + z, q_min, q_max)``
and back to ``x_hat = s * (q - z)``.

Schemes (``b`` = number of bits):

* symmetric: ``q`` in ``[-2^(b-1), 2^(b-1) - 1]``, ``z = 0``, and for a clipping threshold
  ``T`` the step is ``s = T / (2^(b-1) - 1)`` (the paper's convention: the positive side
  ends exactly at ``T``, the negative side one step further, at ``-T - s``);
* unsigned (post-ReLU): ``q`` in ``[0, 2^b - 1]``, ``z = 0``, ``s = T / (2^b - 1)``;
* asymmetric: ``q`` in ``[0, 2^b - 1]``, range ``[lo, hi]`` (widened to contain 0),
  ``s = (hi - lo) / (2^b - 1)``, ``z = round(-lo / s)``.

Step sizes and zero points broadcast against ``x``: a scalar gives a per-tensor quantizer,
a tensor shaped like :func:`channel_view` gives one quantizer per channel.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class QuantScheme(str, enum.Enum):
    SYMMETRIC = "symmetric"
    ASYMMETRIC = "asymmetric"
    UNSIGNED = "unsigned"


def integer_range(n_bits: int, scheme: QuantScheme | str) -> tuple[int, int]:
    """The integers ``(q_min, q_max)`` a ``n_bits`` quantizer of ``scheme`` can produce."""
    if not 1 <= n_bits <= 32:
        raise ValueError(f"n_bits must be in 1..32, got {n_bits}")
    if QuantScheme(scheme) is QuantScheme.SYMMETRIC:
        if n_bits < 2:
            raise ValueError("a symmetric quantizer needs at least 2 bits")
        return -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1
    return 0, 2**n_bits - 1


@dataclass(frozen=True)
class QuantParams:
    """Everything that defines a uniform quantizer: ``x_hat = step_size * (q - zero_point)``."""

    step_size: torch.Tensor
    zero_point: torch.Tensor
    q_min: int
    q_max: int


def channel_view(values: torch.Tensor, ndim: int, ch_axis: int) -> torch.Tensor:
    """Reshape per-channel ``values`` (shape ``(C,)``) to broadcast along ``ch_axis`` of an ``ndim`` tensor."""
    shape = [1] * ndim
    shape[ch_axis] = -1
    return values.reshape(shape)


def params_from_range(
    min_val: torch.Tensor, max_val: torch.Tensor, n_bits: int, scheme: QuantScheme | str
) -> QuantParams:
    """Quantization parameters covering ``[min_val, max_val]`` (element-wise: any shape).

    The step size is kept strictly positive, so an all-zero tensor quantizes to zeros.
    """
    scheme = QuantScheme(scheme)
    q_min, q_max = integer_range(n_bits, scheme)
    min_val = torch.as_tensor(min_val)
    max_val = torch.as_tensor(max_val, dtype=min_val.dtype, device=min_val.device)
    tiny = torch.finfo(min_val.dtype if min_val.is_floating_point() else torch.float32).tiny
    if scheme is QuantScheme.SYMMETRIC:
        threshold = torch.maximum(min_val.abs(), max_val.abs())
        step_size = (threshold / q_max).clamp_min(tiny)
        zero_point = torch.zeros_like(step_size)
    elif scheme is QuantScheme.UNSIGNED:
        step_size = (max_val.clamp_min(0) / q_max).clamp_min(tiny)
        zero_point = torch.zeros_like(step_size)
    else:
        lo, hi = min_val.clamp_max(0), max_val.clamp_min(0)
        step_size = ((hi - lo) / (q_max - q_min)).clamp_min(tiny)
        zero_point = torch.round(-lo / step_size).clamp(q_min, q_max)
    return QuantParams(step_size, zero_point, q_min, q_max)


def quantize(x: torch.Tensor, params: QuantParams) -> torch.Tensor:
    """Integers ``clamp(round(x / s) + z, q_min, q_max)``, as a floating-point tensor."""
    return torch.clamp(torch.round(x / params.step_size) + params.zero_point, params.q_min, params.q_max)


def dequantize(q: torch.Tensor, params: QuantParams) -> torch.Tensor:
    """``s * (q - z)``."""
    return (q - params.zero_point) * params.step_size


def quantize_dequantize(x: torch.Tensor, params: QuantParams) -> torch.Tensor:
    """The value each element of ``x`` is quantized to (no gradient semantics)."""
    return dequantize(quantize(x, params), params)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward pass, identity in the backward pass (straight-through)."""
    return x + (torch.round(x) - x).detach()


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``scale`` (LSQ's step-size scaling)."""
    return x * scale + (x - x * scale).detach()


def fake_quantize(
    x: torch.Tensor,
    step_size: torch.Tensor,
    zero_point: torch.Tensor,
    q_min: int,
    q_max: int,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """Differentiable quantize-dequantize (LSQ, Esser et al. 2020).

    ``x_hat = s * (round_ste(clamp(x / s + z, q_min, q_max)) - z)``, equal to
    :func:`quantize_dequantize` for an integer ``z``. Clamping before rounding gives exactly
    LSQ's gradients: w.r.t. ``x``, 1 where ``q_min <= x/s + z <= q_max`` and 0 outside
    (straight-through estimator); w.r.t. ``s``, ``round(x/s) - x/s`` inside and ``q_min - z``
    or ``q_max - z`` outside, multiplied by ``grad_scale``.
    """
    step_size = scale_gradient(step_size, grad_scale) if grad_scale != 1.0 else step_size
    q = round_ste(torch.clamp(x / step_size + zero_point, q_min, q_max))
    return (q - zero_point) * step_size
