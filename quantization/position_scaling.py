"""Position-based scaled gradient (PSGD; Kim, Yoo & Kwak, NeurIPS 2020): the targets and the gradient scale.

PSGD trains with ``w <- w - lr * s(w) * dL/dw``: each weight's gradient is scaled by its distance
to the nearest *target* ``T(w)``,

    g <- lambda_s * |w - T(w)| * g,

so the gradient is exactly zero on a target (no epsilon) and the targets become sticky: the
full-precision weights end near them, and quantizing (targets: the quantization grid) or
magnitude-pruning (target: 0) afterwards costs little accuracy. The forward pass is unchanged.

Targets (:class:`Target`):

* ``GRID`` - per tensor, the symmetric *restricted* ``b``-bit grid ``delta * k`` with integers
  ``k = -(2^(b-1) - 1) .. 2^(b-1) - 1`` (no ``-2^(b-1)``) and step
  ``delta = max(|lo|, hi) / (2^(b-1) - 1)``, where ``lo`` and ``hi`` are exponential moving averages
  (momentum 0.1: ``m <- 0.1 * m_t + 0.9 * m``, the first step sets ``m``) of ``min(0, min w)`` and
  ``max(0, max w)`` (:class:`SymmetricRangeTracker`), so the grid follows the weights. ``T(w)`` is
  the grid point nearest to ``w`` (the outermost one beyond the range).
* ``ZERO`` - ``T(w) = 0``: ``g <- lambda_s * |w| * g`` (for magnitude pruning).

Which tensors are scaled (:func:`scaled_tensor_bits`), as in the official code: the weight of
every convolution and linear layer (1x1 shortcuts included), the first and the last such layer
at ``FIRST_LAST_BITS`` (8) when ``b < 4``; biases and batch norm not scaled, except, optionally,
the biases of the linear layers at their layer's bit-width (the official code does this).

Weight decay. With decay in the optimizer, the update is ``lr * (s(w) g + wd w)``: the decay is not
scaled and pulls the weights off the targets (the official code therefore sets it to 0 at 2
bits). :func:`position_scaled_gradient` can scale it too, ``s(w) (g + wd w)``; then the optimizer
must give the scaled tensors ``weight_decay=0`` (else they decay twice, once unscaled):
:func:`weight_decay_groups` builds such parameter groups. With AdamW the scaled decay is an L2
term (added to the gradient) rather than decoupled decay.
"""
from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from models.layers import weight_layers
from models.quantized import FIRST_LAST_BITS
from quantization.quantizers import QuantParams, quantize_dequantize

__all__ = [
    "DEFAULT_LAMBDA",
    "FIRST_LAST_BELOW_BITS",
    "RANGE_MOMENTUM",
    "SymmetricRangeTracker",
    "Target",
    "grid_distance",
    "grid_step_size",
    "nearest_grid_point",
    "position_scale",
    "position_scaled_gradient",
    "restricted_level_max",
    "scaled_tensor_bits",
    "weight_decay_groups",
    "zero_including_range",
]

DEFAULT_LAMBDA = 150.0  # the official code's lambda_s
RANGE_MOMENTUM = 0.1  # weight of the current step in the moving averages of the grid's range
FIRST_LAST_BELOW_BITS = 4  # the first and last layer use FIRST_LAST_BITS when the body has fewer bits


class Target(str, enum.Enum):
    """What the scaled weights are pulled to: the quantization grid or zero (pruning)."""

    GRID = "grid"
    ZERO = "zero"


# --------------------------------------------------------------------------- the grid


def restricted_level_max(n_bits: int) -> int:
    """``2^(b-1) - 1``: the grid's largest integer level; the levels are ``-that .. that``."""
    if n_bits < 2:
        raise ValueError(f"a symmetric grid needs at least 2 bits, got {n_bits}")
    return 2 ** (n_bits - 1) - 1


