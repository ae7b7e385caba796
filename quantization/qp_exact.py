"""Exact minimisation of small box-constrained integer quadratic problems by branch and bound.

One problem is ``min f(z) = z'Pz + 2q'z + r`` over integer ``z`` in the box ``[lo, hi]`` (``P``
symmetric positive semidefinite, ``n`` up to about 32, float64), as in
:mod:`quantization.qp_bounds` and :mod:`quantization.ptq_rounding`. :func:`solve_exact` returns the
best integer point found, its value ``ub`` and a *certified* lower bound ``lb`` on the optimum;
when the search tree is exhausted the status is ``"optimal"`` and ``lb`` equals ``ub`` up to the
pruning tolerance ``max(1e-10 |ub|, resolution)``. ``resolution = 32 (n + 2) eps (|z|'|P||z| +
2|q|'|z| + |r|) + 10 nu ||hi - lo||^2`` (at the first incumbent ``z``, ``nu`` below) is a few times the
floating-point margin of the node bounds below: differences of ``f`` smaller than it cannot be
certified in float64. It is below ``1e-9 |ub|`` unless ``f``'s optimum is much smaller than its
terms (e.g. ``min f ~ 1e-9 r``), where no float64 evaluation of ``f`` is accurate to ``1e-9``
relative anyway. When the time or
node limit is hit the status is ``"time_limit"`` (or ``"node_limit"``) and ``lb`` is the minimum of
the certified bounds of all open nodes (and of nodes pruned within the tolerance), so the gap is
reported instead of failing.

**Incumbent.** ``z0`` if given (the batch driver passes ``one_opt(sequential_rounding)`` computed
for all problems at once), else the better of ``one_opt(sequential_rounding)`` and
``one_opt(round(box relaxation))``. At every node the relaxed point rounded into the node's box is
evaluated; if it beats the incumbent it is polished by 1-opt and becomes the incumbent.

**Node bounds.** A node is a sub-box ``[l, u]`` (integers) of ``[lo, hi]``. Its continuous
relaxation ``min f(x), x in [l, u]`` is solved approximately by a projected Newton / active-set
method (free set from the signs of the gradient, Newton step on the free set, variables whose step
leaves the box at a bound moved to the active set, Armijo backtracking along the projected path).
The value used for *pruning* never relies on that solver being accurate: at the computed point
``x`` (any point in the box) convexity gives, for every ``y`` in the box,

    f(y) >= f(x) + g'(y - x) + lam_min ||y - x||^2,   g = 2(Px + q),

so ``min_box f >= f(x) + sum_i min(g_i (l_i - x_i), g_i (u_i - x_i)) - nu * sum_i max(x_i - l_i, u_i - x_i)^2``
with ``nu = max(0, n eps ||P||_F - lam_min(P))`` for the computed ``lam_min`` (covers a stored
``P`` with eigenvalues of rounding size below zero, and the error of the computed ``lam_min``; it
is 0 for a clearly positive definite ``P``). This is the Frank-Wolfe /
Lagrangian dual bound: it equals the relaxed optimum at an exact KKT point. From it a rounding
margin ``8 n eps (|x|'|P||x| + 2|q|'|x| + |r| + 2(|P||x| + |q|)'(u - l))`` is subtracted, which
bounds the floating-point error of evaluating ``f(x)`` and ``g``. A child's bound is also raised to
its parent's (a sub-box cannot have a smaller minimum).

**Branching.** On the free variable maximising ``P_ii * frac * (1 - frac)`` of the relaxed
point (``frac`` its fractional part); if the relaxed point is integral but not certified optimal,
on the widest free variable. The children are ``[l_i, s]`` and ``[s + 1, u_i]`` with
``s = clip(floor(x_i), l_i, u_i - 1)``. Nodes are explored best-first (smallest bound) from a heap;
children are bounded when created and pruned when their bound is ``>= ub - 1e-10 |ub|``.

Limitations: pure numpy, one node at a time (~0.1 ms per node for ``n = 32``); the box relaxation
is weak for ill-conditioned ``P`` (real Gram matrices), so the trees can be large for ``n = 32``.
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

__all__ = ["ExactResult", "solve_exact", "solve_exact_batch"]

_EPS = np.finfo(np.float64).eps
_PRUNE_RTOL = 1e-10
_ONE_OPT_RTOL = 1e-12
_NEWTON_ITERATIONS = 50


@dataclass(frozen=True)
class ExactResult:
    """The result of :func:`solve_exact` for one problem.

    Attributes:
        z: ``(n,)`` float64 integers in the box, the best point found.
        ub: ``f(z)``.
        lb: a certified lower bound on ``min f`` over the integers of the box (``<= ub``).
        status: ``"optimal"`` (tree exhausted), ``"time_limit"`` or ``"node_limit"``.
        nodes: number of nodes whose relaxation was solved.
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


