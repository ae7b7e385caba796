"""Post-training pruning methods for one layer: feasible points of the sparse least-squares problem.

Each output channel is a problem ``min e(x) = (w - x)' G (w - x)`` subject to at most ``k``
nonzeros in ``x`` (see :mod:`pruning.least_squares`). Every method below returns such an ``x``
(batched over problems, float64), so its error is an upper bound on the optimum:

* ``magnitude``: keep the ``k`` largest ``|w_i|``, ``x = w * mask`` (no refit). Among equal
  magnitudes the earlier input is pruned first, as in :mod:`pruning.masks`.
* ``magnitude_refit``: the magnitude support with the least-squares refit ``x_S = G_SS^+ (G w)_S``.
* ``obs``: Optimal Brain Surgeon greedy with error feedback (the OBC / SparseGPT update applied
  one weight at a time): with ``H = G + lambda I`` and ``H^-1`` restricted to the remaining
  inputs, remove the input with the smallest saliency ``x_i^2 / [H^-1]_ii``, update the remaining
  weights by ``x <- x - x_i H^-1 e_i / [H^-1]_ii`` and the inverse by the rank-one downdate
  ``H^-1 <- H^-1 - H^-1 e_i e_i' H^-1 / [H^-1]_ii``, until ``k`` remain. Damping:
  ``lambda = damping * mean(diag G)`` (only to make singular ``G`` invertible; ``1e-6`` by
  default). The returned ``x`` is the exact refit (undamped ``G``) on the final support.
* ``iht``: iterative hard thresholding ``x <- H_k(x - G (x - w) / lambda_max(G))`` (a gradient
  step of length ``1 / Lipschitz`` on ``e``, then keep the ``k`` largest entries), started from
  the magnitude solution, a fixed number of iterations (300); the iterate with the smallest error is
  kept and refit on its support.
* ``swap``: best-improvement local search over supports, started from the best of the above:
  repeatedly replace one kept input ``i`` by one pruned input ``j`` when the refit error
  ``e(S - i + j) = e(S - i) - c_j^2 / s_j`` (``c`` the correlation of the inputs with the
  residual of ``S - i``, ``s_j`` the Schur complement of ``G_jj``; all pairs from rank-one
  downdates, see :func:`swap_search`) is smaller by more than the float64 resolution
  (``1e-12 e + 64 n eps r``), until no swap helps.
"""
from __future__ import annotations

import math

import torch

from pruning.least_squares import as_problems, masked_pinv, reconstruction_error, refit

__all__ = [
    "METHODS",
    "check_budget",
    "hard_threshold",
    "iht_prune",
    "magnitude_prune",
    "magnitude_refit",
    "magnitude_support",
    "obs_prune",
    "pruning_methods",
    "swap_search",
]

METHODS: tuple[str, ...] = ("magnitude", "magnitude_refit", "obs", "iht", "swap")

_IMPROVEMENT_RTOL = 1e-12


def check_budget(k, n: int) -> int:
    """``k`` as an int in ``[0, n]``; ValueError with a clear message otherwise."""
    if isinstance(k, bool) or int(k) != k:
        raise ValueError(f"the number of kept weights k must be an integer, got {k!r}")
    k = int(k)
    if not 0 <= k <= n:
        raise ValueError(f"the number of kept weights k must be in [0, n] = [0, {n}], got {k}")
    return k


