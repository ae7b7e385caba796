"""Exhaustive search of the small subtrees of the sparse least-squares branch and bound.

A node of :mod:`pruning.sparse_ls` fixes inputs *in* (``F``) and leaves ``U`` to share the budget
``k'``; when ``C(|U|, k')`` is small its best support is found by enumerating every ``F u P``
(``P`` in ``U``, ``|P| = k'``; using fewer never helps, ``e`` is nonincreasing in the support).

**Schur-complement recursion.** With ``b = G w``, ``r = w'Gw`` and ``x_F = G_FF^+ b_F`` the refit
on ``F``, the residual problem of the node has the Schur complement ``R = G - G_{:F} G_FF^+ G_{F:}``,
the residual correlations ``c = b - G x_F`` and the error ``e(F) = r - b_F' x_F``. Adding one
input ``j`` (pivot ``R_jj > 0``) is a rank-one step:

    e(S + j) = e(S) - c_j^2 / R_jj,   c <- c - R_{:j} c_j / R_jj,   R <- R - R_{:j} R_{j:} / R_jj.

The sets ``P`` are built in increasing input order (lexicographically), level by level, for all
nodes at once; partial sets that cannot reach ``k'`` inputs are dropped, the full matrix ``R`` is
carried only while another full level follows (the last step needs ``c`` and the diagonal of
``R``), so the work is at most ``O(C(|U|, k') n)`` plus ``O(C(|U|, k' - 2) n^2)``.

**Pruning partial sets.** For a certified diagonal split ``G - D`` PSD (``d`` of
:mod:`pruning.perspective_bound`), the Schur complement ``R_AA`` of the still allowed inputs ``A``
satisfies ``R_AA >= D_A`` (it is the Schur complement of ``G - D_A >= G - D >= 0`` plus ``D_A``), so
``c_P' R_PP^-1 c_P <= sum_P c_i^2 / d_i`` and every completion of ``S`` by ``m`` more inputs has

    e >= e(S) - (sum of the m largest c_i^2 / d_i, i in A);

a partial set whose bound (minus ``margin``) reaches the prune level is dropped, the bound
standing for its supports.

**Accuracy.** These values carry first-order rounding errors: by the backward error of the
elimination (a perturbation ``Delta`` of ``G_SS`` with ``||Delta|| <~ n eps ||G_SS||``), the
computed ``e(S)`` is off by about ``n eps cond(G_SS) r <= n eps cond(G) r``. The caller passes
``margin`` >= that (:mod:`pruning.sparse_ls` uses ``32 (n + 2) eps (1 + cond(G)) |w|'|G||w|``;
``inf`` for singular ``G``): every support whose value is within ``margin`` of the node's best
or of the prune level is returned for the exact refit, and the others are represented by their
value minus ``margin``, a lower bound on their true errors.
"""
from __future__ import annotations

import functools
import math

import torch

from pruning.least_squares import masked_pinv

__all__ = ["enumerate_supports", "support_count"]


@functools.cache
def _binomials(n: int) -> torch.Tensor:
    """``C(a, b)`` for ``0 <= a, b <= n`` (float64, 0 where ``b > a``)."""
    return torch.tensor([[math.comb(a, b) for b in range(n + 1)] for a in range(n + 1)], dtype=torch.float64)


