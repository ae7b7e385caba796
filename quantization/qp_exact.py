"""Exact minimisation of small box-constrained integer quadratic problems by branch and bound.

One problem is ``min f(z) = z'Pz + 2q'z + r`` over integer ``z`` in the box ``[lo, hi]`` (``P``
symmetric positive semidefinite, ``n`` up to about 32, float64), as in
:mod:`quantization.qp_bounds` and :mod:`quantization.ptq_rounding`. :func:`solve_exact` returns the
best integer point found, its value ``ub`` and a *certified* lower bound ``lb`` on the optimum;
when the search tree is exhausted the status is ``"optimal"`` and ``lb`` equals ``ub`` up to the
pruning tolerance ``max(1e-10 |ub|, resolution)``, ``resolution = 32 (n + 2) eps (|z|'|P||z| +
2|q|'|z| + |r|)`` at the first incumbent ``z``: differences of ``f`` smaller than it cannot be
certified in float64 (it is below ``1e-9 |ub|`` unless ``f``'s optimum is much smaller than its
terms). When a limit stops the search the status is ``"node_limit"`` (or ``"time_limit"``) and
``lb`` is the smallest certified bound of the open nodes, so the gap is reported instead of failing.

**Limits and reproducibility.** By default the search stops after :data:`DEFAULT_NODE_LIMIT`
(``10^7``) nodes, a count of work: nodes are the partial assignments bounded below the pruning
level. No clock is read then, so ``z, ub, lb, status, nodes`` depend on the inputs only, not on
the machine's load, and not on thread counts (the large products, the leaves' values, are
``einsum`` loops, not multithreaded BLAS). ``10^7`` nodes take ~5-30 s on a busy 2-core CPU; the
layer problems below need at most ~1e5. ``time_limit`` (seconds) adds a wall-clock limit, whose
results then depend on the machine.

**Incumbent.** ``z0`` if given (the study passes the best of its post-training methods,
:func:`solve_exact_batch` by default ``one_opt(sequential_rounding)`` computed for all problems at
once), else ``one_opt(sequential_rounding)``; polished by 1-opt; then every leaf of the search that
beats it.

**Node bound (the "ellipsoid" bound).** For an integer origin ``c``, a diagonal
``D`` and a vector ``e`` such that ``M = P - diag(D)`` is positive definite, with ``x = z - c``

    f(c + x) = x'Mx + 2(q~ - e/2)'x + r~ + sum_i s_i(x_i),   s_i(t) = D_i t^2 + e_i t,

``q~ = Pc + q``, ``r~ = f(c)``. The search runs over the lattice coordinates ``u`` of ``x = U u``
for a unimodular integer ``U`` (``U^-1`` integer too, so ``u`` runs over all integer vectors
exactly when ``x`` does; *Bases* below). Factor ``U'MU = R'R`` (``R`` upper triangular; the search
fixes ``u_n`` first, then ``u_{n-1}``, ...) and solve ``R'y = U'(q~ - e/2)``:

    f(c + Uu) = ||Ru + y||^2 + r~ - ||y||^2 + sum_i s_i(x_i).

Row ``j`` of ``Ru + y`` depends on ``u_j, ..., u_n`` only, and ``x_i`` is *settled* once every ``u_j``
with ``U_ij != 0`` is fixed. A node fixes ``u_k, ..., u_n``; every integer completion in the box then has

    f >= K + sum_{j >= k} (Ru + y)_j^2 + sum_{settled i} [s_i(x_i) - m_i] + sum_i m_i,

``m_i = min_{t in [l_i, h_i] integer} s_i(t)``, ``K = r~ - ||y||^2``: the other rows are squares
(``>= 0``) and each unsettled ``s_i`` is at least ``m_i``. A node whose settled ``x_i`` leaves its
box has no completion and is never created. Any ``(D, e)`` gives a valid bound; the choices (:func:`ellipsoid_bound`):

* default: ``D = 0`` and ``e`` the box's KKT multipliers ``2(Px + q)_i`` at the coordinates where the
  box relaxation's minimiser ``x`` (projected Newton) sits at a bound (:func:`box_multipliers`),
  ``c = floor((lo + hi) / 2)``. The root bound is the box relaxation's minimum; below it each node's
  bound is the continuous minimum over its free coordinates of ``f`` with those fixed linear
  multipliers (for ``e = 0`` the bound of Q-MIST, Buchheim, Caprara & Lodi 2012, and of
  box-constrained sphere decoding). Where the continuous minimiser ``-P^-1 q`` lies in the box
  (``e = 0``) the box adds nothing; where weights are clipped it lifts the root bound from ~0
  towards the optimum and cuts the trees up to ~100-fold.
* ``multipliers=(lambda, mu, origin)`` of the SDP dual (:mod:`quantization.qp_bounds`): ``D = lambda -
  mu``, ``e = mu (l + h) - lambda`` (:func:`sdp_split`), ``s_i(t) = lambda_i t (t - 1) + mu_i (t - l_i)(h_i - t)
  - mu_i l_i h_i``; the root bound is the dual bound ``g(lambda, mu)`` (plus ``sum_i`` of how far
  ``s_i`` stays above ``-mu_i l_i h_i`` on the integers), the "ellipsoid" bound of Buchheim, Hübner &
  Schöbel (2015). Stronger at the root, but ``R'R = U'(P - D)U`` is smaller deeper down: on the layer
  problems the trees are ~1.2x larger than with the default, and the SDP costs ~30-150 ms per problem.
  In the reduced basis the ``s_i`` enter only once ``x_i`` is settled, so the curvature the SDP moves
  into them is missing from the upper levels: on ``_conv_stem`` this variant stops at the node limit
  on most problems (the default split has ``D = 0``).
* ``P`` singular (duplicated inputs, fewer positions than inputs): ``D`` from the interior
  multipliers of :func:`quantization.qp_bounds.interior_multipliers` (grown tenfold until ``M``
  factorises). Coordinates whose row and column of ``P`` and entry of ``q`` are all zero (dead
  inputs) do not enter ``f``: they keep their starting value and are left out of the search.

*Bases* (``basis``). ``"permutation"``: ``U`` a permutation, ``u`` the coordinates themselves, fixed
greedily in the order of largest conditional curvature ``1 / (M^-1)_ii`` among those not yet fixed
(the V-BLAST order of sphere decoding), ``lo = hi`` first; each ``x_i`` is settled by its own row,
so the box restricts every row. ``"reduced"``: ``U`` an LLL-reduced basis (Lenstra, Lenstra & Lovász
1982) of the lattice ``Z^n`` in the metric ``M`` (:func:`_lll`), then in the same greedy order.
Enumerating ``||Ru + y||^2 <= gap`` visits about ``sum_k V_k gap^(k/2) / prod_{j > n-k} R_jj`` nodes
(``V_k`` the unit ball's volume): the product of the ``R_jj`` is ``sqrt(det M)`` in every basis, but
where ``M`` is ill-conditioned the coordinates' ``R_jj`` fall from ~100 to ~6 along the order, so
the first levels are wide, while reduction evens them out (the Lenstra / sphere-decoder
preprocessing for closest-vector problems): on ``_conv_stem`` (condition number ~1e5) the
permutation search needs 1e7-1e8 nodes per problem, the reduced one 1e3-1e4. In the reduced basis
the box constrains a row only through the coordinates it settles (and through the interval hull
of ``u_j = (U^-1 x)_j`` over the box), so on well-conditioned problems with clipped weights the
permutation search is the smaller one. ``"auto"`` (the default) runs the permutation search alone
for ``_RACE_START`` (65536) nodes (all the well-conditioned layer problems finish there), then
builds the reduced one and lets them take turns on one incumbent with budgets doubling every round
(``B, B, 2B, 2B, 4B, ...``): the first to exhaust its tree proves the optimum, at most ~3x the
nodes of the better one; stopped by the limit, ``lb`` is the larger of their certified bounds.

*Certification.* The floating-point ``R``, ``y``, ``D``, ``e`` are taken as exact numbers defining
the bound. ``A = U'MU - delta I`` is factorised with ``delta = 4 (n + 1) eps (tr A + ||U||_F^2 (|diag P|_1
+ |D|_1) + 1'|U|'|M||U|1)``, which exceeds the backward error of Cholesky (Higham, *Accuracy and
Stability*, Thm 10.5) and the errors of forming ``M`` and ``U'MU``, so ``U'(P - diag(D))U - R'R`` is
positive semidefinite. Then ``f(c + Uu) - ||Ru + y||^2 - sum_i s_i(x_i) - r~ + ||y||^2 = u'(U'(P - D)U -
R'R)u + 2 g'u`` with ``g = U'(Pc + q - e/2) - R'y`` (the residual of the solve, bounded by its computed
value plus the rounding of ``U'v`` and of the residual) is at least ``-2 |g|'X`` over the box,
``X_j = max(|a_j|, |b_j|)`` for the interval hull ``[a_j, b_j]`` of ``u_j`` over the box (exact
integers); this, the rounding of ``r~`` and ``||y||^2`` and a bound on the rounding of the node
bounds themselves (``8 (n + 2) eps (|K| + 3 sum_j T_j^2 + 6 sum_i S_i + sum_i |m_i|)``, ``T_j = |y_j| +
sum_k |R_jk| X_k`` the largest ``|(Ru + y)_j|`` term sum over the box, ``S_i = |D_i| X'_i^2 + |e_i| X'_i``
with ``X'_i = max(|l_i|, |h_i|)``) are subtracted from ``K`` once per problem. The values ``x_i`` of
the settled coordinates are integer sums, exact in float64.

*Search.* Depth-first over the rows. Children of a node are the integers ``t`` of the next ``u_j``
whose bound ``parent + (R_jj t + a)^2 + sum_i [s_i(p_i + U_ij t) - m_i]`` (``a`` the row's sum over the
fixed rows plus ``y_j``, ``p_i`` the sums of the coordinates the row settles) is below the pruning
level; where that increment is a convex parabola in ``t`` only the integers of its sublevel interval,
widened by one and by its rounding error, are evaluated; elsewhere all integers of the row's range;
both intersected with the ``t`` that keep the settled ``x_i`` in their box. Nodes are handled in
numpy blocks (for ``n = 32`` up to 64 parents and 4096 children per step, children sorted by
bound, the best block descended first), so the cost per node is a few vector operations of length
``n``. Leaves are evaluated as ``f(z)`` and replace the incumbent when lower. When the tree is
exhausted ``lb`` is the lowest pruning level used (every pruned node, and every value left out of a
sublevel interval, had a bound at least that).

*Speed* (``bench/bench_qp_exact.py``, EfficientNet-Lite0 at 4 bits, 2 shared cores, single-thread
Gurobi 13 side by side): ``_blocks.5._project_conv`` (640 problems of ``n = 32`` and 16): ~3e3
nodes and ~7 ms per problem on average, all proven optimal, as before the reduced basis, against
~0.4 s for Gurobi; ``_conv_stem`` (32 whole channels of ``n = 27``, condition number ~1e5): all
proven, ~1e5 nodes and ~70 ms per problem at most, ~2 s for the layer, where the permutation search
alone proved 12 of 32 in 10 s each and Gurobi leaves most open at 60 s.
Limitations: below the root the box enters the bounds only through the fixed ``e`` and the settled
coordinates, so the trees grow quickly with ``n`` (and with the number of clipped weights): whole
channels of hundreds of inputs run into the node limit, with ``lb`` the best open bound (about the
box relaxation's).

The previous solver, best-first branch and bound on box relaxations (~100x dearer per node), is
kept for comparison as a test reference (``tests/reference_solvers.py``, ``solve_exact_box``).
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from quantization.ptq_rounding import one_opt, sequential_rounding
from quantization.qp_bounds import QuadraticProblems
from utils.branch_and_bound import BranchAndBoundResult

__all__ = [
    "BASES",
    "DEFAULT_NODE_LIMIT",
    "EllipsoidBound",
    "box_multipliers",
    "ellipsoid_bound",
    "sdp_split",
    "solve_exact",
    "solve_exact_batch",
]

BASES = ("auto", "permutation", "reduced")
# The default work limit of solve_exact: nodes, not seconds (module doc, *Limits and reproducibility*).
DEFAULT_NODE_LIMIT = 10_000_000

_EPS = np.finfo(np.float64).eps
_PRUNE_RTOL = 1e-10
_ONE_OPT_RTOL = 1e-12
_NEWTON_ITERATIONS = 50
# Enumeration steps make at most max(256, _STEP_ELEMENTS / n^2) children (4096 for n = 32) from at
# most 1/64 as many parents, so the open blocks (one per level at most) hold <= ~_STEP_ELEMENTS floats.
# Smaller steps descend sooner (better incumbents earlier), larger ones cost less Python per node.
_STEP_ELEMENTS = 1 << 22
# A coordinate's increment is treated as a parabola (interval of children) only above this curvature
# relative to tr(P) / n; below it all integers of its range are evaluated.
_FLAT_CURVATURE = 1e-9
# Interior multipliers for singular P are grown by this factor until M factorises, at most this often.
_INTERIOR_GROWTH, _INTERIOR_TRIES = 10.0, 12
# LLL: the Lovasz constant, and at most this many tests per pair of basis vectors.
_LLL_DELTA = 0.99
_LLL_STEPS_PER_PAIR = 50
_LLL_MAX_ENTRY = 2.0**16  # a reduced basis with larger entries (numerically degenerate M) is not used
# basis="auto": the permutation search runs alone for this many nodes, then the two bases take turns
# with budgets doubling every round (module doc, *Bases*).
_RACE_START = 1 << 16
# Search bases are cached for this many distinct (P - diag(D), fixed coordinates): a layer's problems share P.
_BASIS_CACHE_SIZE = 64


# --------------------------------------------------------------------------- shared helpers


def _objective(P: np.ndarray, q: np.ndarray, r: float, z: np.ndarray) -> np.ndarray:
    """``z'Pz + 2q'z + r`` for ``z`` of shape ``(n,)`` (a float) or ``(N, n)`` (``(N,)``)."""
    if z.ndim == 1:
        return float(z @ (P @ z) + 2.0 * (q @ z) + r)
    # einsum, not BLAS: the same summation order whatever the thread count (bitwise reproducible results)
    return np.einsum("kj,kj->k", np.einsum("ki,ij->kj", z, P), z) + 2.0 * np.einsum("ki,i->k", z, q) + r


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


def _prepare_search(
    P, q, r, lo, hi, z0
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray, _Search, float]:
    """The checked problem and the state a search starts from (module doc, *Incumbent*).

    Returns ``(P, q, r, lo, hi, search, tolerance)``: the inputs as float64 numpy (``P`` symmetrised,
    ``(P + P') / 2``), the search state at ``one_opt(z0)`` (``z0`` default ``one_opt(sequential_rounding)``)
    with ``ub = f`` there, and the resolution of ``f`` at that point (:func:`_resolution`).

    Raises:
        ValueError: ``P`` not square, ``lo``/``hi`` not integers with ``lo <= hi``, ``z0`` not integers in the box.
    """
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
    return P, q, r, lo, hi, _Search(ub=_objective(P, q, r, best_z), best_z=best_z), _resolution(P, q, r, best_z)


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
    """Certified node bounds ``K + sum_{fixed j} (Ru + y)_j^2 + sum_{settled i} [s_i(x_i) - m_i] + sum_i m_i``.

    ``x = z - c = U u``: row ``j`` of ``R`` belongs to the lattice coordinate ``u_j``; the search fixes
    rows ``n - 1, n - 2, ..., 0``. Coordinate ``x_i`` is *settled* once every row ``j`` with
    ``U_ij != 0`` is fixed, i.e. by row ``settled_by[i] = min{j : U_ij != 0}``.

    Attributes:
        basis: ``(n, n)`` the unimodular integer matrix ``U`` (for the ``"permutation"`` basis a
            permutation matrix: row ``j`` is coordinate ``argmax U[:, j]``).
        origin: ``(n,)`` the integer origin ``c`` (per coordinate).
        lower, upper: ``(n,)`` the shifted box ``[lo - c, hi - c]`` per coordinate.
        row_lower, row_upper: ``(n,)`` per row the interval hull of ``u_j = (U^-1 x)_j`` over that box.
        factor: ``(n, n)`` upper triangular ``R`` with ``R'R <= U'(P - diag(D))U``.
        offset: ``(n,)`` ``y``.
        quadratic, linear: ``(n,)`` ``D`` and ``e`` of ``s_i(t) = D_i t^2 + e_i t`` per coordinate.
        separable_min: ``(n,)`` ``m_i`` per coordinate.
        constant: ``K`` minus all rounding allowances.
    """

    basis: np.ndarray
    origin: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    row_lower: np.ndarray
    row_upper: np.ndarray
    factor: np.ndarray
    offset: np.ndarray
    quadratic: np.ndarray
    linear: np.ndarray
    separable_min: np.ndarray
    constant: float

    @property
    def settled_by(self) -> np.ndarray:
        """``(n,)`` per coordinate the row whose fixing settles it, ``min{j : U_ij != 0}``."""
        return np.argmax(self.basis != 0, axis=1)

    @property
    def root(self) -> float:
        """The bound with nothing fixed: ``K + sum_i m_i`` (for SDP multipliers at least their dual bound ``g``)."""
        return self.constant + float(self.separable_min.sum())

    def separable(self, coordinates: np.ndarray, x: np.ndarray) -> np.ndarray:
        """``sum_{i in coordinates} s_i(x_i) - m_i`` for the values ``x`` ``(N, len(coordinates))`` -> ``(N,)``."""
        D, e, m = self.quadratic[coordinates], self.linear[coordinates], self.separable_min[coordinates]
        return (x * (D * x + e) - m).sum(axis=1)

    def bounds(self, values: np.ndarray) -> np.ndarray:
        """Lower bounds on ``f`` over the box's integers with ``(u_{n-1}, ..., u_{n-k}) = values``, ``(N, k)``.

        Evaluated directly (the search accumulates the same sums row by row).
        """
        values = np.atleast_2d(np.asarray(values, dtype=np.float64))
        n, k = self.basis.shape[0], values.shape[1]
        fixed_rows = np.arange(n - 1, n - 1 - k, -1)
        residual = values @ self.factor[fixed_rows][:, fixed_rows].T + self.offset[fixed_rows]
        settled = np.flatnonzero(self.settled_by >= n - k)
        x = values @ self.basis[settled][:, fixed_rows].T
        return self.root + (residual**2).sum(axis=1) + self.separable(settled, x)


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


def _lll(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LLL reduction (Lenstra, Lenstra & Lovász 1982) of the lattice ``Z^n`` in the metric ``M`` (positive definite).

    Works on ``B = R``, ``M = R'R``, whose columns are the basis vectors: size reduction of column
    ``k`` against columns ``k - 1, ..., 0`` (``b_k -= round(mu_kj) b_j``), then the Lovasz test
    ``delta ||b*_{k-1}||^2 <= mu_{k,k-1}^2 ||b*_{k-1}||^2 + ||b*_k||^2`` with ``delta = _LLL_DELTA``;
    a failed test swaps the two columns and restores the triangle by one Givens rotation. The
    floating-point ``R`` only steers the integer operations (at most ``_LLL_STEPS_PER_PAIR n^2``
    tests): the returned ``W`` (``M``'s reduced basis as columns) and ``W^-1`` are exact integers
    whatever its rounding.
    """
    n = M.shape[0]
    R = np.linalg.cholesky(M).T.copy()
    W, W_inverse = np.eye(n), np.eye(n)
    k, steps = 1, 0
    while k < n and steps < _LLL_STEPS_PER_PAIR * n * n:
        steps += 1
        for j in range(k - 1, -1, -1):
            m = round(R[j, k] / R[j, j])
            if m:
                R[: j + 1, k] -= m * R[: j + 1, j]
                W[:, k] -= m * W[:, j]
                W_inverse[j, :] += m * W_inverse[k, :]
        if _LLL_DELTA * R[k - 1, k - 1] ** 2 > R[k - 1, k] ** 2 + R[k, k] ** 2:
            pair = [k, k - 1]
            R[:, [k - 1, k]], W[:, [k - 1, k]] = R[:, pair], W[:, pair]
            W_inverse[[k - 1, k], :] = W_inverse[pair, :]
            norm = math.hypot(R[k - 1, k - 1], R[k, k - 1])
            cos, sin = R[k - 1, k - 1] / norm, R[k, k - 1] / norm
            R[k - 1 : k + 1, k - 1 :] = np.array([[cos, sin], [-sin, cos]]) @ R[k - 1 : k + 1, k - 1 :]
            R[k, k - 1] = 0.0
            k = max(k - 1, 1)
        else:
            k += 1
    return W, W_inverse


def _search_basis(M: np.ndarray, forced: np.ndarray, basis: str) -> tuple[np.ndarray, np.ndarray]:
    """``(U, U^-1)``: the columns in row order (the search fixes the last column first).

    ``"permutation"``: unit vectors, the coordinates in :func:`_fixing_order`. ``"reduced"``: the
    coordinates with ``lo < hi`` replaced by an LLL-reduced basis of ``M``'s block (:func:`_lll`,
    started from the fixing order; kept only with entries up to ``_LLL_MAX_ENTRY``, exact), the
    ``lo = hi`` ones kept as unit vectors; then its vectors in the fixing order of ``U'MU``.
    """
    n = M.shape[0]
    U, U_inverse = np.eye(n), np.eye(n)
    free = np.flatnonzero(~forced)
    if basis == "reduced" and free.size > 1:
        block = M[np.ix_(free, free)]
        start = _fixing_order(block, np.zeros(free.size, dtype=bool))[::-1]
        W, W_inverse = _lll(block[np.ix_(start, start)])
        small = max(np.abs(W).max(), np.abs(W_inverse).max()) <= _LLL_MAX_ENTRY
        if small and np.array_equal(W @ W_inverse, np.eye(free.size)):
            U[np.ix_(free[start], free)], U_inverse[np.ix_(free, free[start])] = W, W_inverse
    rows = _fixing_order(U.T @ M @ U, forced)[::-1]
    U, U_inverse = U[:, rows], U_inverse[rows]
    if not np.array_equal(U @ U_inverse, np.eye(n)):
        raise ArithmeticError("the search basis is not unimodular")
    return U, U_inverse


@functools.lru_cache(maxsize=_BASIS_CACHE_SIZE)
def _cached_basis(matrix: bytes, forced: bytes, n: int, basis: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_search_basis` of ``M`` (``matrix``, float64 bytes) and ``forced`` (bool bytes), read-only."""
    U, U_inverse = _search_basis(np.frombuffer(matrix).reshape(n, n), np.frombuffer(forced, dtype=bool), basis)
    U.setflags(write=False)
    U_inverse.setflags(write=False)
    return U, U_inverse


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
    D: np.ndarray, e: np.ndarray, basis: str,
) -> EllipsoidBound | None:
    """:class:`EllipsoidBound` for ``(origin, D, e)`` in ``basis``; None where ``P - diag(D)`` does not factorise."""
    n = P.shape[0]
    M = P - np.diag(D)
    diagonal_size = float(np.abs(np.diag(P)).sum() + np.abs(D).sum())
    if not np.isfinite(M).all():
        return None
    try:
        np.linalg.cholesky(M - 4.0 * (n + 1) * _EPS * diagonal_size * np.eye(n))
        U, U_inverse = _cached_basis(M.tobytes(), (lo == hi).tobytes(), n, basis)
    except np.linalg.LinAlgError:
        return None
    abs_U = np.abs(U)
    A = U.T @ M @ U
    product_size = float((abs_U.T @ np.abs(M) @ abs_U).sum())
    trace = float(np.abs(np.diag(A)).sum())
    delta = 4.0 * (n + 1) * _EPS * (trace + float((U * U).sum()) * diagonal_size + product_size)
    try:
        R = np.linalg.cholesky(A - delta * np.eye(n)).T
    except np.linalg.LinAlgError:
        return None
    lower, upper = lo - origin, hi - origin
    row_lower = np.minimum(U_inverse * lower, U_inverse * upper).sum(axis=1)
    row_upper = np.maximum(U_inverse * lower, U_inverse * upper).sum(axis=1)
    abs_P = np.abs(P)
    v = P @ origin + q - e / 2.0
    v_rows = U.T @ v
    y = np.linalg.solve(R.T, v_rows)  # any solver: its residual is measured and allowed for below
    residual = v_rows - R.T @ y
    abs_c = np.abs(origin)
    v_error = abs_U.T @ ((n + 2) * _EPS * (abs_P @ abs_c + np.abs(q) + np.abs(e) / 2.0) + (n + 1) * _EPS * np.abs(v))
    residual_error = (n + 1) * _EPS * (np.abs(v_rows) + np.abs(R.T) @ np.abs(y))
    g_bound = (np.abs(residual) + 2.0 * (v_error + residual_error)) * (1.0 + 4.0 * (n + 2) * _EPS)
    row_reach = np.maximum(np.abs(row_lower), np.abs(row_upper))  # |u_j| over the box
    reach = np.maximum(np.abs(lower), np.abs(upper))  # X_i
    value_at_origin = _objective(P, q, r, origin)
    offset_squared = float(y @ y)
    shift = 2.0 * float(g_bound @ row_reach)
    origin_error = (n + 3) * _EPS * (float(abs_c @ abs_P @ abs_c + 2.0 * (np.abs(q) @ abs_c)) + abs(r))
    constant = value_at_origin - offset_squared - shift
    constant -= origin_error + n * _EPS * offset_squared + 4.0 * _EPS * (abs(value_at_origin) + offset_squared + shift)
    separable_min = _separable_minimum(D, e, lower, upper)
    term_size = np.abs(y) + np.abs(R) @ row_reach  # T_j
    separable_size = np.abs(D) * reach**2 + np.abs(e) * reach  # S_i
    node_margin = 8.0 * (n + 2) * _EPS * (
        abs(constant) + 3.0 * float(term_size @ term_size) + 6.0 * float(separable_size.sum())
        + float(np.abs(separable_min).sum())
    )
    return EllipsoidBound(
        basis=U, origin=origin, lower=lower, upper=upper, row_lower=row_lower, row_upper=row_upper, factor=R,
        offset=y, quadratic=D, linear=e, separable_min=separable_min,
        constant=constant - node_margin * (1.0 + 4.0 * _EPS),
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
    basis: str = "permutation",
) -> EllipsoidBound:
    """The certified node bounds of the module doc for one problem (numpy float64; ``lo``, ``hi`` integers).

    Args:
        diagonal, linear: ``D`` and ``e`` (default zero); any values give valid bounds as long as
            ``P - diag(D)`` is positive definite (e.g. :func:`box_multipliers`, :func:`sdp_split`).
        origin: the integer origin ``c`` (default ``floor((lo + hi) / 2)``).
        basis: ``"permutation"`` (the coordinates themselves, in the V-BLAST fixing order) or
            ``"reduced"`` (an LLL-reduced lattice basis of ``P - diag(D)``); see the module doc.

    Where ``P - diag(D) - delta I`` does not factorise (``P`` singular), ``D`` is replaced by the split
    (:func:`sdp_split`) of the interior multipliers ``mu_i = eps_i``, ``lam_i = eps_i / 2``,
    ``eps_i = tr(P)/n / max(1, |l_i h_i|)`` of :func:`quantization.qp_bounds.interior_multipliers`
    (times 10 until ``M`` factorises), whose ``e`` is added to ``linear``.

    Raises:
        ValueError: no factorisation found (non-finite data), or an unknown ``basis``.
    """
    if basis not in BASES[1:]:
        raise ValueError(f"basis must be one of {', '.join(BASES[1:])}, got {basis!r}")
    n = q.shape[0]
    origin = np.floor((lo + hi) / 2.0) if origin is None else np.asarray(origin, dtype=np.float64)
    if not np.array_equal(origin, np.round(origin)):
        raise ValueError("the origin must be integer")
    diagonal = np.zeros(n) if diagonal is None else np.asarray(diagonal, dtype=np.float64)
    linear = np.zeros(n) if linear is None else np.asarray(linear, dtype=np.float64)
    bound = _try_factor(P, q, r, lo, hi, origin, diagonal, linear, basis)
    if bound is not None:
        return bound
    lower, upper = lo - origin, hi - origin
    scale = float(np.trace(P)) / max(n, 1)
    eps = (scale if scale > 0 else 1.0) / np.maximum(np.abs(lower * upper), 1.0)
    for _ in range(_INTERIOR_TRIES):
        interior_diagonal, interior_linear = sdp_split(eps / 2.0, eps, lower, upper)
        bound = _try_factor(P, q, r, lo, hi, origin, interior_diagonal, interior_linear + linear, basis)
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


@dataclass(frozen=True)
class _RowPlan:
    """What fixing row ``j`` does to the coordinates ``x = U u`` (built once per search by :func:`_row_plans`).

    A node carries, for the coordinates that some fixed row touches but that are not settled yet,
    the integer sums ``sum_{fixed k} U_ik u_k`` (and one trailing zero column).

    Attributes:
        settled: the coordinates ``i`` that row ``j`` settles (``settled_by[i] = j``), and unless the row
            is fresh their ``U_ij`` (``coefficient``), ``D_i``, ``e_i``, ``m_i`` and ``settled_source``,
            their columns in the parent's carried sums (the zero column if none).
        fresh: no settled coordinate has a fixed row besides ``j`` (its sum is 0); then ``first``,
            ``last`` are the ``t = u_j`` that keep them in their box and in the row's range, and
            ``sum_i s_i(U_ij t) - m_i = t (alpha t + beta) - gamma`` with ``alpha = sum_i D_i U_ij^2``,
            ``beta = sum_i e_i U_ij``, ``gamma = sum_i m_i``, ``gamma_size = sum_i |m_i|``.
        carried: the coordinates the children carry; carried_source, carried_coefficient as above.
        diagonal: ``R_jj``.
        curvature: ``R_jj^2 + sum_{settled i} D_i U_ij^2``, the increment's second derivative in ``u_j``.
        column: ``R_{:j, j}``, the row's contributions to the partial sums of the rows above it.
    """

    settled: np.ndarray
    coefficient: np.ndarray
    quadratic: np.ndarray
    linear: np.ndarray
    minimum: np.ndarray
    settled_source: np.ndarray
    fresh: bool
    first: float
    last: float
    alpha: float
    beta: float
    gamma: float
    gamma_size: float
    carried: np.ndarray
    carried_source: np.ndarray
    carried_coefficient: np.ndarray
    diagonal: float
    curvature: float
    column: np.ndarray

    def separable(self, x: np.ndarray) -> np.ndarray:
        """``sum_{settled i} s_i(x_i) - m_i`` for their values ``x`` ``(N, len(settled))`` -> ``(N,)``."""
        return (x * (self.quadratic * x + self.linear) - self.minimum).sum(axis=1)


def _row_plans(bound: EllipsoidBound) -> list[_RowPlan]:
    """:class:`_RowPlan` of every row of ``bound`` (per-row sums by ``bincount`` over the settling rows)."""
    U = bound.basis
    n = U.shape[0]
    first = bound.settled_by
    last = n - 1 - np.argmax(U[:, ::-1] != 0, axis=1)
    coefficient = U[np.arange(n), first]
    ends = np.stack([bound.lower / coefficient, bound.upper / coefficient])
    row_first = np.full(n, -math.inf)
    np.maximum.at(row_first, first, np.ceil(ends.min(0)))
    row_first = np.maximum(row_first, bound.row_lower)
    row_last = np.full(n, math.inf)
    np.minimum.at(row_last, first, np.floor(ends.max(0)))
    row_last = np.minimum(row_last, bound.row_upper)
    D, e, m = bound.quadratic, bound.linear, bound.separable_min
    alpha = np.bincount(first, D * coefficient**2, minlength=n)
    beta = np.bincount(first, e * coefficient, minlength=n)
    gamma = np.bincount(first, m, minlength=n)
    gamma_size = np.bincount(first, np.abs(m), minlength=n)
    fresh = np.bincount(first, last != first, minlength=n) == 0
    by_row = np.argsort(first, kind="stable")
    splits = np.searchsorted(first[by_row], np.arange(n + 1))
    empty = np.zeros(0, dtype=np.int64)
    scalars = zip(fresh.tolist(), row_first.tolist(), row_last.tolist(), alpha.tolist(), beta.tolist(),
                  gamma.tolist(), gamma_size.tolist(), np.diag(bound.factor).tolist())
    plans = []
    for j, (is_fresh, row_lo, row_hi, a, b, c, c_size, r_jj) in enumerate(scalars):
        settled, carried, position = by_row[splits[j]:splits[j + 1]], empty, empty
        if not fresh.all():  # a permutation carries nothing, and its fresh rows need no index arrays
            parent = np.flatnonzero((first <= j) & (last >= j + 1))
            position = np.full(n, parent.size)
            position[parent] = np.arange(parent.size)
            carried = np.flatnonzero((first <= j - 1) & (last >= j))
        general = empty if is_fresh else settled
        plans.append(_RowPlan(
            settled=settled, coefficient=coefficient[general], quadratic=D[general], linear=e[general],
            minimum=m[general], settled_source=position[general], fresh=is_fresh, first=row_lo, last=row_hi,
            alpha=a, beta=b, gamma=c, gamma_size=c_size, carried=carried, carried_source=position[carried],
            carried_coefficient=U[carried, j], diagonal=r_jj, curvature=r_jj * r_jj + a, column=bound.factor[:j, j],
        ))
    return plans


@dataclass
class _Block:
    """Open nodes with the last ``n - level`` rows fixed; parents ``cursor:`` not yet expanded.

    ``partial`` ``(N, level)``: the sums ``y_j + sum_{fixed k} R_jk u_k`` of the free rows;
    ``bound`` ``(N,)``; ``fixed`` ``(N, n - level)``: the values ``u`` of rows ``level..n-1``;
    ``carried`` ``(N, c + 1)``: the carried sums of :class:`_RowPlan` and a zero column (None: none
    carried, and the next row is fresh).
    """

    level: int
    partial: np.ndarray
    bound: np.ndarray
    fixed: np.ndarray
    carried: np.ndarray | None
    cursor: int = 0


@dataclass
class _Search:
    """State of one enumeration: the incumbent and the counters."""

    ub: float
    best_z: np.ndarray
    nodes: int = 1
    threshold: float = math.inf


def _children_range(
    bound: EllipsoidBound, plan: _RowPlan, row: int, partial: np.ndarray, settled_sums: np.ndarray | None,
    slack: np.ndarray, scale: float,
) -> tuple[np.ndarray, np.ndarray]:
    """First and last integer ``t`` of the next row's ``u_j`` that can stay below the pruning level.

    With ``p_i`` the parent's sums of the coordinates the row settles (``x_i = p_i + U_ij t``; None:
    all 0, a fresh row), the increment ``(R_jj t + a)^2 + sum_i [s_i(p_i + U_ij t) - m_i]`` is the parabola
    ``A t^2 + 2 b t + c``, ``A`` the plan's curvature, ``b = R_jj a + sum_i U_ij (D_i p_i + e_i / 2)``,
    ``c = a^2 + sum_i [s_i(p_i) - m_i]``: below ``slack`` on ``|t - v| < sqrt((slack - bottom) / A)`` with
    ``v = -b / A``, ``bottom = c - b^2 / A``. Widened against rounding: ``64 (n + 2) eps`` times the
    terms' size is added under the root, ``4 eps |v| + 1`` outside. Flat or concave rows give the
    whole range. Intersected with the row's range and with the ``t`` that keep the settled ``x_i`` in
    their box (exact: integer quotients).
    """
    n = bound.basis.shape[0]
    square = partial * partial
    if settled_sums is None:
        first, last = plan.first, plan.last
        b = plan.diagonal * partial + 0.5 * plan.beta
        constant, size = square - plan.gamma, square + plan.gamma_size
    else:
        lower = (bound.lower[plan.settled] - settled_sums) / plan.coefficient
        upper = (bound.upper[plan.settled] - settled_sums) / plan.coefficient
        first = np.maximum(np.ceil(np.minimum(lower, upper)).max(axis=1), bound.row_lower[row])
        last = np.minimum(np.floor(np.maximum(lower, upper)).min(axis=1), bound.row_upper[row])
        D, e = plan.quadratic, plan.linear
        b = plan.diagonal * partial + (plan.coefficient * (D * settled_sums + 0.5 * e)).sum(axis=1)
        constant = square + plan.separable(settled_sums)
        size = square + (np.abs(D) * settled_sums**2 + np.abs(e * settled_sums) + np.abs(plan.minimum)).sum(axis=1)
    curvature = plan.curvature
    if not curvature > _FLAT_CURVATURE * scale:
        return np.broadcast_to(first, partial.shape), np.broadcast_to(last, partial.shape)
    vertex = -b / curvature
    completed = b * vertex  # -b^2 / A
    room = np.maximum(slack - constant - completed, 0.0)
    room += 64.0 * (n + 2) * _EPS * (size - completed + np.abs(slack))
    half = np.sqrt(room / curvature) + 4.0 * _EPS * np.abs(vertex) + 1.0
    return np.maximum(np.ceil(vertex - half), first), np.minimum(np.floor(vertex + half), last)


def _expand(
    bound: EllipsoidBound,
    plans: list[_RowPlan],
    block: _Block,
    search: _Search,
    scale: float,
    max_children: int,
    leaf_values,
) -> _Block | None:
    """Expand the next parents of ``block``; return the children that stay below the pruning level (or None).

    Leaves (all rows fixed) are passed to ``leaf_values`` (as ``u``, ``(N, n)``) instead.
    """
    row = block.level - 1
    plan = plans[row]
    start = block.cursor
    stop = min(start + max(16, max_children // 64), block.bound.shape[0])
    partial, parent_bound = block.partial[start:stop, row], block.bound[start:stop]
    settled_sums = None if plan.fresh else block.carried[start:stop][:, plan.settled_source]
    slack = search.threshold - parent_bound
    first, last = _children_range(bound, plan, row, partial, settled_sums, slack, scale)
    counts = np.where(slack > 0, np.maximum(last - first + 1.0, 0.0), 0.0).astype(np.int64)
    ends = np.cumsum(counts)
    used = max(1, int(np.searchsorted(ends, max_children, side="right")))
    block.cursor += used
    total = int(ends[used - 1])
    if total == 0:
        return None
    counts = counts[:used]
    local = np.repeat(np.arange(used), counts)
    t = np.arange(total) + np.repeat(first[:used] - (ends[:used] - counts), counts)  # first, first + 1, ... per parent
    value = partial[local] + plan.diagonal * t
    if settled_sums is None:
        separable = t * (plan.alpha * t + plan.beta) - plan.gamma
    else:
        separable = plan.separable(settled_sums[local] + t[:, None] * plan.coefficient)
    child_bound = parent_bound[local] + value * value + separable
    keep = np.flatnonzero(child_bound < search.threshold)
    if keep.size == 0:
        return None
    search.nodes += keep.size
    parent = local + start
    if row == 0:
        leaf_values(np.concatenate([t[keep, None], block.fixed[parent[keep]]], axis=1))
        return None
    keep = keep[np.argsort(child_bound[keep], kind="stable")]
    parent, t = parent[keep], t[keep]
    partial = block.partial[parent, :row] + t[:, None] * plan.column
    carried = None
    if plan.carried.size:
        carried = np.zeros((keep.size, plan.carried.size + 1))
        carried[:, :-1] = t[:, None] * plan.carried_coefficient
        if block.carried is not None:
            carried[:, :-1] += block.carried[parent][:, plan.carried_source]
    return _Block(row, partial, child_bound[keep], np.concatenate([t[:, None], block.fixed[parent]], axis=1), carried)


class _Enumeration:
    """A resumable depth-first search over the rows of one :class:`EllipsoidBound`, sharing ``search``.

    ``P, q, r`` and ``search.best_z`` are those of the coordinates of ``bound`` (decoupled ones removed).
    Every leaf below the pruning level is evaluated as ``f(z)`` and replaces the incumbent when lower.
    """

    def __init__(self, P: np.ndarray, q: np.ndarray, r: float, bound: EllipsoidBound, search: _Search,
                 tolerance: float) -> None:
        n = bound.basis.shape[0]
        self.P, self.q, self.r, self.bound, self.search, self.tolerance = P, q, r, bound, search, tolerance
        self.scale = max(float(np.trace(P)) / max(n, 1), np.finfo(np.float64).tiny)
        self.max_children = max(256, _STEP_ELEMENTS // (n * n))
        self.plans = _row_plans(bound)
        self._set_threshold()
        self.stack = [_Block(n, bound.offset[None, :].copy(), np.array([bound.root]), np.zeros((1, 0)), None)]
        self.lowest_threshold = search.threshold

    def _set_threshold(self) -> None:
        self.search.threshold = self.search.ub - max(_PRUNE_RTOL * abs(self.search.ub), self.tolerance)

    def _leaf_values(self, u: np.ndarray) -> None:
        z = self.bound.origin + u @ self.bound.basis.T  # integers: exact in any summation order
        values = _objective(self.P, self.q, self.r, z)
        best = int(np.argmin(values))
        if values[best] < self.search.ub:
            self.search.ub, self.search.best_z = float(values[best]), z[best].copy()
            self._set_threshold()

    def run(self, node_limit: int, deadline: float | None) -> str:
        """Search until the tree is exhausted (``"optimal"``), ``search.nodes >= node_limit`` (``"node_limit"``) or
        the clock passes ``deadline`` (``"time_limit"``; None: never read)."""
        self._set_threshold()
        while self.stack:
            if self.search.nodes >= node_limit:
                return "node_limit"
            if deadline is not None and time.perf_counter() > deadline:
                return "time_limit"
            block = self.stack[-1]
            children = _expand(self.bound, self.plans, block, self.search, self.scale, self.max_children,
                               self._leaf_values)
            self.lowest_threshold = min(self.lowest_threshold, self.search.threshold)
            if block.cursor >= block.bound.shape[0]:
                self.stack.pop()
            if children is not None:
                self.stack.append(children)
        return "optimal"

    @property
    def lower_bound(self) -> float:
        """The lowest pruning level used and the lowest bound of the open nodes (and ``ub``): a certified bound."""
        open_bounds = [float(b.bound[b.cursor:].min()) for b in self.stack if b.cursor < b.bound.shape[0]]
        return min([self.search.ub, self.lowest_threshold, *open_bounds])


def _ellipsoid_search(
    P: np.ndarray, q: np.ndarray, r: float, lo: np.ndarray, hi: np.ndarray, split: tuple, basis: str,
    search: _Search, tolerance: float, deadline: float | None, node_limit: int,
) -> tuple[str, float]:
    """The ellipsoid search in ``basis``; for ``"auto"`` the permutation and reduced bases take turns (module doc).

    ``split`` is ``(diagonal, linear, origin)`` of :func:`ellipsoid_bound`. Returns ``(status, lb)``: the
    first search to exhaust its tree proves the optimum; when the limits stop them, ``lb`` is the larger of
    their certified bounds.
    """
    first = "permutation" if basis == "auto" else basis
    searches = [_Enumeration(P, q, r, ellipsoid_bound(P, q, r, lo, hi, *split, basis=first), search, tolerance)]
    budget = _RACE_START if basis == "auto" else node_limit
    turn = 0
    while True:
        current = searches[turn % len(searches)]
        status = current.run(min(search.nodes + budget, node_limit), deadline)
        if status == "optimal":
            return status, current.lower_bound
        if status == "time_limit" or search.nodes >= node_limit:
            return status, max(other.lower_bound for other in searches)
        if basis == "auto" and turn == 0:
            reduced = ellipsoid_bound(P, q, r, lo, hi, *split, basis="reduced")
            if not np.array_equal(reduced.basis, current.bound.basis):
                searches.append(_Enumeration(P, q, r, reduced, search, tolerance))
        turn += 1
        if turn % len(searches) == 0:
            budget *= 2


# --------------------------------------------------------------------------- public API


def solve_exact(
    P,
    q,
    r,
    lo,
    hi,
    time_limit: float | None = None,
    node_limit: int = DEFAULT_NODE_LIMIT,
    z0=None,
    multipliers: tuple | None = None,
    basis: str = "auto",
) -> BranchAndBoundResult:
    """Minimise ``z'Pz + 2q'z + r`` over integer ``z`` in ``[lo, hi]`` by branch and bound.

    Args:
        P: ``(n, n)`` symmetric positive semidefinite; q: ``(n,)``; r: scalar; lo, hi: ``(n,)`` or
            scalars, integers with ``lo <= hi``. numpy arrays or tensors, converted to float64.
        time_limit: optional wall-clock seconds; the search stops with status ``"time_limit"`` when
            exceeded. ``None`` (the default): no clock is read, the result depends on the inputs only.
        node_limit: the search stops with status ``"node_limit"`` once it has counted this many nodes
            (checked between steps, so up to one step of at most ``max(256, 2^22 / n^2)`` more; module
            doc, *Limits and reproducibility*; :data:`DEFAULT_NODE_LIMIT`).
        z0: optional ``(n,)`` integer start inside the box (polished by 1-opt); without it
            ``one_opt(sequential_rounding)`` is computed.
        multipliers: optional ``(lam, mu, origin)`` of the SDP dual for the ellipsoid bound
            (:class:`quantization.qp_bounds.DualSolution`'s, ``(n,)`` each, with the box); without
            them ``D = 0`` and ``e`` the box relaxation's multipliers (module doc).
        basis: the ellipsoid search's lattice basis: ``"permutation"``, ``"reduced"`` or ``"auto"``
            (both, taking turns; the first to finish proves the optimum); module doc.

    Returns:
        :class:`~utils.branch_and_bound.BranchAndBoundResult`; ``lb <= min f <= ub = f(x)`` always (``x``: the best integer point).
    """
    start_time = time.perf_counter()
    if basis not in BASES:
        raise ValueError(f"basis must be one of {', '.join(BASES)}, got {basis!r}")
    if time_limit is not None and not time_limit >= 0:
        raise ValueError(f"time_limit must be None or >= 0, got {time_limit}")
    P, q, r, lo, hi, search, tolerance = _prepare_search(P, q, r, lo, hi, z0)
    n = q.shape[0]
    best_z = search.best_z
    deadline = None if time_limit is None else start_time + time_limit
    active = ~((P == 0).all(0) & (q == 0))
    sub = np.ix_(active, active)
    P_a, q_a, lo_a, hi_a = P[sub], q[active], lo[active], hi[active]
    reduced = _Search(ub=search.ub, best_z=best_z[active])
    status, lb = "optimal", search.ub  # nothing to search when f does not depend on z
    if active.any():
        if multipliers is not None:
            lam, mu, origin = (_as_numpy(values, (n,))[active] for values in multipliers)
            split = (*sdp_split(lam, mu, lo_a - origin, hi_a - origin), origin)
        else:
            relaxed = _box_minimiser(P_a, q_a, r, lo_a, hi_a, reduced.best_z)
            split = (None, box_multipliers(P_a, q_a, lo_a, hi_a, relaxed), None)
        status, lb = _ellipsoid_search(P_a, q_a, r, lo_a, hi_a, split, basis, reduced, tolerance, deadline,
                                       node_limit)
    search.nodes = reduced.nodes
    if reduced.ub < search.ub:
        candidate = best_z.copy()
        candidate[active] = reduced.best_z
        value = _objective(P, q, r, candidate)  # the same sums up to exact zeros, so normally reduced.ub
        if value < search.ub:
            search.best_z, search.ub = candidate, value
    lb = min(lb, search.ub)
    seconds = time.perf_counter() - start_time
    return BranchAndBoundResult(search.best_z, float(search.ub), float(lb), status, search.nodes, seconds)


def solve_exact_batch(
    problems: QuadraticProblems,
    time_limit: float | None = None,
    node_limit: int = DEFAULT_NODE_LIMIT,
    z0: torch.Tensor | None = None,
    basis: str = "auto",
) -> list[BranchAndBoundResult]:
    """:func:`solve_exact` for every problem of ``problems`` (which must have a box), one after another.

    The starting points default to ``one_opt(sequential_rounding)`` computed for the whole batch at
    once. ``time_limit``, ``node_limit`` and ``basis`` apply to each problem.
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
            basis=basis,
        )
        for b in range(problems.batch_size)
    ]
