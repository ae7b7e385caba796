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
around it (8 multipliers), and a forward pass over the layers keeps the partial policies ("labels")
whose bound under every multiplier of the grid is at most a ceiling, fit both rows, and are not
dominated (same DP use, no cheaper label with no more other-row use). Every policy of cost at most
the ceiling keeps all its labels, so the cheapest complete label is the optimum once its cost is at
most the ceiling. The first ceiling lies just above the best bound (ResNet-50: the bound is 0.001
below the optimum 4.631, the best of the DP's own policies costs 4.637), so few labels survive
(ResNet-50: 650 in two passes, floored geometry; 3,700 in one, official); a pass that ends above its
ceiling has found a policy, whose cost is the next ceiling, which settles it. Where the DP's tables or labels would exceed fixed sizes (counts, not time: the
same result on any machine), HiGHS solves it as below.

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
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from scipy import sparse

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
    order = np.lexsort((choices.bits[choices.act], choices.bits[choices.weight], choices.layer))
    layer = choices.layer[order]
    return order[np.r_[True, layer[1:] != layer[:-1]]]  # a layer's choices are all pairs of its allowed bit-widths


def _scaled_rows(choices: _Choices, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The constraint rows over the kept choices, each divided by the gcd of its coefficients (exact)."""
    usage = choices.usage[:, kept]
    divisors = np.array([max(int(np.gcd.reduce(row)), 1) for row in usage], dtype=np.int64)
    return (usage // divisors[:, None]).astype(np.float64), (choices.limit // divisors).astype(np.float64)


def _one_per_layer(choices: _Choices, kept: np.ndarray) -> sparse.csr_array:
    from scipy import sparse  # SciPy only where HiGHS runs: the DP's solves need numpy alone

    return sparse.csr_array((np.ones(kept.size), (choices.layer[kept], np.arange(kept.size))),
                            shape=(choices.n_layers, kept.size))  # fmt: skip


def _solve_milp(choices: _Choices, kept: np.ndarray) -> np.ndarray | None:
    """The optimal choice index per layer among ``kept`` (every layer needs one), or None if none fits."""
    from scipy import sparse
    from scipy.optimize import Bounds, LinearConstraint, milp

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
    from scipy import sparse
    from scipy.optimize import linprog

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


_MU_GRID = 16  # Lagrange multipliers per coarse DP pass
_MU_ROUNDS = 2  # coarse DP passes of the multiplier search
_MU_FINAL = 8  # Lagrange multipliers of the exact DP tables
_COARSE_CAPACITY = 32  # the coarse DP row's capacity, about
_FIRST_CEILING = 1 / 16  # the first label pass's ceiling: bound + this * (incumbent - bound)
_MAX_TABLE = 1 << 23  # exact DP table entries at most: (layers + 1) * _MU_FINAL * (capacity + 2), else HiGHS
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
    if (n_layers + 1) * _MU_FINAL * (capacity + 2) > _MAX_TABLE or (capacity + 1) * (int(limits.max()) + 1) >= 2**53:
        return None  # tables too large, or label ranks past float64's exact integers (see _label_pass)
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
    """``G[k, j, r]``: the least ``sum cost + mu_j * other`` over layers ``k..`` with DP excess at most ``r``.

    ``r`` runs to ``capacity + 1``; the last column holds ``inf``, so that ``G[k, j, -1]`` stands for any
    negative ``r`` (no room left)."""
    n_layers, capacity = problem.cost.shape[0], problem.capacity
    layer, slot = np.nonzero(problem.kept)
    excess = problem.excess[layer, slot]
    order = np.lexsort((excess, layer))
    layer, slot, excess = layer[order], slot[order], excess[order]
    starts = np.flatnonzero(np.r_[True, (layer[1:] != layer[:-1]) | (excess[1:] != excess[:-1])])
    penalised = problem.cost[layer, slot][None] + multipliers[:, None] * problem.other[layer, slot][None]
    group_best = np.minimum.reduceat(penalised, starts, axis=1)  # [K, groups]: the best of each (layer, excess)
    group_layer, group_excess = layer[starts].tolist(), excess[starts].tolist()
    padded = np.full((n_layers + 1, multipliers.size, capacity + 2), np.inf)
    tables = padded[:, :, :-1]
    tables[n_layers] = 0.0
    group = len(starts) - 1
    for k in range(n_layers - 1, -1, -1):
        current, following = tables[k], tables[k + 1]
        while group >= 0 and group_layer[group] == k:
            e = group_excess[group]
            if e <= capacity:
                np.minimum(current[:, e:], following[:, :capacity + 1 - e] + group_best[:, group, None],
                           out=current[:, e:])  # fmt: skip
            group -= 1
    return padded


def _multipliers(problem: _Layered) -> tuple[np.ndarray, np.ndarray]:
    """Multipliers of the other row around the best DP-Lagrangian bound, and their DP tables.

    The bound ``G[0, j, capacity] - mu_j * other_limit`` is concave in ``mu``. Its peak is searched
    on a coarse copy of the DP row (usage and capacity divided by a common factor and rounded, so a
    pass is cheap; an approximation that only steers the search): a geometric grid over 12 decades,
    then a finer one between the best point's neighbours. The exact tables are then built for a
    geometric grid between the best point's neighbours in that finer grid (any multipliers give valid
    bounds, these give tight ones) and one multiplier so large that its DP policy uses the least of
    the other row (a feasible policy: a first incumbent).
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
        low, high = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
        size = _MU_GRID if round_ < _MU_ROUNDS - 1 else _MU_FINAL - 1
        grid = np.geomspace(low, high, size) if low > 0 else np.r_[0.0, np.geomspace(high * 1e-4, high, size - 1)]
    final = np.r_[grid, large]
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
    """The exact optimum by bounded dynamic programming (module doc); None if it would exceed its limits.

    Label passes with rising ceilings: a pass keeps every policy of cost at most its ceiling, so the
    cheapest policy it finds is the optimum when its cost is at most the ceiling. The first ceiling is
    ``bound + _FIRST_CEILING * (incumbent - bound)``; a pass that finds a policy above its ceiling makes
    that policy the incumbent and the incumbent the next ceiling (which settles it: the incumbent's
    policy stays), one that finds none quadruples the ceiling's distance to the bound.
    """
    problem = _layered(choices)
    if problem is None:
        return None
    multipliers, tables = _multipliers(problem)
    offsets = multipliers * problem.other_limit + _bound_tolerance(problem, multipliers)
    bound = float(np.max(tables[0, :, problem.capacity] - multipliers * problem.other_limit))
    incumbent = float(_dp_policy_costs(problem, multipliers, tables).min())
    layers = [(mine := np.flatnonzero(problem.kept[k]), np.stack((problem.excess[k, mine], problem.other[k, mine],
                                                                  problem.cost[k, mine])))
              for k in range(problem.cost.shape[0])]  # fmt: skip
    ceiling = min(bound + _FIRST_CEILING * (incumbent - bound), incumbent)
    while True:
        found = _label_pass(problem, layers, multipliers, tables, offsets, ceiling)
        if found is None:
            return None  # too many labels
        cost = float(problem.cost[np.arange(found.size), found].sum()) if found.size else math.inf
        if cost <= ceiling or ceiling >= incumbent:
            break
        incumbent = min(incumbent, cost)
        ceiling = incumbent if found.size else min(bound + 4 * (ceiling - bound), incumbent)
    if found.size == 0:
        return None  # cannot happen: the incumbent's policy or a better one stays in a pass up to its cost
    chosen = problem.index[np.arange(found.size), found]
    logger.debug("bit allocation DP: capacity %d, multipliers %s, bound %.12g, ceiling %.12g, optimum %.12g",
                 problem.capacity, multipliers, bound, ceiling, float(choices.cost[chosen].sum()))  # fmt: skip
    return chosen


