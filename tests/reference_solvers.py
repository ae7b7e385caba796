"""Reference solvers kept for tests and benches, not used by production code.

* :func:`solve_exact_box`: the previous exact solver of :mod:`quantization.qp_exact`, best-first branch
  and bound on box relaxations, an independent search to check the ellipsoid search against (tests)
  and to time it against (``bench/bench_qp_exact.py --box``, which imports it from here).
* :func:`adaround_loss`: AdaRound's loss, whose autograd gradient checks the closed-form gradient
  that :func:`quantization.ptq_rounding.adaround` uses.

**The box search.** Best-first branch and bound on the box relaxation ``min f(x), x in [l, u]``
solved by projected Newton (``qp_exact._box_minimiser``), certified by the Frank-Wolfe bound

    f(x) + sum_i min(g_i (l_i - x_i), g_i (u_i - x_i)) - nu sum_i max(x_i - l_i, u_i - x_i)^2

(``g = 2(Px + q)``, ``nu = max(0, n eps ||P||_F - lam_min(P))``) minus a rounding margin ``8 n eps
(|x|'|P||x| + 2|q|'|x| + |r| + 2(|P||x| + |q|)'(u - l))``; branching on the free variable maximising
``P_ii frac (1 - frac)``; children bounded when created, pruned against the incumbent, the rounded
relaxed point of each child tried as an incumbent (polished by 1-opt). The start, the incumbent and
the tolerance are those of :func:`quantization.qp_exact.solve_exact`; the tolerance adds
``10 nu ||hi - lo||^2`` to the resolution. ``nodes`` counts the relaxations solved (each ~100x
dearer than a node of the ellipsoid search).
"""
from __future__ import annotations

import heapq
import math
import time

import numpy as np
import torch

from quantization import qp_exact
from quantization.ptq_rounding import rectified_sigmoid
from quantization.qp_bounds import qp_objective
from quantization.qp_exact import DEFAULT_NODE_LIMIT
from utils.branch_and_bound import BranchAndBoundResult

# --------------------------------------------------------------------------- the box search


class _BoxRelaxation:
    """One problem with the constants of the certified box-relaxation bound (module doc)."""

    def __init__(self, P: np.ndarray, q: np.ndarray, r: float, lo: np.ndarray, hi: np.ndarray) -> None:
        self.P, self.q, self.r, self.lo, self.hi = P, q, float(r), lo, hi
        self.n = q.shape[0]
        self.absP, self.absq = np.abs(P), np.abs(q)
        self.diag = np.diag(P).copy()
        norm = float(np.linalg.norm(P))
        lam_min = float(np.linalg.eigvalsh(P)[0]) if self.n else 0.0
        # eigvalsh is backward stable: the true lam_min is >= the computed one - n eps ||P||_F.
        self.nu = max(0.0, self.n * qp_exact._EPS * norm - lam_min)

    def relax(self, l: np.ndarray, u: np.ndarray, x: np.ndarray) -> np.ndarray:
        """An approximate minimiser of ``f`` over ``[l, u]`` (``qp_exact._box_minimiser`` from ``x``)."""
        return qp_exact._box_minimiser(self.P, self.q, self.r, l, u, x)

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
        margin = 8.0 * (self.n + 2) * qp_exact._EPS * magnitude
        return value + linear - curvature - margin


def _box_branch_and_bound(
    problem: _BoxRelaxation, search: qp_exact._Search, tolerance: float, deadline: float | None, node_limit: int
) -> tuple[str, float]:
    """Best-first branch and bound on box relaxations; updates ``search``; returns ``(status, lb)``."""
    lo, hi = problem.lo, problem.hi
    tolerance = tolerance + 10.0 * problem.nu * float(((hi - lo) ** 2).sum())

    def prune_level() -> float:
        return search.ub - max(qp_exact._PRUNE_RTOL * abs(search.ub), tolerance)

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
        if search.nodes >= node_limit:
            status = "node_limit"
            break
        if deadline is not None and time.perf_counter() > deadline:
            status = "time_limit"
            break
        bound, _, l, u, x = heapq.heappop(heap)
        if bound >= prune_level():
            pruned_min = min(pruned_min, bound)
            continue
        free = l < u
        if not free.any():  # a leaf: its only point was evaluated (and 1-opt polished) when it was created
            pruned_min = min(pruned_min, qp_exact._objective(problem.P, problem.q, problem.r, l))
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
            value = qp_exact._objective(problem.P, problem.q, problem.r, z)
            if value < search.ub:
                z = qp_exact._one_opt(problem.P, problem.q, lo, hi, z)
                value = qp_exact._objective(problem.P, problem.q, problem.r, z)
                if value < search.ub:
                    search.best_z, search.ub = z, value
            if child_bound < prune_level():
                counter += 1
                heapq.heappush(heap, (child_bound, counter, cl, cu, cx))
            else:
                pruned_min = min(pruned_min, child_bound)
    open_min = min((entry[0] for entry in heap), default=math.inf)
    return status, min(search.ub, pruned_min, open_min)


def solve_exact_box(
    P, q, r, lo, hi, time_limit: float | None = None, node_limit: int = DEFAULT_NODE_LIMIT, z0=None
) -> BranchAndBoundResult:
    """:func:`quantization.qp_exact.solve_exact` with the box search instead of the ellipsoid search (module doc).

    Same arguments (without ``multipliers`` and ``basis``) and the same result contract:
    ``lb <= min f <= ub = f(z)``, ``"optimal"`` when the tree is exhausted.
    """
    start_time = time.perf_counter()
    if time_limit is not None and not time_limit >= 0:
        raise ValueError(f"time_limit must be None or >= 0, got {time_limit}")
    P, q, r, lo, hi, search, tolerance = qp_exact._prepare_search(P, q, r, lo, hi, z0)
    deadline = None if time_limit is None else start_time + time_limit
    status, lb = _box_branch_and_bound(_BoxRelaxation(P, q, r, lo, hi), search, tolerance, deadline, node_limit)
    lb = min(lb, search.ub)
    seconds = time.perf_counter() - start_time
    return BranchAndBoundResult(search.best_z, float(search.ub), float(lb), status, search.nodes, seconds)


# --------------------------------------------------------------------------- AdaRound's loss for autograd


def adaround_loss(
    P: torch.Tensor,
    q: torch.Tensor,
    r: torch.Tensor,
    v: torch.Tensor,
    floor: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    scale: torch.Tensor,
    reg_weight: float,
    beta: float | None,
) -> torch.Tensor:
    """AdaRound's loss summed over the problems, a scalar differentiable in ``v`` (autograd gives the
    reference for :func:`quantization.ptq_rounding.adaround_gradient`):

        L(V) = sum_b f_b(clamp(floor + h(V), lo, hi)) / scale_b + reg_weight * sum_i (1 - |2 h_i - 1|^beta).
    """
    h = rectified_sigmoid(v)
    z = torch.clamp(floor + h, lo, hi)
    loss = (qp_objective(P, q, r, z) / scale).sum()
    if beta is not None:
        loss = loss + reg_weight * (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()
    return loss