class _Problem:
    """One problem in numpy with the constants of the certified bound."""

    def __init__(self, P: np.ndarray, q: np.ndarray, r: float, lo: np.ndarray, hi: np.ndarray) -> None:
        self.P, self.q, self.r, self.lo, self.hi = P, q, float(r), lo, hi
        self.n = q.shape[0]
        self.absP, self.absq = np.abs(P), np.abs(q)
        self.diag = np.diag(P).copy()
        norm = float(np.linalg.norm(P))
        lam_min = float(np.linalg.eigvalsh(P)[0]) if self.n else 0.0
        # eigvalsh is backward stable: the true lam_min is >= the computed one - n eps ||P||_F.
        self.nu = max(0.0, self.n * _EPS * norm - lam_min)
        self.ridge = 1e-12 * max(float(self.diag.max(initial=0.0)), np.finfo(np.float64).tiny)

    def value(self, z: np.ndarray) -> float:
        return float(z @ (self.P @ z) + 2.0 * (self.q @ z) + self.r)

    # ------------------------------------------------------------------ relaxation

    def relax(self, l: np.ndarray, u: np.ndarray, x: np.ndarray) -> np.ndarray:
        """An approximate minimiser of ``f`` over ``[l, u]`` (projected Newton from ``x``)."""
        P, q = self.P, self.q
        x = np.clip(x, l, u)
        fixed = l == u
        for _ in range(_NEWTON_ITERATIONS):
            g = P @ x + q
            free = ~(fixed | ((x <= l) & (g > 0)) | ((x >= u) & (g < 0)))
            if not free.any():
                break
            direction = np.zeros_like(x)
            for _ in range(self.n):
                idx = np.flatnonzero(free)
                if idx.size == 0:
                    break
                step = self._newton(idx, g[idx])
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
            if -change <= 1e-15 * (abs(float(x @ (P @ x))) + abs(float(q @ x)) + abs(self.r)):
                break
        return x

    def _newton(self, idx: np.ndarray, g: np.ndarray) -> np.ndarray:
        block = self.P[np.ix_(idx, idx)]
        ridge = 0.0
        for _ in range(8):
            try:
                factor = np.linalg.cholesky(block + ridge * np.eye(idx.size))
                y = np.linalg.solve(factor, -g)
                return np.linalg.solve(factor.T, y)
            except np.linalg.LinAlgError:
                ridge = self.ridge if ridge == 0.0 else ridge * 100.0
        return -g / max(float(np.abs(block).max(initial=0.0)), 1.0)

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

    # ------------------------------------------------------------------ heuristics

    def one_opt(self, z: np.ndarray, max_sweeps: int = 100) -> np.ndarray:
        """Greedy integer coordinate descent within ``[lo, hi]`` (as :func:`ptq_rounding.one_opt`)."""
        z = z.copy()
        for _ in range(max_sweeps):
            g = self.P @ z + self.q
            improved = False
            for i in range(self.n):
                p_ii, g_i = self.diag[i], g[i]
                if p_ii > 0:
                    step = float(np.round(-g_i / p_ii))
                else:
                    step = -math.inf if g_i > 0 else (math.inf if g_i < 0 else 0.0)
                step = min(max(step, self.lo[i] - z[i]), self.hi[i] - z[i])
                quadratic, linear = p_ii * step * step, 2.0 * g_i * step
                if step != 0.0 and quadratic + linear < -_ONE_OPT_RTOL * (quadratic + abs(linear)):
                    z[i] += step
                    g += step * self.P[:, i]
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