def zero_including_range(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min(0, min w), max(0, max w))`` of a non-empty tensor, as 0-dim tensors."""
    low, high = torch.aminmax(weight.detach())
    return low.clamp(max=0), high.clamp(min=0)


def grid_step_size(low: torch.Tensor, high: torch.Tensor, n_bits: int) -> torch.Tensor:
    """``delta = max(|low|, high) / (2^(b-1) - 1)``, kept strictly positive (an all-zero range gives the tiniest step)."""
    tiny = torch.finfo(low.dtype).tiny
    return (torch.maximum(low.abs(), high) / restricted_level_max(n_bits)).clamp(min=tiny)


def nearest_grid_point(weight: torch.Tensor, step_size: torch.Tensor, n_bits: int) -> torch.Tensor:
    """``T(w) = delta * clamp(round(w / delta), -(2^(b-1) - 1), 2^(b-1) - 1)``, element-wise."""
    level_max = restricted_level_max(n_bits)
    return quantize_dequantize(weight, QuantParams(step_size, torch.zeros_like(step_size), -level_max, level_max))


def grid_distance(weight: torch.Tensor, n_bits: int) -> float:
    """``mean |w - T(w)| / delta`` over the tensor, ``T`` the ``n_bits`` grid of its current range
    (:func:`nearest_grid_point`, step ``delta = max|w| / (2^(b-1) - 1)``, also the post-hoc quantizer's grid):
    0 when every weight is on the grid, about 0.25 when they are spread evenly between its points."""
    weight = weight.detach().double()
    step_size = grid_step_size(*zero_including_range(weight), n_bits)
    return float(((weight - nearest_grid_point(weight, step_size, n_bits)).abs() / step_size).mean())


class SymmetricRangeTracker:
    """Moving averages of ``min(0, min w)`` and ``max(0, max w)`` of one tensor over the training steps.

    ``low <- momentum * low_t + (1 - momentum) * low`` (likewise ``high``); the first update sets
    them. The state (0-dim tensors on the weight's device) is :meth:`state_dict` for checkpoints.
    (:class:`quantization.range_estimators.RunningMinMax` averages the plain extremes, with the
    momentum on the old value.)
    """

    def __init__(self, momentum: float = RANGE_MOMENTUM) -> None:
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, weight: torch.Tensor) -> None:
        low, high = zero_including_range(weight)
        if self.low is None or self.high is None:
            self.low, self.high = low, high
            return
        self.low = torch.lerp(self.low.to(low), low, self.momentum)
        self.high = torch.lerp(self.high.to(high), high, self.momentum)

    def step_size(self, n_bits: int) -> torch.Tensor:
        """The grid step of the averaged range (:func:`grid_step_size`)."""
        if self.low is None or self.high is None:
            raise RuntimeError("the range tracker has not seen the weights yet (call update first)")
        return grid_step_size(self.low, self.high, n_bits)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"low": ..., "high": ...}``; empty before the first update."""
        if self.low is None or self.high is None:
            return {}
        return {"low": self.low.clone(), "high": self.high.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) not in (set(), {"low", "high"}):
            raise KeyError(f"a range tracker's state has the keys low and high (or none), got {sorted(state)}")
        self.low = state["low"].clone() if state else None
        self.high = state["high"].clone() if state else None


# --------------------------------------------------------------------------- the scale


def position_scale(weight: torch.Tensor, target: torch.Tensor | None, lambda_s: float = DEFAULT_LAMBDA) -> torch.Tensor:
    """``s(w) = lambda_s * |w - T(w)|`` (``target`` = ``T(w)``; ``None`` means the zero target: ``lambda_s * |w|``)."""
    distance = weight.abs() if target is None else (weight - target).abs_()
    return distance.mul_(lambda_s)


def position_scaled_gradient(
    grad: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor | None,
    lambda_s: float = DEFAULT_LAMBDA,
    weight_decay: float = 0.0,
) -> torch.Tensor:
    """``lambda_s * |w - T(w)| * (g + wd * w)``: the scaled gradient, weight decay included when ``wd > 0``.

    Exactly zero where ``w`` is on a target. With ``weight_decay > 0`` the optimizer must not decay
    this tensor again (see the module doc and :func:`weight_decay_groups`).
    """
    scale = position_scale(weight.detach(), target, lambda_s)
    if weight_decay:
        grad = grad.add(weight.detach(), alpha=weight_decay)
    return scale.mul_(grad)


# --------------------------------------------------------------------------- which tensors


def scaled_tensor_bits(
    model: nn.Module,
    n_bits: int | None,
    first_last: bool = True,
    linear_biases: bool = False,
) -> dict[str, int | None]:
    """Parameter name -> grid bit-width of every tensor PSGD scales (``None``: the zero target).

    ``n_bits=None`` selects the zero target (pruning) for every selected tensor. Selected: the
    weight of every Conv/ConvTranspose/Linear layer (:func:`models.layers.weight_layers`); the
    first and the last of them (module order) at ``FIRST_LAST_BITS`` when ``n_bits < 4``, or not at
    all without ``first_last``; with ``linear_biases`` also each selected linear layer's bias, at
    its layer's bit-width. Batch norm and other biases are never scaled.
    """
    if n_bits is not None:
        restricted_level_max(n_bits)  # validates
    layers = list(weight_layers(model))
    edges = {layers[0][0], layers[-1][0]} if layers else set()
    edge_bits = FIRST_LAST_BITS if n_bits is not None and n_bits < FIRST_LAST_BELOW_BITS else n_bits
    bits: dict[str, int | None] = {}
    for name, module in layers:
        if name in edges and not first_last:
            continue
        layer_bits = edge_bits if name in edges else n_bits
        prefix = f"{name}." if name else ""
        bits[f"{prefix}weight"] = layer_bits
        if linear_biases and isinstance(module, nn.Linear) and module.bias is not None:
            bits[f"{prefix}bias"] = layer_bits
    return bits


def weight_decay_groups(model: nn.Module, scaled: Iterable[str], weight_decay: float) -> list[dict]:
    """Optimizer parameter groups for scaled weight decay: the ``scaled`` tensors with ``weight_decay=0``
    (:func:`position_scaled_gradient` decays them), all other parameters with ``weight_decay``."""
    scaled = set(scaled)
    named = dict(model.named_parameters())
    unknown = scaled - named.keys()
    if unknown:
        raise KeyError(f"not parameters of the model: {', '.join(sorted(unknown))}")
    groups = [
        {"params": [p for n, p in named.items() if n in scaled], "weight_decay": 0.0},
        {"params": [p for n, p in named.items() if n not in scaled], "weight_decay": weight_decay},
    ]
    return [group for group in groups if group["params"]]
