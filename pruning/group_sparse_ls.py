"""Group-sparse least squares with several right-hand sides: the best 1xN block pruning of one block row.

**The problem.** A block row of a layer (1xN pruning, Lin et al., TPAMI 2022, :mod:`pruning.block_masks`)
is ``N`` consecutive output channels; within an input chunk they have weights ``w_1 .. w_N`` (``n``
inputs each) and share the chunk's Gram matrix ``G = A'A`` (``n x n``, PSD, float64, possibly
singular). The inputs form ``m = n / g`` groups of ``g`` consecutive inputs (one input channel x its
``k x k`` kernel, ``g = k^2``); a 1xN block is one group of the ``N`` channels. Keeping the blocks of a
set ``S`` of ``K`` groups (the same for the ``N`` channels) and refitting them:

    minimise  E(X) = sum_c (w_c - x_c)' G (w_c - x_c)   over X with every x_c zero outside I(S), |S| <= K,

``I(S)`` the inputs of the groups of ``S``. For a fixed ``S`` the minimum is every channel's
least-squares refit ``x_c = G_II^+ b_c,I`` (``b_c = G w_c``, :func:`block_refit`):

    E(S) = sum_c [ w_c' G w_c - b_c,I' G_II^+ b_c,I ],

so the optimum is the least ``E(S)`` over the ``C(m, K)`` supports. With ``N = 1`` and ``g = 1`` this
is the unstructured problem of :mod:`pruning.sparse_ls`. Arrays: ``gram`` ``(B, n, n)`` (or
``(n, n)``, shared), ``weights`` ``(B, N, n)`` (a block row with fewer channels is padded with zero
rows, which cost nothing), points ``x`` ``(B, N, n)``, group supports ``(B, m)`` bool. Float64 on the
CPU.

**Methods** (feasible points, upper bounds on the optimum; :data:`METHODS`):

* ``magnitude``: the 1xN mask of :mod:`pruning.block_masks` inside the problem: the ``m - K`` blocks
  of least L1 norm ``sum_c sum_{i in group} |w_ci|`` pruned (ties: the earlier group first), no refit;
* ``magnitude_refit``: the same blocks, refit;
* ``obs``: group Optimal Brain Surgeon, backward greedy: with ``H = G + lambda I`` (the damping of
  :func:`pruning.sparse_ls_heuristics.obs_prune`) and ``H^-1`` of the remaining inputs, remove the
  group ``I`` of least ``sum_c x_c,I' [H^-1]_II^-1 x_c,I`` (the exact increase of the damped error),
  update ``x_c <- x_c - [H^-1]_:I [H^-1]_II^-1 x_c,I`` and ``H^-1 <- H^-1 - [H^-1]_:I [H^-1]_II^-1
  [H^-1]_I:``; the final support is refit exactly;
* ``swap``: best-improvement local search over supports from the best of the three
  (:func:`block_swap_search`, the group form of :func:`pruning.sparse_ls_heuristics.swap_search`).

**Certified lower bounds.**

* Unstructured (:func:`unstructured_lower_bound`): a feasible ``X`` keeps at most ``K g`` weights of
  every channel, so ``E(X) >= sum_c min{ (w_c - x)' G (w_c - x) : ||x||_0 <= K g }``; each term is
  bounded below by the perspective relaxation of :func:`pruning.perspective_bound.lower_bound`.
* Group perspective relaxation (:func:`block_lower_bound`). With the certified diagonal split ``d``
  of :func:`pruning.perspective_bound.diagonal_split` (``G - D`` PSD) and one indicator ``z_h`` per
  group ``h``, relaxing ``z`` to ``0 <= z <= 1, sum z <= K'`` (groups forced in: ``z = 1``) gives

      R = min_{X, z} sum_c [x_c'(G - D)x_c - 2 b_c'x_c + r_c] + sum_h sum_{i in h} d_i sum_c x_ci^2 / z_h,

  at least the sum of the channels' unstructured relaxations at ``K g`` (a group point is an
  unstructured one with ``z_i = z_h(i)``). Its dual, for *any* ``V`` (``N x n``, zero outside the
  allowed inputs), with ``s_c = b_c - (G - D) v_c`` and ``q_h = sum_{i in h} sum_c s_ci^2 / d_i``:

      phi(V) = sum_c [r_c - v_c'(G - D) v_c] - sum_{h forced} q_h - (sum of the K' largest q_h, h free) <= R,

  the proof of :mod:`pruning.perspective_bound` with the ``N g`` perspective terms of a group sharing
  one ``z_h``. The bound reported is ``phi(V) - margin``: the channels' rounding margins of
  :func:`pruning.perspective_bound.dual_value_margin` (inputs with ``d_i = 0``: the same
  stationarity assumption as there) plus ``2 (N n + 2) eps`` times the sums over the channels.
  ``V`` comes from alternating minimisation of the relaxation: for fixed ``z`` the minimiser in
  ``X`` is the ridge solution ``(G - D + D Z^-1) x_c = b_c`` (``Z = diag(z_h(i))``, 1 on forced inputs
  and where ``d_i = 0``), solved well conditioned as ``x_c = Z^1/2 y_c``, ``(Z^1/2 (G - D) Z^1/2 + D)
  y_c = Z^1/2 b_c`` (``z_h = 0`` gives ``x = 0`` there), and for fixed ``X`` the minimiser in ``z`` is the capped-simplex (squared
  ``K'``-support norm) solution ``z_h = min(1, u_h / tau)`` of the group norms ``u_h =
  sqrt(sum_{i in h} d_i sum_c x_ci^2)`` (:func:`pruning.perspective_bound.relaxed_indicators`); the
  best ``phi`` over the iterates is kept. With ``N = g = 1`` it is the relaxation of
  :mod:`pruning.perspective_bound`, solved less precisely.

**Exact solver** (:func:`solve_block_exact_batch`): branch and bound over groups, the problems of a
batch searched in lockstep (64 nodes a round) as in :mod:`pruning.sparse_ls` (whose search state it
reuses). A node fixes groups in (``F``) and out and leaves ``U`` to share ``K' = K - |F|``. A node
with at most :data:`ENUMERATION_SUPPORTS` supports ``C(|U|, K')`` is enumerated: every support's
``E(S) = sum_c r_c - sum_c b_c,I' G_II^-1 b_c,I`` from a Cholesky factor of its own ``G_II``; as in
:mod:`pruning.support_enumeration`, the supports within ``margin`` of the node's best (or of the prune
level; all of them when ``G`` is singular or nearly so) are refit exactly and the others stand for their
value minus ``margin``, a certified bound on the rounding of the Cholesky solves
(:func:`enumeration_margins`). The root of a small chunk (e.g. 3 input channels of a
3x3 conv, or 16 of a 1x1 conv keeping 8) is solved this way. Otherwise the node's bound is the group
relaxation (``ROOT_ITERATIONS`` alternating steps at the root, up to ``NODE_ITERATIONS`` from the
parent's ``z`` below, stopping once the node can be pruned), raised to the parent's; its rounding
(``F`` plus the ``K'`` largest ``z_h`` of ``U``) is refit as a candidate, and it branches on the
group of ``U`` with the most fractional ``z_h``. Nodes are explored best-first and pruned at
``ub - max(1e-10 |ub|, resolution)``, ``resolution = 32 (N n + 2) eps sum_c |w_c|'|G||w_c|``.
Groups whose inputs all have ``G_ii = 0`` change nothing and are pruned for free. The incumbent
starts from ``swap`` (or a given support). The limit is a count of nodes
(:data:`DEFAULT_NODE_LIMIT`; an enumerated node is one), so results do not depend on the machine's
speed; ``time_limit`` optionally adds wall-clock seconds. As in :mod:`pruning.sparse_ls`, exact
refit errors are taken as exact: ``optimal`` means optimal up to the float64 accuracy of a refit.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import time

import numpy as np
import torch
from tqdm import tqdm

from pruning.block_masks import block_scores
from pruning.least_squares import masked_pinv
from pruning.perspective_bound import (
    NodeBatch,
    dual_value_margin,
    lower_bound,
    problem_splits,
    relaxed_indicators,
    top_sum,
)
from pruning.sparse_ls import SupportSearch, live_eigenvalues
from pruning.sparse_ls_heuristics import check_budget, damped_inverse, hard_threshold
from pruning.support_enumeration import eigenvalue_floors, rounding_gamma
from utils.branch_and_bound import BranchAndBoundResult

__all__ = [
    "DEFAULT_NODE_LIMIT",
    "ENUMERATION_SUPPORTS",
    "METHODS",
    "as_block_problems",
    "block_error",
    "block_lower_bound",
    "block_magnitude_prune",
    "block_magnitude_refit",
    "block_magnitude_support",
    "block_obs_prune",
    "block_pruning_methods",
    "block_refit",
    "block_support",
    "block_swap_search",
    "group_inputs",
    "solve_block_exact_batch",
    "torch_threads",
    "unstructured_lower_bound",
]

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("magnitude", "magnitude_refit", "obs", "swap")
DEFAULT_NODE_LIMIT = 20_000
ENUMERATION_SUPPORTS = 4096  # nodes with at most this many supports C(|U|, K') are enumerated
ROOT_ITERATIONS = 60
NODE_ITERATIONS = 12

_EPS = float(np.finfo(np.float64).eps)
_IMPROVEMENT_RTOL = 1e-12
_STALL_RTOL = 1e-7  # the alternating minimisation stops when no node's dual value improves by more (relative)
_ROUND_NODES = 64
_SLICE_ELEMENTS = 4_000_000  # float64 entries of the largest temporary of a swap sweep, per slice of problems
_REFIT_SLICE = 2048
_ENUMERATION_SLICE = 16384


# --------------------------------------------------------------------------- problems, refit, error


def as_block_problems(gram, weights, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, W)``: ``G`` ``(B, n, n)`` (symmetrised; an ``(n, n)`` one expanded) and ``W`` ``(B, N, n)``, float64 CPU.

    Raises ValueError for shapes that do not fit, ``n`` not a multiple of ``group_size`` or non-finite weights.
    """
    W = torch.as_tensor(weights).to(device="cpu", dtype=torch.float64)
    G = torch.as_tensor(gram).to(device="cpu", dtype=torch.float64)
    if W.dim() != 3:
        raise ValueError(f"weights must have shape (B, N, n), got {tuple(W.shape)}")
    B, _, n = W.shape
    if G.dim() == 2:
        G = G.expand(B, n, n)
    if G.shape != (B, n, n):
        raise ValueError(f"gram of shape {tuple(G.shape)} does not fit weights of shape {tuple(W.shape)}")
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} inputs cannot be split into groups of {group_size}")
    if not torch.isfinite(W).all() or not torch.isfinite(G).all():
        raise ValueError("the weights or the Gram matrix have non-finite entries")
    return 0.5 * (G + G.transpose(1, 2)), W