def _bound_tolerance(problem: _Layered, multipliers: np.ndarray) -> np.ndarray:
    """Per multiplier, far above the float error of the label bounds (a part in 1e9 of their largest terms)."""
    scale = float(np.abs(np.where(problem.kept, problem.cost, 0)).max(axis=1).sum())
    other = problem.other_limit + float(np.where(problem.kept, problem.other, 0).max(axis=1).sum())
    return 1e-9 * (1.0 + scale + multipliers * other)


def _label_pass(problem: _Layered, layers: list[tuple[np.ndarray, np.ndarray]], multipliers: np.ndarray,
                tables: np.ndarray, offsets: np.ndarray, ceiling: float) -> np.ndarray | None:
    """The cheapest policy (``[L]`` slots) among those whose bounds stay below ``ceiling`` (every policy of cost
    at most ``ceiling`` among them): empty if none, None if more than :data:`_MAX_LABELS` labels would be kept.

    ``layers[k]``: layer ``k``'s kept slots and their (DP excess, other-row use, cost) as a ``[3, m]`` array.
    A label is a partial policy of layers ``..k`` as (DP use ``u``, other-row use ``o``, cost ``c``); its bound
    under ``mu_j`` is ``c + G[k + 1, j, capacity - u] - mu_j * (limit - o)``, less ``offsets[j] - mu_j * limit``
    (a tolerance), and a label whose largest bound exceeds ``ceiling``
    (or that leaves the other row too little room) is dropped. Of labels with the same ``u``, only those
    with less ``o`` than every cheaper one are kept: with the labels sorted by ``(u, c, o)``,
    ``o - u * (limit + 1)`` must fall below its running minimum (exact: integers below 2**53, see
    :func:`_layered`).
    """
    capacity, limit = problem.capacity, problem.other_limit
    least_other = np.where(problem.kept, problem.other, np.inf).min(axis=1)
    other_room = limit - np.append(np.cumsum(least_other[::-1])[::-1][1:], 0.0)  # the most layers ..k may use
    labels = np.zeros((3, 1))  # rows: DP use, other-row use, cost
    parents, picks = [], []
    for k, (mine, choice) in enumerate(layers):
        grown = (labels[:, :, None] + choice[:, None, :]).reshape(3, -1)
        room = capacity - np.minimum(grown[0], capacity + 1).astype(np.int64)  # -1: none (the tables' inf column)
        bound = grown[2] + (tables[k + 1][:, room] + multipliers[:, None] * grown[1] - offsets[:, None]).max(axis=0)
        index = np.flatnonzero((bound <= ceiling) & (grown[1] <= other_room[k]))
        if index.size == 0:
            return np.empty(0, dtype=np.int64)
        index = index[np.lexsort(grown[[1, 2, 0]][:, index])]  # by DP use, then cost, then other-row use
        grown = grown[:, index]
        rank = np.minimum.accumulate(grown[1] - grown[0] * (limit + 1.0))  # groups of one DP use, each below the last
        live = np.flatnonzero(np.diff(rank, prepend=np.inf) < 0)
        if live.size > _MAX_LABELS:
            return None
        labels, index = grown[:, live], index[live]
        parents.append(index // mine.size)
        picks.append(mine[index % mine.size])
    label = int(np.argmin(labels[2]))
    slots = np.empty(len(layers), dtype=np.int64)
    for k in range(len(layers) - 1, -1, -1):
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