def hard_threshold(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest ``|values|`` of every row (ties: the earlier entry is dropped first)."""
    order = torch.sort(values.abs(), dim=-1, stable=True).indices  # ascending: pruned first
    keep = torch.ones_like(values, dtype=torch.bool)
    keep.scatter_(-1, order[..., : values.shape[-1] - k], False)
    return keep


def magnitude_support(weights, k: int) -> torch.Tensor:
    """The ``k`` largest ``|w_i|`` of every problem, ``(B, n)`` bool (``(n,)`` for one problem)."""
    W = torch.as_tensor(weights).to(torch.float64)
    k = check_budget(k, W.shape[-1])
    return hard_threshold(W, k)


def magnitude_prune(weights, k: int) -> torch.Tensor:
    """Magnitude pruning without refit: ``x = w * mask`` with the ``k`` largest ``|w_i|`` kept."""
    W = torch.as_tensor(weights).to(torch.float64)
    return W * magnitude_support(W, k)


def magnitude_refit(gram, weights, k: int) -> torch.Tensor:
    """Magnitude support with the least-squares refit of the kept weights."""
    return refit(gram, weights, magnitude_support(weights, k))


def damped_inverse(G: torch.Tensor, damping: float) -> torch.Tensor:
    """``(G + lam I)^-1`` per problem with ``lam = damping * mean(diag G)`` (``damping`` alone when that mean is 0)."""
    mean_diagonal = torch.diagonal(G, dim1=-2, dim2=-1).mean(-1)
    lam = damping * torch.where(mean_diagonal > 0, mean_diagonal, torch.ones_like(mean_diagonal))
    H = G + lam[:, None, None] * torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    factor, info = torch.linalg.cholesky_ex(H)
    if (info != 0).any():
        raise ValueError("obs_prune: G + damping * mean(diag G) * I is not positive definite (is G PSD?)")
    return torch.cholesky_inverse(factor)


def obs_prune(gram, weights, k: int, damping: float = 1e-6) -> torch.Tensor:
    """Greedy Optimal Brain Surgeon pruning with error feedback, then the exact refit (module doc)."""
    G, W, batched = as_problems(gram, weights)
    n = W.shape[1]
    k = check_budget(k, n)
    if damping <= 0:
        raise ValueError(f"damping must be positive, got {damping}")
    inverse = damped_inverse(G, damping)
    x = W.clone()
    alive = torch.ones_like(W, dtype=torch.bool)
    rows = torch.arange(W.shape[0], device=W.device)
    for _ in range(n - k):
        diagonal = torch.diagonal(inverse, dim1=-2, dim2=-1)
        saliency = torch.where(alive, x * x / diagonal, torch.full_like(x, float("inf")))
        i = torch.argmin(saliency, dim=1)
        column = inverse[rows, :, i]  # (B, n)
        pivot = diagonal[rows, i]
        x = x - (x[rows, i] / pivot)[:, None] * column
        inverse = inverse - column[:, :, None] * column[:, None, :] / pivot[:, None, None]
        alive[rows, i] = False
        x = torch.where(alive, x, torch.zeros((), dtype=x.dtype))
        inverse = torch.where(alive[:, :, None] & alive[:, None, :], inverse, torch.zeros((), dtype=x.dtype))
    result = refit(G, W, alive)
    return result if batched else result[0]


def iht_prune(gram, weights, k: int, iterations: int = 300) -> torch.Tensor:
    """Iterative hard thresholding with step ``1 / lambda_max(G)``, best iterate, then refit (module doc)."""
    G, W, batched = as_problems(gram, weights)
    k = check_budget(k, W.shape[1])
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    lam_max = torch.linalg.eigvalsh(G)[:, -1]
    step = torch.where(lam_max > 0, 1.0 / lam_max.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    mask = hard_threshold(W, k)
    x = W * mask
    gradient = torch.bmm(G, (x - W)[..., None])[..., 0]  # half the gradient of e at x
    best_mask, best_error = mask, ((x - W) * gradient).sum(-1)
    for _ in range(iterations):
        y = x - step[:, None] * gradient
        mask = hard_threshold(y, k)
        x = y * mask
        gradient = torch.bmm(G, (x - W)[..., None])[..., 0]
        error = ((x - W) * gradient).sum(-1)
        better = error < best_error
        best_mask = torch.where(better[:, None], mask, best_mask)
        best_error = torch.where(better, error, best_error)
    result = refit(G, W, best_mask)
    return result if batched else result[0]


def swap_search(gram, weights, support, max_sweeps: int = 100) -> torch.Tensor:
    """Best-improvement swap local search from ``support``; returns the final support (module doc).

    Each sweep scores every swap of a kept input ``i`` and a pruned input ``j`` of every problem at
    once from ``K = G_SS^+``, the refit ``x_S = K b_S``, the residual correlations
    ``c = b - G_{:,S} x_S``, ``P = G_{:,S} K`` and the Schur complements ``s_j = G_jj - (P G_{S,:})_jj``:
    removing ``i`` costs ``x_i^2 / K_ii`` and turns ``c_j`` into ``c_j + x_i P_ji / K_ii`` and ``s_j``
    into ``s_j + P_ji^2 / K_ii`` (rank-one downdates), so ``e(S - i + j) = e(S) + x_i^2 / K_ii -
    (c_j + x_i P_ji / K_ii)^2 / (s_j + P_ji^2 / K_ii)``. The best swap of every problem is refit
    exactly and applied where the error drops by more than the float64 resolution. Stops when no
    problem improves or after ``max_sweeps`` sweeps. The support size is unchanged.
    """
    G, W, batched = as_problems(gram, weights)
    S = torch.as_tensor(support, device=W.device).expand_as(W).clone()
    B, n = W.shape
    b = torch.einsum("bij,bj->bi", G, W)
    r = torch.einsum("bi,bi->b", W, b)
    diagonal = torch.diagonal(G, dim1=-2, dim2=-1)
    counts = S.sum(1)
    if int(counts.min()) != int(counts.max()):
        raise ValueError("swap_search needs supports of equal size")
    k = int(counts[0])
    if k == 0 or k == n:
        return S if batched else S[0]
    tiny = torch.finfo(torch.float64).tiny
    active = torch.ones(B, dtype=torch.bool, device=W.device)
    current = reconstruction_error(G, W, refit(G, W, S))
    for _ in range(max_sweeps):
        idx = torch.nonzero(active).flatten()
        if idx.numel() == 0:
            break
        Gi, bi, Si = G[idx], b[idx], S[idx]
        inverse = masked_pinv(Gi, Si)
        x = torch.bmm(inverse, bi[..., None])[..., 0]
        correlation = bi - torch.bmm(Gi, x[..., None])[..., 0]
        P = torch.bmm(Gi, inverse)  # (A, n, n): column i in S is G K e_i
        schur = diagonal[idx] - (P * Gi).sum(-1)
        pivot = torch.diagonal(inverse, dim1=-2, dim2=-1)  # K_ii, zero outside S
        removable = Si & (pivot > tiny)
        safe_pivot = torch.where(removable, pivot, torch.ones_like(pivot))
        cost = torch.where(removable, x * x / safe_pivot, math.inf)  # (A, n) over i
        ratio = torch.where(removable, x / safe_pivot, 0.0)
        # pairs (j, i): correlations and Schur complements after removing i
        c_ji = correlation[:, :, None] + P * ratio[:, None, :]
        s_ji = schur[:, :, None] + P * P / safe_pivot[:, None, :]
        floor = 1e3 * n * torch.finfo(torch.float64).eps * diagonal[idx][:, :, None]  # j (nearly) in span(S - i)
        usable = (~Si)[:, :, None] & removable[:, None, :] & (s_ji > floor)
        gain = torch.where(usable, c_ji * c_ji / torch.where(usable, s_ji, torch.ones_like(s_ji)), -math.inf)
        change = (cost[:, None, :] - gain).reshape(idx.numel(), n * n)
        best = change.argmin(1)
        j, i = best // n, best % n
        rows = torch.arange(idx.numel())
        candidate = Si.clone()
        candidate[rows, i] = False
        candidate[rows, j] = True
        error = reconstruction_error(Gi, W[idx], refit(Gi, W[idx], candidate))
        tolerance = _IMPROVEMENT_RTOL * current[idx].abs() + 64 * n * torch.finfo(torch.float64).eps * r[idx].abs()
        improves = torch.isfinite(change[rows, best]) & (error < current[idx] - tolerance)
        S[idx[improves]] = candidate[improves]
        current[idx[improves]] = error[improves]
        active[idx[~improves]] = False
    return S if batched else S[0]


def pruning_methods(gram, weights, k: int, iht_iterations: int = 300, damping: float = 1e-6) -> dict[str, torch.Tensor]:
    """All methods of the module doc for every problem: ``{name: x}`` with ``x`` ``(B, n)`` float64.

    The keys are :data:`METHODS` in order; ``swap`` starts from the best of the other four (by the
    exact error) and is refit on its final support.
    """
    G, W, batched = as_problems(gram, weights)
    k = check_budget(k, W.shape[1])
    results = {
        "magnitude": magnitude_prune(W, k),
        "magnitude_refit": magnitude_refit(G, W, k),
        "obs": obs_prune(G, W, k, damping=damping),
        "iht": iht_prune(G, W, k, iterations=iht_iterations),
    }
    errors = torch.stack([reconstruction_error(G, W, x) for x in results.values()])  # (methods, B)
    start = torch.stack(list(results.values()))[errors.argmin(0), torch.arange(W.shape[0])]
    start_support = hard_threshold(start, k) if k < W.shape[1] else torch.ones_like(W, dtype=torch.bool)
    results["swap"] = refit(G, W, swap_search(G, W, start_support))
    return results if batched else {name: x[0] for name, x in results.items()}