def support_count(free: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """``C(|U|, k')`` per node (float64; ``free`` ``(N, n)`` bool, ``budget`` ``(N,)`` in ``[0, n]``)."""
    return _binomials(free.shape[-1])[free.sum(-1), budget]


def _step(R, diagonal, c, e, chosen, allowed, need: int, full: bool):
    """Every one-input extension ``S + j`` (``j`` allowed, after the inputs of ``S``) of every state.

    ``need``: inputs still to add after this one (extensions with fewer allowed inputs left are
    dropped); ``full``: whether ``R`` of the extensions is needed (else only its diagonal).
    Returns the extensions' ``(R, diagonal, c, e, chosen, allowed, state)`` (``state``: the parent).
    """
    n = c.shape[1]
    state, j = torch.nonzero(allowed, as_tuple=True)
    next_allowed = allowed[state] & (torch.arange(n)[None, :] > j[:, None])
    keep = next_allowed.sum(-1) >= need
    state, j, next_allowed = state[keep], j[keep], next_allowed[keep]
    rows = torch.arange(j.numel())
    pivot = diagonal[state, j]
    usable = pivot > 0  # a pivot <= 0 (in the span of S, up to rounding): j adds nothing
    safe = torch.where(usable, pivot, torch.ones_like(pivot))
    cj = c[state, j]
    new_e = e[state] - torch.where(usable, cj * cj / safe, 0.0)
    new_chosen = chosen[state]
    new_chosen[rows, j] = True
    if need == 0:
        return None, None, None, new_e, new_chosen, next_allowed, state
    column = R[state, :, j]  # (M, n)
    ratio = torch.where(usable[:, None], column / safe[:, None], 0.0)
    new_c = torch.addcmul(c[state], ratio, cj[:, None], value=-1.0)
    if full:
        new_R = R[state].addcmul_(ratio[:, :, None], column[:, None, :], value=-1.0)
        return new_R, torch.diagonal(new_R, dim1=-2, dim2=-1), new_c, new_e, new_chosen, next_allowed, state
    new_diagonal = torch.addcmul(diagonal[state], ratio, column, value=-1.0)
    return None, new_diagonal, new_c, new_e, new_chosen, next_allowed, state


def _completion_bound(c, e, allowed, inv_d, need: int) -> torch.Tensor:
    """``e(S) - (sum of the need largest c_i^2 / d_i, i allowed)``: a lower bound on every completion (module doc)."""
    gains = torch.where(allowed, c * c * inv_d, 0.0)
    return e - torch.topk(gains, need, dim=-1).values.sum(-1)


def enumerate_supports(
    G: torch.Tensor,
    b: torch.Tensor,
    r: torch.Tensor,
    d: torch.Tensor,
    forced_in: torch.Tensor,
    free: torch.Tensor,
    budget: int,
    margin: torch.Tensor,
    level: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best supports of nodes with a common budget ``k' >= 1`` (``|U| > k'``), by enumeration (module doc).

    Args:
        G: ``(N, n, n)``; b ``(N, n)``; r ``(N,)``; d ``(N, n)`` a certified diagonal split of
            ``G`` (:mod:`pruning.perspective_bound`; zeros disable the pruning); forced_in, free
            ``(N, n)`` bool (``F``, ``U``).
        budget: ``k'``, the same for every node.
        margin: ``(N,)`` the accuracy of the enumerated values (module doc).
        level: ``(N,)`` the prune level of each node's problem.

    Returns:
        ``(owner, supports, rest)``: the supports to refit exactly, ``(C, n)`` bool, with their node
        ``owner`` ``(C,)``; and ``rest`` ``(N,)``, a lower bound on the errors of the node's other
        supports (``inf`` when there are none).
    """
    N = b.shape[0]
    inverse = masked_pinv(G, forced_in)
    x_f = torch.bmm(inverse, b[..., None])[..., 0]
    R = G - torch.bmm(G, torch.bmm(inverse, G))
    c = b - torch.bmm(G, x_f[..., None])[..., 0]
    e = r - (b * x_f).sum(-1)
    diagonal = torch.diagonal(R, dim1=-2, dim2=-1)
    inv_d = torch.where(d > 0, 1.0 / torch.where(d > 0, d, 1.0), math.inf)
    chosen, allowed = forced_in.clone(), free.clone()
    owner = torch.arange(N)
    rest = torch.full((N,), math.inf, dtype=e.dtype)
    for added in range(budget):
        need = budget - added - 1
        R, diagonal, c, e, chosen, allowed, state = _step(R, diagonal, c, e, chosen, allowed, need, need >= 2)
        owner = owner[state]
        if need:  # drop the partial sets whose completions cannot reach the prune level
            bound = _completion_bound(c, e, allowed, inv_d[owner], need) - margin[owner]
            hopeless = bound >= level[owner]
            if hopeless.any():
                rest.scatter_reduce_(0, owner[hopeless], bound[hopeless], reduce="amin")
                keep = ~hopeless
                R = R[keep] if R is not None else None
                diagonal, c, e, chosen, allowed, owner = (
                    diagonal[keep], c[keep], e[keep], chosen[keep], allowed[keep], owner[keep])
    best = torch.full((N,), math.inf, dtype=e.dtype).scatter_reduce(0, owner, e, reduce="amin")
    cutoff = torch.minimum(level, best + margin)[owner] + margin[owner]
    exact = ~(e >= cutoff)  # also every support when margin is infinite
    rest.scatter_reduce_(0, owner[~exact], (e - margin[owner])[~exact], reduce="amin")
    return owner[exact], chosen[exact], rest
