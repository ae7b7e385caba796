"""Range estimators: which ``[min, max]`` a quantizer should cover.

* :func:`current_minmax` - the extremes of the tensor at hand;
* :class:`RunningMinMax` - an exponential moving average of the extremes over batches;
* :func:`mse_range` - the range whose quantizer has the least squared error on the tensor,
  found by a certified search over all step sizes (:func:`mse_range_search`; many tensors at
  once: :func:`mse_range_search_many`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from quantization.grid_error import (
    SortedValues,
    as_rows,
    error_resolution,
    grid_sse,
    grid_sse_lower_bound,
    interval_minimum,
    narrow_intervals,
    narrow_ratio,
    use_direct_sum,
)
from quantization.quantizers import QuantScheme, integer_range, params_from_range

# The search returns an error within this share of the optimum (or within the float64
# resolution of the prefix sums, whichever is larger).
MSE_RTOL = 1e-9
# The first incumbents: thresholds i / FIRST_CANDIDATES of the tensor's extreme (every fourth of the paper's 100).
FIRST_CANDIDATES = 25
# Equal intervals of the step from 0 to the extreme's that start the search.
ROOT_INTERVALS = 8
# Children of a narrow node per split of its step interval.
_STEP_SPLITS = 4
# At most this many parts of a wide node in one split.
_MAX_PARTS = 64
# Nodes x segments evaluated at once (bounds the memory of a round).
_MAX_SLOTS = 1 << 19
# Narrow nodes with at most this many values changing level inside are solved by a sweep rather than split.
SWEEP_LIMIT = 512
# Level caps of the narrow statistics of intervals narrow only for the levels up to them (wide ones).
LEVEL_CAPS = (0, 1, 3, 7, 15, 31, 63)


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


def _row_argmin(values: torch.Tensor, row: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per row, the index of its node with the least finite value (-1 where none)."""
    least = torch.full((n_rows,), torch.inf, dtype=values.dtype, device=values.device)
    least = least.scatter_reduce(0, row, values, "amin")
    candidates = torch.where((values == least[row]) & torch.isfinite(values), torch.arange(row.numel(), device=row.device), row.numel())
    first = torch.full((n_rows,), row.numel(), dtype=torch.long, device=row.device).scatter_reduce(0, row, candidates, "amin")
    return torch.where(first < row.numel(), first, -1)