def solve_exact(
    P,
    q,
    r,
    lo,
    hi,
    time_limit: float = 10.0,
    node_limit: int = 1_000_000,
    z0=None,
) -> ExactResult:
    """Minimise ``z'Pz + 2q'z + r`` over integer ``z`` in ``[lo, hi]`` by branch and bound.

    Args:
        P: ``(n, n)`` symmetric positive semidefinite; q: ``(n,)``; r: scalar; lo, hi: ``(n,)`` or
            scalars, integers with ``lo <= hi``. numpy arrays or tensors, converted to float64.
        time_limit: seconds; the search stops with status ``"time_limit"`` when exceeded.
        node_limit: the search stops with status ``"node_limit"`` after this many nodes.
        z0: optional ``(n,)`` integer start inside the box (polished by 1-opt); without it
            ``one_opt(sequential_rounding)`` is computed.

    Returns:
        :class:`ExactResult`; ``lb <= min f <= ub = f(z)`` always.
    """
    start_time = time.perf_counter()
    P = _as_numpy(P, np.shape(P))
    n = P.shape[0]
    if P.shape != (n, n):
        raise ValueError(f"P must be square, got {P.shape}")
    P = 0.5 * (P + P.T)
    q = _as_numpy(q, (n,))
    lo, hi = _as_numpy(lo, (n,)), _as_numpy(hi, (n,))
    if not (np.array_equal(lo, np.round(lo)) and np.array_equal(hi, np.round(hi))) or (lo > hi).any():
        raise ValueError("lo and hi must be integers with lo <= hi")
    problem = _Problem(P, q, float(r), lo, hi)

    def feasible(z: np.ndarray) -> np.ndarray:
        z = _as_numpy(z, (n,))
        if not np.array_equal(z, np.round(z)) or (z < lo).any() or (z > hi).any():
            raise ValueError("z0 must hold integers inside the box [lo, hi]")
        return z

    candidates = [feasible(z0)] if z0 is not None else [_heuristic_start(P, q, lo, hi)]
    root_x = problem.relax(lo, hi, np.clip(candidates[0], lo, hi))
    candidates.append(np.clip(np.round(root_x), lo, hi))
    best_z, ub = None, math.inf
    for z in candidates:
        z = problem.one_opt(z)
        value = problem.value(z)
        if value < ub:
            best_z, ub = z, value

    # Below this absolute level, differences of f are beyond the resolution of float64 evaluation.
    az = np.abs(best_z)
    resolution = 32.0 * (n + 2) * _EPS * (
        float(az @ problem.absP @ az + 2.0 * (problem.absq @ az)) + abs(problem.r)
    ) + 10.0 * problem.nu * float(((hi - lo) ** 2).sum())

    def prune_level() -> float:
        return ub - max(_PRUNE_RTOL * abs(ub), resolution)

    pruned_min = math.inf  # smallest certified bound of a node pruned against the incumbent
    nodes = 1
    root_bound = problem.certified_bound(lo, hi, root_x)
    heap: list[tuple[float, int, np.ndarray, np.ndarray, np.ndarray]] = []
    counter = 0
    if root_bound < prune_level():
        heap.append((root_bound, counter, lo.copy(), hi.copy(), root_x))
    else:
        pruned_min = root_bound
    status = "optimal"
    while heap:
        if time.perf_counter() - start_time > time_limit:
            status = "time_limit"
            break
        if nodes >= node_limit:
            status = "node_limit"
            break
        bound, _, l, u, x = heapq.heappop(heap)
        if bound >= prune_level():
            pruned_min = min(pruned_min, bound)
            continue
        free = l < u
        if not free.any():  # a leaf: its only point was evaluated (and 1-opt polished) when it was created
            pruned_min = min(pruned_min, problem.value(l))
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
            nodes += 1
            child_bound = max(bound, problem.certified_bound(cl, cu, cx))
            z = np.clip(np.round(cx), cl, cu)
            value = problem.value(z)
            if value < ub:
                z = problem.one_opt(z)
                value = problem.value(z)
                if value < ub:
                    best_z, ub = z, value
            if child_bound < prune_level():
                counter += 1
                heapq.heappush(heap, (child_bound, counter, cl, cu, cx))
            else:
                pruned_min = min(pruned_min, child_bound)
    open_min = min((entry[0] for entry in heap), default=math.inf)
    lb = min(ub, pruned_min, open_min)
    return ExactResult(best_z, float(ub), float(lb), status, nodes, time.perf_counter() - start_time)


def solve_exact_batch(
    problems: QuadraticProblems,
    time_limit: float = 10.0,
    node_limit: int = 1_000_000,
    z0: torch.Tensor | None = None,
) -> list[ExactResult]:
    """:func:`solve_exact` for every problem of ``problems`` (which must have a box), one after another.

    The starting points default to ``one_opt(sequential_rounding)`` computed for the whole batch at
    once. ``time_limit`` and ``node_limit`` apply to each problem.
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
        )
        for b in range(problems.batch_size)
    ]
