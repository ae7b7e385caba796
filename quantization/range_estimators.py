"""Range estimators: which ``[min, max]`` a quantizer should cover.

* :func:`current_minmax` - the extremes of the tensor at hand;
* :class:`RunningMinMax` - an exponential moving average of the extremes over batches;
* :func:`mse_range` - the range whose quantizer has the least squared error on the tensor.

The MSE search never quantizes the tensor per candidate. The values are sorted once, with
prefix sums of ``x`` and ``x^2`` (:class:`SortedValues`). A uniform grid with levels
``L_k = s (k - z)`` sends every value to its nearest level (clipped values go to the end
levels), so the values of one level are a contiguous run ``[i_k, i_{k+1})`` of the sorted
array, found by binary search on the mid-points between levels, and

    SSE = sum_k (S2_k - 2 L_k S1_k + L_k^2 n_k),

with ``n_k``, ``S1_k``, ``S2_k`` the count, sum and sum of squares of the run, read off the
prefix sums. One candidate costs ``O(2^b log n)`` instead of ``O(n)``, so a dense grid of
candidates followed by local refinement is cheap. Sums are taken in float64 (float32 on
devices without float64) whatever the dtype of the tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from quantization.quantizers import QuantParams, QuantScheme, integer_range, params_from_range

# Elements of the largest intermediate (rows x candidates x levels) built at once.
_MAX_CHUNK_ELEMENTS = 1 << 22


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device supports it (not on Apple MPS), else float32."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def as_rows(x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    """``x`` as a 2-D ``(rows, n)`` tensor: one row per channel of ``ch_axis``, or a single row."""
    if ch_axis is None:
        return x.reshape(1, -1)
    return x.movedim(ch_axis, 0).reshape(x.shape[ch_axis], -1)


def current_minmax(x: torch.Tensor, ch_axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` (per channel of ``ch_axis``: shape ``(C,)``; else scalars)."""
    if ch_axis is None:
        return x.min(), x.max()
    rows = as_rows(x, ch_axis)
    return rows.min(dim=1).values, rows.max(dim=1).values


class RunningMinMax:
    """Exponential moving average of batch extremes: ``m <- momentum * m + (1 - momentum) * m_batch``.

    The first batch initialises the range directly.
    """

    def __init__(self, momentum: float = 0.9, ch_axis: int | None = None) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.ch_axis = ch_axis
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_min, batch_max = current_minmax(x.detach(), self.ch_axis)
        if self.min_val is None:
            self.min_val, self.max_val = batch_min, batch_max
        else:
            self.min_val = self.momentum * self.min_val + (1 - self.momentum) * batch_min
            self.max_val = self.momentum * self.max_val + (1 - self.momentum) * batch_max
        return self.min_val, self.max_val