def mse_range_search(
    sorted_values: SortedValues, n_bits: int, scheme: QuantScheme | str = QuantScheme.SYMMETRIC, rtol: float = MSE_RTOL
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the range whose quantizer has the least squared error over *all* step sizes.

    The error ``E(s)`` of the grid with step ``s`` is piecewise quadratic: between the steps
    where some value changes level (``x / s`` crosses a mid-point ``j + 1/2``) the assignment
    is fixed and ``E = sum x^2 - 2 s A + s^2 B`` with ``A = sum j x``, ``B = sum j^2``. Branch
    and bound over intervals ``[a, b]`` of steps:

    * incumbent: the best of the thresholds ``i / 25`` of the extreme (:data:`FIRST_CANDIDATES`), then each
      round the exact error at the best point of the node with the least bound and of the best
      swept node;
    * bounds: on wide intervals the distance of every value to the union of the intervals
      ``[j a, j b]`` (:func:`quantization.grid_error.grid_sse_lower_bound`); on narrow ones
      (no value changes level twice) the stable values' parabola plus the unstable values'
      least errors (:func:`quantization.grid_error.narrow_intervals`), exact without breakpoints;
      on those narrow only for the levels up to a cap of :data:`LEVEL_CAPS` (zero points 0), the same
      for the values up to that level and the clipped values' distance to the ends (``level_cap``),
      far fewer cuts than narrow intervals of all levels would take;
    * a narrow node with at most :data:`SWEEP_LIMIT` unstable values that
      cannot be pruned is solved exactly by sweeping its breakpoints
      (:func:`quantization.grid_error.interval_minimum`); others are split (wide ones
      geometrically into parts of the next class, narrow ones into :data:`_STEP_SPLITS`) unless their bound is within
      ``max(rtol E, resolution)`` of the incumbent, ``resolution`` the float64 resolution of the
      prefix sums (:func:`quantization.grid_error.error_resolution`).

    The root covers every step ``0 < s <= 2 max|x|`` (beyond, every value rounds to 0, the
    largest possible error). So for the symmetric and unsigned schemes the result is the global
    optimum up to that tolerance, thresholds above ``max|x|`` included, never worse than the
    paper's search. The asymmetric scheme keeps the zero point of the ranges ``[f min, f max]``,
    ``z = round(-min (2^b - 1) / (max - min))`` (independent of ``f``), and is exact over the
    step for it; searching every zero point as well would multiply the work by up to ``2^b``.

    Returns:
        ``(min_val, max_val)``, each of shape ``(R,)``, such that
        :func:`quantization.quantizers.params_from_range` gives the optimal grid: ``(-T, T)``
        with ``T = s * q_max`` (symmetric), ``(0, T)`` (unsigned), ``(-z s, (q_max - z) s)``
        (asymmetric). An all-zero row (or an unsigned row without positive values) gives ``(0, 0)``.
    """
    scheme = QuantScheme(scheme)
    q_min, q_max = integer_range(n_bits, scheme)
    sv = sorted_values
    n_rows, dtype, device = sv.n_rows, sv.dtype, sv.device
    max_abs = torch.maximum(sv.smallest.abs(), sv.largest.abs())
    if scheme is QuantScheme.ASYMMETRIC:
        low, high = sv.smallest.clamp_max(0), sv.largest.clamp_min(0)
        scale = (high - low) / (q_max - q_min)
        # The zero point of every range [f min, f max]: round(-min / s) does not depend on f.
        zero_point = torch.round(-low / torch.where(scale > 0, scale, 1.0)).clamp(q_min, q_max)
    else:
        low = torch.zeros_like(max_abs)
        high = max_abs if scheme is QuantScheme.SYMMETRIC else sv.largest.clamp_min(0)
        scale = high / q_max
        zero_point = torch.zeros_like(scale)

    # Incumbents: the first candidates.
    fractions = torch.arange(1, FIRST_CANDIDATES + 1, dtype=dtype, device=device) / FIRST_CANDIDATES
    params = params_from_range(low[:, None] * fractions, high[:, None] * fractions, n_bits, scheme)
    errors = grid_sse(sv, params.step_size, params.zero_point, q_min, q_max)
    best_error, best_index = errors.min(dim=1)
    best_step = params.step_size.gather(1, best_index[:, None])[:, 0]
    best_zero = params.zero_point.gather(1, best_index[:, None])[:, 0]
    resolution = error_resolution(sv)

    # Root nodes: ROOT_INTERVALS equal intervals up to the extreme, then doubling ones up to 2 max|x|.
    root_fractions = torch.arange(1, ROOT_INTERVALS + 1, dtype=dtype, device=device) / ROOT_INTERVALS
    doublings = 2.0 ** torch.arange(1, (2 * (q_max - q_min)).bit_length() + 1, dtype=dtype, device=device)
    edges = torch.cat([torch.zeros(1, dtype=dtype, device=device), root_fractions, doublings])
    live = scale > 0
    rows = torch.arange(n_rows, device=device)[live]
    row = rows.repeat_interleave(edges.numel() - 1)
    step_low = (scale[rows, None] * edges[:-1]).reshape(-1)
    step_high = (scale[rows, None] * edges[1:]).reshape(-1)

    # Node classes by width, each with its bound: wide (the union bound), narrow for the levels up to each
    # cap (capped narrow statistics), narrow (all levels). `ratios`: the widest b / a of each class but the first.
    largest = max(q_max - int(zero_point.min()), int(zero_point.max()) - q_min)
    caps = [cap for cap in LEVEL_CAPS if cap + 1 < largest] if bool((zero_point == 0).all()) else []
    ratios = [narrow_ratio(-cap - 1, cap + 1) for cap in caps]
    ratios.append(narrow_ratio(q_min - int(zero_point.max()), q_max - int(zero_point.min())))
    narrow_class = len(caps)
    while row.numel():
        bound = torch.empty(row.numel(), dtype=dtype, device=device)
        probe = 0.5 * (step_low + step_high)
        swept = torch.full_like(bound, torch.inf)  # the exact minimum of the nodes solved by a sweep
        node_class = sum((step_high <= step_low * r).long() for r in ratios) - 1  # -1: wide
        tolerance = torch.maximum(rtol * best_error, resolution)
        for cls in range(-1, narrow_class + 1):
            group = node_class == cls
            levels = 2 * caps[cls] + 3 if 0 <= cls < narrow_class else q_max - q_min + 1
            # One node per row of the bounds (rows of the values are selected, not copied), in chunks.
            nodes = group.nonzero()[:, 0]
            for at in nodes.split(max(1, _MAX_SLOTS // (3 * levels))) if nodes.numel() else ():
                part = sv.select(row[at])
                a, b, zero = step_low[at, None], step_high[at, None], zero_point[row[at], None]
                if cls == -1:
                    node_bound = grid_sse_lower_bound(part, a, b, q_min - zero, q_max - zero)
                elif cls < narrow_class:
                    node_bound = narrow_intervals(part, a, b, zero, q_min, q_max, level_cap=caps[cls]).bound(a, b)[0]
                else:
                    # The tight bound; nodes that cannot be pruned and have few breakpoints are solved by a sweep.
                    stats = narrow_intervals(part, a, b, zero, q_min, q_max)
                    node_bound, node_probe = stats.bound(a, b)
                    chosen = (stats.unstable <= SWEEP_LIMIT) & (node_bound < (best_error - tolerance)[row[at], None])
                    if chosen.any():
                        least, least_step = interval_minimum(stats, chosen, a, b)
                        swept[at] = least[:, 0]
                        node_probe = torch.where(chosen, least_step, node_probe)
                    probe[at] = node_probe[:, 0]
                bound[at] = node_bound[:, 0]

        # Incumbent: per row, the exact error at the probes of the best swept node and of the
        # open node with the least bound.
        solved = torch.isfinite(swept)
        candidates = torch.stack(
            [_row_argmin(swept, row, n_rows), _row_argmin(torch.where(solved, torch.inf, bound), row, n_rows)], 1
        )
        found = candidates >= 0
        steps = probe[candidates.clamp_min(0)]
        error = torch.where(found, grid_sse(sv, steps, zero_point[:, None].expand_as(steps), q_min, q_max), torch.inf)
        round_error, round_index = error.min(dim=1)
        improved = round_error < best_error
        best_error = torch.where(improved, round_error, best_error)
        best_step = torch.where(improved, steps.gather(1, round_index[:, None])[:, 0], best_step)
        best_zero = torch.where(improved, zero_point, best_zero)

        # Solved nodes are done; the others are split unless their bound is within the
        # tolerance of the incumbent: narrow ones in _STEP_SPLITS equal parts, the others
        # geometrically into parts of the next class.
        tolerance = torch.maximum(rtol * best_error, resolution)
        keep = ~solved & (bound < (best_error - tolerance)[row])
        a, b, row, kept_class = step_low[keep], step_high[keep], row[keep], node_class[keep]
        wide = kept_class < narrow_class
        target = torch.tensor(ratios, dtype=dtype, device=device)[(kept_class + 1).clamp_max(narrow_class)]
        geometric_parts = torch.ceil(torch.log(b / a.clamp_min(b * 1e-300)) / torch.log(target)).clamp(2, _MAX_PARTS)
        parts = torch.where(wide, geometric_parts, _STEP_SPLITS).long()
        parent = torch.repeat_interleave(torch.arange(row.numel(), device=device), parts)
        rank = (torch.arange(parent.numel(), device=device) - (torch.cumsum(parts, 0) - parts)[parent]).to(dtype)
        count = parts[parent].to(dtype)
        pa, pb = a[parent], b[parent]
        geometric = wide[parent] & (pa > 0)
        step_low, step_high = (
            torch.where(geometric, pa * (pb / pa.clamp_min(1e-300)) ** t, pa + (pb - pa) * t)
            for t in (rank / count, (rank + 1) / count)
        )
        step_high = torch.where(rank + 1 == count, pb, step_high)
        row = row[parent]

    best_step = torch.where(live, best_step, torch.zeros_like(best_step))
    if scheme is QuantScheme.ASYMMETRIC:
        return (q_min - best_zero) * best_step, (q_max - best_zero) * best_step
    threshold = best_step * q_max
    return (-threshold if scheme is QuantScheme.SYMMETRIC else torch.zeros_like(threshold)), threshold


def mse_range_search_many(
    parts: Sequence[SortedValues], n_bits: int, scheme: QuantScheme | str = QuantScheme.SYMMETRIC, rtol: float = MSE_RTOL
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`mse_range_search` of each of ``parts``, in as few searches as pay.

    A search costs a few hundred tensor operations per round whatever its number of rows, which
    dominates on short rows; so parts are searched together
    (:meth:`quantization.grid_error.SortedValues.stack`: rows read as padded with zeros to the
    longest, which change no error; parts that share their stored values are not copied). Where
    even the longest row is short, the bounds sum the rows value by value
    (:func:`quantization.grid_error.use_direct_sum`), padding included: then the parts go in
    searches of their own by length (``ceil(log2 n)``). Every row keeps its own certificate.
    """
    q_min, q_max = integer_range(n_bits, scheme)
    lengths = [int(part.lengths.max()) for part in parts]
    # Only if the longest row is short do bounds sum value by value, padding included: then by length.
    by_length = use_direct_sum(max(lengths), 3 * (q_max - q_min + 1))
    groups: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        groups.setdefault(length.bit_length() if by_length else 0, []).append(index)
    ranges: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(parts)  # type: ignore[list-item]
    for members in groups.values():
        stacked = SortedValues.stack([parts[index] for index in members]) if len(members) > 1 else parts[members[0]]
        min_val, max_val = mse_range_search(stacked, n_bits, scheme, rtol)
        sizes = [parts[index].n_rows for index in members]
        for index, low, high in zip(members, min_val.split(sizes), max_val.split(sizes)):
            ranges[index] = (low, high)
    return ranges


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
