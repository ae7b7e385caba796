"""The squared error of a uniform grid on a tensor, exactly and as a bound over a range of step sizes.

A grid with step ``s`` and integer levels ``j`` in ``[j_lo, j_hi]`` (``j_lo <= 0 <= j_hi``) holds
the points ``j s``; every value goes to its nearest point (values beyond the ends go to the
ends), which is what ``s * (clamp(round(x / s) + z, q_min, q_max) - z)`` does with
``j = q - z``. The values are sorted once, with prefix sums of ``x`` and ``x^2``
(:class:`SortedValues`: rows of any lengths stored one after the other, every row read as
padded with zeros to the longest, so that the rows of many tensors are handled by the same
tensor operations). Every error below is a sum over *segments* of the sorted values, each
with an anchor ``c``: a segment is a contiguous run ``[i0, i1)`` of the sorted array, found by
binary search on its end points, and its error is

    sum_{i0 <= i < i1} (x_i - c)^2 = S2 - 2 c S1 + c^2 m,

with ``m``, ``S1``, ``S2`` the count, sum and sum of squares of the run, read off the prefix
sums. One segment costs ``O(log n)`` instead of ``O(m)``.

* :func:`grid_sse`: the exact error of a grid: one segment per level, cut at the mid-points
  between levels, anchored at the level.
* :func:`grid_sse_lower_bound`: a lower bound on the error of every grid with a step in
  ``[a, b]``. For a step in ``[a, b]`` the point ``j s`` lies in the interval
  ``I_j = [j a, j b]`` (``[j b, j a]`` for ``j < 0``), so each value is at least its distance to
  the union of the ``I_j`` away from the grid. Between two consecutive intervals the distance
  is to the nearer one (two segments, split at the middle of the gap), inside an interval it
  is 0, beyond the end intervals it is to the end. With ``a = b`` the bound is the exact error.

Sums are taken in float64 (float32 on devices without float64) whatever the dtype of the
tensor. Rounding of the prefix sums makes each error uncertain by about
:func:`error_resolution`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Rows are searched candidate-fastest where the longest stored row has at least this many values (:func:`count_below`).
CANDIDATE_FASTEST_VALUES = 1 << 15
# Elements of the largest intermediate (rows x candidates x segments) built at once.
_MAX_CHUNK_ELEMENTS = 1 << 20


def accumulation_dtype(device: torch.device | str) -> torch.dtype:
    """float64 where the device supports it (not on Apple MPS), else float32."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def as_rows(x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    """``x`` as a 2-D ``(rows, n)`` tensor: one row per channel of ``ch_axis``, or a single row."""
    if ch_axis is None:
        return x.reshape(1, -1)
    return x.movedim(ch_axis, 0).reshape(x.shape[ch_axis], -1)


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


def _search_keys(values: torch.Tensor, row_key: torch.Tensor, round_up: bool) -> torch.Tensor:
    """int64 search keys: ``row_key`` (``row << 32``, broadcast) plus the order of ``values`` rounded to float32.

    The float32 bits as int32, with the magnitude bits of negative numbers flipped, are ordered as
    the numbers (``-0.0`` one below ``0.0``); each value is rounded down (``round_up`` False: the
    stored values) or up (cuts) to float32. So ``v < c`` implies ``key(v) < key(c)``, and a value
    whose key is below a cut's is below the cut unless it lies within one float32 step of it, or is
    ``-0.0`` against ``0.0`` (float32 data: only the latter).
    """
    single = values.to(torch.float32)
    bits = single.view(torch.int32)
    order = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    widened = single.to(values.dtype)
    nudge = widened < values if round_up else -(widened > values).to(torch.int32)
    return row_key + (order + nudge)


@dataclass(frozen=True)
class SortedValues:
    """Rows of values, each sorted ascending, with prefix sums ``[0, cumsum(x)]`` and ``[0, cumsum(x^2)]``.

    The rows may differ in length; they are stored one after the other (``values`` of row ``r`` at
    ``starts[r]:starts[r + 1]``, its prefix sums at ``starts[r] + r`` on) and searched through int64
    keys (:func:`count_below`). Every row reads as if padded with zeros, in sorted place, to a common
    length :attr:`n_values` (the longest row's; a selection keeps its set's): ``0`` is a level of every grid, so no error or bound of
    this module sees them, and all rows share ``(R, ...)`` shaped cuts. ``rows``: which stored row each
    row is (:meth:`select` and :meth:`stack` copy nothing where they can).
    """

    flat_values: torch.Tensor  # (N,)
    keys: torch.Tensor  # (N,) int64: :func:`_search_keys` of the values rounded down
    flat_prefix_sum: torch.Tensor  # (N + S,)
    flat_prefix_sum_sq: torch.Tensor  # (N + S,)
    starts: torch.Tensor  # (S + 1,) int64
    negatives: torch.Tensor  # (S,) int64: values below 0 per stored row (where the padding zeros go)
    rows: torch.Tensor  # (R,) int64
    n_values: int
    exact_keys: bool  # every stored value a float32 number: the keys alone order values and cuts exactly

    @classmethod
    def from_rows(cls, rows: torch.Tensor) -> SortedValues:
        """The rows of a 2-D tensor, sorted (:func:`sort_rows`)."""
        return cls.from_row_sets([rows])

    @classmethod
    def from_row_sets(cls, row_sets: Sequence[torch.Tensor]) -> SortedValues:
        """The rows of several 2-D tensors (each of its own length), sorted and stored together, in order."""
        shapes = [tuple(rows.shape) for rows in row_sets]
        n_stored = sum(n_rows for n_rows, _ in shapes)
        n_total = sum(n_rows * length for n_rows, length in shapes)
        device, dtype = row_sets[0].device, accumulation_dtype(row_sets[0].device)
        flat_values = torch.empty(n_total, dtype=dtype, device=device)
        keys = torch.empty(n_total, dtype=torch.int64, device=device)
        prefix_sum, prefix_sum_sq = (torch.empty(n_total + n_stored, dtype=dtype, device=device) for _ in range(2))
        negatives = torch.empty(n_stored, dtype=torch.int64, device=device)
        starts = [0]
        exact_keys = True
        row, offset = 0, 0
        for rows, (n_rows, length) in zip(row_sets, shapes):
            values = sort_rows(rows) + 0.0  # no -0.0
            size = n_rows * length
            flat_values[offset:offset + size] = values.reshape(-1)
            stored = torch.arange(row, row + n_rows, device=device)
            keys[offset:offset + size] = _search_keys(values, stored[:, None] << 32, round_up=False).reshape(-1)
            for prefix, terms in ((prefix_sum, values), (prefix_sum_sq, values * values)):
                block = prefix[offset + row:offset + row + size + n_rows].view(n_rows, length + 1)
                block[:, 0] = 0.0
                block[:, 1:] = terms.cumsum(dim=1)
            negatives[row:row + n_rows] = torch.searchsorted(values, values.new_zeros(n_rows, 1))[:, 0]
            if rows.dtype not in (torch.float32, torch.float16, torch.bfloat16):  # those are float32 numbers
                exact_keys = exact_keys and bool((values.to(torch.float32).to(dtype) == values).all())
            starts.extend(range(offset + length, offset + size + 1, length) if length else [offset] * n_rows)
            row, offset = row + n_rows, offset + size
        return cls(
            flat_values, keys, prefix_sum, prefix_sum_sq, torch.tensor(starts, device=device), negatives,
            torch.arange(n_stored, device=device), max((length for _, length in shapes), default=0), exact_keys,
        )

    @classmethod
    def stack(cls, parts: Sequence[SortedValues]) -> SortedValues:
        """The rows of all ``parts`` in one (read as padded to the longest of them).

        Parts that are rows of one stored set share it (no copy); otherwise each part must be a
        whole stored set (:meth:`from_rows`, :meth:`stack`), and they are stored together.
        """
        first = parts[0]
        if all(part.flat_values is first.flat_values for part in parts):
            rows = torch.cat([part.rows for part in parts])
            longest = int((first.starts[rows + 1] - first.starts[rows]).max())
            return cls(*(getattr(first, name) for name in _STORED), rows, longest, first.exact_keys)
        if not all(part.is_whole for part in parts):
            raise ValueError("stack takes rows of one stored set, or whole stored sets")
        row_offsets = np.cumsum([0] + [part.n_rows for part in parts]).tolist()
        value_offsets = np.cumsum([0] + [part.flat_values.numel() for part in parts]).tolist()
        return cls(
            flat_values=torch.cat([part.flat_values for part in parts]),
            keys=torch.cat([part.keys + (offset << 32) for part, offset in zip(parts, row_offsets)]),
            flat_prefix_sum=torch.cat([part.flat_prefix_sum for part in parts]),
            flat_prefix_sum_sq=torch.cat([part.flat_prefix_sum_sq for part in parts]),
            starts=torch.cat([first.starts[:1]] + [part.starts[1:] + offset for part, offset in zip(parts, value_offsets)]),
            negatives=torch.cat([part.negatives for part in parts]),
            rows=torch.arange(row_offsets[-1], device=first.device),
            n_values=max(part.n_values for part in parts),
            exact_keys=all(part.exact_keys for part in parts),
        )

    @property
    def is_whole(self) -> bool:
        """Whether the rows are all the stored rows, in order."""
        stored = torch.arange(self.starts.numel() - 1, device=self.device)
        return self.rows.numel() == stored.numel() and bool((self.rows == stored).all())

    def select(self, rows: torch.Tensor) -> SortedValues:
        """The given rows (``(r,)`` indices, possibly repeated), sharing the stored values."""
        return SortedValues(*(getattr(self, name) for name in _STORED), self.rows[rows], self.n_values, self.exact_keys)

    @property
    def n_rows(self) -> int:
        return self.rows.numel()

    @property
    def nbytes(self) -> int:
        """Bytes of the stored values, keys and prefix sums (shared by every selection of them)."""
        return sum(t.numel() * t.element_size() for t in (getattr(self, name) for name in _STORED))

    @property
    def dtype(self) -> torch.dtype:
        return self.flat_values.dtype

    @property
    def device(self) -> torch.device:
        return self.flat_values.device

    @property
    def lengths(self) -> torch.Tensor:
        """Per row, how many values are its own (not padding), ``(R,)`` int64."""
        return self.starts[self.rows + 1] - self.starts[self.rows]

    @property
    def counts(self) -> torch.Tensor:
        """:attr:`lengths` as a float ``(R,)`` tensor."""
        return self.lengths.to(self.dtype)

    @property
    def padding(self) -> torch.Tensor:
        """Per row, how many zeros pad it to :attr:`n_values`, ``(R,)`` int64."""
        return self.n_values - self.lengths

    @property
    def total_sum(self) -> torch.Tensor:
        """``sum x`` per row, shape ``(R,)``."""
        return self.flat_prefix_sum[self.starts[self.rows + 1] + self.rows]

    @property
    def energy(self) -> torch.Tensor:
        """``sum x^2`` per row, shape ``(R,)``."""
        return self.flat_prefix_sum_sq[self.starts[self.rows + 1] + self.rows]

    @property
    def smallest(self) -> torch.Tensor:
        """The least value of each row, ``(R,)`` (its own, not the padding)."""
        return self.flat_values[self.starts[self.rows]]

    @property
    def largest(self) -> torch.Tensor:
        """The greatest value of each row, ``(R,)``."""
        return self.flat_values[self.starts[self.rows + 1] - 1]

    @property
    def values(self) -> torch.Tensor:
        """The rows as one ``(R, n_values)`` tensor, padded with zeros in sorted place (a copy)."""
        slots = torch.arange(self.n_values, device=self.device)
        return self.value_at(torch.arange(self.n_rows, device=self.device)[:, None], slots, zeros=True)

    def value_at(self, row: torch.Tensor, index: torch.Tensor, zeros: bool = False) -> torch.Tensor:
        """The value at ``index`` of the padded row ``row`` (broadcast); with ``zeros`` False, ``index``
        must not point at the padding."""
        stored = self.rows[row]
        negatives, padding = self.negatives[stored], self.padding[row]
        own = torch.where(index < negatives, index, index - padding)
        last = self.starts[stored + 1] - self.starts[stored] - 1
        value = self.flat_values[self.starts[stored] + torch.minimum(own.clamp_min(0), last)]
        if zeros:
            value = torch.where((index >= negatives) & (index < negatives + padding), 0.0, value)
        return value


_STORED = ("flat_values", "keys", "flat_prefix_sum", "flat_prefix_sum_sq", "starts", "negatives")


def error_resolution(sorted_values: SortedValues) -> torch.Tensor:
    """Per row, how far rounding can move an error made of the prefix sums: ``4 n eps sum x^2``."""
    eps = torch.finfo(sorted_values.dtype).eps
    return 4.0 * (sorted_values.counts + 1) * eps * sorted_values.energy


def use_direct_sum(n_values: int, n_segments: int) -> bool:
    """Whether summing over the values beats binary searches for the segments' ends.

    Both cost a few dozen passes over their elements (``n`` values, or ``segments`` ends each with
    an ``O(log n)`` search); measured on CPU the values are cheaper up to about 3 per segment.
    """
    return n_values <= 3 * n_segments


def stored_below(sorted_values: SortedValues, cuts: torch.Tensor) -> torch.Tensor:
    """Per cut of ``(R, M)`` cuts, where in the stored values its row's values below it end (an index
    into :attr:`SortedValues.flat_values`): the row's start plus how many of its own values are below.

    One ``searchsorted`` of the int64 keys (:func:`_search_keys`), exact where the stored values are
    float32 numbers (:attr:`SortedValues.exact_keys`); otherwise the few cuts whose count that
    overstates (a counted value not below the cut) are corrected by a binary search over their rows in
    the accumulation dtype.
    """
    sv = sorted_values
    position = torch.searchsorted(sv.keys, _search_keys(cuts, (sv.rows << 32)[:, None], round_up=True))
    if sv.exact_keys:
        return position
    start = sv.starts[sv.rows][:, None]
    wrong = (sv.flat_values[(position - 1).clamp_min(0)] >= cuts) & (position > start)
    if bool(wrong.any()):
        low, high, cut = start.expand_as(cuts)[wrong], position[wrong], cuts[wrong]
        while bool((low < high).any()):
            middle = (low + high) // 2
            below = sv.flat_values[middle.clamp_max(sv.flat_values.numel() - 1)] < cut
            active = low < high
            low = torch.where(active & below, middle + 1, low)
            high = torch.where(active & ~below, middle, high)
        position = position.masked_scatter(wrong, low)
    return position


def count_below(
    sorted_values: SortedValues, cuts: torch.Tensor, squares: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per cut, how many values of its (padded) row lie below it, and the sums of those values and of
    their squares (None without ``squares``).

    ``cuts`` is ``(R, G, ...)``, with the candidates along dim 1 in order of their step. Rows of at
    least :data:`CANDIDATE_FASTEST_VALUES` are searched candidate-fastest: neighbouring candidates
    put the same cut at nearby values, so consecutive binary searches share their path through the
    array and stay in cache (about five times faster on a row of a million values).

    Returns:
        ``(index, sums, sums_sq)``, all shaped like ``cuts``; ``index`` counts the padding zeros
        below positive cuts (:class:`SortedValues`).
    """
    sv = sorted_values
    rows, n_candidates = cuts.shape[:2]
    reorder = sv.n_values >= CANDIDATE_FASTEST_VALUES
    flat = cuts.reshape(rows, n_candidates, -1).transpose(1, 2).reshape(rows, -1) if reorder else cuts.reshape(rows, -1)
    position = stored_below(sv, flat)
    index = position - (sv.starts[sv.rows] - sv.padding)[:, None] - torch.where(flat > 0, 0, sv.padding[:, None])
    at = (position + sv.rows[:, None]).reshape(-1)
    prefixes = (sv.flat_prefix_sum, sv.flat_prefix_sum_sq) if squares else (sv.flat_prefix_sum,)
    results = (index, *(prefix.index_select(0, at).view_as(index) for prefix in prefixes))
    if reorder:
        results = tuple(t.reshape(rows, -1, n_candidates).transpose(1, 2) for t in results)
    return (*(t.reshape(cuts.shape) for t in results), *([] if squares else [None]))


