"""Exact minimisation of small box-constrained integer quadratic problems by branch and bound.

One problem is ``min f(z) = z'Pz + 2q'z + r`` over integer ``z`` in the box ``[lo, hi]`` (``P``
symmetric positive semidefinite, ``n`` up to about 32, float64), as in
:mod:`quantization.qp_bounds` and :mod:`quantization.ptq_rounding`. :func:`solve_exact` returns the
best integer point found, its value ``ub`` and a *certified* lower bound ``lb`` on the optimum;
when the search tree is exhausted the status is ``"optimal"`` and ``lb`` equals ``ub`` up to the
pruning tolerance ``max(1e-10 |ub|, resolution)``, ``resolution = 32 (n + 2) eps (|z|'|P||z| +
2|q|'|z| + |r|)`` at the first incumbent ``z``: differences of ``f`` smaller than it cannot be
certified in float64 (it is below ``1e-9 |ub|`` unless ``f``'s optimum is much smaller than its
terms). When the time or node limit is hit the status is ``"time_limit"`` (or ``"node_limit"``)
and ``lb`` is the smallest certified bound of the open nodes, so the gap is reported instead of
failing.

**Incumbent.** ``z0`` if given (the study passes the best of its post-training methods,
:func:`solve_exact_batch` by default ``one_opt(sequential_rounding)`` computed for all problems at
once), else ``one_opt(sequential_rounding)``; polished by 1-opt; then every leaf of the search that
beats it.

**Node bound (``node_bound="ellipsoid"``, the default).** For an integer origin ``c``, a diagonal
``D`` and a vector ``e`` such that ``M = P - diag(D)`` is positive definite, with ``x = z - c``

    f(c + x) = x'Mx + 2(q~ - e/2)'x + r~ + sum_i s_i(x_i),   s_i(t) = D_i t^2 + e_i t,

``q~ = Pc + q``, ``r~ = f(c)``. Factor ``M = R'R`` (``R`` upper triangular, coordinates in the
*fixing order* reversed: the first coordinate fixed is the last row) and solve ``R'y = q~ - e/2``:

    f(c + x) = ||Rx + y||^2 + r~ - ||y||^2 + sum_i s_i(x_i).

Row ``i`` of ``Rx + y`` depends on ``x_i, ..., x_n`` only. A node fixes the last rows ``k..n``;
every integer completion in the box then has

    f >= K + sum_{i >= k} [(Rx + y)_i^2 + s_i(x_i) - m_i] + sum_i m_i,   m_i = min_{t in [l_i, h_i] integer} s_i(t),

``K = r~ - ||y||^2``: the other rows are squares (``>= 0``) and each free ``s_i`` is at least
``m_i``. Any ``(D, e)`` gives a valid bound; the choices (:func:`ellipsoid_bound`):

* default: ``D = 0`` and ``e`` the box's KKT multipliers ``2(Px + q)_i`` at the coordinates where the
  box relaxation's minimiser ``x`` (projected Newton) sits at a bound (:func:`box_multipliers`),
  ``c = floor((lo + hi) / 2)``. The root bound is the box relaxation's minimum; below it each node's
  bound is the continuous minimum over its free coordinates of ``f`` with those fixed linear
  multipliers (for ``e = 0`` the bound of Q-MIST, Buchheim, Caprara & Lodi 2012, and of
  box-constrained sphere decoding). Where the continuous minimiser ``-P^-1 q`` lies in the box
  (``e = 0``) the box adds nothing; where weights are clipped it lifts the root bound from ~0
  towards the optimum and cuts the trees up to ~100-fold (the layer's hardest problems).
* ``multipliers=(lambda, mu, origin)`` of the SDP dual (:mod:`quantization.qp_bounds`): ``D = lambda -
  mu``, ``e = mu (l + h) - lambda`` (:func:`sdp_split`), ``s_i(t) = lambda_i t (t - 1) + mu_i (t - l_i)(h_i - t)
  - mu_i l_i h_i``; the root bound is the dual bound ``g(lambda, mu)`` (plus ``sum_i`` of how far
  ``s_i`` stays above ``-mu_i l_i h_i`` on the integers), the "ellipsoid" bound of Buchheim, Hübner &
  Schöbel (2015). Stronger at the root, but ``R'R = P - D`` is smaller deeper down: on the layer
  problems the trees are ~1.2x larger than with the default, and the SDP costs ~30-150 ms per problem.
* ``P`` singular (duplicated inputs, fewer positions than inputs): ``D`` from the interior
  multipliers of :func:`quantization.qp_bounds.interior_multipliers` (grown tenfold until ``M``
  factorises). Coordinates whose row and column of ``P`` and entry of ``q`` are all zero (dead
  inputs) do not enter ``f``: they keep their starting value and are left out of the search.

*Certification.* The floating-point ``R``, ``y``, ``D``, ``e`` are taken as exact numbers defining
the bound. ``M - delta I`` is factorised with ``delta = 4 (n + 1) eps (|diag P|_1 + |D|_1)``, which
exceeds the backward error of Cholesky (Higham, *Accuracy and Stability*, Thm 10.5) and of forming
``M``, so ``P - diag(D) - R'R`` is positive semidefinite. Then
``f(c + x) - ||Rx + y||^2 - sum_i s_i(x_i) - r~ + ||y||^2 = x'(P - D - R'R)x + 2 g'x`` with ``g = Pc + q - e/2 - R'y``
(the residual of the solve, bounded by its computed value plus the rounding of ``v`` and of the
residual) is at least ``-2 |g|'X`` over the box, ``X_i = max(|l_i|, |h_i|)``; this, the rounding
of ``r~`` and ``||y||^2`` and a bound on the rounding of the node bounds themselves
(``8 (n + 2) eps (|K| + 3 sum_i T_i^2 + 6 sum_i S_i + sum_i |m_i|)``, ``T_i = |y_i| + sum_j |R_ij| X_j``
the largest ``|(Rx + y)_i|`` term sum over the box, ``S_i = |D_i| X_i^2 + |e_i| X_i``) are
subtracted from ``K`` once per problem.

*Search.* Depth-first over the coordinates in the fixing order: greedily the coordinate with the
largest conditional curvature ``1 / (M^-1)_ii`` among those not yet fixed (the V-BLAST order of
sphere decoding), coordinates with ``lo = hi`` first. Children of a node are the integers ``t`` of
the next coordinate whose bound ``parent + (R_jj t + a)^2 + s_j(t) - m_j`` (``a`` the row's sum over
the fixed coordinates plus ``y_j``) is below the pruning level; where that increment is a convex
parabola in ``t`` (``R_jj^2 + D_j > 0``) only the integers of its sublevel interval, widened by
one and by its rounding error, are evaluated; elsewhere all integers of the box. Nodes are handled
in numpy blocks (for ``n = 32`` up to 64 parents and 4096 children per step, children sorted by
bound, the best block descended first), so the cost per node is a few vector operations of length
``n``. Leaves are evaluated as ``f(z)`` and replace the incumbent when lower. When the tree is
exhausted ``lb`` is the lowest pruning level used (every pruned node, and every value left out of a
sublevel interval, had a bound at least that).

*Speed* (``bench/bench_qp_exact.py``, the 32-input chunks of EfficientNet-Lite0's
``_blocks.5._project_conv`` at 4 bits, 2 shared cores): ~3e3 nodes and ~10 ms per problem on
average (at most ~0.1 s), all proven optimal, against ~3 s (and 4-6 of 80 at a 10 s time limit)
for the ``"box"`` search below.
Limitations: below the root the box enters the bounds only through the fixed ``e``, so the trees
grow quickly with ``n`` (and with the number of clipped weights): whole channels of hundreds of
inputs run into the time limit, with ``lb`` the best open bound (about the box relaxation's).

**Node bound ``"box"``** (the previous solver, kept for comparison): best-first branch and bound
on the box relaxation ``min f(x), x in [l, u]`` solved by projected Newton, certified by the
Frank-Wolfe bound ``f(x) + sum_i min(g_i (l_i - x_i), g_i (u_i - x_i)) - nu sum_i max(x_i - l_i, u_i - x_i)^2``
(``g = 2(Px + q)``, ``nu = max(0, n eps ||P||_F - lam_min(P))``) minus a rounding margin ``8 n eps
(|x|'|P||x| + 2|q|'|x| + |r| + 2(|P||x| + |q|)'(u - l))``; branching on the free variable maximising
``P_ii frac (1 - frac)``; children bounded when created, pruned against the incumbent, the rounded
relaxed point of each child tried as an incumbent. Its tolerance adds ``10 nu ||hi - lo||^2`` to the
resolution.
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from quantization.ptq_rounding import one_opt, sequential_rounding
from quantization.qp_bounds import QuadraticProblems

__all__ = [
    "NODE_BOUNDS",
    "EllipsoidBound",
    "ExactResult",
    "box_multipliers",
    "ellipsoid_bound",
    "sdp_split",
    "solve_exact",
    "solve_exact_batch",
]

NODE_BOUNDS = ("ellipsoid", "box")

_EPS = np.finfo(np.float64).eps
_PRUNE_RTOL = 1e-10
_ONE_OPT_RTOL = 1e-12
_NEWTON_ITERATIONS = 50
# Enumeration steps make at most max(256, _STEP_ELEMENTS / n^2) children (4096 for n = 32) from at
# most 1/64 as many parents, so the open blocks (one per level at most) hold <= ~_STEP_ELEMENTS floats.
# Smaller steps descend sooner (better incumbents earlier), larger ones cost less Python per node.
_STEP_ELEMENTS = 1 << 22
_NODE_LIMIT = 100_000_000
# A coordinate's increment is treated as a parabola (interval of children) only above this curvature
# relative to tr(P) / n; below it all integers of its box are evaluated.
_FLAT_CURVATURE = 1e-9
# Interior multipliers for singular P are grown by this factor until M factorises, at most this often.
_INTERIOR_GROWTH, _INTERIOR_TRIES = 10.0, 12


@dataclass(frozen=True)
class ExactResult:
    """The result of :func:`solve_exact` for one problem.

    Attributes:
        z: ``(n,)`` float64 integers in the box, the best point found.
        ub: ``f(z)``.
        lb: a certified lower bound on ``min f`` over the integers of the box (``<= ub``).
        status: ``"optimal"`` (tree exhausted), ``"time_limit"`` or ``"node_limit"``.
        nodes: number of search-tree nodes bounded and kept (``"ellipsoid"``: partial assignments
            below the pruning level; ``"box"``: relaxations solved).
        seconds: wall-clock time.
    """

    z: np.ndarray
    ub: float
    lb: float
    status: str
    nodes: int
    seconds: float

    @property
    def gap(self) -> float:
        """``(ub - lb) / max(|ub|, tiny)``."""
        return (self.ub - self.lb) / max(abs(self.ub), np.finfo(np.float64).tiny)


# --------------------------------------------------------------------------- shared helpers


def _objective(P: np.ndarray, q: np.ndarray, r: float, z: np.ndarray) -> np.ndarray:
    """``z'Pz + 2q'z + r`` for ``z`` of shape ``(n,)`` (a float) or ``(N, n)`` (``(N,)``)."""
    if z.ndim == 1:
        return float(z @ (P @ z) + 2.0 * (q @ z) + r)
    return np.einsum("ki,ki->k", z @ P, z) + 2.0 * (z @ q) + r


def _one_opt(P: np.ndarray, q: np.ndarray, lo: np.ndarray, hi: np.ndarray, z: np.ndarray, max_sweeps: int = 100):
    """Greedy integer coordinate descent within ``[lo, hi]`` (as :func:`ptq_rounding.one_opt`)."""
    z = z.copy()
    diagonal = np.diag(P)
    for _ in range(max_sweeps):
        g = P @ z + q
        improved = False
        for i in range(z.shape[0]):
            p_ii, g_i = diagonal[i], g[i]
            if p_ii > 0:
                step = float(np.round(-g_i / p_ii))
            else:
                step = -math.inf if g_i > 0 else (math.inf if g_i < 0 else 0.0)
            step = min(max(step, lo[i] - z[i]), hi[i] - z[i])
            quadratic, linear = p_ii * step * step, 2.0 * g_i * step
            if step != 0.0 and quadratic + linear < -_ONE_OPT_RTOL * (quadratic + abs(linear)):
                z[i] += step
                g += step * P[:, i]
                improved = True
        if not improved:
            break
    return z


def _heuristic_start(P: np.ndarray, q: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``one_opt(sequential_rounding)`` via :mod:`quantization.ptq_rounding` for one problem."""
    P_t, q_t = torch.from_numpy(P)[None], torch.from_numpy(q)[None]
    lo_t, hi_t = torch.from_numpy(lo)[None], torch.from_numpy(hi)[None]
    z = sequential_rounding(P_t, q_t, lo_t, hi_t)
    z = one_opt(P_t, q_t, torch.zeros(1, dtype=torch.float64), z, lo_t, hi_t)
    return z[0].numpy().copy()


