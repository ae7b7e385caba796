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
)
from quantization.quantizers import QuantScheme, integer_range, params_from_range

# The search returns an error within this share of the optimum (or within the float64
# resolution of the prefix sums, whichever is larger).
MSE_RTOL = 1e-9
# The paper's search: thresholds i / 100 of the tensor's extreme, the first incumbents.
PAPER_CANDIDATES = 100
# Equal intervals of the step from 0 to the extreme's that start the search.
ROOT_INTERVALS = 25
# Children of a narrow node per split of its step interval.
_STEP_SPLITS = 4
# At most this many parts of a wide node in one split.
_MAX_PARTS = 64
# Nodes x segments evaluated at once (bounds the memory of a round).
_MAX_SLOTS = 1 << 21
# One-row parts of at most this many values are searched together with the others of about their
# length (:func:`mse_range_search_many`); longer ones are searched alone.
STACK_MAX_VALUES = 1 << 17
# Narrow nodes with at most this many values changing level inside (or levels x log2 n / 4, if
# more) are solved by a sweep rather than split.
SWEEP_LIMIT = 1024
# Level caps of the narrow statistics of intervals narrow only for the levels up to them (wide ones).
LEVEL_CAPS = (31,)


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


def _node_chunks(row: torch.Tensor, selected: torch.Tensor, max_slots: int):
    """The selected nodes laid out by row, in chunks of at most ``max_slots`` slots (rows x nodes).

    Yields ``(rows, index, valid)``: the chunk's rows, its ``(r, g)`` node indices (padded with
    the row's last node) and which slots hold a node. Rows with many
    nodes get chunks of their own, so padding never costs more than the nodes themselves.
    """
    nodes = selected.nonzero()[:, 0]
    if not nodes.numel():
        return
    nodes = nodes[torch.argsort(row[nodes], stable=True)]
    rows, counts = torch.unique_consecutive(row[nodes], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    max_slots = max(1, max_slots)
    groups: list[list[tuple[int, int, int]]] = [[]]  # per chunk: (row, first node, node count)
    width = 0
    for r, start, count in zip(rows.tolist(), starts.tolist(), counts.tolist()):
        for first in range(start, start + count, max_slots):
            size = min(max_slots, start + count - first)
            if groups[-1] and (len(groups[-1]) + 1) * max(width, size) > max_slots:
                groups.append([])
                width = 0
            groups[-1].append((r, first, size))
            width = max(width, size)
    for group in groups:
        chunk_rows, first, size = (torch.tensor(column, device=row.device) for column in zip(*group))
        slots = torch.arange(int(size.max()), device=row.device)
        valid = slots < size[:, None]
        index = nodes[first[:, None] + torch.minimum(slots, size[:, None] - 1)]
        yield chunk_rows, index, valid


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

    * incumbent: the best of the paper's 100 thresholds ``i / 100`` of the extreme, then each
      round the exact error at the best point of the node with the least bound and of the best
      swept node;
    * bounds: on wide intervals the distance of every value to the union of the intervals
      ``[j a, j b]`` (:func:`quantization.grid_error.grid_sse_lower_bound`); on narrow ones
      (no value changes level twice) the stable values' parabola plus the unstable values'
      least errors (:func:`quantization.grid_error.narrow_intervals`), exact without breakpoints;
      on those narrow only for the levels up to a cap of :data:`LEVEL_CAPS` (zero points 0), the same
      for the values up to that level and the clipped values' distance to the ends (``level_cap``),
      far fewer cuts than narrow intervals of all levels would take;
    * a narrow node with at most ``max(SWEEP_LIMIT, levels x log2 n / 4)`` unstable values that
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
    values = sv.values
    n_rows, dtype, device = sv.n_rows, values.dtype, values.device
    max_abs = torch.maximum(values[:, 0].abs(), values[:, -1].abs())
    if scheme is QuantScheme.ASYMMETRIC:
        low, high = values[:, 0].clamp_max(0), values[:, -1].clamp_min(0)
        scale = (high - low) / (q_max - q_min)
        # The zero point of every range [f min, f max]: round(-min / s) does not depend on f.
        zero_point = torch.round(-low / torch.where(scale > 0, scale, 1.0)).clamp(q_min, q_max)
    else:
        low = torch.zeros_like(max_abs)
        high = max_abs if scheme is QuantScheme.SYMMETRIC else values[:, -1].clamp_min(0)
        scale = high / q_max
        zero_point = torch.zeros_like(scale)

    # Incumbents: the paper's candidates.
    fractions = torch.arange(1, PAPER_CANDIDATES + 1, dtype=dtype, device=device) / PAPER_CANDIDATES
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
    sweep_limit = max(SWEEP_LIMIT, (q_max - q_min + 1) * sv.n_values.bit_length() // 4)
    while row.numel():
        bound = torch.empty(row.numel(), dtype=dtype, device=device)
        probe = 0.5 * (step_low + step_high)
        swept = torch.full_like(bound, torch.inf)  # the exact minimum of the nodes solved by a sweep
        node_class = sum((step_high <= step_low * r).long() for r in ratios) - 1  # -1: wide
        tolerance = torch.maximum(rtol * best_error, resolution)
        for cls in range(-1, narrow_class + 1):
            group = node_class == cls
            levels = 2 * caps[cls] + 3 if 0 <= cls < narrow_class else q_max - q_min + 1
            for chunk_rows, index, valid in _node_chunks(row, group, _MAX_SLOTS // (3 * levels)):
                part = sv.select(chunk_rows)
                a, b, zero = step_low[index], step_high[index], zero_point[row[index]]
                at = index[valid]
                if cls == -1:
                    node_bound = grid_sse_lower_bound(part, a, b, q_min - zero, q_max - zero)
                elif cls < narrow_class:
                    node_bound = narrow_intervals(part, a, b, zero, q_min, q_max, level_cap=caps[cls]).bound(a, b)[0]
                else:
                    # The tight bound; nodes that cannot be pruned and have few breakpoints are solved by a sweep.
                    stats = narrow_intervals(part, a, b, zero, q_min, q_max)
                    node_bound, node_probe = stats.bound(a, b)
                    chosen = valid & (stats.unstable <= sweep_limit) & (node_bound < (best_error - tolerance)[row[index]])
                    if chosen.any():
                        least, least_step = interval_minimum(stats, chosen, a, b)
                        swept[at] = least[valid]
                        node_probe = torch.where(chosen, least_step, node_probe)
                    probe[at] = node_probe[valid]
                bound[at] = node_bound[valid]

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
        # tolerance of the incumbent: narrow ones in _STEP_SPLITS equal parts, wide ones
        # geometrically into narrow parts.
        tolerance = torch.maximum(rtol * best_error, resolution)
        keep = ~solved & (bound < (best_error - tolerance)[row])
        a, b, row, kept_class = step_low[keep], step_high[keep], row[keep], node_class[keep]
        wide = kept_class < narrow_class
        # Parts of the next class up.
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
    """:func:`mse_range_search` of each of ``parts``, the parts of about the same row length in one search.

    A search costs a few hundred tensor operations whatever its number of rows, which dominates
    on a single short row; so the one-row parts of at most :data:`STACK_MAX_VALUES` values whose
    lengths have the same ``ceil(log2 n)`` are stacked (:meth:`quantization.grid_error.SortedValues.stack`:
    zeros pad them, at most doubling them, and change no error) and searched at once. Parts of
    several rows (per channel) are searched alone: stacking them was measured slower (padding, and
    rows of uneven node counts). Every row keeps its own certificate.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for index, part in enumerate(parts):
        stackable = part.n_rows == 1 and part.n_values <= STACK_MAX_VALUES
        key = (0, (part.n_values - 1).bit_length()) if stackable else (1, index)
        groups.setdefault(key, []).append(index)
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