def _in_chunks(n_candidates: int, elements_per_candidate: int, compute: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """``compute`` over slices of the candidates (dim 1) holding at most ``_MAX_CHUNK_ELEMENTS``, concatenated."""
    chunk = max(1, _MAX_CHUNK_ELEMENTS // elements_per_candidate)
    return torch.cat([compute(slice(i, i + chunk)) for i in range(0, n_candidates, chunk)], dim=1)


def segment_sse(sorted_values: SortedValues, cuts: torch.Tensor, anchors: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """``sum over segments of counted * sum (x - anchor)^2`` for every candidate of every row.

    Args:
        sorted_values: ``R`` rows of ``n`` values.
        cuts: ``(R, G, M - 1)`` non-decreasing segment ends per candidate; segment ``m`` holds
            the values in ``[cuts[m - 1], cuts[m])`` (the first from ``-inf``, the last to ``+inf``).
        anchors: ``(R, G, M)``; counted: ``(M,)`` bool, which segments count.
    Returns:
        ``(R, G)``.
    """
    rows, n_candidates, n_segments = anchors.shape
    return _in_chunks(
        n_candidates, rows * n_segments, lambda part: _segment_sse(sorted_values, cuts[:, part], anchors[:, part], counted)
    )


def _segment_sums(sv: SortedValues, cuts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For ``(R, G, M - 1)`` segment ends: each segment's count, sum and sum of squares ``(R, G, M)``,
    read off the prefix sums."""
    rows, n_candidates = cuts.shape[:2]

    def runs(inner: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The differences between consecutive ends ``[first, inner..., last]``."""
        ends = torch.cat([first.expand(rows, n_candidates, 1), inner, last.expand(rows, n_candidates, 1)], dim=2)
        return ends[..., 1:] - ends[..., :-1]

    index, below, below_sq = count_below(sv, cuts)
    zero = cuts.new_zeros(1, 1, 1)
    counts = runs(index.to(cuts.dtype), zero, cuts.new_full((1, 1, 1), sv.n_values))
    sums = runs(below, zero, sv.total_sum[:, None, None])
    sums_sq = runs(below_sq, zero, sv.energy[:, None, None])
    return counts, sums, sums_sq


def _segment_sse(sv: SortedValues, cuts: torch.Tensor, anchors: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    counts, sums, sums_sq = _segment_sums(sv, cuts)
    errors = sums_sq - 2 * anchors * sums + anchors * anchors * counts
    return (errors * counted.to(errors.dtype)).sum(dim=2)


def grid_sse(sorted_values: SortedValues, step_size: torch.Tensor, zero_point: torch.Tensor, q_min: int, q_max: int) -> torch.Tensor:
    """Sum of squared quantization errors of each row for each candidate grid.

    Args:
        sorted_values: ``R`` rows of ``n`` values.
        step_size, zero_point: ``(R, G)`` candidate grids per row.
    Returns:
        ``(R, G)`` sums of squared errors, exactly those of :func:`quantize_dequantize`
        (a value on a mid-point has the same error whichever neighbour it rounds to).
    """
    n_levels = q_max - q_min + 1
    if use_direct_sum(sorted_values.n_values, n_levels):
        return _direct_sse(sorted_values.values, step_size, zero_point, q_min, q_max)
    integers = torch.arange(q_min, q_max + 1, dtype=step_size.dtype, device=step_size.device)
    counted = torch.ones(n_levels, dtype=torch.bool, device=step_size.device)

    def errors(part: slice) -> torch.Tensor:
        levels = (integers - zero_point[:, part, None]) * step_size[:, part, None]  # (R, G, K)
        midpoints = 0.5 * (levels[..., 1:] + levels[..., :-1])
        return segment_sse(sorted_values, midpoints, levels, counted)

    return _in_chunks(step_size.shape[1], step_size.shape[0] * n_levels, errors)


def _direct_sse(values: torch.Tensor, step_size: torch.Tensor, zero_point: torch.Tensor, q_min: int, q_max: int) -> torch.Tensor:
    """Full quantize-dequantize per candidate; cheaper than segments when levels outnumber values."""
    x = values[:, None, :]

    def errors(part: slice) -> torch.Tensor:
        s, z = step_size[:, part, None], zero_point[:, part, None]
        x_hat = (torch.clamp(torch.round(x / s) + z, q_min, q_max) - z) * s
        return ((x - x_hat) ** 2).sum(dim=2)

    return _in_chunks(step_size.shape[1], values.numel(), errors)


def grid_sse_lower_bound(
    sorted_values: SortedValues, low: torch.Tensor, high: torch.Tensor, level_low: torch.Tensor, level_high: torch.Tensor
) -> torch.Tensor:
    """A lower bound on :func:`grid_sse` over every step in ``[low, high]`` (module doc).

    Args:
        low, high: ``(R, G)`` step intervals, ``0 <= low <= high``.
        level_low, level_high: ``(R, G)`` integer levels ``j_lo <= 0 <= j_hi`` (float tensors);
            the bound holds for every grid whose levels lie in ``[j_lo, j_hi]``, e.g. for every
            zero point of an interval of them at once.
    Returns:
        ``(R, G)``; equal to :func:`grid_sse` when ``low == high`` and the levels are one grid's.
    """
    n_levels = int((level_high - level_low).max()) + 1
    if use_direct_sum(sorted_values.n_values, 3 * n_levels):
        return _direct_lower_bound(sorted_values.values, low, high, level_low, level_high)
    steps = torch.arange(n_levels, dtype=low.dtype, device=low.device)
    levels = torch.minimum(level_low[..., None] + steps, level_high[..., None])  # (R, G, T), ends repeated
    a, b = low[..., None], high[..., None]
    interval_low = levels * torch.where(levels >= 0, a, b)
    interval_high = levels * torch.where(levels >= 0, b, a)
    next_low = interval_low[..., 1:]
    gap_start = torch.minimum(interval_high[..., :-1], next_low)  # == next_low where intervals overlap
    gap_middle = 0.5 * (gap_start + next_low)
    # Cuts, rising: per gap the interval's start, the gap's start and middle; then the last interval's ends.
    triples = torch.stack([interval_low[..., :-1], gap_start, gap_middle], dim=-1).flatten(-2)
    cuts = torch.cat([triples, interval_low[..., -1:], interval_high[..., -1:]], dim=-1)
    index, below, below_sq = count_below(sorted_values, cuts)
    count = index.to(low.dtype)

    def run_error(start: slice, end: slice, anchor: torch.Tensor) -> torch.Tensor:
        """``sum (x - anchor)^2`` over the values between the cuts ``start`` and ``end``."""
        sums, sums_sq, counts = (t[..., end] - t[..., start] for t in (below, below_sq, count))
        return (sums_sq - anchor * (2 * sums - anchor * counts)).sum(dim=-1)

    last = 3 * (n_levels - 1)
    first_anchor, last_anchor = interval_low[..., 0], interval_high[..., -1]
    first = below_sq[..., 0] - first_anchor * (2 * below[..., 0] - first_anchor * count[..., 0])
    beyond_sq = sorted_values.energy[:, None] - below_sq[..., last + 1]
    beyond_sum = sorted_values.total_sum[:, None] - below[..., last + 1]
    beyond_count = sorted_values.n_values - count[..., last + 1]
    end = beyond_sq - last_anchor * (2 * beyond_sum - last_anchor * beyond_count)
    # Per gap: from its start to its middle (anchor: the start), from the middle to the next interval (anchor: its start).
    to_middle = run_error(slice(1, last, 3), slice(2, last, 3), gap_start)
    from_middle = run_error(slice(2, last, 3), slice(3, last + 1, 3), next_low)
    return first + to_middle + from_middle + end


def _direct_lower_bound(
    values: torch.Tensor, low: torch.Tensor, high: torch.Tensor, level_low: torch.Tensor, level_high: torch.Tensor
) -> torch.Tensor:
    """:func:`grid_sse_lower_bound` summed over the values (few values, many levels).

    For ``y = |x|`` and the levels ``m = 0..M`` on its side (``M = j_hi`` for ``x >= 0``, ``-j_lo``
    below): the intervals ``[m a, m b]`` ending at or below ``y`` end at most at ``m1 b`` with
    ``m1 = min(floor(y / b), M)``, the next one starts at ``(m1 + 1) a``; ``y`` is covered if that
    start is ``<= y`` (it ends above ``y``).
    """
    x = values[:, None, :]
    y = x.abs()

    def distances(part: slice) -> torch.Tensor:
        a, b = low[:, part, None], high[:, part, None]
        top = torch.where(x >= 0, level_high[:, part, None], -level_low[:, part, None])
        below = torch.minimum(torch.floor(y / b), top)
        to_below = y - below * b
        to_above = torch.where(below + 1 <= top, ((below + 1) * a - y).clamp_min(0.0), torch.inf)
        distance = torch.minimum(to_below, to_above).clamp_min(0.0)
        return (distance * distance).sum(dim=2)

    return _in_chunks(low.shape[1], values.numel(), distances)


def narrow_ratio(level_low: int, level_high: int) -> float:
    """The largest ``b / a`` for which an interval is narrow: ``J / (J - 1/2)``, ``J = max(|j_lo|, j_hi)``."""
    largest = max(-level_low, level_high)
    return largest / (largest - 0.5)


@dataclass(frozen=True)
class NarrowInterval:
    """How the values of each row behave on narrow step intervals ``[a, b]`` (shapes ``(R, G)``).

    On a narrow interval (``b / a <= J / (J - 1/2)``, :func:`narrow_ratio`) no value changes level
    more than once. The *stable* values keep their level ``j`` and cost
    ``sum (x - j s)^2 = sum x^2 - 2 s moment + s^2 curvature``. An *unstable* value (in the
    zone between ``(j + 1/2) a`` and ``(j + 1/2) b``) goes from level ``j_a`` to ``j_b`` at its
    breakpoint ``x / (j + 1/2)``; it is never exactly on a level inside the interval, so its error
    rises to the breakpoint and falls after it, least at an end: ``min((x - j_a a)^2, (x - j_b b)^2)``.
    With ``constant = sum x^2`` over *all* values, ``excess`` sums each unstable value's least error
    less its ``x^2``, so ``P(s) = constant - 2 s moment + s^2 curvature`` plus ``excess`` is the
    stable values' error plus the unstable values' least errors.
    """

    moment: torch.Tensor
    curvature: torch.Tensor
    constant: torch.Tensor
    excess: torch.Tensor
    unstable: torch.Tensor
    unstable_values: Callable[[torch.Tensor], UnstableValues]  # of the chosen (R, G) intervals
    capped: bool = False  # made with a level cap: a bound only (:func:`narrow_intervals`)

    def bound(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(min_{a <= s <= b} P(s) + excess, argmin)``: a lower bound on the least error over the
        interval, exact when no value is unstable (then ``E = P`` there)."""
        step = parabola_argmin(self.moment, self.curvature, low, high)
        return parabola(self.constant, self.moment, self.curvature, step) + self.excess, step


@dataclass(frozen=True)
class UnstableValues:
    """The unstable values of chosen narrow intervals, one entry per value (flat, any order)."""

    node: torch.Tensor  # flat index ``r * G + g`` of the interval
    value: torch.Tensor
    level_low: torch.Tensor  # the value's level at the interval's low end ``a``
    level_high: torch.Tensor  # ... and at its high end ``b``
    breakpoint: torch.Tensor  # ``x / (j + 1/2)``, where it changes level


def parabola(constant: torch.Tensor, moment: torch.Tensor, curvature: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``C - 2 s A + s^2 B``."""
    return constant - 2 * step * moment + step * step * curvature


def parabola_argmin(moment: torch.Tensor, curvature: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``clamp(A / B, a, b)``, the least point of ``C - 2 s A + s^2 B`` on ``[a, b]`` (``b`` where ``B = 0``)."""
    ratio = torch.where(curvature > 0, moment / torch.where(curvature > 0, curvature, 1.0), high)
    return torch.minimum(torch.maximum(ratio, low), high)


def _counted_levels(q_min: int, q_max: int, level_cap: int | None) -> tuple[int, int]:
    """The levels whose boundaries narrow statistics count: all, or those within ``level_cap + 1`` of 0."""
    return (q_min, q_max) if level_cap is None else (max(q_min, -level_cap - 1), min(q_max, level_cap + 1))


def narrow_intervals(
    sorted_values: SortedValues,
    low: torch.Tensor,
    high: torch.Tensor,
    zero_point: torch.Tensor,
    q_min: int,
    q_max: int,
    level_cap: int | None = None,
) -> NarrowInterval:
    """:class:`NarrowInterval` of ``(R, G)`` narrow intervals ``[low, high]``.

    ``level_cap`` ``J`` (zero points 0) makes a lower bound for intervals that are only narrow
    for the levels ``|j| <= J + 1`` (``b / a <= narrow_ratio(-J - 1, J + 1)``), far cheaper on wide
    grids: only the values up to the zones of the boundaries ``J | J + 1`` and ``-J - 1 | -J``
    are counted as above; those beyond count nothing, except those beyond the end points
    ``q_max b`` and ``q_min b``, which count their distance to them (the nearest any grid of the
    interval comes). Such statistics are a bound, never the error itself (:attr:`NarrowInterval.capped`).

    By segments: per level boundary ``j | j + 1`` the zone's ends ``(j + 1/2) a``, ``(j + 1/2) b``
    and, between them, the point where the two ends' errors are equal (the middle of
    ``j b`` and ``(j + 1) a`` for ``j >= 0``): left of it the least error is at the level of
    the ``b`` end, right of it at that of the ``a`` end. On a narrow interval these three cuts
    rise from one boundary to the next, so the stable run of a level lies between two zones and
    every sum telescopes into the prefix sums at the cuts: only ``sum x`` is read there (the
    ``x^2`` of every value is in ``constant``). (Few values: per value.)
    """
    # The boundaries j | j + 1 counted: from `first` to `last` - 1; cut off below and above with a cap.
    first, last = _counted_levels(q_min, q_max, level_cap)
    cut_below, cut_above = first > q_min, last < q_max
    n_levels = last - first + 1
    if use_direct_sum(sorted_values.n_values, 3 * n_levels):
        return _direct_narrow_intervals(sorted_values.values, low, high, zero_point, q_min, q_max, level_cap)
    rows, n_candidates = low.shape
    sv = sorted_values
    # The levels below and above each boundary, (R, G, K - 1).
    lower = torch.arange(first, last, dtype=low.dtype, device=low.device) - zero_point[..., None]
    upper = lower + 1
    a, b = low[..., None], high[..., None]
    left_anchor = lower * torch.where(lower >= 0, b, a)
    right_anchor = upper * torch.where(upper >= 0, a, b)
    half = lower + 0.5
    zone_low = torch.minimum(half * a, half * b)
    zone_high = torch.maximum(half * a, half * b)
    zone_middle = torch.minimum(torch.maximum(0.5 * (left_anchor + right_anchor), zone_low), zone_high)
    cuts = torch.stack([zone_low, zone_middle, zone_high], dim=-1)  # (R, G, K - 1, 3), rising
    # below: the sum of the values below each cut (of their squares too where the levels are cut)
    index, below, below_sq = count_below(sv, cuts, squares=cut_below or cut_above)
    count = index.to(low.dtype)
    at_low, at_middle, at_high = count.unbind(-1)
    sum_low, sum_middle, sum_high = below.unbind(-1)
    # The stable runs: level lower[0] up to the first zone, upper[k] from zone k to zone k + 1, the top after the
    # last; the run below the first zone and the one above the last are left out where the levels are cut there.
    moment = (lower * sum_low - upper * sum_high).sum(dim=2)
    curvature = (lower * lower * at_low - upper * upper * at_high).sum(dim=2)
    if cut_below:
        moment, curvature = moment - lower[..., 0] * sum_low[..., 0], curvature - (lower * lower * at_low)[..., 0]
    if cut_above:
        moment, curvature = moment + upper[..., -1] * sum_high[..., -1], curvature + (upper * upper * at_high)[..., -1]
    else:
        top = q_max - zero_point
        moment, curvature = moment + top * sv.total_sum[:, None], curvature + top * top * sv.n_values
    left = left_anchor * (left_anchor * (at_middle - at_low) - 2 * (sum_middle - sum_low))
    right = right_anchor * (right_anchor * (at_high - at_middle) - 2 * (sum_high - sum_middle))
    excess = (left + right).sum(dim=2)
    zone_start, zone_end = index[..., 0], index[..., 2]
    constant = sv.energy[:, None].expand(rows, n_candidates)
    if cut_below or cut_above:
        # Only the values from the first zone on (cut below) and up to the end of the last one (cut above) count;
        # beyond the end points each counts its distance to them.
        counted_end = below_sq[..., -1, 2] if cut_above else constant
        counted_start = below_sq[..., 0, 0] if cut_below else 0.0
        constant = counted_end - counted_start
        ends = torch.stack([(q_min - zero_point) * high, (q_max - zero_point) * high], dim=-1)  # (R, G, 2)
        end_index, end_sum, end_sum_sq = count_below(sv, ends)
        end_count = end_index.to(low.dtype)
        if cut_below:
            anchor = ends[..., 0]
            excess = excess + end_sum_sq[..., 0] - anchor * (2 * end_sum[..., 0] - anchor * end_count[..., 0])
        if cut_above:
            anchor = ends[..., 1]
            beyond_sum_sq = sv.energy[:, None] - end_sum_sq[..., 1]
            beyond_sum = sv.total_sum[:, None] - end_sum[..., 1]
            excess = excess + beyond_sum_sq - anchor * (2 * beyond_sum - anchor * (sv.n_values - end_count[..., 1]))

    def unstable_values(chosen: torch.Tensor) -> UnstableValues:
        """The index runs ``[zone_low, zone_high)`` of the chosen intervals' zones."""
        sizes = torch.where(chosen[..., None], zone_end - zone_start, 0).reshape(-1)
        zone = torch.repeat_interleave(torch.arange(sizes.numel(), device=low.device), sizes)
        offset = torch.arange(zone.numel(), device=low.device) - (torch.cumsum(sizes, 0) - sizes)[zone]
        node = zone // (n_levels - 1)
        value = sv.value_at(node // n_candidates, zone_start.reshape(-1)[zone] + offset)
        level = lower.reshape(-1)[zone]
        rising = level + 0.5 > 0  # at a, x / a is above the boundary: the upper level
        level_low, level_high = torch.where(rising, level + 1, level), torch.where(rising, level, level + 1)
        return UnstableValues(node, value, level_low, level_high, value / (level + 0.5))

    return NarrowInterval(
        moment=moment,
        curvature=curvature,
        constant=constant,
        excess=excess,
        unstable=(at_high - at_low).sum(dim=2),
        unstable_values=unstable_values,
        capped=cut_below or cut_above,
    )


def _direct_narrow_intervals(
    values: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    zero_point: torch.Tensor,
    q_min: int,
    q_max: int,
    level_cap: int | None = None,
) -> NarrowInterval:
    """:func:`narrow_intervals` per value (few values, many levels)."""
    x = values[:, None, :]
    a, b, z = low[..., None], high[..., None], zero_point[..., None]
    level_a = torch.clamp(torch.round(x / a) + z, q_min, q_max) - z
    level_b = torch.clamp(torch.round(x / b) + z, q_min, q_max) - z
    first, last = _counted_levels(q_min, q_max, level_cap)
    # The values counted: from the first zone's start (levels cut below) up to the last zone's end (cut above).
    counted = torch.ones_like(x, dtype=torch.bool)
    if first > q_min:
        half = first + 0.5 - z
        counted = counted & (x >= torch.minimum(half * a, half * b))
    if last < q_max:
        half = last - 0.5 - z
        counted = counted & (x < torch.maximum(half * a, half * b))
    stable = level_a == level_b
    levels = torch.where(stable & counted, level_a, 0.0)
    least = torch.minimum((x - level_a * a) ** 2, (x - level_b * b) ** 2)
    # Beyond the end points (levels cut there): the distance to them.
    bottom, top = (q_min - z) * b, (q_max - z) * b
    ends = torch.zeros_like(x)
    if first > q_min:
        ends = torch.where(x < bottom, (x - bottom) ** 2, ends)
    if last < q_max:
        ends = torch.where(x >= top, (x - top) ** 2, ends)

    def unstable_values(chosen: torch.Tensor) -> UnstableValues:
        picked = (~stable & counted & chosen[..., None]).reshape(-1, values.shape[1])
        node, position = picked.nonzero(as_tuple=True)
        value = values[node // low.shape[1], position]
        level_low, level_high = level_a.reshape(picked.shape)[node, position], level_b.reshape(picked.shape)[node, position]
        return UnstableValues(node, value, level_low, level_high, value / (0.5 * (level_low + level_high)))

    return NarrowInterval(
        moment=(levels * x).sum(dim=2),
        curvature=(levels * levels).sum(dim=2),
        constant=torch.where(counted, x * x, 0.0).sum(dim=2).expand_as(low),
        excess=(torch.where(stable | ~counted, 0.0, least - x * x) + ends).sum(dim=2),
        unstable=(~stable & counted).sum(dim=2).to(low.dtype),
        unstable_values=unstable_values,
        capped=first > q_min or last < q_max,
    )


def _by_node_then_breakpoint(node: torch.Tensor, breakpoint: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """The order of the values by node, then by breakpoint.

    One sort of the key ``node + 1/4 + t / 2``, ``t = (breakpoint - a) / (b - a)`` clamped to ``[0, 1]``:
    the keys of different nodes do not overlap and within a node the key does not decrease with the
    breakpoint (every step of it is monotone), so only breakpoints with equal keys can come out of
    order. That is checked; if any did, the order is taken by two stable sorts instead.
    """
    width = (high - low)[node]
    position = torch.where(width > 0, (breakpoint - low[node]) / torch.where(width > 0, width, 1.0), 0.0)
    order = torch.argsort(node.to(breakpoint.dtype) + 0.25 + 0.5 * position.clamp(0.0, 1.0))
    sorted_node, sorted_breakpoint = node[order], breakpoint[order]
    if bool(((sorted_breakpoint[1:] >= sorted_breakpoint[:-1]) | (sorted_node[1:] != sorted_node[:-1])).all()):
        return order
    order = torch.argsort(breakpoint, stable=True)
    return order[torch.argsort(node[order], stable=True)]


def interval_minimum(
    stats: NarrowInterval, chosen: torch.Tensor, low: torch.Tensor, high: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The least error over ``[a, b]`` of narrow intervals, exactly, by sweeping their breakpoints.

    Between consecutive breakpoints of the unstable values the error is one parabola
    ``C - 2 s A + s^2 B``; passing the breakpoint of a value ``x`` from level ``j_a`` to
    ``j_b`` adds ``(j_b - j_a) x`` to ``A`` and ``j_b^2 - j_a^2`` to ``B``. Each piece's minimum
    is at ``clamp(A / B)`` within it.

    Args:
        stats: :func:`narrow_intervals` of the ``(R, G)`` intervals ``[low, high]``;
        chosen: ``(R, G)`` bool, which of them to solve.
    Returns:
        ``(error, step)``, ``(R, G)``: the least error (``inf`` where not chosen) and where it is.
    """
    if stats.capped:
        raise ValueError("interval_minimum needs the statistics of all levels (no level_cap)")
    rows, n_candidates = low.shape
    unstable = stats.unstable_values(chosen)
    n_nodes = rows * n_candidates
    # The values in node order, by breakpoint within a node.
    order = _by_node_then_breakpoint(unstable.node, unstable.breakpoint, low.reshape(-1), high.reshape(-1))
    node, value = unstable.node[order], unstable.value[order]
    level_low, level_high, breakpoint = unstable.level_low[order], unstable.level_high[order], unstable.breakpoint[order]

    def per_node(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_nodes, dtype=low.dtype, device=low.device).index_add_(0, node, values)

    constant = stats.constant.reshape(-1)
    start_moment = stats.moment.reshape(-1) + per_node(level_low * value)
    start_curvature = stats.curvature.reshape(-1) + per_node(level_low * level_low)
    counts = torch.bincount(node, minlength=n_nodes)
    first = torch.cumsum(counts, 0) - counts  # where each node's values start
    zero = torch.zeros(1, dtype=low.dtype, device=low.device)

    def after_each(changes: torch.Tensor) -> torch.Tensor:
        """The sum of a node's changes up to and including each value (a cumulative sum restarted per node)."""
        total = torch.cat([zero, torch.cumsum(changes, 0)])
        return total[1:] - total[first[node]]

    moment = start_moment[node] + after_each((level_high - level_low) * value)
    curvature = start_curvature[node] + after_each(level_high * level_high - level_low * level_low)
    flat_low, flat_high = low.reshape(-1), high.reshape(-1)
    # Pieces: [a, first breakpoint] at the start, then from each breakpoint to the next (the last to b).
    first_break = torch.full((n_nodes,), torch.inf, dtype=low.dtype, device=low.device)
    first_break = first_break.scatter_reduce(0, node, breakpoint, "amin")
    first_end = torch.maximum(torch.minimum(first_break, flat_high), flat_low)
    is_last = torch.ones_like(node, dtype=torch.bool)
    is_last[:-1] = node[1:] != node[:-1]
    piece_start = torch.minimum(torch.maximum(breakpoint, flat_low[node]), flat_high[node])
    piece_end = torch.where(is_last, flat_high[node], torch.roll(breakpoint, -1))
    piece_end = torch.minimum(torch.maximum(piece_end, piece_start), flat_high[node])
    first_step = parabola_argmin(start_moment, start_curvature, flat_low, first_end)
    steps = parabola_argmin(moment, curvature, piece_start, piece_end)
    error = torch.cat([parabola(constant, start_moment, start_curvature, first_step), parabola(constant[node], moment, curvature, steps)])
    step = torch.cat([first_step, steps])
    owner = torch.cat([torch.arange(n_nodes, device=low.device), node])
    best = torch.full((n_nodes,), torch.inf, dtype=low.dtype, device=low.device).scatter_reduce(0, owner, error, "amin")
    at_best = torch.where(error == best[owner], step, torch.inf)
    best_step = torch.full_like(best, torch.inf).scatter_reduce(0, owner, at_best, "amin")
    chosen_flat = chosen.reshape(-1)
    best = torch.where(chosen_flat, best, torch.inf)
    best_step = torch.where(chosen_flat, best_step, flat_high)
    return best.reshape(rows, n_candidates), best_step.reshape(rows, n_candidates)


def zero_count(sorted_values: SortedValues, step_size: torch.Tensor) -> torch.Tensor:
    """Per row, how many values a zero-point-0 quantizer with ``step_size`` (shape ``(R,)``) maps to 0.

    ``round(x / s) = 0`` exactly for ``-s/2 <= x <= s/2`` (round half to even).
    """
    half_step = 0.5 * step_size
    just_above = torch.nextafter(half_step, torch.full_like(half_step, torch.inf))  # below it: the values <= s/2
    position = stored_below(sorted_values, torch.stack([-half_step, just_above], dim=1))
    return position[:, 1] - position[:, 0]