def sort_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each row sorted ascending, returned in the accumulation dtype.

    Sorting happens in the input's precision (float16 as float32) and the result is cast
    afterwards, which is exact. On CPU numpy's vectorised sort is about three times faster
    than ``torch.sort``, and sorting dominates the weight study's run time.
    """
    dtype = accumulation_dtype(rows.device)
    if rows.device.type == "cpu":
        values = rows.detach().to(torch.float32 if rows.dtype in (torch.float16, torch.bfloat16) else rows.dtype)
        return torch.from_numpy(np.sort(values.numpy(), axis=1)).to(dtype).contiguous()
    return torch.sort(rows.detach(), dim=1).values.to(dtype).contiguous()


@dataclass(frozen=True)
class SortedValues:
    """Rows of values sorted ascending, with prefix sums ``[0, cumsum(x)]`` and ``[0, cumsum(x^2)]``."""

    values: torch.Tensor
    prefix_sum: torch.Tensor
    prefix_sum_sq: torch.Tensor

    @classmethod
    def from_rows(cls, rows: torch.Tensor) -> SortedValues:
        values = sort_rows(rows)
        zeros = values.new_zeros(values.shape[0], 1)
        prefix_sum = torch.cat([zeros, values.cumsum(dim=1)], dim=1)
        prefix_sum_sq = torch.cat([zeros, (values * values).cumsum(dim=1)], dim=1)
        return cls(values, prefix_sum, prefix_sum_sq)

    @property
    def n_rows(self) -> int:
        return self.values.shape[0]

    @property
    def n_values(self) -> int:
        return self.values.shape[1]


def _candidate_cost(n_values: int, n_levels: int) -> int:
    """Work per row and candidate: binned ``O(K log n)`` or direct ``O(n)``, whichever is smaller."""
    return min(n_values, n_levels * max(1, math.ceil(math.log2(n_values + 1))))


def basin_grid_size(n_rows: int, n_values: int, n_levels: int) -> int:
    """Points of the dense search over the near-optimal basin: about 2^19 units of work, in [16, 1024]."""
    return int(min(1024, max(16, (1 << 19) // (n_rows * _candidate_cost(n_values, n_levels)))))


def grid_sse(sorted_values: SortedValues, step_size: torch.Tensor, zero_point: torch.Tensor, q_min: int, q_max: int) -> torch.Tensor:
    """Sum of squared quantization errors of each row for each candidate grid.

    Args:
        sorted_values: ``R`` rows of ``n`` values.
        step_size, zero_point: ``(R, G)`` candidate grids per row.
    Returns:
        ``(R, G)`` sums of squared errors, exactly those of :func:`quantize_dequantize`
        (a value on a mid-point has the same error whichever neighbour it rounds to).
    """
    rows, n_candidates = step_size.shape
    n_levels = q_max - q_min + 1
    if _candidate_cost(sorted_values.n_values, n_levels) == sorted_values.n_values:
        return _direct_sse(sorted_values.values, step_size, zero_point, q_min, q_max)
    chunk = max(1, _MAX_CHUNK_ELEMENTS // (rows * n_levels))
    return torch.cat(
        [
            _binned_sse(sorted_values, step_size[:, i : i + chunk], zero_point[:, i : i + chunk], q_min, q_max)
            for i in range(0, n_candidates, chunk)
        ],
        dim=1,
    )


def _binned_sse(sv: SortedValues, step_size: torch.Tensor, zero_point: torch.Tensor, q_min: int, q_max: int) -> torch.Tensor:
    rows, n_candidates = step_size.shape
    integers = torch.arange(q_min, q_max + 1, dtype=step_size.dtype, device=step_size.device)
    levels = (integers - zero_point[..., None]) * step_size[..., None]  # (R, G, K)
    midpoints = 0.5 * (levels[..., 1:] + levels[..., :-1])
    cuts = torch.searchsorted(sv.values, midpoints.reshape(rows, -1)).reshape(rows, n_candidates, -1)
    first = cuts.new_zeros(rows, n_candidates, 1)
    last = torch.full_like(first, sv.n_values)
    bounds = torch.cat([first, cuts, last], dim=2).reshape(rows, -1)

    def run_sums(prefix: torch.Tensor) -> torch.Tensor:
        at_bounds = torch.gather(prefix, 1, bounds).reshape(rows, n_candidates, -1)
        return at_bounds[..., 1:] - at_bounds[..., :-1]

    run_bounds = bounds.reshape(rows, n_candidates, -1)
    counts = (run_bounds[..., 1:] - run_bounds[..., :-1]).to(levels.dtype)
    sums, sums_sq = run_sums(sv.prefix_sum), run_sums(sv.prefix_sum_sq)
    return (sums_sq - 2 * levels * sums + levels * levels * counts).sum(dim=2)


def _direct_sse(values: torch.Tensor, step_size: torch.Tensor, zero_point: torch.Tensor, q_min: int, q_max: int) -> torch.Tensor:
    """Full quantize-dequantize per candidate; cheaper than binning when levels outnumber values."""
    rows, n_candidates = step_size.shape
    chunk = max(1, _MAX_CHUNK_ELEMENTS // (rows * values.shape[1]))
    out = []
    for i in range(0, n_candidates, chunk):
        s, z = step_size[:, i : i + chunk, None], zero_point[:, i : i + chunk, None]
        x = values[:, None, :]
        x_hat = (torch.clamp(torch.round(x / s) + z, q_min, q_max) - z) * s
        out.append(((x - x_hat) ** 2).sum(dim=2))
    return torch.cat(out, dim=1)


def zero_count(sorted_values: SortedValues, step_size: torch.Tensor) -> torch.Tensor:
    """Per row, how many values a zero-point-0 quantizer with ``step_size`` (shape ``(R,)``) maps to 0.

    ``round(x / s) = 0`` exactly for ``-s/2 <= x <= s/2`` (round half to even).
    """
    half_step = (0.5 * step_size)[:, None]
    upper = torch.searchsorted(sorted_values.values, half_step, right=True)
    lower = torch.searchsorted(sorted_values.values, -half_step, right=False)
    return (upper - lower)[:, 0]


def _candidate_params(
    low: torch.Tensor, high: torch.Tensor, fractions: torch.Tensor, n_bits: int, scheme: QuantScheme
) -> QuantParams:
    """Quantizers for the ranges ``[f * low, f * high]``: ``low``/``high`` are ``(R,)``, ``fractions`` ``(R, G)``."""
    return params_from_range(low[:, None] * fractions, high[:, None] * fractions, n_bits, scheme)


def mse_range_search(
    sorted_values: SortedValues,
    n_bits: int,
    scheme: QuantScheme | str = QuantScheme.SYMMETRIC,
    grid_size: int = 100,
    basin_tolerance: float = 0.25,
    refine_rounds: int = 3,
    refine_size: int = 9,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the range ``[f * min, f * max]``, ``0 < f <= 1``, minimising the quantization SSE.

    For the symmetric scheme the range is ``[-f * max|x|, f * max|x|]``, so ``f * max|x|`` is
    the clipping threshold ``T``; for unsigned it is ``[0, f * max]``. The search is relative
    to the tensor's own extremes, hence scale invariant. Three stages:

    1. a coarse grid of ``grid_size`` fractions ``i / grid_size`` over ``(0, 1]`` (by default
       the paper's 100 candidates, so the result is never worse than the paper's search);
    2. the basin: a dense grid (:func:`basin_grid_size` points) over the span of the coarse
       points whose error is within ``1 + basin_tolerance`` of the best one (about 1 dB),
       widened by two coarse intervals on each side. The error as a function of ``f`` is a sum of ``n``
       piecewise quadratics, smooth for large tensors but jagged with many local minima for
       small ones, where a candidate is cheap: the basin grid is densest there;
    3. ``refine_rounds`` rounds of ``refine_size`` points spanning the two intervals around
       the best point so far.

    Returns:
        ``(min_val, max_val)``, each of shape ``(R,)``.
    """
    scheme = QuantScheme(scheme)
    q_min, q_max = integer_range(n_bits, scheme)
    values = sorted_values.values
    low, high = values[:, 0], values[:, -1]
    if scheme is QuantScheme.SYMMETRIC:
        high = torch.maximum(low.abs(), high.abs())
        low = -high
    elif scheme is QuantScheme.UNSIGNED:
        low = torch.zeros_like(high)

    def evaluate(fractions: torch.Tensor) -> torch.Tensor:
        params = _candidate_params(low, high, fractions, n_bits, scheme)
        return grid_sse(sorted_values, params.step_size, params.zero_point, q_min, q_max)

    def unit_grid(size: int) -> torch.Tensor:
        return torch.linspace(0.0, 1.0, size, dtype=values.dtype, device=values.device)

    rows = sorted_values.n_rows
    fractions = (unit_grid(grid_size + 1)[1:]).expand(rows, -1)
    errors = evaluate(fractions)
    best_error, best_index = errors.min(dim=1)
    best = fractions.gather(1, best_index[:, None])

    def keep_better(fractions: torch.Tensor, errors: torch.Tensor) -> None:
        nonlocal best, best_error
        round_error, round_index = errors.min(dim=1)
        improved = round_error < best_error
        best = torch.where(improved[:, None], fractions.gather(1, round_index[:, None]), best)
        best_error = torch.where(improved, round_error, best_error)

    in_basin = errors <= best_error[:, None] * (1.0 + basin_tolerance)
    spacing = 2.0 / grid_size
    basin_low = torch.where(in_basin, fractions, 2.0).amin(dim=1, keepdim=True) - spacing
    basin_high = torch.where(in_basin, fractions, -1.0).amax(dim=1, keepdim=True) + spacing
    basin_size = basin_grid_size(rows, sorted_values.n_values, q_max - q_min + 1)
    fractions = (basin_low + (basin_high - basin_low) * unit_grid(basin_size)).clamp(1e-12, 1.0)
    keep_better(fractions, evaluate(fractions))

    half_width = (basin_high - basin_low) / (basin_size - 1)
    offsets = 2.0 * unit_grid(refine_size) - 1.0
    for _ in range(refine_rounds):
        fractions = (best + half_width * offsets).clamp(1e-12, 1.0)
        keep_better(fractions, evaluate(fractions))
        half_width = half_width * (2.0 / (refine_size - 1))
    best = best[:, 0]
    return low * best, high * best


def mse_range(
    x: torch.Tensor, n_bits: int, scheme: QuantScheme | str = QuantScheme.SYMMETRIC, ch_axis: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE-optimal range of ``x`` (see :func:`mse_range_search`), per channel of ``ch_axis`` or per tensor.

    Returns float tensors of shape ``(C,)`` per channel, scalars per tensor, in the
    accumulation dtype.
    """
    min_val, max_val = mse_range_search(SortedValues.from_rows(as_rows(x.detach(), ch_axis)), n_bits, scheme)
    if ch_axis is None:
        return min_val[0], max_val[0]
    return min_val, max_val
