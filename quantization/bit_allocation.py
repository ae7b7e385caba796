"""Mixed-precision bit allocation by integer linear programming: the search of LIMPQ (Tang et al., ECCV 2022).

Every searched layer ``l`` gets a weight bit-width ``B[i]`` and an input-activation bit-width
``B[j]`` from the candidates ``B``: one binary ``x[l, i, j]`` per choice, one choice per layer
(``sum_ij x[l, i, j] = 1``), and the search solves ::

    minimise    sum_lij (a[l, j] + alpha * w[l, i]) * x[l, i, j]
    subject to  sum_lij MAC_l * B[i] * B[j] * x[l, i, j]  <=  sum_l MAC_l * wb * ab              (BitOPs)
                F * P_fixed + sum_lij P_l * B[i] * x[l, i, j]  <=  32 * P_total / CR               (size)

``w``, ``a``: the layers' weight and activation importance indicators (their learned step sizes,
or any cost per bit-width); ``MAC_l``: the layer's multiply-accumulates; ``P_l``: its weight
count; ``P_fixed``: the weights of the layers kept at ``F = 8`` bits (first conv, classifier);
``P_total = P_fixed + sum_l P_l``. Either constraint may be off, not both.

**Outliers.** The official search drops "outliers" of the jointly trained indicators: for each
candidate ``b`` but the last, if ``s(b - 1) < s(b)`` the choice ``b - 1`` gets the cost 1e8,
for weights and activations separately. That reads ``s(b - 1)``, so it assumes consecutive
candidates (6, 5, 4, 3, 2). Here the rule is applied to the candidates as given: with ``b'``
the next smaller candidate than ``b``, ``b'`` is forbidden when ``s(b') < s(b)`` (the original
values are compared, as in the official code; for consecutive candidates it is the same rule).
Forbidden choices are removed rather than priced at 1e8: the optimum is the same whenever the
official search avoids them, and where no policy avoids them the setting is reported infeasible
instead of returning a policy of 1e8 costs. The largest candidate is never forbidden.

**Feasibility.** BitOPs and size both grow with the bit-widths, so the policy of each layer's
smallest allowed weight and activation bit-widths uses the least of both: the setting is
feasible exactly when that policy is. It is checked first; an infeasible setting gets
``status="infeasible"`` and a one-line ``reason``, without a solver call.

**Exact solution by bounded dynamic programming** (``solver="dp"``, the default). Every row holds
integers (MACs, weight counts, bit-widths), divided by its greatest common divisor. The row with
the least slack above the smallest policy's use (ResNet-50: size, 864 units) is handled exactly by a
DP over that slack; the other row by a Lagrange multiplier ``mu >= 0``: ``G_k(mu, r)``, the least
``sum cost + mu * other`` of layers ``k..`` using at most ``r`` slack units, bounds every completion of
a partial policy (``cost >= G - mu * room left in the other row``), for any ``mu``. The multiplier of
the best bound is searched on a coarse copy of the DP row, the exact tables are built for a grid
around it, and a forward pass over the layers keeps the partial policies ("labels") whose bound
under every multiplier of the grid is at most the incumbent's cost, fit both rows, and are not
dominated (same DP use, no cheaper label with no more other-row use). The incumbent is the best of
the DP's own policies and of a heuristic pass keeping 64 labels per layer. The cheapest complete
label is the optimum: a cheaper policy's labels would all have survived. Where the DP's tables
or labels would exceed fixed sizes (counts, not time: the same result on any machine), HiGHS
solves it as below.

**HiGHS after a reduction** (``solver="highs"``; ``"highs-full"`` gives it every choice). The
problem is solved by :func:`scipy.optimize.milp` (HiGHS) with
no optimality gap (``mip_rel_gap=0``), after a reduction that keeps the exact optimum
(Lagrangian reduced-cost fixing). With ``mu >= 0`` the duals of the two constraints in the LP
relaxation, every choice ``v`` of layer ``l`` has the penalised cost
``q_v = c_v + mu . u_v`` (``u_v``: its BitOPs and size) and the reduced cost
``r_v = q_v - min_{v' in l} q_v'``. For any feasible policy ``x``::

    c . x = sum_l q_{x_l} - mu . U x  >=  sum_l q_{x_l} - mu . limit  =  L(mu) + sum_l r_{x_l},

``L(mu) = sum_l min_l q - mu . limit`` (the LP bound). So a policy that uses a choice with
``r_v > delta`` costs more than ``L(mu) + delta``. The ILP is solved on the choices with
``r_v <= delta`` only (ResNet-50: 131 of 1290 choices, 2.5 per layer); if its optimum ``z`` satisfies
``z <= L(mu) + delta`` it is the optimum of the whole problem, otherwise ``delta`` grows to
``z - L(mu)`` and one more solve settles it. The bound holds for any ``mu >= 0``, so the
duals' accuracy only affects the speed. Every constraint row holds integers (MACs, weight counts
and bit-widths), divided by their greatest common divisor before the solve (so the solver's
feasibility tolerance is far below one unit), and the returned policy is re-checked in exact
integer arithmetic. Costs are shifted per layer and scaled so that HiGHS's absolute gap (1e-6,
not settable through SciPy) is ``1e-12`` of the largest cost spread of a layer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

logger = logging.getLogger(__name__)

__all__ = ["FIXED_LAYER_BITS", "FULL_PRECISION_BITS", "SOLVERS", "BitAllocation", "allocate_bits", "forbidden_choices"]

FIXED_LAYER_BITS = 8  # the first conv and the classifier, outside the search
FULL_PRECISION_BITS = 32  # the reference of the compression ratio
SOLVERS = ("dp", "highs", "highs-full")
_COST_SCALE = 1e6  # the largest per-layer cost spread after scaling (HiGHS's absolute gap is 1e-6)


@dataclass(frozen=True)
class BitAllocation:
    """The searched policy and what it uses (``None``/empty where infeasible or the constraint is off).

    ``bitops``, ``bitops_target``: ``sum_l MAC_l * wbits_l * abits_l`` of the searched layers
    and its budget; ``size_bits``: the weights of the whole model in bits (fixed layers at
    :data:`FIXED_LAYER_BITS`), ``size_budget_bits`` its budget ``32 P_total / CR``, and
    ``compression_ratio = 32 P_total / size_bits``; ``reason``: why no policy exists.
    """

    status: str  # "optimal" or "infeasible"
    weight_bits: tuple[int, ...]
    act_bits: tuple[int, ...]
    objective: float | None
    bitops: int | None
    bitops_target: int | None
    size_bits: int | None
    size_budget_bits: float | None
    compression_ratio: float | None
    solve_seconds: float
    reason: str = ""
    solver: str = ""  # "dp", "highs" or "highs-full": what found the optimum; "" where none was needed


def forbidden_choices(scores: np.ndarray, bits: Sequence[int]) -> np.ndarray:
    """LIMPQ's outlier rule: ``[layers, len(bits)]`` booleans, True where bit-width ``bits[k]`` is forbidden.

    With the candidates in decreasing order, a candidate is forbidden when its indicator is
    smaller than that of the next larger candidate: ``s(b') < s(b)`` with ``b'`` the next
    smaller candidate than ``b``. ``scores[:, k]`` belongs to ``bits[k]`` (any order).
    """
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(bits)[::-1]  # decreasing bit-widths
    forbidden = np.zeros(scores.shape, dtype=bool)
    forbidden[:, order[1:]] = scores[:, order[1:]] < scores[:, order[:-1]]
    return forbidden


@dataclass(frozen=True)
class _Choices:
    """The allowed ``(layer, weight bits, act bits)`` choices, their costs and constraint usage."""

    bits: np.ndarray  # [candidates] int64, as given
    layer: np.ndarray  # [n] layer index, ascending
    weight: np.ndarray  # [n] index into bits
    act: np.ndarray  # [n] index into bits
    cost: np.ndarray  # [n] float64
    usage: np.ndarray  # [rows, n] int64, exact
    limit: np.ndarray  # [rows] int64
    row_names: tuple[str, ...]  # "bitops", "size": the rows of usage
    n_layers: int
    macs: np.ndarray  # [layers] int64
    weight_counts: np.ndarray  # [layers] int64
    fixed_weight_count: int
    size_budget: float | None  # 32 P_total / CR


def allocate_bits(
    weight_scores: np.ndarray,
    act_scores: np.ndarray,
    bits: Sequence[int],
    macs: Sequence[int],
    weight_counts: Sequence[int],
    *,
    alpha: float = 2.0,
    bitops_bits: tuple[int, int] | None = None,
    compression_ratio: float | None = None,
    fixed_weight_count: int = 0,
    solver: str = "dp",
) -> BitAllocation:
    """The optimal per-layer (weight, activation) bit-widths of the module doc's ILP.

    Args:
        weight_scores, act_scores: ``[layers, len(bits)]`` indicators; column ``k`` is ``bits[k]``.
        bits: the candidate bit-widths (distinct, any order).
        macs: ``MAC_l`` of each searched layer (integers).
        weight_counts: ``P_l`` of each searched layer.
        alpha: the weight of the weight indicators.
        bitops_bits: ``(wb, ab)``: BitOPs at most those of every layer at ``wb``-bit weights and
            ``ab``-bit inputs; ``None``: no BitOPs constraint.
        compression_ratio: ``CR > 0``: weights at most ``32 P_total / CR`` bits; ``None``: no size
            constraint.
        fixed_weight_count: ``P_fixed``, the weights kept at :data:`FIXED_LAYER_BITS` bits.
        solver: ``"dp"``: the bounded dynamic programme (module doc; HiGHS as below where it would
            exceed its limits); ``"highs"``: HiGHS after the reduced-cost reduction; ``"highs-full"``:
            HiGHS on every choice. All are exact; the result says which one solved it.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    choices = _choices(weight_scores, act_scores, bits, macs, weight_counts, alpha, bitops_bits, compression_ratio,
                       fixed_weight_count)  # fmt: skip
    started = time.perf_counter()
    reason = _infeasibility(choices)
    if reason:
        return _result(choices, None, time.perf_counter() - started, reason)
    chosen = _solve_dp(choices) if solver == "dp" else None
    if chosen is None:
        solver = "highs-full" if solver == "highs-full" else "highs"
        chosen = _solve_reduced(choices) if solver == "highs" else _solve_milp(choices, np.arange(choices.cost.size))
    seconds = time.perf_counter() - started
    if chosen is None:  # cannot happen: the smallest policy is feasible
        raise RuntimeError("HiGHS found no policy although the smallest bit-widths fit the constraints")
    _check_exactly(choices, chosen, solver)
    return _result(choices, chosen, seconds, solver=solver)


def _choices(
    weight_scores: np.ndarray,
    act_scores: np.ndarray,
    bits: Sequence[int],
    macs: Sequence[int],
    weight_counts: Sequence[int],
    alpha: float,
    bitops_bits: tuple[int, int] | None,
    compression_ratio: float | None,
    fixed_weight_count: int,
) -> _Choices:
    """Validate the inputs; every allowed choice with its cost, BitOPs and weight bits."""
    weight_scores = np.asarray(weight_scores, dtype=np.float64)
    act_scores = np.asarray(act_scores, dtype=np.float64)
    bit_array = np.asarray(bits, dtype=np.int64)
    n_layers = weight_scores.shape[0] if weight_scores.ndim == 2 else 0
    distinct = bit_array.ndim == 1 and bit_array.size > 0 and len(set(bit_array.tolist())) == bit_array.size
    if not distinct or (bit_array < 1).any():
        raise ValueError(f"bits must be distinct positive integers, got {list(bits)}")
    if weight_scores.shape != (n_layers, bit_array.size) or act_scores.shape != weight_scores.shape or n_layers == 0:
        raise ValueError(f"the indicators must be [layers, {bit_array.size}] arrays of one shape, got "
                         f"{weight_scores.shape} and {act_scores.shape}")  # fmt: skip
    if not (np.isfinite(weight_scores).all() and np.isfinite(act_scores).all()):
        raise ValueError("the indicators must be finite")
    macs_array = _counts(macs, n_layers, "macs")
    counts_array = _counts(weight_counts, n_layers, "weight_counts")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    if bitops_bits is None and compression_ratio is None:
        raise ValueError("at least one constraint is needed: bitops_bits or compression_ratio")
    if compression_ratio is not None and not (math.isfinite(compression_ratio) and compression_ratio > 0):
        raise ValueError(f"the compression ratio must be positive, got {compression_ratio}")
    if fixed_weight_count < 0:
        raise ValueError(f"fixed_weight_count must be >= 0, got {fixed_weight_count}")

    allowed_weight = ~forbidden_choices(weight_scores, bits)
    allowed_act = ~forbidden_choices(act_scores, bits)
    layer, weight, act = np.nonzero(allowed_weight[:, :, None] & allowed_act[:, None, :])
    cost = act_scores[layer, act] + alpha * weight_scores[layer, weight]
    usage, limit, names, budget = [], [], [], None
    if bitops_bits is not None:
        wb, ab = bitops_bits
        usage.append(macs_array[layer] * bit_array[weight] * bit_array[act])
        limit.append(int(macs_array.sum()) * wb * ab)
        names.append("bitops")
    if compression_ratio is not None:
        budget = FULL_PRECISION_BITS * (int(counts_array.sum()) + fixed_weight_count) / compression_ratio
        usage.append(counts_array[layer] * bit_array[weight])
        limit.append(math.floor(budget) - FIXED_LAYER_BITS * fixed_weight_count)  # integer usage <= budget
        names.append("size")
    usage_rows = np.array(usage, dtype=np.int64).reshape(len(usage), layer.size)
    return _Choices(bit_array, layer, weight, act, cost, usage_rows, np.array(limit, dtype=np.int64), tuple(names),
                    n_layers, macs_array, counts_array, fixed_weight_count, budget)  # fmt: skip


def _counts(values: Sequence[int], n_layers: int, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.shape != (n_layers,) or not np.issubdtype(array.dtype, np.integer) or (array < 0).any():
        raise ValueError(f"{name} must hold {n_layers} non-negative integers")
    return array.astype(np.int64)


def _infeasibility(choices: _Choices) -> str:
    """Why no policy fits (empty if one does): even the smallest allowed bit-widths exceed a limit."""
    used = dict(zip(choices.row_names, choices.usage[:, _smallest_policy(choices)].sum(axis=1).tolist()))
    limits = dict(zip(choices.row_names, choices.limit.tolist()))
    if used.get("bitops", 0) > limits.get("bitops", 0):
        return (f"even the smallest allowed bit-widths need {used['bitops']:.4g} BitOPs, above the target "
                f"{limits['bitops']:.4g}")  # fmt: skip
    if used.get("size", 0) > limits.get("size", 0):
        size = used["size"] + FIXED_LAYER_BITS * choices.fixed_weight_count
        total_bits = FULL_PRECISION_BITS * (int(choices.weight_counts.sum()) + choices.fixed_weight_count)
        return (f"even the smallest allowed bit-widths give {size:.4g} weight bits (compression ratio "
                f"{total_bits / size:.4g}), above the budget {choices.size_budget:.4g}")  # fmt: skip
    return ""


def _smallest_policy(choices: _Choices) -> np.ndarray:
    """Per layer, the index of its choice with the smallest allowed weight and activation bit-widths."""
    weight_bits, act_bits = choices.bits[choices.weight], choices.bits[choices.act]
    smallest = np.empty(choices.n_layers, dtype=np.int64)
    for layer in range(choices.n_layers):  # a layer's choices are all pairs of its allowed bit-widths
        mine = np.flatnonzero(choices.layer == layer)
        smallest[layer] = mine[np.lexsort((act_bits[mine], weight_bits[mine]))[0]]
    return smallest


def _scaled_rows(choices: _Choices, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The constraint rows over the kept choices, each divided by the gcd of its coefficients (exact)."""
    usage = choices.usage[:, kept]
    divisors = np.array([max(int(np.gcd.reduce(row)), 1) for row in usage], dtype=np.int64)
    return (usage // divisors[:, None]).astype(np.float64), (choices.limit // divisors).astype(np.float64)


def _one_per_layer(choices: _Choices, kept: np.ndarray) -> sparse.csr_array:
    return sparse.csr_array((np.ones(kept.size), (choices.layer[kept], np.arange(kept.size))),
                            shape=(choices.n_layers, kept.size))  # fmt: skip


def _solve_milp(choices: _Choices, kept: np.ndarray) -> np.ndarray | None:
    """The optimal choice index per layer among ``kept`` (every layer needs one), or None if none fits."""
    usage, limit = _scaled_rows(choices, kept)
    cost = choices.cost[kept]
    cost = cost - _layer_minimum(cost, choices.layer[kept], choices.n_layers)[choices.layer[kept]]
    spread = float(cost.max())
    cost = cost * (_COST_SCALE / spread) if spread > 0 else cost
    constraints = [LinearConstraint(_one_per_layer(choices, kept), 1, 1),
                   LinearConstraint(sparse.csr_array(usage), -np.inf, limit)]  # fmt: skip
    with _stdout_silenced():
        result = milp(cost, integrality=np.ones(kept.size), bounds=Bounds(0, 1), constraints=constraints,
                      options={"mip_rel_gap": 0.0})  # fmt: skip
    if result.status == 2:
        return None
    if result.status != 0:
        raise RuntimeError(f"HiGHS did not solve the bit allocation: {result.message}")
    picked = kept[result.x > 0.5]
    if picked.size != choices.n_layers:
        raise RuntimeError(f"HiGHS returned {picked.size} choices for {choices.n_layers} layers")
    return picked  # ordered by layer, as the choices are


@contextlib.contextmanager
def _stdout_silenced() -> Iterator[None]:
    """Discard what C code writes to file descriptor 1 meanwhile.

    HiGHS 1.12 (SciPy's) prints a stray debug line "HighsMipSolverData::transformNewIntegerFeasibleSolution
    tmpSolver.run();" to stdout even with its output off (ERGO-Code/HiGHS issue 2783).
    """
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1: nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _layer_minimum(values: np.ndarray, layer: np.ndarray, n_layers: int) -> np.ndarray:
    minimum = np.full(n_layers, np.inf)
    np.minimum.at(minimum, layer, values)
    return minimum


def _lagrangian_reduced_costs(choices: _Choices) -> tuple[np.ndarray, float]:
    """Reduced costs ``r_v`` and the bound ``L(mu)`` (module doc) from the LP relaxation's duals."""
    every = np.arange(choices.cost.size)
    usage, limit = _scaled_rows(choices, every)
    relaxation = linprog(choices.cost, A_ub=sparse.csr_array(usage), b_ub=limit, A_eq=_one_per_layer(choices, every),
                         b_eq=np.ones(choices.n_layers), bounds=(0, 1), method="highs")  # fmt: skip
    multipliers = np.zeros(usage.shape[0])
    if relaxation.status == 0:
        multipliers = np.maximum(-relaxation.ineqlin.marginals, 0.0)  # SciPy's marginals are <= 0 here
    penalised = choices.cost + multipliers @ usage
    minimum = _layer_minimum(penalised, choices.layer, choices.n_layers)
    return penalised - minimum[choices.layer], float(minimum.sum() - multipliers @ limit)


def _solve_reduced(choices: _Choices) -> np.ndarray | None:
    """The exact optimum, solved on the choices of small reduced cost (module doc).

    ``delta`` starts at 0 (each layer's cheapest penalised choice, a quick first policy), then
    becomes a quarter of that policy's excess over the bound (usually enough), then the excess
    of the latest policy (always enough: that policy's own choices are then kept).
    """
    reduced, bound = _lagrangian_reduced_costs(choices)
    tolerance = 1e-9 * max(1.0, abs(bound))  # float error of r_v and L(mu), far above their rounding
    delta = 0.0
    while True:
        kept = np.flatnonzero(reduced <= delta + tolerance)
        chosen = _solve_milp(choices, kept)
        if kept.size == reduced.size:
            return chosen
        if chosen is None:  # too few choices kept: take more
            delta = max(2 * delta, float(np.min(reduced[reduced > delta + tolerance])))
            continue
        excess = float(choices.cost[chosen].sum()) - bound
        logger.debug("bit allocation: %d of %d choices kept (delta %.3g), optimum - bound %.3g",
                     kept.size, reduced.size, delta, excess)  # fmt: skip
        if excess <= delta:
            return chosen  # any policy using a dropped choice costs more than bound + delta
        delta = excess if delta > 0 else excess / 4


_MU_GRID = 16  # Lagrange multipliers per DP pass
_MU_ROUNDS = 3  # coarse DP passes of the multiplier search
_MU_SPREAD = 0.3  # the exact tables' multipliers: the coarse peak times 1 -+ this
_COARSE_CAPACITY = 128  # the coarse DP row's capacity, about
_BEAM = 64  # labels kept per layer by the heuristic pass that finds the incumbent
_MAX_TABLE = 1 << 23  # DP table entries at most: (layers + 1) * multipliers * (capacity + 1), else HiGHS
_MAX_LABELS = 100_000  # labels kept after any layer at most, else HiGHS (a count: the same on any machine)


@dataclass(frozen=True)
class _Layered:
    """The choices as ``[layers, width]`` arrays for the DP (padding: ``kept`` False)."""

    kept: np.ndarray  # [L, m] bool: a choice, not dominated within its layer
    index: np.ndarray  # [L, m] index into the _Choices arrays
    cost: np.ndarray  # [L, m] float64
    excess: np.ndarray  # [L, m] int64: the DP row's usage above the layer's least, in units of the row's gcd
    other: np.ndarray  # [L, m] float64: the other row's usage in units of its gcd (integers), zeros if none
    capacity: int  # the DP row's limit above the sum of the layers' least usage (units)
    other_limit: float  # the other row's limit (units); 0 if none


def _layered(choices: _Choices) -> _Layered | None:
    """The DP's view of the problem: the row of least slack is the DP's, the other is Lagrangian; None: too big."""
    n_layers, n_rows = choices.n_layers, choices.usage.shape[0]
    position = np.arange(choices.layer.size) - np.searchsorted(choices.layer, choices.layer)
    width = int(position.max()) + 1
    index = np.zeros((n_layers, width), dtype=np.int64)
    valid = np.zeros((n_layers, width), dtype=bool)
    index[choices.layer, position], valid[choices.layer, position] = np.arange(choices.layer.size), True
    divisors = np.array([max(int(np.gcd.reduce(row)), 1) for row in choices.usage], dtype=np.int64)
    units = np.where(valid[None], choices.usage[:, index] // divisors[:, None, None], np.iinfo(np.int64).max)
    limits = choices.limit // divisors
    least = units.min(axis=2)  # [rows, L]
    slack = limits - least.sum(axis=1)
    dp_row = int(np.argmin(slack))
    capacity = int(slack[dp_row])  # >= 0: the smallest policy fits (checked before)
    if (n_layers + 1) * _MU_GRID * (capacity + 1) > _MAX_TABLE or limits.max() >= 2**52:
        return None
    excess = np.where(valid, units[dp_row] - least[dp_row][:, None], 0)
    if n_rows == 2:
        other, other_limit = np.where(valid, units[1 - dp_row], 0).astype(np.float64), float(limits[1 - dp_row])
    else:
        other, other_limit = np.zeros(valid.shape), 0.0
    cost = np.where(valid, choices.cost[index], np.inf)
    # a choice no cheaper and using no less of either row than another of its layer is never needed
    no_better = ((cost[:, :, None] <= cost[:, None, :]) & (excess[:, :, None] <= excess[:, None, :])
                 & (other[:, :, None] <= other[:, None, :]))  # [L, w, v]: w is at least as good as v  # fmt: skip
    strictly = ((cost[:, :, None] < cost[:, None, :]) | (excess[:, :, None] < excess[:, None, :])
                | (other[:, :, None] < other[:, None, :]))  # fmt: skip
    first = np.arange(width)[:, None] < np.arange(width)[None, :]  # equal choices: the first is kept
    dominated = (valid[:, :, None] & no_better & (strictly | first[None])).any(axis=1)
    return _Layered(valid & ~dominated, index, cost, excess, other, capacity, other_limit)


def _dp_tables(problem: _Layered, multipliers: np.ndarray) -> np.ndarray:
    """``G[k, j, r]``: the least ``sum cost + mu_j * other`` over layers ``k..`` with DP excess at most ``r``."""
    n_layers, capacity = problem.cost.shape[0], problem.capacity
    layer, slot = np.nonzero(problem.kept)
    excess = problem.excess[layer, slot]
    order = np.lexsort((excess, layer))
    layer, slot, excess = layer[order], slot[order], excess[order]
    starts = np.flatnonzero(np.r_[True, (layer[1:] != layer[:-1]) | (excess[1:] != excess[:-1])])
    penalised = problem.cost[layer, slot][None] + multipliers[:, None] * problem.other[layer, slot][None]
    group_best = np.minimum.reduceat(penalised, starts, axis=1)  # [K, groups]: the best of each (layer, excess)
    group_layer, group_excess = layer[starts].tolist(), excess[starts].tolist()
    tables = np.empty((n_layers + 1, multipliers.size, capacity + 1))
    tables[n_layers] = 0.0
    group = len(starts) - 1
    for k in range(n_layers - 1, -1, -1):
        current, following = tables[k], tables[k + 1]
        current.fill(np.inf)
        while group >= 0 and group_layer[group] == k:
            e = group_excess[group]
            if e <= capacity:
                np.minimum(current[:, e:], following[:, :capacity + 1 - e] + group_best[:, group, None],
                           out=current[:, e:])  # fmt: skip
            group -= 1
    return tables


def _multipliers(problem: _Layered) -> tuple[np.ndarray, np.ndarray]:
    """Multipliers of the other row around the best DP-Lagrangian bound, and their DP tables.

    The bound ``G[0, j, capacity] - mu_j * other_limit`` is concave in ``mu``. Its peak is searched
    on a coarse copy of the DP row (usage and capacity divided by a common factor and rounded, so a
    pass is cheap; an approximation that only steers the search): a geometric grid, then finer grids
    between the best point's neighbours. The exact tables are then built for a grid around that peak
    (any multipliers give valid bounds, these give tight ones) and one multiplier so large that its
    DP policy uses the least of the other row (a feasible policy: a first incumbent).
    """
    if problem.other_limit == 0 and not problem.other.any():
        return np.zeros(1), _dp_tables(problem, np.zeros(1))
    spread = np.where(problem.kept, problem.cost, -np.inf).max(axis=1) - np.where(problem.kept, problem.cost,
                                                                                  np.inf).min(axis=1)  # fmt: skip
    large = 2.0 * float(spread.sum()) + 1.0  # one unit of the other row outweighs any cost difference
    factor = -(-problem.capacity // _COARSE_CAPACITY)
    coarse = problem
    if factor > 1:
        coarse = dataclasses.replace(problem, excess=(problem.excess + factor // 2) // factor,
                                     capacity=(problem.capacity + factor // 2) // factor)  # fmt: skip
    grid = np.r_[0.0, large * np.logspace(-12, 0, _MU_GRID - 1)]
    for round_ in range(_MU_ROUNDS):
        value = _dp_tables(coarse, grid)[0, :, coarse.capacity] - grid * problem.other_limit
        best = int(np.argmax(value))
        centre, low, high = grid[best], grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
        if round_ < _MU_ROUNDS - 1:
            grid = np.geomspace(low, high, _MU_GRID) if low > 0 else np.r_[0.0, np.geomspace(high * 1e-4, high,
                                                                                             _MU_GRID - 1)]  # fmt: skip
    if centre > 0:
        final = centre * np.linspace(1 - _MU_SPREAD, 1 + _MU_SPREAD, _MU_GRID - 1)
    else:
        final = np.r_[0.0, np.geomspace(high * 1e-3, high, _MU_GRID - 2)]
    final = np.r_[final, large]
    return final, _dp_tables(problem, final)


def _dp_policy_costs(problem: _Layered, multipliers: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """The cost of each multiplier's DP policy (it fits the DP row); inf where it exceeds the other row."""
    n_layers, count = problem.cost.shape[0], multipliers.size
    rows = np.arange(count)[:, None]
    room = np.full(count, problem.capacity)
    cost, other = np.zeros(count), np.zeros(count)
    for k in range(n_layers):
        mine = np.flatnonzero(problem.kept[k])
        excess = problem.excess[k, mine]
        fits = excess[None] <= room[:, None]
        rest = tables[k + 1][rows, np.where(fits, room[:, None] - excess[None], 0)]
        value = problem.cost[k, mine][None] + multipliers[:, None] * problem.other[k, mine][None] + rest
        pick = mine[np.argmin(np.where(fits, value, np.inf), axis=1)]
        room -= problem.excess[k, pick]
        cost += problem.cost[k, pick]
        other += problem.other[k, pick]
    return np.where(other <= problem.other_limit, cost, np.inf)


def _solve_dp(choices: _Choices) -> np.ndarray | None:
    """The exact optimum by bounded dynamic programming (module doc); None if it would exceed its limits."""
    problem = _layered(choices)
    if problem is None:
        return None
    multipliers, tables = _multipliers(problem)
    incumbent = float(_dp_policy_costs(problem, multipliers, tables).min())
    guess = _label_pass(problem, multipliers, tables, incumbent, beam=_BEAM)
    if guess is not None and guess.size:  # a policy (the heuristic pass keeps only the most promising labels)
        incumbent = min(incumbent, float(problem.cost[np.arange(guess.size), guess].sum()))
    found = _label_pass(problem, multipliers, tables, incumbent)
    if found is None or found.size == 0:
        return None  # too many labels (none found cannot happen: the incumbent's policy or a better one stays)
    chosen = problem.index[np.arange(found.size), found]
    logger.debug("bit allocation DP: capacity %d, multipliers %s, incumbent %.12g, optimum %.12g",
                 problem.capacity, multipliers, incumbent, float(choices.cost[chosen].sum()))  # fmt: skip
    return chosen


def _label_pass(problem: _Layered, multipliers: np.ndarray, tables: np.ndarray, ceiling: float,
                beam: int = 0) -> np.ndarray | None:
    """The cheapest policy (``[L]`` slots) among those whose bounds stay below ``ceiling``: empty if none, None if
    more than :data:`_MAX_LABELS` labels would be kept. ``beam > 0``: a heuristic, only the ``beam`` labels
    of least bound are kept after each layer."""
    n_layers, capacity, limit = problem.cost.shape[0], problem.capacity, problem.other_limit
    scale = float(np.abs(np.where(problem.kept, problem.cost, 0)).max(axis=1).sum())
    scale += multipliers * (limit + float(np.where(problem.kept, problem.other, 0).max(axis=1).sum()))
    tolerance = 1e-9 * (1.0 + scale)  # [K], far above the float error of the bounds
    least_other = np.where(problem.kept, problem.other, np.inf).min(axis=1)
    other_after = np.r_[np.cumsum(least_other[::-1])[::-1], 0.0][1:]  # least other-row use of layers k+1..
    used, cost, other = np.zeros(1, dtype=np.int64), np.zeros(1), np.zeros(1)
    parents, picks = [], []
    for k in range(n_layers):
        mine = np.flatnonzero(problem.kept[k])
        parent = np.repeat(np.arange(used.size), mine.size)
        pick = np.tile(mine, used.size)
        new_used = used[parent] + problem.excess[k, pick]
        new_other = other[parent] + problem.other[k, pick]
        live = np.flatnonzero((new_used <= capacity) & (new_other + other_after[k] <= limit))
        parent, pick, new_used, new_other = parent[live], pick[live], new_used[live], new_other[live]
        new_cost = cost[parent] + problem.cost[k, pick]
        bounds = (new_cost[None] + tables[k + 1][:, capacity - new_used]
                  - multipliers[:, None] * (limit - new_other[None]))  # fmt: skip
        live = np.flatnonzero((bounds - tolerance[:, None] <= ceiling).all(axis=0))
        parent, pick, new_used, new_other, new_cost = (a[live] for a in (parent, pick, new_used, new_other, new_cost))
        if beam and live.size > beam:
            best = np.argsort(bounds[:, live].max(axis=0), kind="stable")[:beam]
            parent, pick, new_used, new_other, new_cost = (a[best] for a in (parent, pick, new_used, new_other,
                                                                               new_cost))  # fmt: skip
        # of labels with the same DP use, keep those with less other-row use than every cheaper one
        order = np.lexsort((new_other, new_cost, new_used))
        parent, pick, new_used, new_other, new_cost = (a[order] for a in (parent, pick, new_used, new_other, new_cost))
        rank = np.unique(new_other, return_inverse=True)[1].astype(np.int64)
        group = np.cumsum(np.r_[True, new_used[1:] != new_used[:-1]])
        shifted = rank - group * (rank.size + 1)  # groups in ascending order, each below the previous
        before = np.r_[np.iinfo(np.int64).max, np.minimum.accumulate(shifted)[:-1]]
        live = np.flatnonzero(shifted < before)
        if live.size > _MAX_LABELS:
            return None
        parents.append(parent[live])
        picks.append(pick[live])
        used, other, cost = new_used[live], new_other[live], new_cost[live]
        if cost.size == 0:
            return np.empty(0, dtype=np.int64)
    label = int(np.argmin(cost))
    slots = np.empty(n_layers, dtype=np.int64)
    for k in range(n_layers - 1, -1, -1):
        slots[k] = picks[k][label]
        label = int(parents[k][label])
    return slots


def _check_exactly(choices: _Choices, chosen: np.ndarray, solver: str) -> None:
    """Re-check the solver's policy in exact integer arithmetic."""
    used = choices.usage[:, chosen].sum(axis=1)
    for name, use, limit in zip(choices.row_names, used.tolist(), choices.limit.tolist()):
        if use > limit:
            raise RuntimeError(f"the {solver} solver returned a policy over the {name} limit ({use} > {limit})")


def _result(choices: _Choices, chosen: np.ndarray | None, seconds: float, reason: str = "",
            solver: str = "") -> BitAllocation:
    limits = dict(zip(choices.row_names, choices.limit.tolist()))
    if chosen is None:
        return BitAllocation("infeasible", (), (), None, None, limits.get("bitops"), None, choices.size_budget, None,
                             seconds, reason)  # fmt: skip
    weight_bits, act_bits = choices.bits[choices.weight[chosen]], choices.bits[choices.act[chosen]]
    bitops = int(np.sum(choices.macs * weight_bits * act_bits))
    size = FIXED_LAYER_BITS * choices.fixed_weight_count + int(np.sum(choices.weight_counts * weight_bits))
    total_bits = FULL_PRECISION_BITS * (int(choices.weight_counts.sum()) + choices.fixed_weight_count)
    return BitAllocation("optimal", tuple(weight_bits.tolist()), tuple(act_bits.tolist()),
                         float(choices.cost[chosen].sum()), bitops, limits.get("bitops"), size, choices.size_budget,
                         total_bits / size, seconds, solver=solver)  # fmt: skip