def group_inputs(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """The input mask ``(..., m g)`` of a group mask ``(..., m)``: every group's ``g`` consecutive inputs."""
    return groups.repeat_interleave(group_size, dim=-1)


def block_error(gram: torch.Tensor, weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``E(X) = sum_c (w_c - x_c)' G (w_c - x_c)``: ``(B,)`` from ``G`` ``(B, n, n)``, ``W`` and ``X`` ``(B, N, n)``."""
    delta = weights - x
    return torch.einsum("bci,bij,bcj->b", delta, gram, delta)


def block_refit(gram: torch.Tensor, weights: torch.Tensor, support: torch.Tensor, group_size: int) -> torch.Tensor:
    """The refit ``x_c = G_II^+ b_c,I`` of every channel on the inputs ``I`` of the kept groups ``support`` ``(B, m)``.

    ``G_II^+`` from :func:`pruning.least_squares.masked_pinv` (the minimum-norm solution when singular).
    """
    inverse = masked_pinv(gram, group_inputs(support, group_size))
    return torch.einsum("bij,bjk,bck->bci", inverse, gram, weights)


def _refit_errors(gram, weights, support, group_size) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_error` of :func:`block_refit` and its float64 resolution ``64 (N n + 2) eps sum_c
    (|w_c| + |x_c|)'|G|(|w_c| + |x_c|)``, in slices of problems (bounded memory); ``(B,)`` each."""
    errors, resolutions = [], []
    for s in _slices(support.shape[0], _REFIT_SLICE):
        G, W = gram[s], weights[s]
        x = block_refit(G, W, support[s], group_size)
        errors.append(block_error(G, W, x))
        size = W.abs() + x.abs()
        resolutions.append(64 * (W.shape[1] * W.shape[2] + 2) * _EPS
                           * torch.einsum("bci,bij,bcj->b", size, G.abs(), size))
    if not errors:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    return torch.cat(errors), torch.cat(resolutions)


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's CPU threads set to ``threads`` inside the block (None: unchanged), restored afterwards.

    These small batched problems run fastest on one thread, and far faster than on several on a loaded machine.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _slices(total: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, total)) for start in range(0, total, max(1, size))]


# --------------------------------------------------------------------------- methods


def block_magnitude_support(weights: torch.Tensor, group_size: int, kept: int) -> torch.Tensor:
    """The 1xN blocks kept by magnitude: the ``kept`` groups of largest L1 norm over the ``N`` channels, ``(B, m)``.

    The scores are :func:`pruning.block_masks.block_scores` of each problem's ``N`` channels, the
    selection :func:`pruning.sparse_ls_heuristics.hard_threshold` (ties: the earlier group pruned first,
    the rule of :func:`pruning.block_masks.one_by_n_mask`).
    """
    B, N, n = weights.shape
    m = n // group_size
    kept = check_budget(kept, m)
    scores = block_scores(weights.reshape(B * N, m, group_size), N)
    return hard_threshold(scores, kept)


def block_magnitude_prune(weights: torch.Tensor, group_size: int, kept: int) -> torch.Tensor:
    """1xN magnitude pruning without refit: ``x_c = w_c`` on the kept blocks, 0 elsewhere."""
    return weights * group_inputs(block_magnitude_support(weights, group_size, kept), group_size)[:, None, :]


def block_magnitude_refit(gram: torch.Tensor, weights: torch.Tensor, group_size: int, kept: int) -> torch.Tensor:
    """The 1xN magnitude blocks with the least-squares refit."""
    return block_refit(gram, weights, block_magnitude_support(weights, group_size, kept), group_size)


def _diagonal_blocks(matrix: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(B, m, g, g)``: the ``g x g`` diagonal blocks of ``(B, n, n)`` matrices."""
    B, n, _ = matrix.shape
    m = n // group_size
    return matrix.reshape(B, m, group_size, m, group_size).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)


def block_obs_prune(gram: torch.Tensor, weights: torch.Tensor, group_size: int, kept: int,
                    damping: float = 1e-6) -> torch.Tensor:
    """Group OBS backward greedy (module doc), then the exact refit on its support; ``(B, N, n)``."""
    B, N, n = weights.shape
    g = group_size
    m = n // g
    kept = check_budget(kept, m)
    if damping <= 0:
        raise ValueError(f"damping must be positive, got {damping}")
    inverse = damped_inverse(gram, damping)
    x = weights.clone()
    alive = torch.ones(B, m, dtype=torch.bool)
    rows = torch.arange(B)
    eye = torch.eye(g, dtype=torch.float64)
    offsets = torch.arange(g)
    for _ in range(m - kept):
        blocks = torch.where(alive[:, :, None, None], _diagonal_blocks(inverse, g), eye)
        block_inverse = torch.linalg.inv(blocks)
        xg = x.reshape(B, N, m, g)
        saliency = torch.einsum("bcmg,bmgh,bcmh->bm", xg, block_inverse, xg)
        h = torch.where(alive, saliency, math.inf).argmin(1)
        index = h[:, None] * g + offsets  # (B, g): the removed inputs
        columns = inverse.gather(2, index[:, None, :].expand(B, n, g))  # [H^-1]_:I
        pivot = block_inverse[rows, h]  # [H^-1]_II^-1
        x_removed = x.gather(2, index[:, None, :].expand(B, N, g))
        x = x - torch.einsum("bng,bgh,bch->bcn", columns, pivot, x_removed)
        inverse = inverse - torch.einsum("bng,bgh,bkh->bnk", columns, pivot, columns)
        alive[rows, h] = False
        inputs = group_inputs(alive, g)
        x = torch.where(inputs[:, None, :], x, 0.0)
        inverse = torch.where(inputs[:, :, None] & inputs[:, None, :], inverse, 0.0)
    return block_refit(gram, weights, alive, g)


def _best_swaps(gram, weights, support, group_size) -> tuple[torch.Tensor, torch.Tensor]:
    """Per problem, the predicted error change of its best swap and the swapped support (:func:`block_swap_search`)."""
    A, N, n = weights.shape
    g = group_size
    m = n // g
    inverse = masked_pinv(gram, group_inputs(support, g))
    b = torch.einsum("aij,acj->aci", gram, weights)
    x = torch.einsum("aij,acj->aci", inverse, b)
    correlation = b - torch.einsum("aij,acj->aci", gram, x)
    P = torch.bmm(gram, inverse)
    schur = gram - torch.bmm(P, gram)
    block_p = P.reshape(A, m, g, m, g).permute(0, 1, 3, 2, 4)  # [a, j, i] = P_JI
    pivot_inverse = torch.linalg.pinv(_diagonal_blocks(inverse, g), hermitian=True)  # [K_II]^+
    xg = x.reshape(A, N, m, g)
    cost = torch.einsum("acig,aigh,acih->ai", xg, pivot_inverse, xg)  # removing i
    ratio = torch.einsum("aigh,acih->acig", pivot_inverse, xg)
    c_ji = correlation.reshape(A, N, m, 1, g) + torch.einsum("ajigh,acih->acjig", block_p, ratio)
    s_ji = _diagonal_blocks(schur, g)[:, :, None] + torch.einsum("ajigh,aihk,ajilk->ajigl", block_p, pivot_inverse,
                                                                   block_p)
    floor = 1e3 * n * _EPS * _diagonal_blocks(gram, g).diagonal(dim1=-2, dim2=-1).amax(-1)  # (A, m) over j
    gain = torch.einsum("acjig,ajigl,acjil->aji", c_ji,
                        torch.linalg.pinv(s_ji, atol=floor[:, :, None], hermitian=True), c_ji)
    usable = (~support)[:, :, None] & support[:, None, :]
    change = torch.where(usable, cost[:, None, :] - gain, math.inf).reshape(A, m * m)
    best = change.argmin(1)
    j, i = best // m, best % m
    rows = torch.arange(A)
    candidate = support.clone()
    candidate[rows, i] = False
    candidate[rows, j] = True
    return change[rows, best], candidate


def block_swap_search(gram: torch.Tensor, weights: torch.Tensor, group_size: int, support: torch.Tensor,
                      max_sweeps: int = 100) -> torch.Tensor:
    """Best-improvement swap local search over group supports from ``support`` ``(B, m)``; the final supports.

    Every sweep scores all swaps of a kept group ``i`` and a pruned group ``j`` of every problem from
    ``K = G_SS^+``, the refit ``X``, the residual correlations ``C = B - G X``, ``P = G K`` and the
    Schur complement ``R = G - P G``: removing ``i`` costs ``sum_c x_c,I' K_II^+ x_c,I`` and turns
    ``C_J`` into ``C_J + P_JI K_II^+ X_I`` and ``R_JJ`` into ``R_JJ + P_JI K_II^+ P_JI'``; adding ``j``
    then gains ``tr(C_J' R_JJ^+ C_J)`` (eigenvalues of ``R_JJ`` below ``1e3 n eps max G_jj`` dropped:
    ``j`` nearly in the span). The best swap of each problem is refit exactly and applied where the
    error drops by more than ``1e-12 E`` plus the float64 resolution of ``E`` at the new point,
    ``64 (N n + 2) eps sum_c (|w_c| + |x_c|)'|G|(|w_c| + |x_c|)`` (an ill-conditioned refit cannot
    win by rounding); stops when none does, or after
    ``max_sweeps``. The group form of :func:`pruning.sparse_ls_heuristics.swap_search`.
    """
    B, N, n = weights.shape
    g = group_size
    m = n // g
    S = support.clone()
    counts = S.sum(1)
    if B == 0 or int(counts.min()) != int(counts.max()):
        if B == 0:
            return S
        raise ValueError("block_swap_search needs supports of equal size")
    if int(counts[0]) in (0, m):
        return S
    current, _ = _refit_errors(gram, weights, S, g)
    active = torch.ones(B, dtype=torch.bool)
    per_problem = m * m * g * (N + 2 * g) + 4 * n * n
    for _ in range(max_sweeps):
        running = torch.nonzero(active).flatten()
        if running.numel() == 0:
            break
        for part in _slices(running.numel(), _SLICE_ELEMENTS // per_problem):
            idx = running[part]
            change, candidate = _best_swaps(gram[idx], weights[idx], S[idx], g)
            error, resolution = _refit_errors(gram[idx], weights[idx], candidate, g)
            tolerance = _IMPROVEMENT_RTOL * current[idx].abs() + resolution
            improves = torch.isfinite(change) & (error < current[idx] - tolerance)
            S[idx[improves]] = candidate[improves]
            current[idx[improves]] = error[improves]
            active[idx[~improves]] = False
    return S


def block_pruning_methods(gram, weights, group_size: int, kept: int, damping: float = 1e-6) -> dict[str, torch.Tensor]:
    """All methods of the module doc for every problem: ``{name: X}`` (``(B, N, n)``), keys :data:`METHODS` in order.

    ``swap`` starts from the best of the other three (by the exact error) and is refit on its final support.
    """
    G, W = as_block_problems(gram, weights, group_size)
    m = W.shape[2] // group_size
    kept = check_budget(kept, m)
    points = {
        "magnitude": block_magnitude_prune(W, group_size, kept),
        "magnitude_refit": block_magnitude_refit(G, W, group_size, kept),
        "obs": block_obs_prune(G, W, group_size, kept, damping=damping),
    }
    errors = torch.stack([block_error(G, W, x) for x in points.values()])
    start = torch.stack(list(points.values()))[errors.argmin(0), torch.arange(W.shape[0])]
    start_support = block_support(start, group_size, kept)
    points["swap"] = block_refit(G, W, block_swap_search(G, W, group_size, start_support), group_size)
    return points


def block_support(x: torch.Tensor, group_size: int, kept: int) -> torch.Tensor:
    """The ``kept`` groups of largest ``sum_c sum_{i in group} |x_ci|`` of every point ``(B, N, n)``, ``(B, m)``.

    For a feasible point (nonzero on at most ``kept`` groups) a support holding all its nonzeros, so the refit
    there is at least as good as the point.
    """
    B, _, n = x.shape
    weight = x.abs().sum(1).reshape(B, n // group_size, group_size).sum(-1)
    return hard_threshold(weight, kept)


# --------------------------------------------------------------------------- the group relaxation and its dual


def unstructured_lower_bound(gram, weights, group_size: int, kept: int, d=None) -> torch.Tensor:
    """``sum_c`` of :func:`pruning.perspective_bound.lower_bound` of every channel at ``kept * group_size`` weights.

    A certified lower bound on the block optimum (module doc), ``(B,)``; ``d`` a diagonal split ``(n,)`` or ``(B, n)``.
    """
    G, W = as_block_problems(gram, weights, group_size)
    B, N, n = W.shape
    kept = check_budget(kept, n // group_size)
    if B == 0:
        return torch.zeros(0, dtype=torch.float64)
    splits = None if d is None else torch.as_tensor(d, dtype=torch.float64).expand(B, n)
    bounds = []
    for part in _slices(B, _SLICE_ELEMENTS // (N * n * n)):  # the channels' problems, a slice of rows at a time
        rows = W[part].shape[0]
        flat = G[part, None].expand(rows, N, n, n).reshape(rows * N, n, n)
        flat_d = None if splits is None else splits[part, None].expand(rows, N, n).reshape(rows * N, n)
        bounds.append(lower_bound(flat, W[part].reshape(rows * N, n), kept * group_size, d=flat_d).reshape(rows, N))
    return torch.cat(bounds).sum(1)


class _Nodes:
    """Nodes of the block problems (possibly of different problems): ``G`` ``(M, n, n)``, ``W`` ``(M, N, n)``,
    ``b = G w`` ``(M, N, n)``, ``r = sum_c w_c'Gw_c`` ``(M,)``, the split ``d`` ``(M, n)``, groups ``forced``
    and ``free`` ``(M, m)`` and the budgets ``K'`` ``(M,)``."""

    def __init__(self, G, W, d, forced, free, budget, group_size: int) -> None:
        self.G, self.W, self.d = G, W, d
        self.forced, self.free, self.budget = forced, free, budget
        self.group_size = group_size
        self.b = torch.einsum("mij,mcj->mci", G, W)
        self.r = (W * self.b).sum((1, 2))
        self.forced_inputs = group_inputs(forced, group_size)
        self.free_inputs = group_inputs(free, group_size)
        self.positive = d > 0
        self.inv_d = torch.where(self.positive, 1.0 / torch.where(self.positive, d, 1.0), 0.0)

    @property
    def size(self) -> int:
        return self.W.shape[0]


def _dual_values(nodes: _Nodes, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(phi(V), q)`` of the module doc as computed in float64 (``V`` zero outside the allowed inputs), ``(M,)``."""
    Mv = torch.einsum("mij,mcj->mci", nodes.G, V) - nodes.d[:, None, :] * V
    s = nodes.b - Mv
    q_inputs = (s * s).sum(1) * nodes.inv_d
    M, n = q_inputs.shape
    q = q_inputs.reshape(M, n // nodes.group_size, nodes.group_size).sum(-1)
    fixed = (q * nodes.forced).sum(-1)
    top = top_sum(torch.where(nodes.free, q, 0.0), nodes.budget)
    return nodes.r - (V * Mv).sum((1, 2)) - fixed - top, q


def _dual_margin(nodes: _Nodes, V: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The rounding margin of :func:`_dual_values` at ``V``: every channel's
    :func:`pruning.perspective_bound.dual_value_margin` plus ``2 (N n + 2) eps`` times the sums over the channels
    (``|r_c|``, ``|v_c|'(|G| + D)|v_c|`` and the ``q``), a slice of nodes at a time."""
    M, N, n = V.shape
    margins = []
    for part in _slices(M, _SLICE_ELEMENTS // (N * n * n)):
        rows = V[part].shape[0]

        def repeat(t: torch.Tensor, part=part, rows=rows) -> torch.Tensor:
            return t[part, None].expand(rows, N, *t.shape[1:]).reshape(rows * N, *t.shape[1:])

        channels = NodeBatch.from_problems(repeat(nodes.G), nodes.W[part].reshape(rows * N, n), repeat(nodes.d),
                                           repeat(nodes.forced_inputs), repeat(nodes.free_inputs),
                                           repeat(nodes.budget) * nodes.group_size)
        absolute = V[part].abs().reshape(rows * N, n)
        per_channel = dual_value_margin(channels, V[part].reshape(rows * N, n)).reshape(rows, N).sum(1)
        quadratic = (absolute * (torch.bmm(channels.abs_gram, absolute[..., None])[..., 0]
                                 + channels.d * absolute)).sum(-1).reshape(rows, N).sum(1)
        sums = channels.abs_r.reshape(rows, N).sum(1) + quadratic + q[part].sum(-1)
        margins.append(per_channel + 2.0 * (N * n + 2) * _EPS * sums)
    return torch.cat(margins)


def _group_indicators(u: torch.Tensor, forced: torch.Tensor, free: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """``z`` minimising ``sum_h u_h^2 / z_h`` over ``0 <= z <= 1, sum_free z <= K'`` (``z = 1`` forced, 0 out):
    :func:`pruning.perspective_bound.relaxed_indicators` with the groups as its inputs (``d = 1``)."""
    M, m = u.shape
    zeros = torch.zeros(M, m, dtype=u.dtype)
    groups = NodeBatch(torch.zeros(M, m, m, dtype=u.dtype), zeros, zeros[:, 0], torch.ones_like(u), forced, free,
                       budget, torch.zeros(M, m, m, dtype=u.dtype), zeros, zeros[:, 0])
    return relaxed_indicators(groups, u)


def _relax(nodes: _Nodes, z: torch.Tensor, iterations: int, level: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternating minimisation of the group relaxation of every node from ``z`` (module doc): at most
    ``iterations`` steps, until every node's ``phi`` has reached its ``level`` (``(M,)``, the node can be pruned;
    None: never) or improves by less than ``1e-7`` relative in a step.

    Returns the certified bounds ``max phi - margin`` over the iterates (``(M,)``) and the last ``z`` ``(M, m)``.
    """
    g = nodes.group_size
    best = torch.full((nodes.size,), -math.inf, dtype=torch.float64)
    best_V = torch.zeros_like(nodes.W)
    best_q = torch.zeros_like(z)
    allowed = nodes.forced_inputs | nodes.free_inputs
    weighted = nodes.free_inputs & nodes.positive
    split = nodes.G - torch.diag_embed(nodes.d)
    target = torch.full_like(best, math.inf) if level is None else level
    for _ in range(iterations):
        scale = torch.where(weighted, group_inputs(z, g).clamp(0.0, 1.0).sqrt(), 1.0)
        system = scale[:, :, None] * split * scale[:, None, :] + torch.diag_embed(nodes.d)
        inverse = masked_pinv(system, allowed)
        V = scale[:, None, :] * torch.einsum("mij,mcj->mci", inverse, scale[:, None, :] * nodes.b)
        value, q = _dual_values(nodes, V)
        improving = ~torch.isfinite(best) | (value > best + _STALL_RTOL * best.abs())
        better = value > best
        best = torch.where(better, value, best)
        best_V[better], best_q[better] = V[better], q[better]
        u = ((V * V).sum(1) * nodes.d).reshape(nodes.size, -1, g).sum(-1).sqrt()
        z = _group_indicators(u, nodes.forced, nodes.free, nodes.budget)
        if not (improving & (best < target)).any():
            break
    return best - _dual_margin(nodes, best_V, best_q), z


def block_lower_bound(gram, weights, group_size: int, kept: int, d=None, iterations: int = ROOT_ITERATIONS
                      ) -> torch.Tensor:
    """Certified lower bounds ``(B,)`` on the block optimum from the group perspective relaxation (module doc), >= 0.

    ``d``: a diagonal split ``(n,)`` or ``(B, n)``, checked (default: :func:`pruning.perspective_bound.diagonal_split`
    of each distinct ``G``); ``iterations``: alternating minimisation steps.
    """
    G, W = as_block_problems(gram, weights, group_size)
    B, _, n = W.shape
    m = n // group_size
    kept = check_budget(kept, m)
    if B == 0:
        return torch.zeros(0, dtype=torch.float64)
    if kept == m:
        return torch.zeros(B, dtype=torch.float64)
    if kept == 0:
        return torch.einsum("bci,bij,bcj->b", W, G, W).clamp_min(0.0)
    d = problem_splits(G, d)
    nodes = _Nodes(G, W, d, torch.zeros(B, m, dtype=torch.bool), torch.ones(B, m, dtype=torch.bool),
                   torch.full((B,), kept), group_size)
    bound, _ = _relax(nodes, torch.full((B, m), kept / m, dtype=torch.float64), iterations)
    return bound.clamp_min(0.0)


# --------------------------------------------------------------------------- the exact solver


@functools.cache
def _combinations(free: int, budget: int) -> torch.Tensor:
    """``(C(free, budget), budget)`` index tuples in lexicographic order."""
    return torch.tensor(list(itertools.combinations(range(free), budget)), dtype=torch.long).reshape(-1, budget)


def _supports_of(forced: np.ndarray, free: np.ndarray, budget: int) -> torch.Tensor:
    """Every support ``F u P``, ``P`` a ``budget``-subset of the free groups: ``(C, m)`` bool."""
    free_index = torch.from_numpy(np.flatnonzero(free))
    chosen = free_index[_combinations(len(free_index), budget)]
    supports = torch.from_numpy(forced).expand(chosen.shape[0], -1).clone()
    supports.scatter_(1, chosen, True)
    return supports


def solve_block_exact_batch(
    gram,
    weights,
    group_size: int,
    kept: int,
    node_limit: int = DEFAULT_NODE_LIMIT,
    time_limit: float | None = None,
    d=None,
    initial_support: torch.Tensor | None = None,
    progress: bool = False,
    threads: int | None = 1,
) -> list[BranchAndBoundResult]:
    """The best 1xN pruning of every block row (problem) by branch and bound over groups (module doc).

    Args:
        gram: ``(n, n)`` or ``(B, n, n)`` PSD Gram matrices.
        weights: ``(B, N, n)``.
        group_size: ``g``, inputs per group (``n`` a multiple of it).
        kept: ``K``, the groups kept, in ``[0, m]``.
        node_limit: nodes per problem (deterministic work limit).
        time_limit: optional wall-clock seconds per problem (its share of the rounds); None: none.
        d: optional diagonal split ``(n,)`` or ``(B, n)`` (checked); default :func:`~pruning.perspective_bound.diagonal_split`.
        initial_support: optional ``(B, m)`` supports of ``K`` groups as first incumbents (default: ``swap`` from
            the best of the other methods).
        progress: a tqdm bar of finished problems.
        threads: torch CPU threads during the search (restored afterwards; None keeps torch's).

    Returns:
        One :class:`~utils.branch_and_bound.BranchAndBoundResult` per problem: ``x`` ``(N, n)``, ``support`` ``(m,)``
        the kept groups, ``lb <= optimum <= ub = E(x)``.
    """
    if node_limit < 1:
        raise ValueError(f"node_limit must be >= 1, got {node_limit}")
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be positive or None, got {time_limit}")
    with torch_threads(threads):
        return _solve_batch(gram, weights, group_size, kept, node_limit, time_limit, d, initial_support, progress)


def _solve_batch(gram, weights, g, kept, node_limit, time_limit, d, initial_support, progress):
    start = time.perf_counter()
    G, W = as_block_problems(gram, weights, g)
    B, N, n = W.shape
    m = n // g
    kept = check_budget(kept, m)
    results: list[BranchAndBoundResult | None] = [None] * B
    live = group_inputs(torch.ones(B, m, dtype=torch.bool), g) & (torch.diagonal(G, dim1=-2, dim2=-1) > 0)
    live_groups = live.reshape(B, m, g).any(-1)  # a group of inputs that never fire is pruned for free
    for p in range(B):
        if kept == 0 or int(live_groups[p].sum()) <= kept:
            support = live_groups[p] if kept > 0 else torch.zeros(m, dtype=torch.bool)
            x = block_refit(G[p:p + 1], W[p:p + 1], support[None], g)
            error = max(0.0, float(block_error(G[p:p + 1], W[p:p + 1], x)[0]))
            results[p] = BranchAndBoundResult(x[0].numpy(), error, error, "optimal", 0, 0.0, support=support.numpy())
    todo = [p for p in range(B) if results[p] is None]
    if not todo:
        return results
    index = torch.tensor(todo)
    Gt, Wt, live_t = G[index], W[index], live_groups[index]
    if initial_support is None:
        start_support = block_support(block_pruning_methods(Gt, Wt, g, kept)["swap"], g, kept)
    else:
        start_support = torch.as_tensor(initial_support, dtype=torch.bool)[index]
        if start_support.shape != (len(todo), m) or (start_support.sum(1) > kept).any():
            raise ValueError(f"initial_support must be ({B}, {m}) with at most {kept} groups each")
    start_error, _ = _refit_errors(Gt, Wt, start_support, g)
    splits = problem_splits(Gt, None if d is None else torch.as_tensor(d, dtype=torch.float64).expand(B, n)[index])
    abs_energy = torch.einsum("bci,bij,bcj->b", Wt.abs(), Gt.abs(), Wt.abs())
    resolution = 32.0 * (N * n + 2) * _EPS * abs_energy
    b = torch.einsum("bij,bcj->bci", Gt, Wt)
    r = (Wt * b).sum((1, 2))
    margin = enumeration_margins(Gt, Wt, b, r, kept * g)  # certified accuracy of the enumerated values
    searches = []
    for t in range(len(todo)):
        search = SupportSearch(todo[t], start_support[t].numpy(), float(start_error[t]), float(resolution[t]),
                         float(margin[t]))
        search.push(-math.inf, np.zeros(m, dtype=bool), live_t[t].numpy(), None)
        search.seconds = (time.perf_counter() - start) / len(todo)
        searches.append(search)

    bar = tqdm(total=len(todo), desc="exact 1xN pruning", unit="problem", disable=not progress, leave=False)
    running = list(range(len(todo)))
    while running:
        round_start = time.perf_counter()
        still = [t for t in running if not searches[t].settle(node_limit, time_limit)]
        bar.update(len(running) - len(still))
        running = still
        if not running:
            break
        quota = max(1, math.ceil(_ROUND_NODES / len(running)))
        owners, taken = [], []
        for t in running:
            for node in searches[t].pop_open(min(quota, node_limit - searches[t].nodes)):
                owners.append(t)
                taken.append(node)
        if owners:
            _solve_round(searches, owners, taken, Gt, Wt, b, r, splits, g, kept)
        elapsed = time.perf_counter() - round_start
        counts = np.bincount(np.asarray(owners, dtype=np.int64), minlength=len(todo)) if owners else None
        for t in running:
            searches[t].seconds += elapsed * (counts[t] / len(owners) if owners else 1.0 / len(running))
    bar.close()

    supports = torch.from_numpy(np.stack([search.support for search in searches]))
    final = block_refit(Gt, Wt, supports, g)
    errors = block_error(Gt, Wt, final).clamp_min(0.0).tolist()
    for t, search in enumerate(searches):
        results[search.index] = BranchAndBoundResult(
            final[t].numpy(), errors[t], min(search.lower_bound(), errors[t]), search.status, search.nodes,
            search.seconds, support=search.support,
        )
    return results


def _solve_round(searches, owners, taken, G, W, b, r, splits, g: int, kept: int) -> None:
    """Enumerate or relax the round's nodes, prune or branch them, and refit the candidate supports exactly."""
    for t in owners:
        searches[t].nodes += 1
    candidates, candidate_owner = [], []
    relaxed, enumerated = [], []
    for t, (bound, forced, free, z) in zip(owners, taken):
        budget = kept - int(forced.sum())
        if math.comb(int(free.sum()), budget) <= ENUMERATION_SUPPORTS:
            enumerated.append((t, _supports_of(forced, free, budget)))
        else:
            relaxed.append((t, bound, forced, free, z))
    if enumerated:
        _enumerate_nodes(searches, enumerated, G, b, r, g, candidates, candidate_owner)
    if relaxed:
        _relax_and_branch(searches, relaxed, G, W, splits, g, kept, candidates, candidate_owner)
    if not candidates:
        return
    supports = torch.cat(candidates)
    who = torch.cat(candidate_owner)
    errors = _refit_errors(G[who], W[who], supports, g)[0].clamp_min(0.0).tolist()
    for error, t, support in zip(errors, who.tolist(), supports.numpy()):
        search = searches[t]
        if error < search.ub:
            search.ub, search.support = error, support.copy()
        search.closed_min = min(search.closed_min, error)  # an enumerated support's or a leaf's value (a rounding's >= ub)


def enumeration_margins(G: torch.Tensor, W: torch.Tensor, b: torch.Tensor, r: torch.Tensor, size: int) -> torch.Tensor:
    """A certified bound ``(B,)`` on ``|E^(S) - E(S)|`` of :func:`_support_values` for every support of at most
    ``size`` live inputs (``G_ii > 0``), ``b = fl(G w_c)`` ``(B, N, n)`` and ``r = fl(sum_c w_c'b_c)`` as computed.

    With ``u = eps / 2``, ``gamma_k = k u / (1 - k u)``, ``t`` the sum of the ``size`` largest live ``G_ii`` and
    ``mu <= lambda_min(G_LL)`` certified (:func:`pruning.support_enumeration.eigenvalue_floors`):

    * *inputs*: ``|b^_c - b_c| <= beta_c = gamma_{2n+2} |G||w_c|``, ``|r^ - r| <= rho = 2 gamma_{(N+1) n + 2}
      sum_c |w_c|'|G||w_c|``;
    * *solve*: Cholesky and the two triangular solves give ``(G_II + Delta_c) x^_c = b^_c`` with ``|Delta_c| <=
      gamma_{3m+1} |L^||L^'|`` (Higham, Thms 10.3-10.4) and, the rows of ``L^`` having squared norms at most
      ``G_ii / (1 - gamma_{m+1})``, ``||Delta_c|| <= theta t`` with ``theta = gamma_{3m+1} / (1 - gamma_{m+1})``
      (taken at ``2(3n + 1)`` and ``2(n + 1)``, room for blocked kernels);
    * *perturbation, exactly*: with ``x_c = G_II^-1 b_c`` (``||x_c|| <= X_c = sqrt((r^_c + rho_c) / mu)``, as
      ``x_c'G x_c <= r_c``), ``b^_c'x^_c - b_c'x_c = (b^_c - b_c)'x^_c + x_c'(b^_c - b_c) - x_c'Delta_c x^_c``, and
      ``||x^_c|| <= Y_c = (X_c + ||beta_c|| / mu) / (1 - theta t / mu)``;
    * *sums*: the ``N m`` products and their sum ``gamma_{Nn+1} sum_c ||b^_c|| Y_c``, the final subtraction ``u``
      times ``r^ + sum_c ||b^_c|| Y_c``.

    ``margin = sum_c (||beta_c|| (X_c + Y_c) + theta t X_c Y_c) + (gamma_{Nn+1} + u) sum_c ||b^_c|| Y_c + u r^ + rho``
    (a little above: it is evaluated in float itself); ``inf`` where ``mu`` is not certified or ``theta t >= mu / 2``.
    """
    N, n = W.shape[1:]
    live = torch.diagonal(G, dim1=-2, dim2=-1) > 0
    mu = eigenvalue_floors(G, live, live_eigenvalues(G, live)[:, 0])
    t = torch.topk(torch.where(live, torch.diagonal(G, dim1=-2, dim2=-1), 0.0), min(size, n), dim=-1).values.sum(-1)
    unit = _EPS / 2
    gamma_in = rounding_gamma(2 * n + 2)
    theta = rounding_gamma(2 * (3 * n + 1)) / (1.0 - rounding_gamma(2 * (n + 1)))
    abs_gw = torch.einsum("bij,bcj->bci", G.abs(), W.abs())
    beta = torch.linalg.vector_norm(gamma_in * abs_gw, dim=-1)  # (B, N)
    rho_c = 2.0 * rounding_gamma((N + 1) * n + 2) * (W.abs() * abs_gw).sum(-1)
    r_c = (W * b).sum(-1).clamp_min(0.0)
    usable = (mu > 0) & (theta * t < 0.5 * mu)
    safe_mu = torch.where(usable, mu, 1.0)[:, None]
    X = torch.sqrt((r_c + rho_c) / safe_mu)
    Y = (X + beta / safe_mu) / (1.0 - (theta * t)[:, None] / safe_mu)
    b_norm = torch.linalg.vector_norm(b, dim=-1)
    products = (rounding_gamma(N * n + 1) + unit) * (b_norm * Y).sum(-1)
    margin = (beta * (X + Y) + theta * t[:, None] * X * Y).sum(-1) + products + unit * r.abs() + rho_c.sum(-1)
    return torch.where(usable, margin * (1.0 + 1e-6), math.inf)


def _support_values(G, b, r, supports: torch.Tensor, owner: torch.Tensor, g: int) -> torch.Tensor:
    """``E(S) = r - sum_c b_c,I' G_II^-1 b_c,I`` of supports ``(C, m)`` of one size (problem ``owner`` ``(C,)``)
    from a Cholesky factor of each support's own ``G_II``; ``-inf`` where it fails or is numerically singular."""
    C = supports.shape[0]
    inputs = group_inputs(supports, g)
    size = int(inputs[0].sum()) if C else 0
    if size == 0:
        return r[owner].clone()
    index = inputs.nonzero()[:, 1].reshape(C, size)
    sub = G[owner[:, None, None], index[:, :, None], index[:, None, :]]
    rhs = b[owner[:, None, None], torch.arange(b.shape[1])[None, :, None], index[:, None, :]].transpose(1, 2)
    factor, info = torch.linalg.cholesky_ex(sub)
    pivots = torch.diagonal(factor, dim1=-2, dim2=-1) ** 2
    scale = torch.diagonal(sub, dim1=-2, dim2=-1).amax(-1)
    bad = (info != 0) | ~torch.isfinite(pivots).all(-1) | (pivots.amin(-1) <= 1e3 * size * _EPS * scale)
    eye = torch.eye(size, dtype=torch.float64)
    solution = torch.cholesky_solve(rhs, torch.where(bad[:, None, None], eye, factor))
    return torch.where(bad, -math.inf, r[owner] - (rhs * solution).sum((1, 2)))


def _enumerate_nodes(searches, nodes: list, G, b, r, g: int, candidates: list, candidate_owner: list) -> None:
    """Every support of the nodes ``nodes`` (``(search index, supports)``) by :func:`_support_values`; as in
    :mod:`pruning.support_enumeration`, the supports within the problem's ``margin`` of the node's best (or of the
    prune level) go to ``candidates`` for the exact refit, the others close the node with their value minus it."""
    supports = torch.cat([node_supports for _, node_supports in nodes])
    node = torch.cat([torch.full((len(node_supports),), i) for i, (_, node_supports) in enumerate(nodes)])
    owner = torch.tensor([t for t, _ in nodes])[node]
    values = torch.cat([_support_values(G, b, r, supports[part], owner[part], g)
                        for part in _slices(len(supports), _ENUMERATION_SLICE)])
    margin = torch.tensor([searches[t].margin for t, _ in nodes], dtype=torch.float64)[node]
    level = torch.tensor([searches[t].level() for t, _ in nodes], dtype=torch.float64)[node]
    best = torch.full((len(nodes),), math.inf, dtype=torch.float64).scatter_reduce(0, node, values, reduce="amin")
    exact = ~(values >= torch.minimum(level, best[node] + margin) + margin)  # every support when margin is infinite
    rest = torch.full((len(nodes),), math.inf, dtype=torch.float64).scatter_reduce(
        0, node[~exact], (values - margin)[~exact], reduce="amin")
    for (t, _), value in zip(nodes, rest.tolist()):
        searches[t].closed_min = min(searches[t].closed_min, value)
    candidates.append(supports[exact])
    candidate_owner.append(owner[exact])


def _relax_and_branch(searches, relaxed, G, W, splits, g: int, kept: int, candidates: list, candidate_owner: list) -> None:
    """Relax the nodes ``relaxed`` and push their children; roundings and new leaves go to ``candidates``."""
    owner = torch.tensor([item[0] for item in relaxed])
    forced = torch.from_numpy(np.stack([item[2] for item in relaxed]))
    free = torch.from_numpy(np.stack([item[3] for item in relaxed]))
    budget = kept - forced.sum(1)
    m = forced.shape[1]
    cold = (budget.to(torch.float64) / free.sum(1).clamp_min(1)).clamp(max=1.0)
    z0 = torch.stack([torch.from_numpy(item[4]) if item[4] is not None else torch.where(
        torch.from_numpy(item[3]), cold[i], torch.from_numpy(item[2]).to(torch.float64))
        for i, item in enumerate(relaxed)])
    iterations = ROOT_ITERATIONS if all(item[1] == -math.inf for item in relaxed) else NODE_ITERATIONS
    nodes = _Nodes(G[owner], W[owner], splits[owner], forced, free, budget, g)
    level = torch.tensor([searches[t].level() for t in owner.tolist()], dtype=torch.float64)
    bound, z = _relax(nodes, z0, iterations, level)
    bound = torch.maximum(bound, torch.tensor([item[1] for item in relaxed], dtype=torch.float64))
    # rounding: F plus the K' free groups of largest z
    key = torch.where(free, z, -1.0)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(m).expand_as(order))
    candidates.append(forced | (free & (rank < budget[:, None])))
    candidate_owner.append(owner)
    fractional = torch.where(free, torch.minimum(z, 1.0 - z), -1.0)
    branch = torch.where(fractional.amax(-1) > 1e-9, fractional.argmax(-1), torch.where(free, z, -1.0).argmax(-1))
    leaves, leaf_owners = [], []
    for i, (t, _, forced_i, free_i, _) in enumerate(relaxed):
        search = searches[t]
        value = float(bound[i])
        if value >= search.level():
            search.closed_min = min(search.closed_min, value)
            continue
        j = int(branch[i])
        remaining = free_i.copy()
        remaining[j] = False
        included = forced_i.copy()
        included[j] = True
        z_in = z[i].clone()
        z_in[j] = 1.0
        z_out = z[i].clone()
        z_out[j] = 0.0
        for child_forced, child_z in ((included, z_in), (forced_i, z_out)):
            child_budget = kept - int(child_forced.sum())
            if child_budget == 0 or int(remaining.sum()) <= child_budget:
                leaves.append(child_forced | remaining if child_budget > 0 else child_forced.copy())
                leaf_owners.append(t)
            else:
                search.push(value, child_forced, remaining, child_z.numpy())
    if leaves:
        candidates.append(torch.from_numpy(np.stack(leaves)))
        candidate_owner.append(torch.tensor(leaf_owners))
