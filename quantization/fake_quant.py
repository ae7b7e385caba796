"""A fake-quantization module for training: learnable step size, pluggable range estimator.

The module holds the quantizer's state (step size as an ``nn.Parameter``, zero point as a
buffer, both created with their final shape: one value per group of the configured
:class:`quantization.granularity.Granularity`) so that per-layer bit-widths, per-channel (or
per-block) step sizes and LSQ-style learning fit one building block. Its forward pass is
:func:`quantization.quantizers.fake_quantize`.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from quantization.granularity import Granularity, GranularityKind
from quantization.grid_error import accumulation_dtype
from quantization.quantizers import QuantScheme, fake_quantize, integer_range, params_from_range
from quantization.range_estimators import RunningMinMax, current_minmax, mse_range


class RangeEstimator(str, enum.Enum):
    CURRENT_MINMAX = "current_minmax"
    RUNNING_MINMAX = "running_minmax"
    MSE = "mse"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor of ``dtype`` is quantized in: at least float32 (float16/bfloat16 -> float32, float64 kept)."""
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else torch.float32


@dataclass(frozen=True)
class QuantizerConfig:
    """How one tensor is quantized (``granularity``: which elements share a step size)."""

    n_bits: int = 8
    scheme: QuantScheme = QuantScheme.SYMMETRIC
    granularity: Granularity = field(default_factory=Granularity.per_tensor)
    range_estimator: RangeEstimator = RangeEstimator.CURRENT_MINMAX
    running_momentum: float = 0.9
    learn_step_size: bool = True
    grad_scaling: bool = False


class FakeQuantizer(nn.Module):
    """Quantize-dequantize ``x`` with straight-through gradients.

    While ``estimating`` is True (the default until :meth:`freeze_range` is called), every
    forward pass first sets the step size and zero point from the configured range
    estimator; afterwards the step size is a trainable parameter (when ``learn_step_size``).
    With ``grad_scaling`` the step-size gradient is scaled by ``1 / sqrt(numel * q_max)`` (LSQ).

    Half-precision inputs (float16/bfloat16, e.g. activations under autocast) are quantized in
    float32 and the result cast back to the input's dtype: the step size stays a float32
    parameter, and in half precision ``x / s`` would be rounded before ``round`` (bfloat16 keeps 8
    significant bits, so ``x / s`` near 63 is off by up to 0.25 levels) and the step-size
    gradient ``round(x/s + z) - z - x/s`` (its autograd form ``(x / s) / s`` overflows float16
    for ``|x| / s^2 > 65504``: a NaN gradient wherever the clamp zeroes the incoming one).
    """

    def __init__(self, config: QuantizerConfig, shape: Sequence[int] | None = None) -> None:
        """``shape``: the quantized tensor's shape, needed (for the number of step sizes) unless per tensor."""
        super().__init__()
        self.config = config
        granularity = config.granularity
        if shape is None and not granularity.is_per_tensor:
            raise ValueError(f"a {granularity.describe()} quantizer needs the shape of the tensor it quantizes")
        param_shape = granularity.param_shape(shape) if shape is not None else ()
        self.q_min, self.q_max = integer_range(config.n_bits, config.scheme)
        self.step_size = nn.Parameter(torch.ones(param_shape), requires_grad=config.learn_step_size)
        self.register_buffer("zero_point", torch.zeros(param_shape))
        self.estimating = True
        self._running = self._new_running()

    @property
    def n_bits(self) -> int:
        """The bit-width the quantizer currently quantizes to."""
        return self.config.n_bits

    def _new_running(self) -> RunningMinMax | None:
        if self.config.range_estimator is not RangeEstimator.RUNNING_MINMAX:
            return None
        granularity = self.config.granularity
        # per block: the running statistics are kept per block, fed with rows ``[block min, block max]``
        axis = 0 if granularity.kind is GranularityKind.PER_BLOCK else granularity.channel_axis
        return RunningMinMax(self.config.running_momentum, axis)

    def _block_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min and max of each block of channels (the configured estimator, per block)."""
        granularity, config = self.config.granularity, self.config
        if config.range_estimator is RangeEstimator.MSE:
            channels = x.shape[granularity.axis]
            ranges = [mse_range(x.narrow(granularity.axis, start, min(granularity.block_size, channels - start)),
                                config.n_bits, config.scheme)
                      for start in range(0, channels, granularity.block_size)]  # fmt: skip
            return torch.stack([lo for lo, _ in ranges]), torch.stack([hi for _, hi in ranges])
        min_val, max_val = current_minmax(x, granularity.axis)
        min_val, max_val = granularity.reduce_channels(min_val, "amin"), granularity.reduce_channels(max_val, "amax")
        if self._running is not None:
            min_val, max_val = self._running.update(torch.stack([min_val, max_val], dim=1))
        return min_val, max_val

    @torch.no_grad()
    def estimate_range(self, x: torch.Tensor) -> None:
        """Set step size and zero point from ``x`` with the configured estimator."""
        ch_axis = self.config.granularity.channel_axis
        if self.config.granularity.kind is GranularityKind.PER_BLOCK:
            min_val, max_val = self._block_range(x)
        elif self._running is not None:
            min_val, max_val = self._running.update(x)
        elif self.config.range_estimator is RangeEstimator.MSE:
            min_val, max_val = mse_range(x, self.config.n_bits, self.config.scheme, ch_axis)
        else:
            min_val, max_val = current_minmax(x, ch_axis)
        wide = accumulation_dtype(x.device)  # (hi - lo) / (q_max - q_min) of float16 extremes, not in float16
        params = params_from_range(min_val.to(wide), max_val.to(wide), self.config.n_bits, self.config.scheme)
        dtype = compute_dtype(x.dtype)
        if self.step_size.shape != params.step_size.shape:
            raise ValueError(f"a {self.config.granularity.describe()} quantizer of {tuple(self.step_size.shape)} step "
                             f"sizes cannot quantize a tensor of shape {tuple(x.shape)}")  # fmt: skip
        if self.step_size.dtype != dtype or self.step_size.device != x.device:
            self.to(device=x.device, dtype=dtype)  # the state follows the quantized tensor (shapes unchanged)
        # The step is computed in float64: keep it positive after the cast (all-zero input).
        self.step_size.copy_(params.step_size.to(dtype).clamp_min(torch.finfo(dtype).tiny))
        self.zero_point.copy_(params.zero_point.to(dtype))

    def start_estimating(self) -> None:
        """Estimate the range afresh from the next forward passes on (running statistics forgotten)."""
        self.estimating = True
        if self._running is not None:
            self._running = self._new_running()

    def freeze_range(self) -> None:
        """Stop re-estimating the range; the step size is learned from now on."""
        self.estimating = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.estimating:
            self.estimate_range(x)
        granularity = self.config.granularity
        step_size, zero_point = granularity.expand(self.step_size, x.shape), granularity.expand(self.zero_point, x.shape)
        grad_scale = 1.0 / math.sqrt(x.numel() * self.q_max) if self.config.grad_scaling else 1.0
        dtype = torch.promote_types(compute_dtype(x.dtype), step_size.dtype)
        out = fake_quantize(x.to(dtype), step_size.to(dtype), zero_point.to(dtype), self.q_min, self.q_max, grad_scale)
        return out.to(x.dtype) if x.is_floating_point() else out

    def extra_repr(self) -> str:
        c = self.config
        return f"n_bits={c.n_bits}, scheme={c.scheme.value}, {c.granularity.describe()}, range={c.range_estimator.value}"
