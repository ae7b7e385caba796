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
``R``), so the work is at most ``O(C(|U|, k') m)`` plus ``O(C(|U|, k' - 2) m^2)``, ``m = |F u U|``: the
matrices are reduced to the inputs of ``F u U`` first.

**Pruning partial sets.** For a certified diagonal split ``G - D`` PSD (``d`` of
:mod:`pruning.perspective_bound`), the Schur complement ``R_AA`` of the still allowed inputs ``A``
satisfies ``R_AA >= D_A`` (it is the Schur complement of ``G - D_A >= G - D >= 0`` plus ``D_A``), so
``c_P' R_PP^-1 c_P <= sum_P c_i^2 / d_i`` and every completion of ``S`` by ``m`` more inputs has

    e >= e(S) - (sum of the m largest c_i^2 / d_i, i in A);

a partial set whose bound (minus ``margin``) reaches the prune level is dropped, the bound
standing for its supports.

**Accuracy (certified).** The recursion is Gaussian elimination, without pivoting, of the
augmented matrix ``M = [[G, b], [b', r]]``: the inputs of ``F`` (in increasing order, the same rank-one
steps) and then those of ``P``; ``e(S)`` is the last pivot. Let ``u = eps / 2``, ``gamma_m = m u / (1 - m u)``,
``t = tr(G_SS)`` (at most the sum of the ``k`` largest ``G_ii``), and ``mu > 0`` a certified lower bound on
``lambda_min`` of the live inputs' ``G`` (:func:`eigenvalue_floors`: half the computed smallest eigenvalue,
checked by :func:`pruning.perspective_bound.verify_split`), so ``lambda_min(G_SS) >= mu`` for every ``S``.

1. *Inputs.* ``b^ = fl(G w)`` and ``r^ = fl(w'b^)`` satisfy ``|b^ - b| <= beta = gamma |G||w|`` and
   ``|r^ - r| <= rho_in = 2 gamma |w|'|G||w|`` (``gamma = gamma_{2n+2}``, covering the rounding of
   ``|G||w|`` itself).