def _as_numpy(values, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.broadcast_to(np.asarray(values, dtype=np.float64), shape).copy()


def _resolution(P: np.ndarray, q: np.ndarray, r: float, z: np.ndarray) -> float:
    """``32 (n + 2) eps (|z|'|P||z| + 2|q|'|z| + |r|)``: below it differences of ``f`` near ``z`` are rounding."""
    az = np.abs(z)
    return 32.0 * (z.shape[0] + 2) * _EPS * (float(az @ np.abs(P) @ az + 2.0 * (np.abs(q) @ az)) + abs(r))


def _box_minimiser(P: np.ndarray, q: np.ndarray, r: float, l: np.ndarray, u: np.ndarray, x: np.ndarray) -> np.ndarray:
    """An approximate minimiser of ``f`` over the box ``[l, u]``: projected Newton / active set from ``x``.

    The free set comes from the signs of the gradient; the Newton step on it (Cholesky, with a ridge
    of ``1e-12 max P_ii`` grown where it fails) drops the variables it would push out of the box at a
    bound; Armijo backtracking along the projected path. Not certified: callers only use the point.
    """
    n = x.shape[0]
    ridge = 1e-12 * max(float(np.diag(P).max(initial=0.0)), np.finfo(np.float64).tiny)
    x = np.clip(x, l, u)
    fixed = l == u
    for _ in range(_NEWTON_ITERATIONS):
        g = P @ x + q
        free = ~(fixed | ((x <= l) & (g > 0)) | ((x >= u) & (g < 0)))
        if not free.any():
            break
        direction = np.zeros_like(x)
        for _ in range(n):
            idx = np.flatnonzero(free)
            if idx.size == 0:
                break
            step = _newton_step(P[np.ix_(idx, idx)], g[idx], ridge)
            blocked = ((x[idx] <= l[idx]) & (step < 0)) | ((x[idx] >= u[idx]) & (step > 0))
            if not blocked.any():
                direction[idx] = step
                break
            free[idx[blocked]] = False
        slope = float(g @ direction)
        if not slope < 0.0:
            break
        t = 1.0
        for _ in range(40):
            candidate = np.clip(x + t * direction, l, u)
            s = candidate - x
            linear = float(g @ s)
            change = linear + 0.5 * float(s @ (P @ s))
            if change <= 1e-4 * linear and linear < 0.0:
                break
            t *= 0.5
        else:
            break
        x = candidate
        if -change <= 1e-15 * (abs(float(x @ (P @ x))) + abs(float(q @ x)) + abs(r)):
            break
    return x


def _newton_step(block: np.ndarray, g: np.ndarray, ridge: float) -> np.ndarray:
    """``-block^-1 g`` by Cholesky, the ridge grown 100-fold while it fails; a scaled gradient step at last."""
    shift = 0.0
    for _ in range(8):
        try:
            factor = np.linalg.cholesky(block + shift * np.eye(g.shape[0]))
            return np.linalg.solve(factor.T, np.linalg.solve(factor, -g))
        except np.linalg.LinAlgError:
            shift = ridge if shift == 0.0 else shift * 100.0
    return -g / max(float(np.abs(block).max(initial=0.0)), 1.0)


# --------------------------------------------------------------------------- the ellipsoid bound


@dataclass(frozen=True)
class EllipsoidBound:
    """Certified node bounds ``K + sum_{fixed rows} [(Rx + y)_i^2 + s_i(x_i) - m_i] + sum_i m_i`` (module doc).

    Everything is stored per *row* of ``R``: row ``i`` belongs to coordinate ``rows[i]``; the search
    fixes rows ``n - 1, n - 2, ..., 0`` (coordinates ``order = rows[::-1]``).

    Attributes:
        rows: ``(n,)`` the coordinate of each row.
        origin: ``(n,)`` the integer origin ``c`` (per coordinate, not per row).
        lower, upper: ``(n,)`` the shifted box ``[lo - c, hi - c]`` per row.
        factor: ``(n, n)`` upper triangular ``R`` with ``R'R <= P - diag(D)`` (rows' coordinates).
        offset: ``(n,)`` ``y``.
        quadratic, linear: ``(n,)`` ``D`` and ``e`` of ``s_i(t) = D_i t^2 + e_i t`` per row.
        separable_min: ``(n,)`` ``m_i`` per row.
        constant: ``K`` minus all rounding allowances.
    """

    rows: np.ndarray
    origin: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    factor: np.ndarray
    offset: np.ndarray
    quadratic: np.ndarray
    linear: np.ndarray
    separable_min: np.ndarray
    constant: float

    @property
    def order(self) -> np.ndarray:
        """The coordinates in the order the search fixes them."""
        return self.rows[::-1]

    @property
    def root(self) -> float:
        """The bound with nothing fixed: ``K + sum_i m_i`` (for SDP multipliers at least their dual bound ``g``)."""
        return self.constant + float(self.separable_min.sum())

    def separable(self, row: int, t: np.ndarray) -> np.ndarray:
        """``s_i(t) - m_i`` for row ``i``."""
        return t * (self.quadratic[row] * t + self.linear[row]) - self.separable_min[row]

    def bounds(self, values: np.ndarray) -> np.ndarray:
        """Lower bounds on ``f`` over the box's integer points with ``z[order[:k]] = values``, ``(N, k)`` -> ``(N,)``.

        ``values`` must be integers inside the box. Evaluated directly (the search accumulates the
        same sums row by row).
        """
        values = np.atleast_2d(np.asarray(values, dtype=np.float64))
        n, k = self.rows.shape[0], values.shape[1]
        fixed_rows = np.arange(n - 1, n - 1 - k, -1)
        x = values - self.origin[self.rows[fixed_rows]]
        residual = x @ self.factor[fixed_rows][:, fixed_rows].T + self.offset[fixed_rows]
        total = np.full(values.shape[0], self.root)
        for column, row in enumerate(fixed_rows):
            total = total + residual[:, column] ** 2 + self.separable(row, x[:, column])
        return total


def _fixing_order(M: np.ndarray, forced: np.ndarray) -> np.ndarray:
    """Coordinates of ``M`` (positive definite) in fixing order: ``forced`` ones first, then greedily the
    largest conditional curvature ``1 / (M_S^-1)_ii`` over the set ``S`` of coordinates not yet fixed."""
    n = M.shape[0]
    covariance = np.linalg.inv(M)
    free = np.ones(n, dtype=bool)
    order = []
    for _ in range(n):
        candidates = free & forced if (free & forced).any() else free
        i = int(np.argmin(np.where(candidates, np.diag(covariance), np.inf)))
        order.append(i)
        free[i] = False
        column = covariance[:, i].copy()
        if column[i] > 0:
            covariance -= np.outer(column, column) / column[i]
    return np.array(order)


def _separable_minimum(D: np.ndarray, e: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """``min D_i t^2 + e_i t`` over integers ``t`` in ``[lower_i, upper_i]``: the box ends and, for a
    convex ``D_i > 0``, the integers next to the vertex ``-e_i / (2 D_i)``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        vertex = np.where(D > 0, -e / (2.0 * D), lower)
    vertex = np.clip(vertex, lower, upper)
    candidates = np.stack([lower, upper, np.floor(vertex), np.ceil(vertex)])
    return (candidates * (D * candidates + e)).min(0)


def _try_factor(
    P: np.ndarray, q: np.ndarray, r: float, lo: np.ndarray, hi: np.ndarray, origin: np.ndarray,
    D: np.ndarray, e: np.ndarray,
) -> EllipsoidBound | None:
    """:class:`EllipsoidBound` for ``(origin, D, e)``, or None where ``P - diag(D) - delta I`` does not factorise."""
    n = P.shape[0]
    M = P - np.diag(D)
    delta = 4.0 * (n + 1) * _EPS * float(np.abs(np.diag(P)).sum() + np.abs(D).sum())
    if not np.isfinite(M).all():
        return None
    try:
        np.linalg.cholesky(M - delta * np.eye(n))
    except np.linalg.LinAlgError:
        return None
    lower_c, upper_c = lo - origin, hi - origin
    rows = _fixing_order(M, lo == hi)[::-1].copy()
    try:
        R = np.linalg.cholesky((M - delta * np.eye(n))[np.ix_(rows, rows)]).T
    except np.linalg.LinAlgError:
        return None
    abs_P = np.abs(P)
    v = P @ origin + q - e / 2.0
    y = np.linalg.solve(R.T, v[rows])  # any solver: its residual is measured and allowed for below
    residual = v[rows] - R.T @ y
    abs_c = np.abs(origin)
    v_error = (n + 2) * _EPS * (abs_P @ abs_c + np.abs(q) + np.abs(e) / 2.0)[rows]
    residual_error = (n + 1) * _EPS * (np.abs(v[rows]) + np.abs(R.T) @ np.abs(y))
    g_bound = (np.abs(residual) + 2.0 * (v_error + residual_error)) * (1.0 + 4.0 * (n + 2) * _EPS)
    lower, upper = lower_c[rows], upper_c[rows]
    reach = np.maximum(np.abs(lower), np.abs(upper))  # X_i
    value_at_origin = _objective(P, q, r, origin)
    offset_squared = float(y @ y)
    shift = 2.0 * float(g_bound @ reach)
    origin_error = (n + 3) * _EPS * (float(abs_c @ abs_P @ abs_c + 2.0 * (np.abs(q) @ abs_c)) + abs(r))
    constant = value_at_origin - offset_squared - shift
    constant -= origin_error + n * _EPS * offset_squared + 4.0 * _EPS * (abs(value_at_origin) + offset_squared + shift)
    D_rows, e_rows = D[rows], e[rows]
    separable_min = _separable_minimum(D_rows, e_rows, lower, upper)
    term_size = np.abs(y) + np.abs(R) @ reach  # T_i
    separable_size = np.abs(D_rows) * reach**2 + np.abs(e_rows) * reach  # S_i
    node_margin = 8.0 * (n + 2) * _EPS * (
        abs(constant) + 3.0 * float(term_size @ term_size) + 6.0 * float(separable_size.sum())
        + float(np.abs(separable_min).sum())
    )
    return EllipsoidBound(
        rows=rows, origin=origin, lower=lower, upper=upper, factor=R, offset=y, quadratic=D_rows,
        linear=e_rows, separable_min=separable_min, constant=constant - node_margin * (1.0 + 4.0 * _EPS),
    )


def ellipsoid_bound(
    P: np.ndarray,
    q: np.ndarray,
    r: float,
    lo: np.ndarray,
    hi: np.ndarray,
    diagonal: np.ndarray | None = None,
    linear: np.ndarray | None = None,
    origin: np.ndarray | None = None,
) -> EllipsoidBound:
    """The certified node bounds of the module doc for one problem (numpy float64; ``lo``, ``hi`` integers).

    Args:
        diagonal, linear: ``D`` and ``e`` (default zero); any values give valid bounds as long as
            ``P - diag(D)`` is positive definite (e.g. :func:`box_multipliers`, :func:`sdp_split`).
        origin: the integer origin ``c`` (default ``floor((lo + hi) / 2)``).

    Where ``P - diag(D) - delta I`` does not factorise (``P`` singular), ``D`` is replaced by the split
    (:func:`sdp_split`) of the interior multipliers ``mu_i = eps_i``, ``lam_i = eps_i / 2``,
    ``eps_i = tr(P)/n / max(1, |l_i h_i|)`` of :func:`quantization.qp_bounds.interior_multipliers`
    (times 10 until ``M`` factorises), whose ``e`` is added to ``linear``.

    Raises:
        ValueError: no factorisation found (non-finite data).
    """
    n = q.shape[0]
    origin = np.floor((lo + hi) / 2.0) if origin is None else np.asarray(origin, dtype=np.float64)
    if not np.array_equal(origin, np.round(origin)):
        raise ValueError("the origin must be integer")
    diagonal = np.zeros(n) if diagonal is None else np.asarray(diagonal, dtype=np.float64)
    linear = np.zeros(n) if linear is None else np.asarray(linear, dtype=np.float64)
    bound = _try_factor(P, q, r, lo, hi, origin, diagonal, linear)
    if bound is not None:
        return bound
    lower, upper = lo - origin, hi - origin
    scale = float(np.trace(P)) / max(n, 1)
    eps = (scale if scale > 0 else 1.0) / np.maximum(np.abs(lower * upper), 1.0)
    for _ in range(_INTERIOR_TRIES):
        interior_diagonal, interior_linear = sdp_split(eps / 2.0, eps, lower, upper)
        bound = _try_factor(P, q, r, lo, hi, origin, interior_diagonal, interior_linear + linear)
        if bound is not None:
            return bound
        eps = eps * _INTERIOR_GROWTH
    raise ValueError("no positive definite split of P found (is P finite?)")


def sdp_split(lam: np.ndarray, mu: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(D, e) = (lam - mu, mu (l + h) - lam)`` for the SDP dual's multipliers and the shifted box ``[l, h]``.

    Then ``s_i(t) = D_i t^2 + e_i t = lam_i t (t - 1) + mu_i (t - l_i)(h_i - t) - mu_i l_i h_i`` and the
    root bound of :func:`ellipsoid_bound` is the dual bound ``g(lam, mu)`` of :mod:`quantization.qp_bounds`.
    """
    return lam - mu, mu * (lower + upper) - lam


def box_multipliers(P: np.ndarray, q: np.ndarray, lo: np.ndarray, hi: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``e_i = 2 g_i``, ``g = Px + q``, where ``x_i`` is at a bound of ``[lo, hi]`` with ``g_i`` pointing out; else 0.

    At the minimiser ``x`` of ``f`` over the box these are the KKT multipliers of the box (as a
    linear ``e`` with ``D = 0``): the root bound of :func:`ellipsoid_bound` is then the box
    relaxation's minimum, and the same ``e`` stays valid (if weaker) deeper in the tree.
    """
    g = P @ x + q
    active = ((x <= lo) & (g > 0)) | ((x >= hi) & (g < 0))
    return np.where(active, 2.0 * g, 0.0)


# --------------------------------------------------------------------------- depth-first enumeration


@dataclass
class _Block:
    """Open nodes with the last ``n - level`` rows fixed; parents ``cursor:`` not yet expanded.

    ``partial`` ``(N, level)``: the sums ``y_i + sum_{fixed j} R_ij x_j`` of the free rows;
    ``bound`` ``(N,)``; ``fixed`` ``(N, n - level)``: the values ``x`` of rows ``level..n-1``.
    """

    level: int
    partial: np.ndarray
    bound: np.ndarray
    fixed: np.ndarray
    cursor: int = 0


@dataclass
class _Search:
    """State of one enumeration: the incumbent and the counters."""

    ub: float
    best_z: np.ndarray
    nodes: int = 1
    threshold: float = math.inf


def _children_range(bound: EllipsoidBound, row: int, partial: np.ndarray, slack: np.ndarray, scale: float):
    """First and last integer of the next row's values that can stay below the pruning level.

    The increment ``(R_jj t + a)^2 + s_j(t) - m_j`` is the parabola ``A t^2 + 2 b t + a^2 - m_j``,
    ``A = R_jj^2 + D_j``, ``b = R_jj a + e_j / 2``: below ``slack`` on ``|t - v| < sqrt((slack - bottom) / A)``
    with ``v = -b / A``, ``bottom = a^2 - m_j - b^2 / A``. Widened against rounding: ``64 (n + 2) eps``
    times the terms' size is added under the root, ``4 eps |v| + 1`` outside. Flat or concave rows
    give the whole box.
    """
    n = bound.rows.shape[0]
    lower, upper = bound.lower[row], bound.upper[row]
    r_jj = bound.factor[row, row]
    curvature = r_jj * r_jj + bound.quadratic[row]
    if not curvature > _FLAT_CURVATURE * scale:
        return np.full_like(partial, lower), np.full_like(partial, upper)
    b = r_jj * partial + 0.5 * bound.linear[row]
    vertex = -b / curvature
    square, completed = partial * partial, b * vertex  # a^2 and -b^2 / A
    m_j = bound.separable_min[row]
    room = np.maximum(slack - square + m_j - completed, 0.0)
    room += 64.0 * (n + 2) * _EPS * (square + abs(m_j) - completed + np.abs(slack))
    half = np.sqrt(room / curvature) + 4.0 * _EPS * np.abs(vertex) + 1.0
    return np.maximum(np.ceil(vertex - half), lower), np.minimum(np.floor(vertex + half), upper)


def _expand(
    bound: EllipsoidBound,
    block: _Block,
    search: _Search,
    scale: float,
    max_children: int,
    leaf_values,
) -> _Block | None:
    """Expand the next parents of ``block``; return the children that stay below the pruning level (or None).

    Leaves (all rows fixed) are passed to ``leaf_values`` instead.
    """
    row = block.level - 1
    start = block.cursor
    stop = min(start + max(16, max_children // 64), block.bound.shape[0])
    partial, parent_bound = block.partial[start:stop, row], block.bound[start:stop]
    slack = search.threshold - parent_bound
    first, last = _children_range(bound, row, partial, slack, scale)
    counts = np.where(slack > 0, np.maximum(last - first + 1.0, 0.0), 0.0).astype(np.int64)
    ends = np.cumsum(counts)
    used = max(1, int(np.searchsorted(ends, max_children, side="right")))
    block.cursor += used
    total = int(ends[used - 1])
    if total == 0:
        return None
    counts = counts[:used]
    parent = np.repeat(np.arange(start, start + used), counts)
    t = np.arange(total) + np.repeat(first[:used] - (ends[:used] - counts), counts)  # first, first + 1, ... per parent
    value = block.partial[parent, row] + bound.factor[row, row] * t
    child_bound = block.bound[parent] + value * value + bound.separable(row, t)
    keep = np.flatnonzero(child_bound < search.threshold)
    if keep.size == 0:
        return None
    search.nodes += keep.size
    if row == 0:
        leaf_values(np.concatenate([t[keep, None], block.fixed[parent[keep]]], axis=1))
        return None
    keep = keep[np.argsort(child_bound[keep], kind="stable")]
    parent, t = parent[keep], t[keep]
    partial = block.partial[parent, :row] + t[:, None] * bound.factor[:row, row]
    return _Block(row, partial, child_bound[keep], np.concatenate([t[:, None], block.fixed[parent]], axis=1))


def _enumerate(
    P: np.ndarray,
    q: np.ndarray,
    r: float,
    bound: EllipsoidBound,
    search: _Search,
    tolerance: float,
    deadline: float,
    node_limit: int,
) -> tuple[str, float]:
    """Depth-first search over the rows of ``bound``; updates ``search``; returns ``(status, lb)``.

    ``P, q, r`` and ``search.best_z`` are those of the coordinates of ``bound`` (decoupled ones removed).
    """
    n = bound.rows.shape[0]
    scale = max(float(np.trace(P)) / max(n, 1), np.finfo(np.float64).tiny)
    max_children = max(256, _STEP_ELEMENTS // (n * n))

    def set_threshold() -> None:
        search.threshold = search.ub - max(_PRUNE_RTOL * abs(search.ub), tolerance)

    def leaf_values(fixed: np.ndarray) -> None:
        z = np.empty_like(fixed)
        z[:, bound.rows] = fixed + bound.origin[bound.rows]
        values = _objective(P, q, r, z)
        best = int(np.argmin(values))
        if values[best] < search.ub:
            search.ub, search.best_z = float(values[best]), z[best].copy()
            set_threshold()

    set_threshold()
    stack = [_Block(n, bound.offset[None, :].copy(), np.array([bound.root]), np.zeros((1, 0)))]
    lowest_threshold = search.threshold
    status = "optimal"
    while stack:
        if time.perf_counter() > deadline:
            status = "time_limit"
            break
        if search.nodes >= node_limit:
            status = "node_limit"
            break
        block = stack[-1]
        children = _expand(bound, block, search, scale, max_children, leaf_values)
        lowest_threshold = min(lowest_threshold, search.threshold)
        if block.cursor >= block.bound.shape[0]:
            stack.pop()
        if children is not None:
            stack.append(children)
    open_bounds = [float(block.bound[block.cursor:].min()) for block in stack if block.cursor < block.bound.shape[0]]
    return status, min([search.ub, lowest_threshold, *open_bounds])


# --------------------------------------------------------------------------- best-first box relaxation ("box")


class _BoxRelaxation:
    """One problem with the constants of the certified box-relaxation bound (``node_bound="box"``)."""

    def __init__(self, P: np.ndarray, q: np.ndarray, r: float, lo: np.ndarray, hi: np.ndarray) -> None:
        self.P, self.q, self.r, self.lo, self.hi = P, q, float(r), lo, hi
        self.n = q.shape[0]
        self.absP, self.absq = np.abs(P), np.abs(q)
        self.diag = np.diag(P).copy()
        norm = float(np.linalg.norm(P))
        lam_min = float(np.linalg.eigvalsh(P)[0]) if self.n else 0.0
        # eigvalsh is backward stable: the true lam_min is >= the computed one - n eps ||P||_F.
        self.nu = max(0.0, self.n * _EPS * norm - lam_min)

    def relax(self, l: np.ndarray, u: np.ndarray, x: np.ndarray) -> np.ndarray:
        """An approximate minimiser of ``f`` over ``[l, u]`` (:func:`_box_minimiser` from ``x``)."""
        return _box_minimiser(self.P, self.q, self.r, l, u, x)

    def certified_bound(self, l: np.ndarray, u: np.ndarray, x: np.ndarray) -> float:
        """A certified lower bound on ``min f`` over ``[l, u]`` from the point ``x`` in the box (see module doc)."""
        Px = self.P @ x
        g = 2.0 * (Px + self.q)
        value = float(x @ Px + 2.0 * (self.q @ x) + self.r)
        linear = float(np.minimum(g * (l - x), g * (u - x)).sum())
        curvature = self.nu * float((np.maximum(x - l, u - x) ** 2).sum())
        ax = np.abs(x)
        abs_px = self.absP @ ax
        magnitude = float(ax @ abs_px + 2.0 * (self.absq @ ax) + abs(self.r) + 2.0 * ((abs_px + self.absq) @ (u - l)))
        margin = 8.0 * (self.n + 2) * _EPS * magnitude
        return value + linear - curvature - margin


def _box_branch_and_bound(
    problem: _BoxRelaxation, search: _Search, tolerance: float, deadline: float, node_limit: int
) -> tuple[str, float]:
    """Best-first branch and bound on box relaxations; updates ``search``; returns ``(status, lb)``."""
    lo, hi = problem.lo, problem.hi
    tolerance = tolerance + 10.0 * problem.nu * float(((hi - lo) ** 2).sum())

    def prune_level() -> float:
        return search.ub - max(_PRUNE_RTOL * abs(search.ub), tolerance)

    root_x = problem.relax(lo, hi, search.best_z)
    pruned_min = math.inf  # smallest certified bound of a node pruned against the incumbent
    root_bound = problem.certified_bound(lo, hi, root_x)
    heap: list[tuple[float, int, np.ndarray, np.ndarray, np.ndarray]] = []
    counter = 0
    if root_bound < prune_level():
        heap.append((root_bound, counter, lo.copy(), hi.copy(), root_x))
    else:
        pruned_min = root_bound
    status = "optimal"
    while heap:
        if time.perf_counter() > deadline:
            status = "time_limit"
            break
        if search.nodes >= node_limit:
            status = "node_limit"
            break
        bound, _, l, u, x = heapq.heappop(heap)
        if bound >= prune_level():
            pruned_min = min(pruned_min, bound)
            continue
        free = l < u
        if not free.any():  # a leaf: its only point was evaluated (and 1-opt polished) when it was created
            pruned_min = min(pruned_min, _objective(problem.P, problem.q, problem.r, l))
            continue
        fraction = x - np.floor(x)
        score = np.where(free, problem.diag * fraction * (1.0 - fraction), -1.0)
        i = int(np.argmax(score))
        if score[i] <= 0.0:
            i = int(np.argmax(np.where(free, u - l, -1.0)))
        split = min(max(math.floor(x[i]), l[i]), u[i] - 1)
        for child_lo, child_hi in ((l[i], split), (split + 1, u[i])):
            cl, cu = l.copy(), u.copy()
            cl[i], cu[i] = child_lo, child_hi
            cx = problem.relax(cl, cu, x)
            search.nodes += 1
            child_bound = max(bound, problem.certified_bound(cl, cu, cx))
            z = np.clip(np.round(cx), cl, cu)
            value = _objective(problem.P, problem.q, problem.r, z)
            if value < search.ub:
                z = _one_opt(problem.P, problem.q, lo, hi, z)
                value = _objective(problem.P, problem.q, problem.r, z)
                if value < search.ub:
                    search.best_z, search.ub = z, value
            if child_bound < prune_level():
                counter += 1
                heapq.heappush(heap, (child_bound, counter, cl, cu, cx))
            else:
                pruned_min = min(pruned_min, child_bound)
    open_min = min((entry[0] for entry in heap), default=math.inf)
    return status, min(search.ub, pruned_min, open_min)


# --------------------------------------------------------------------------- public API


def solve_exact(
    P,
    q,
    r,
    lo,
    hi,
    time_limit: float = 10.0,
    node_limit: int = _NODE_LIMIT,
    z0=None,
    node_bound: str = "ellipsoid",
    multipliers: tuple | None = None,
) -> ExactResult:
    """Minimise ``z'Pz + 2q'z + r`` over integer ``z`` in ``[lo, hi]`` by branch and bound.

    Args:
        P: ``(n, n)`` symmetric positive semidefinite; q: ``(n,)``; r: scalar; lo, hi: ``(n,)`` or
            scalars, integers with ``lo <= hi``. numpy arrays or tensors, converted to float64.
        time_limit: seconds; the search stops with status ``"time_limit"`` when exceeded.
        node_limit: the search stops with status ``"node_limit"`` after this many nodes (by default
            effectively only the time limit stops it).
        z0: optional ``(n,)`` integer start inside the box (polished by 1-opt); without it
            ``one_opt(sequential_rounding)`` is computed.
        node_bound: ``"ellipsoid"`` (depth-first, Cholesky node bounds) or ``"box"`` (the previous
            best-first search on box relaxations); see the module doc.
        multipliers: optional ``(lam, mu, origin)`` of the SDP dual for the ellipsoid bound
            (:class:`quantization.qp_bounds.DualSolution`'s, ``(n,)`` each, with the box); without
            them ``D = 0`` and ``e`` the box relaxation's multipliers (module doc).

    Returns:
        :class:`ExactResult`; ``lb <= min f <= ub = f(z)`` always.
    """
    start_time = time.perf_counter()
    if node_bound not in NODE_BOUNDS:
        raise ValueError(f"node_bound must be one of {', '.join(NODE_BOUNDS)}, got {node_bound!r}")
    if multipliers is not None and node_bound != "ellipsoid":
        raise ValueError("multipliers are used by the ellipsoid node bound only")
    P = _as_numpy(P, np.shape(P))
    n = P.shape[0]
    if P.shape != (n, n):
        raise ValueError(f"P must be square, got {P.shape}")
    P = 0.5 * (P + P.T)
    q = _as_numpy(q, (n,))
    lo, hi = _as_numpy(lo, (n,)), _as_numpy(hi, (n,))
    if not (np.array_equal(lo, np.round(lo)) and np.array_equal(hi, np.round(hi))) or (lo > hi).any():
        raise ValueError("lo and hi must be integers with lo <= hi")
    r = float(r)
    if z0 is not None:
        z0 = _as_numpy(z0, (n,))
        if not np.array_equal(z0, np.round(z0)) or (z0 < lo).any() or (z0 > hi).any():
            raise ValueError("z0 must hold integers inside the box [lo, hi]")
    else:
        z0 = _heuristic_start(P, q, lo, hi)
    best_z = _one_opt(P, q, lo, hi, z0)
    search = _Search(ub=_objective(P, q, r, best_z), best_z=best_z)
    tolerance = _resolution(P, q, r, best_z)
    deadline = start_time + time_limit
    if node_bound == "box":
        status, lb = _box_branch_and_bound(_BoxRelaxation(P, q, r, lo, hi), search, tolerance, deadline, node_limit)
    else:
        active = ~((P == 0).all(0) & (q == 0))
        sub = np.ix_(active, active)
        P_a, q_a, lo_a, hi_a = P[sub], q[active], lo[active], hi[active]
        reduced = _Search(ub=search.ub, best_z=best_z[active])
        status, lb = "optimal", search.ub  # nothing to search when f does not depend on z
        if active.any():
            if multipliers is not None:
                lam, mu, origin = (_as_numpy(values, (n,))[active] for values in multipliers)
                diagonal, linear = sdp_split(lam, mu, lo_a - origin, hi_a - origin)
            else:
                relaxed = _box_minimiser(P_a, q_a, r, lo_a, hi_a, reduced.best_z)
                diagonal, linear, origin = None, box_multipliers(P_a, q_a, lo_a, hi_a, relaxed), None
            bound = ellipsoid_bound(P_a, q_a, r, lo_a, hi_a, diagonal, linear, origin)
            status, lb = _enumerate(P_a, q_a, r, bound, reduced, tolerance, deadline, node_limit)
        search.nodes = reduced.nodes
        if reduced.ub < search.ub:
            candidate = best_z.copy()
            candidate[active] = reduced.best_z
            value = _objective(P, q, r, candidate)  # the same sums up to exact zeros, so normally reduced.ub
            if value < search.ub:
                search.best_z, search.ub = candidate, value
    lb = min(lb, search.ub)
    seconds = time.perf_counter() - start_time
    return ExactResult(search.best_z, float(search.ub), float(lb), status, search.nodes, seconds)


def solve_exact_batch(
    problems: QuadraticProblems,
    time_limit: float = 10.0,
    node_limit: int = _NODE_LIMIT,
    z0: torch.Tensor | None = None,
    node_bound: str = "ellipsoid",
) -> list[ExactResult]:
    """:func:`solve_exact` for every problem of ``problems`` (which must have a box), one after another.

    The starting points default to ``one_opt(sequential_rounding)`` computed for the whole batch at
    once. ``time_limit``, ``node_limit`` and ``node_bound`` apply to each problem.
    """
    if not problems.has_box:
        raise ValueError("solve_exact_batch needs problems with a box [lo, hi]")
    problems = problems.to("cpu")
    if z0 is None:
        z0 = sequential_rounding(problems.P, problems.q, problems.lo, problems.hi)
        z0 = one_opt(problems.P, problems.q, problems.r, z0, problems.lo, problems.hi)
    z0 = z0.to(device="cpu", dtype=torch.float64)
    return [
        solve_exact(
            problems.P[b].numpy(),
            problems.q[b].numpy(),
            float(problems.r[b]),
            problems.lo[b].numpy(),
            problems.hi[b].numpy(),
            time_limit=time_limit,
            node_limit=node_limit,
            z0=z0[b].numpy(),
            node_bound=node_bound,
        )
        for b in range(problems.batch_size)
    ]
