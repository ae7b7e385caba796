"""Sparse least squares as a mixed-integer program in cvxpy, for external solvers (SCIP, Gurobi, MOSEK).

Optional reference backends for :mod:`pruning.sparse_ls` (used by the benchmark and an optional
test); none of them is required. With binaries ``z`` (``z_i = 0`` forces ``x_i = 0``) and
``sum z <= k``, two exact formulations of ``min (w - x)'G(w - x)``:

* ``"bigm"``: ``|x_i| <= M_i z_i`` with ``M_i = |w_i| + sqrt(ub / lambda_min(G))``, where ``ub`` is
  the error of a feasible point (the best heuristic of :mod:`pruning.sparse_ls_heuristics`). It is
  valid: an optimal ``x`` has ``lambda_min ||w - x||^2 <= e(x) <= ub``. It needs a positive
  definite ``G``.
* ``"perspective"``: ``x'(G - D)x + sum_i d_i t_i`` with ``x_i^2 <= t_i z_i`` (rotated cones) for the
  diagonal split ``d`` of :func:`pruning.perspective_bound.diagonal_split`; it needs ``d > 0``
  (a positive definite ``G``).

:func:`available_backends` lists the installed solvers; :func:`solve_mip` returns the solver's
support refit exactly (so its error is comparable with ours) and the status.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from pruning.least_squares import as_problems, reconstruction_error, refit
from pruning.perspective_bound import diagonal_split
from pruning.sparse_ls_heuristics import check_budget, pruning_methods

__all__ = ["BACKENDS", "MipResult", "available_backends", "solve_mip"]

logger = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("SCIP", "GUROBI", "MOSEK")


@dataclass(frozen=True)
class MipResult:
    """A backend's answer for one problem.

    Attributes:
        x: ``(n,)`` the exact refit on the solver's support.
        support: ``(n,)`` bool, the inputs with ``z_i = 1`` (at most ``k``).
        error: ``e(x)``.
        status: ``"optimal"``, ``"time_limit"``, ``"solver_error"`` or the cvxpy status otherwise.
        seconds: wall-clock time including cvxpy's model building.
    """

    x: np.ndarray
    support: np.ndarray
    error: float
    status: str
    seconds: float


def available_backends() -> list[str]:
    """The solvers of :data:`BACKENDS` that cvxpy finds installed (possibly none)."""
    try:
        import cvxpy as cp
    except ImportError:
        return []
    installed = set(cp.installed_solvers())
    return [name for name in BACKENDS if name in installed]


def _solver_options(solver: str, time_limit: float) -> dict:
    """Time limit and an optimality gap of 1e-9 (the defaults of Gurobi and MOSEK are 1e-4)."""
    if solver == "SCIP":
        return {"scip_params": {"limits/time": float(time_limit), "limits/gap": 1e-9}}
    if solver == "GUROBI":
        return {"TimeLimit": float(time_limit), "MIPGap": 1e-9, "OutputFlag": 0}
    if solver == "MOSEK":
        return {"mosek_params": {"MSK_DPAR_OPTIMIZER_MAX_TIME": float(time_limit), "MSK_DPAR_MIO_TOL_REL_GAP": 1e-9}}
    raise ValueError(f"unknown backend {solver!r}; one of {BACKENDS}")


def solve_mip(
    gram,
    weights,
    k: int,
    solver: str = "SCIP",
    formulation: str = "bigm",
    time_limit: float = 60.0,
    upper_bound: float | None = None,
) -> MipResult:
    """Solve one problem with an external MIP solver through cvxpy (module doc).

    Args:
        gram: ``(n, n)`` positive definite Gram matrix.
        weights: ``(n,)`` weights.
        k: kept weights, an integer in ``[0, n]``.
        solver: one of :func:`available_backends`.
        formulation: ``"bigm"`` or ``"perspective"``.
        time_limit: the solver's time limit in seconds.
        upper_bound: the error of a feasible point for the big-M constants (default: the best
            heuristic).

    Raises:
        ValueError: an unavailable solver, an unknown formulation, a ``G`` that is not positive
            definite, a bad ``k``.
    """
    import cvxpy as cp

    if solver not in available_backends():
        raise ValueError(f"backend {solver!r} is not installed; available: {available_backends() or 'none'}")
    if formulation not in ("bigm", "perspective"):
        raise ValueError(f"formulation must be 'bigm' or 'perspective', got {formulation!r}")
    options = _solver_options(solver, time_limit)
    G_t, W_t, batched = as_problems(gram, weights)
    if batched:
        raise ValueError("solve_mip solves one problem: weights must have shape (n,)")
    G = 0.5 * (G_t[0] + G_t[0].T).cpu().numpy()
    w = W_t[0].cpu().numpy()
    n = w.size
    k = check_budget(k, n)
    lam_min = float(np.linalg.eigvalsh(G)[0])
    if not lam_min > 1e3 * n * np.finfo(np.float64).eps * float(np.abs(G).max(initial=0.0)):
        raise ValueError("the MIP formulations need a positive definite Gram matrix")
    start = time.perf_counter()
    x = cp.Variable(n)
    z = cp.Variable(n, boolean=True)
    b = G @ w
    r = float(w @ b)
    constraints = [cp.sum(z) <= k]
    if formulation == "bigm":
        if upper_bound is None:
            candidates = pruning_methods(G, w[None], k)
            upper_bound = min(float(reconstruction_error(G, w, c[0])) for c in candidates.values())
        big_m = np.abs(w) + math.sqrt(max(upper_bound, 0.0) / lam_min)
        values, vectors = np.linalg.eigh(G)
        factor = vectors * np.sqrt(np.clip(values, 0.0, None))
        objective = cp.sum_squares(factor.T @ x) - 2 * b @ x + r
        constraints += [cp.abs(x) <= cp.multiply(big_m, z)]
    else:
        d = diagonal_split(G).numpy()
        values, vectors = np.linalg.eigh(G - np.diag(d))
        factor = vectors * np.sqrt(np.clip(values, 0.0, None))
        t = cp.Variable(n)
        objective = cp.sum_squares(factor.T @ x) - 2 * b @ x + r + d @ t
        constraints += [cp.quad_over_lin(x[i], z[i]) <= t[i] for i in range(n)]
    problem = cp.Problem(cp.Minimize(objective), constraints)
    try:
        problem.solve(solver=solver, **options)
    except cp.error.SolverError as error:
        logger.warning("%s failed: %s", solver, error)
        return MipResult(np.zeros(n), np.zeros(n, dtype=bool), r, "solver_error", time.perf_counter() - start)
    seconds = time.perf_counter() - start
    status = problem.status
    if status == cp.OPTIMAL:
        status = "optimal"
    elif status == cp.OPTIMAL_INACCURATE and seconds >= 0.99 * time_limit:
        status = "time_limit"  # cvxpy reports a time limit with a solution as optimal_inaccurate
    if z.value is None:
        return MipResult(np.zeros(n), np.zeros(n, dtype=bool), r, status, seconds)
    support = np.zeros(n, dtype=bool)
    support[np.argsort(-z.value, kind="stable")[:k]] = True
    support &= z.value > 0.5
    fitted = refit(torch.from_numpy(G), torch.from_numpy(w), torch.from_numpy(support)).numpy()
    error = float(reconstruction_error(G, w, fitted))
    return MipResult(fitted, support, error, status, seconds)