2. *Elimination.* When every pivot is positive, the computed factors are an exact LU factorisation of
   ``M^ + Delta`` with ``|Delta_ij| <= theta sqrt(M^_ii M^_jj)``, ``theta = gamma' / (1 - gamma')``,
   ``gamma' = gamma_{2(n+2)}``: the componentwise backward error of LU (Higham, Thm 9.3; each product here is
   rounded at most twice, hence ``2(n+2)``), and, by Cauchy-Schwarz on the scaled multipliers
   ``R_ij / sqrt(R_jj)`` whose squares sum to at most ``M^_ii / (1 - gamma')`` (the diagonal recursion, as in
   Demmel's bound for Cholesky), the entrywise bound. (It also needs the last pivot ``>= 0``.)
3. *Perturbation, exactly.* With ``x* = G_SS^-1 b_S`` and the left vector ``y`` of the perturbed system
   (``(G_SS + E)' y = b_S + row part of Delta``), ``e^ - e = [-y; 1]' (M^ + Delta - M) [-x*; 1]`` (an
   identity: ``M [-x*; 1] = [0; e]`` and ``[-y; 1]'(M^ + Delta) = [0, e^]``). With ``||E|| <= theta t``, the
   off-diagonal part ``<= eta = theta sqrt(r^ t) + ||beta||``, ``||x*|| <= X = sqrt((r^ + rho_in) / mu)``
   (``x*'G x* <= r``) and ``||y|| <= Y = (X + eta / mu) / (1 - theta t / mu)``:

       |e^(S) - e(S)| <= margin = theta t X Y + eta (X + Y) + theta r^ + rho_in.

4. *Completion bounds.* The computed ``c^_i`` of a partial ``S`` is likewise the exact off-diagonal Schur
   entry of ``M^ + Delta``; with ``z_i = G_SS^-1 G_Si`` (``||z_i|| <= sqrt(G_ii / mu)``) the same identity gives

       |c^_i - c_i| <= deviation_i = sqrt(G_ii) (theta t Y / sqrt(mu) + theta sqrt(t) Y + eta / sqrt(mu)
                                     + theta sqrt(r^)) + beta_i,

   so the completion bound uses ``(|c^_i| + deviation_i)^2 / d_i`` and ``e^(S) - margin``.

``margin`` is infinite when ``mu`` cannot be certified or ``theta t >= mu / 2`` (``G`` singular or nearly
so); every support is then refit exactly. A state with a pivot ``<= 0``, a negative ``e^`` or a negative
computed ``R_ii`` of an allowed input is outside the analysis: its supports are all refit and its partial
sets never dropped. Every support whose value is within ``margin`` of the node's best or of the prune
level is returned for the exact refit; the others are represented by their value minus ``margin``, a
certified lower bound on their true errors.
"""
from __future__ import annotations

import functools
import math

import torch

from pruning.perspective_bound import verify_split

__all__ = ["eigenvalue_floors", "enumerate_supports", "rounding_gamma", "rounding_margins", "support_count"]

_UNIT_ROUNDOFF = torch.finfo(torch.float64).eps / 2


def rounding_gamma(m: int) -> float:
    """``gamma_m = m u / (1 - m u)`` (Higham), ``u`` the float64 unit roundoff."""
    return m * _UNIT_ROUNDOFF / (1.0 - m * _UNIT_ROUNDOFF)


@functools.cache
def _binomials(n: int) -> torch.Tensor:
    """``C(a, b)`` for ``0 <= a, b <= n`` (float64, 0 where ``b > a``)."""
    return torch.tensor([[math.comb(a, b) for b in range(n + 1)] for a in range(n + 1)], dtype=torch.float64)


def support_count(free: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """``C(|U|, k')`` per node (float64; ``free`` ``(N, n)`` bool, ``budget`` ``(N,)`` in ``[0, n]``)."""
    return _binomials(free.shape[-1])[free.sum(-1), budget]


def eigenvalue_floors(G: torch.Tensor, live: torch.Tensor, smallest: torch.Tensor) -> torch.Tensor:
    """A certified ``mu <= lambda_min(G_LL)`` of the live inputs ``L`` of every problem, ``(B,)`` (0 if none).

    ``mu`` is half the computed smallest eigenvalue ``smallest`` ``(B,)`` of ``G_LL``, accepted when
    :func:`pruning.perspective_bound.verify_split` certifies ``G - mu diag(live)`` PSD; a shared
    (expanded) ``G`` with the same live inputs and estimate everywhere is checked once.
    """
    B = G.shape[0]
    shared = (B == 1 or G.stride(0) == 0) and bool((live == live[:1]).all()) and bool((smallest == smallest[0]).all())
    floors = 0.5 * smallest[:1 if shared else B].clone()
    for p in range(floors.numel()):
        if not (floors[p] > 0 and verify_split(G[p], floors[p] * live[p])):
            floors[p] = 0.0
    return floors.expand(B) if shared else floors


def rounding_margins(G: torch.Tensor, b: torch.Tensor, r: torch.Tensor, abs_gw: torch.Tensor, abs_r: torch.Tensor,
                     live: torch.Tensor, k: int, mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(margin (B,), deviation (B, n))``: certified bounds on ``|e^(S) - e(S)|`` for every support of at most
    ``k`` live inputs and on ``|c^_i - c_i|`` of the enumeration (module doc, items 1-4).

    ``G`` ``(B, n, n)``, ``b = fl(G w)``, ``r = fl(w'b)``, ``abs_gw = |G||w|``, ``abs_r = |w|'|G||w|`` as
    computed (:class:`pruning.perspective_bound.NodeBatch`), ``live`` ``(B, n)`` the inputs with
    ``G_ii > 0``, ``mu`` ``(B,)`` from :func:`eigenvalue_floors`. ``margin`` and ``deviation`` are ``inf`` where
    ``mu = 0`` or ``theta t >= mu / 2``.
    """
    n = b.shape[1]
    gamma = rounding_gamma(2 * n + 2)
    theta = rounding_gamma(2 * (n + 2)) / (1.0 - rounding_gamma(2 * (n + 2)))
    diagonal = torch.where(live, torch.diagonal(G, dim1=-2, dim2=-1), 0.0)
    t = torch.topk(diagonal, min(k, n), dim=-1).values.sum(-1)
    beta = gamma * abs_gw
    rho_in = 2.0 * gamma * abs_r
    r_hat = r.clamp_min(0.0)
    eta = theta * torch.sqrt(r_hat * t) + torch.linalg.vector_norm(beta, dim=-1)
    usable = (mu > 0) & (theta * t < 0.5 * mu)
    safe_mu = torch.where(usable, mu, 1.0)
    X = torch.sqrt((r_hat + rho_in) / safe_mu)
    Y = (X + eta / safe_mu) / (1.0 - theta * t / safe_mu)
    margin = theta * t * X * Y + eta * (X + Y) + theta * r_hat + rho_in
    per_root = (theta * t * Y + eta) / torch.sqrt(safe_mu) + theta * torch.sqrt(t) * Y + theta * torch.sqrt(r_hat)
    deviation = torch.sqrt(diagonal) * per_root[:, None] + beta
    # a little above the bounds: they are evaluated in floating point themselves
    margin = torch.where(usable, margin * (1.0 + 1e-6), math.inf)
    deviation = torch.where(usable[:, None], deviation * (1.0 + 1e-6), math.inf)
    return margin, deviation


def _rank_one(column: torch.Tensor, cj: torch.Tensor, j: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(usable, ratio, gain)`` of the rank-one step on input ``j`` (module doc) from the column ``R_{:j}`` ``(M, n)``
    and ``c_j``: ``ratio = R_{:j} / R_jj``, ``gain = c_j^2 / R_jj``; a pivot ``R_jj <= 0`` (``j`` in the span of
    ``S``, up to rounding) is not ``usable``: ``j`` then adds nothing (ratio and gain 0)."""
    pivot = column.gather(1, j[:, None])[:, 0]
    usable = pivot > 0
    safe = torch.where(usable, pivot, 1.0)
    ratio = torch.where(usable[:, None], column / safe[:, None], 0.0)
    return usable, ratio, torch.where(usable, cj * cj / safe, 0.0)


def _rows(index: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows ``index`` of every tensor (``index_select``: several times faster than indexing on the CPU)."""
    return tuple(tensor.index_select(0, index) for tensor in tensors)


def _extensions(chosen: torch.Tensor, allowed: torch.Tensor, need: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every one-input extension ``S + j`` (``j`` allowed, after the inputs of ``S``) of every state that leaves at
    least ``need`` allowed inputs: their ``(state, j, chosen, allowed)`` (``state``: the parent)."""
    n = allowed.shape[1]
    state, j = torch.nonzero(allowed, as_tuple=True)
    next_allowed = allowed.index_select(0, state) & (torch.arange(n)[None, :] > j[:, None])
    keep = torch.nonzero(next_allowed.sum(-1) >= need).flatten()
    state, j, next_allowed = _rows(keep, state, j, next_allowed)
    next_chosen = chosen.index_select(0, state)
    next_chosen[torch.arange(j.numel()), j] = True
    return state, j, next_chosen, next_allowed


def _eliminate(R, diagonal, c, e, certain, state, j):
    """The rank-one step on input ``j`` of the states ``state``: their ``(diagonal, c, e, certain)``, and the step's
    ``(ratio, column)`` that update ``R`` (:func:`_updated`). A pivot ``<= 0`` or a negative ``e`` makes the state
    uncertain (module doc)."""
    c, diagonal, e, certain = _rows(state, c, diagonal, e, certain)
    column = R[state, :, j]
    cj = c.gather(1, j[:, None])[:, 0]
    usable, ratio, gain = _rank_one(column, cj, j)
    e = e - gain
    certain = certain & usable & (e >= 0)
    c.addcmul_(ratio, cj[:, None], value=-1.0)
    diagonal.addcmul_(ratio, column, value=-1.0)
    return diagonal, c, e, certain, ratio, column


def _updated(R: torch.Tensor, state: torch.Tensor, ratio: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """``R`` of the states ``state`` after their rank-one steps ``(ratio, column)`` of :func:`_eliminate`."""
    return R.index_select(0, state).addcmul_(ratio[:, :, None], column[:, None, :], value=-1.0)


def _last_errors(diagonal, c, e, certain, state, j) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e, certain)`` of the states ``state`` after the rank-one step on ``j`` (no ``R`` or ``c`` needed after it)."""
    flat = state * c.shape[1] + j
    cj, pivot = c.reshape(-1).index_select(0, flat), diagonal.reshape(-1).index_select(0, flat)
    e, certain = _rows(state, e, certain)
    usable = pivot > 0
    e = e - torch.where(usable, cj * cj / torch.where(usable, pivot, 1.0), 0.0)
    return e, certain & usable & (e >= 0)


def _completion_bound(c, e, diagonal, allowed, inv_d, deviation, need: int) -> torch.Tensor:
    """``e^(S) - (sum of the need largest (|c^_i| + deviation_i)^2 / d_i, i allowed)`` (module doc, item 4);
    ``-inf`` where an allowed input has a negative computed ``R_ii`` (outside the analysis)."""
    gains = torch.where(allowed, (c.abs() + deviation).square() * inv_d, 0.0)
    gains = torch.where(allowed & (diagonal < 0), math.inf, gains)
    return e - (gains.amax(-1) if need == 1 else torch.topk(gains, need, dim=-1).values.sum(-1))  # amax: far faster


def enumerate_supports(
    G: torch.Tensor,
    b: torch.Tensor,
    r: torch.Tensor,
    d: torch.Tensor,
    forced_in: torch.Tensor,
    free: torch.Tensor,
    budget: int,
    margin: torch.Tensor,
    deviation: torch.Tensor,
    level: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best supports of nodes with a common budget ``k' >= 1`` (``|U| > k'``) and a common ``|F|``, by
    enumeration (module doc).

    Args:
        G: ``(N, n, n)``; b ``(N, n)``; r ``(N,)``; d ``(N, n)`` a certified diagonal split of
            ``G`` (:mod:`pruning.perspective_bound`; zeros disable the pruning); forced_in, free
            ``(N, n)`` bool (``F``, ``U``).
        budget: ``k'``, the same for every node.
        margin, deviation: ``(N,)`` and ``(N, n)``, the accuracy of the enumerated values and residual
            correlations (:func:`rounding_margins`).
        level: ``(N,)`` the prune level of each node's problem.

    Returns:
        ``(owner, supports, rest)``: the supports to refit exactly, ``(C, n)`` bool, with their node
        ``owner`` ``(C,)``; and ``rest`` ``(N,)``, a certified lower bound on the errors of the node's
        other supports (``inf`` when there are none).
    """
    N, n = b.shape
    # each node's inputs of F u U in increasing order, padded with its other inputs (never pivots nor allowed):
    # the elimination computes every entry it keeps exactly as on the whole matrix, on fewer entries
    live = forced_in | free
    width = int(live.sum(-1).amax()) if N else n
    columns = torch.sort((~live).to(torch.int8), dim=-1, stable=True).indices[:, :width]
    R = G.gather(1, columns[:, :, None].expand(N, width, n)).gather(2, columns[:, None, :].expand(N, width, width))
    c, d, deviation, forced_in, free = (tensor.gather(1, columns) for tensor in (b, d, deviation, forced_in, free))
    e = r.clone()
    certain = torch.ones(N, dtype=torch.bool)
    nodes = torch.arange(N)
    order = torch.sort(forced_in.to(torch.int8), dim=-1, descending=True, stable=True).indices
    for step in range(int(forced_in[0].sum()) if N else 0):  # F first, in increasing order (same |F| everywhere)
        j = order[:, step]  # the rank-one steps of _eliminate, in place
        column, cj = R[nodes, :, j], c[nodes, j]
        usable, ratio, gain = _rank_one(column, cj, j)
        e = e - gain
        certain &= usable & (e >= 0)
        c.addcmul_(ratio, cj[:, None], value=-1.0)
        R.addcmul_(ratio[:, :, None], column[:, None, :], value=-1.0)
    diagonal = torch.diagonal(R, dim1=-2, dim2=-1)
    inv_d = torch.where(d > 0, 1.0 / torch.where(d > 0, d, 1.0), math.inf)
    chosen, allowed = forced_in.clone(), free.clone()
    owner = torch.arange(N)
    rest = torch.full((N,), math.inf, dtype=e.dtype)
    prunable = bool((d > 0).any()) and bool(torch.isfinite(level).any())  # else no completion bound reaches a level
    for added in range(budget - 1):
        need = budget - added - 1
        state, j, chosen, allowed = _extensions(chosen, allowed, need)
        diagonal, c, e, certain, ratio, column = _eliminate(R, diagonal, c, e, certain, state, j)
        owner = owner.index_select(0, state)
        if prunable:  # drop the partial sets whose completions cannot reach the prune level
            deviations, margins, levels = _rows(owner, deviation, margin, level)
            bound = _completion_bound(c, e, diagonal, allowed, inv_d.index_select(0, owner), deviations, need) - margins
            hopeless = certain & (bound >= levels)
            if hopeless.any():
                rest.scatter_reduce_(0, owner, torch.where(hopeless, bound, math.inf), reduce="amin")
                keep = torch.nonzero(~hopeless).flatten()
                state, ratio, column, diagonal, c, e, certain, chosen, allowed, owner = _rows(
                    keep, state, ratio, column, diagonal, c, e, certain, chosen, allowed, owner)
        R = _updated(R, state, ratio, column) if need >= 2 else None  # the full R only while another full level follows
    # the last input: the errors of every support; the masks are built only for the supports returned
    state, j = torch.nonzero(allowed, as_tuple=True)
    e, certain = _last_errors(diagonal, c, e, certain, state, j)
    owner = owner.index_select(0, state)
    margins = margin.index_select(0, owner)
    best = torch.full((N,), math.inf, dtype=e.dtype).scatter_reduce(0, owner, e, reduce="amin")
    cutoff = torch.minimum(level, best + margin).index_select(0, owner) + margins
    exact = ~(e >= cutoff) | ~certain  # also every support when margin is infinite
    rest.scatter_reduce_(0, owner, torch.where(exact, math.inf, e - margins), reduce="amin")
    returned = torch.nonzero(exact).flatten()
    owner = owner.index_select(0, returned)
    supports = chosen.index_select(0, state.index_select(0, returned))
    supports[torch.arange(returned.numel()), j.index_select(0, returned)] = True
    return owner, torch.zeros(returned.numel(), n, dtype=torch.bool).scatter_(1, columns.index_select(0, owner),
                                                                             supports), rest
