"""Exact sparse least squares: the best pruning of an output channel, with a proof of optimality.

For weights ``w`` (``n`` inputs), the layer's input Gram matrix ``G = A'A`` (``n x n``, PSD,
float64, possibly singular) and a budget ``k``:

    minimise  e(x) = (w - x)' G (w - x)   subject to at most k nonzeros in x  (x real).

For a support ``S`` the best ``x`` is the least-squares refit (:func:`pruning.least_squares.refit`),
so the optimum is the minimum of ``e(S)`` over supports of size ``k``. :func:`solve_exact`
returns the best ``x`` found, its error ``ub``, a *certified* lower bound ``lb`` on the optimum,
and the status ``"optimal"`` (search finished: ``lb >= ub - max(1e-10 |ub|, resolution)``),
``"node_limit"`` or ``"time_limit"`` (``lb`` is then the smallest certified bound of the open
nodes, so the gap is reported instead of failing). ``resolution = 32 (n + 2) eps |w|'|G||w|`` is
the float64 resolution of ``e``: differences below it cannot be certified.

**Limits and determinism.** The default limit is a count of work, ``node_limit =
DEFAULT_NODE_LIMIT`` (100 000) nodes per problem (a node: one relaxation solved, or one small
subtree enumerated, see below), so with it the results (``x``, ``ub``, ``lb``, ``status``,
``nodes``) do not depend on timing or machine load; the search runs single-threaded in torch
(``threads=1``) so they do not depend on torch's thread count either. The real layers' problems
(``bench/bench_prune_bounds.py``) need at most a few thousand nodes; a problem needing all
100 000 stops after roughly 10-40 s on one core. ``time_limit`` (seconds per problem, ``None`` by
default) adds an optional wall-clock limit; only then do results depend on timing.

**Presolve.** An input with ``G_ii = 0`` (a zero column of ``A``: it never fires) changes no
output, so it is pruned for free: the root fixes it *out*. When the remaining (live) inputs
number at most ``k``, they are all kept (error 0).

**Branch and bound.** A node fixes inputs *in* (``F``) and *out* (``O``); the others (``U``)
share the budget ``k' = k - |F|``. A node with at most ``2048`` supports ``C(|U|, k')`` is
enumerated (:mod:`pruning.support_enumeration`: every support's error by Schur-complement
updates, the near-best ones refit exactly); this also solves problems at the root, without
heuristics or a diagonal split, when the root has at most ``65536`` supports and its enumeration's
largest full level (``n^2 C(|U| - 2, k - 2)`` floats) fits in ``2^22`` floats: far cheaper than a
search at these sizes (e.g. ``n = 32, k = 4``: 35 960 supports). Otherwise its bound is the
certified dual bound of the perspective relaxation (:mod:`pruning.perspective_bound`, with the diagonal split ``d`` of
:func:`diagonal_split`, computed once per distinct ``G``; at most 3 Newton iterations, from the
parent's relaxed point), raised to the parent's bound. A child whose budget is 0 or whose ``|U|``
fits the budget is a leaf: its best support is ``F`` (resp. ``F u U``), evaluated exactly by a
refit. Branching is on the input of ``U`` whose relaxed indicator ``z_i`` is closest to 1/2 (the
most fractional), into ``i in F`` and ``i in O``; the children start from the parent's relaxed
point. Nodes are explored best-first (smallest bound) and pruned when their bound reaches
``ub - max(1e-10 |ub|, resolution)``.

**Incumbent.** OBS (:func:`pruning.sparse_ls_heuristics.obs_prune`) improved by the swap local
search (:func:`pruning.sparse_ls_heuristics.swap_search`); at every relaxed node the relaxed point
is rounded (``F`` plus the ``k - |F|`` largest ``z_i`` of ``U``) and refit.

**Batches.** :func:`solve_exact_batch` runs the searches of many problems (one per output channel)
in lockstep: every round takes the best open nodes of every unfinished problem (128 in all) and
solves their relaxations and enumerations in batched torch computations, so the per-node Python
overhead is shared. The limits apply to each problem; the time of a round is attributed to its
problems in proportion to their nodes in it. Computation is on the CPU in float64.

Degenerate problems are solved directly: ``k = 0`` (``x = 0``, error ``r = w'Gw``), ``w = 0``
on the live inputs (``x = 0``) and ``k >=`` the live inputs (``x = w`` there, error 0).
"""
from __future__ import annotations

import heapq
import logging
import math
import time

import numpy as np
import torch
from tqdm import tqdm

from pruning.least_squares import as_problems, masked_solve, reconstruction_error, refit, support_error
from pruning.perspective_bound import (
    NodeBatch,
    diagonal_split,
    initial_point,
    lower_bound,
    problem_splits,
    relaxed_indicators,
    solve_relaxation,
)
from pruning.sparse_ls_cvxpy import available_backends, solve_mip
from pruning.sparse_ls_heuristics import (
    METHODS,
    check_budget,
    hard_threshold,
    obs_prune,
    pruning_methods,
    swap_search,
)
from pruning.support_enumeration import eigenvalue_floors, enumerate_supports, rounding_margins, support_count
from utils.branch_and_bound import BranchAndBoundResult

# The solver and, re-exported for one import, the pieces it is built from.
__all__ = [
    "DEFAULT_NODE_LIMIT",
    "METHODS",
    "available_backends",
    "diagonal_split",
    "lower_bound",
    "pruning_methods",
    "reconstruction_error",
    "refit",
    "solve_exact",
    "solve_exact_batch",
    "solve_mip",
    "support_error",
]

logger = logging.getLogger(__name__)

_EPS = float(np.finfo(np.float64).eps)
_PRUNE_RTOL = 1e-10
_ROUND_NODES = 128  # nodes processed together per round (all problems; fewer rounds, about as many nodes)
_NEWTON_ITERATIONS = 3  # per node; a child continues from its parent's point (more: fewer nodes, more time)
_ENUMERATION_SUPPORTS = 2048  # nodes with at most this many supports C(|U|, k') are enumerated
# a root is enumerated with up to this many supports (it then needs no split, heuristics or search) when its largest
# Schur-complement level, n^2 C(|U| - 2, k - 2) floats, stays below _ENUMERATION_FLOATS; so are the enumerations of a
# round, taken in groups of at most _ENUMERATION_FLOATS * _ENUMERATION_GROUP floats
_ROOT_ENUMERATION_SUPPORTS = 65536
_ENUMERATION_FLOATS = 1 << 22
_ENUMERATION_GROUP = 4
DEFAULT_NODE_LIMIT = 100_000


class SupportSearch:
    """The branch-and-bound state of one problem."""

    def __init__(self, index: int, support: np.ndarray, ub: float, resolution: float, margin: float) -> None:
        self.index = index
        self.support, self.ub = support, ub
        self.x: torch.Tensor | None = None  # the refit on support, where the search keeps it
        self.resolution = resolution
        self.margin = margin  # accuracy of the enumerated values (pruning.support_enumeration)
        self.heap: list[tuple[float, int, np.ndarray, np.ndarray, np.ndarray | None]] = []
        self.counter = 0
        self.closed_min = math.inf  # smallest bound (or exact value) of a closed node
        self.nodes = 0
        self.seconds = 0.0
        self.status: str | None = None

    def settle(self, node_limit: int, time_limit: float | None) -> bool:
        """Whether the search is over; if so, :attr:`status` says why (a limit reached, or ``optimal``: no open node)."""
        if time_limit is not None and self.seconds >= time_limit:
            self.status = "time_limit"
        elif self.nodes >= node_limit:
            self.status = "node_limit"
        elif not self.heap:
            self.status = "optimal"
        else:
            return False
        return True

    def level(self) -> float:
        """The prune level ``ub - max(1e-10 |ub|, resolution)`` (``inf`` without an incumbent)."""
        return self.ub - max(_PRUNE_RTOL * abs(self.ub), self.resolution) if math.isfinite(self.ub) else math.inf

    def push(self, bound: float, forced_in: np.ndarray, free: np.ndarray, x: np.ndarray | None) -> None:
        self.counter += 1
        heapq.heappush(self.heap, (bound, self.counter, forced_in, free, x))

    def pop_open(self, count: int) -> list[tuple[float, np.ndarray, np.ndarray, np.ndarray | None]]:
        """Up to ``count`` open nodes with a bound below the prune level (others are closed)."""
        taken = []
        while self.heap and len(taken) < count:
            bound, _, forced_in, free, x = heapq.heappop(self.heap)
            if bound >= self.level():
                self.closed_min = min(self.closed_min, bound)
                continue
            taken.append((bound, forced_in, free, x))
        return taken

    def lower_bound(self) -> float:
        open_min = min((entry[0] for entry in self.heap), default=math.inf)
        return max(0.0, min(self.ub, self.closed_min, open_min))


def _validate(G: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """ValueError for non-finite or clearly indefinite (symmetric) Gram matrices; else the smallest eigenvalue of
    every live block ``G_LL`` (``G`` is PSD iff ``G_LL`` is and the rows of the inputs with ``G_ii <= 0`` are 0)."""
    if not torch.isfinite(G).all():
        raise ValueError("the Gram matrix has non-finite entries")
    if (torch.where(live[:, :, None], 0.0, G) != 0).any():
        raise ValueError("the Gram matrix is not positive semidefinite")
    eigenvalues = live_eigenvalues(G, live)
    if (eigenvalues[:, 0] < -1e3 * (G.shape[-1] + 1) * _EPS * eigenvalues.abs().amax(-1)).any():
        raise ValueError("the Gram matrix is not positive semidefinite")
    return eigenvalues[:, 0]


def _branch_input(z: torch.Tensor, x: torch.Tensor, choice: torch.Tensor, free: torch.Tensor,
                  diagonal: torch.Tensor) -> torch.Tensor:
    """The most fractional ``z_i`` of ``U``; without one, the input of ``U`` with the largest ``sqrt(G_ii)|x_i|``."""
    fractional = torch.where(choice, torch.minimum(z, 1.0 - z), torch.full_like(z, -1.0))
    best = fractional.argmax(-1)
    has_fraction = fractional.amax(-1) > 1e-9
    weight = torch.where(free, diagonal.sqrt() * x.abs() + 1e-300, torch.full_like(x, -1.0))
    return torch.where(has_fraction, best, weight.argmax(-1))


def _rounded_supports(
    z: torch.Tensor, forced_in: torch.Tensor, free: torch.Tensor, budget: torch.Tensor
) -> torch.Tensor:
    """``F`` plus the ``k'`` inputs of ``U`` with the largest relaxed indicators."""
    key = torch.where(free, z, torch.full_like(z, -1.0))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(z.shape[1]).expand_as(order))
    return forced_in | (free & (rank < budget[:, None]))


def solve_exact_batch(
    gram,
    weights,
    k: int,
    time_limit: float | None = None,
    node_limit: int = DEFAULT_NODE_LIMIT,
    d=None,
    progress: bool = False,
    threads: int | None = 1,
) -> list[BranchAndBoundResult]:
    """:func:`solve_exact` for every problem (one per row of ``weights``), searched in lockstep.

    Args:
        gram: ``(n, n)`` shared Gram matrix or ``(B, n, n)``; numpy or torch, converted to float64
            and symmetrised.
        weights: ``(B, n)`` (or ``(n,)`` for one problem).
        k: the number of kept weights, an integer in ``[0, n]``.
        time_limit: optional wall-clock seconds per problem (its share of the batched work);
            ``None`` (the default): no wall-clock limit, the results do not depend on timing.
        node_limit: nodes per problem (the deterministic work limit, module doc).
        d: an optional diagonal split (``(n,)`` or ``(B, n)``), checked with
            :func:`pruning.perspective_bound.verify_split`; default: :func:`diagonal_split`.
        progress: show a tqdm bar of finished problems.
        threads: torch CPU threads during the search (restored afterwards). The default 1 is the
            fastest for these small batched problems and robust on a loaded machine; ``None``
            keeps torch's setting.

    Returns:
        One :class:`~utils.branch_and_bound.BranchAndBoundResult` (with ``support``) per problem, in order.

    Raises:
        ValueError: bad shapes, ``k`` not an integer in ``[0, n]``, a non-finite or indefinite ``G``,
            an invalid ``d``, a non-positive ``time_limit`` or ``node_limit``.
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _solve_batch(gram, weights, k, time_limit, node_limit, d, progress)
    finally:
        torch.set_num_threads(previous_threads)


def live_eigenvalues(G: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """The eigenvalues of ``G_LL`` of the live inputs of every problem, with ``max_i G_ii`` for each other input
    (``G_LL`` embedded in ``max_i G_ii I``), ascending, ``(B, n)``."""
    scale = torch.diagonal(G, dim1=-2, dim2=-1).amax(-1).clamp_min(torch.finfo(torch.float64).tiny)
    pair = live[:, :, None] & live[:, None, :]
    embedded = torch.where(pair, G, 0.0) + torch.diag_embed((~live).to(G.dtype) * scale[:, None])
    return torch.linalg.eigvalsh(embedded)


def live_condition_number(G: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``cond(G_LL)`` of the live inputs of every problem (``inf`` when singular), ``(B,)``."""
    eigenvalues = live_eigenvalues(G, live)
    return torch.where(eigenvalues[:, 0] > 0, eigenvalues[:, -1] / eigenvalues[:, 0].clamp_min(1e-300), math.inf)


def _schur_floats(free: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """``n^2 C(|U| - 2, k' - 2)``: the floats of the largest full level of an enumeration (``0`` for ``k' < 2``)."""
    n = free.shape[-1]
    counts = free.sum(-1)
    return torch.tensor([n * n * math.comb(u - 2, kept - 2) if kept >= 2 and u >= 2 else 0
                         for u, kept in zip(counts.tolist(), budget.tolist())], dtype=torch.float64)


def _enumerated_roots(live: torch.Tensor, k: int) -> torch.Tensor:
    """Whether each problem's root is enumerated (module doc): at most ``_ROOT_ENUMERATION_SUPPORTS`` supports and
    ``_ENUMERATION_FLOATS`` floats in its largest level."""
    budget = torch.full((live.shape[0],), k)
    return (support_count(live, budget) <= _ROOT_ENUMERATION_SUPPORTS) & (_schur_floats(live, budget)
                                                                          <= _ENUMERATION_FLOATS)


def _solve_batch(gram, weights, k, time_limit: float | None, node_limit: int, d, progress: bool
                 ) -> list[BranchAndBoundResult]:
    start = time.perf_counter()
    G, W, _ = as_problems(gram, weights)
    G, W = G.cpu(), W.cpu()
    B, n = W.shape
    k = check_budget(k, n)
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be positive or None, got {time_limit}")
    if node_limit < 1:
        raise ValueError(f"node_limit must be >= 1, got {node_limit}")
    if not torch.isfinite(W).all():
        raise ValueError("the weights have non-finite entries")
    shared = B == 1 or G.stride(0) == 0
    G = 0.5 * (G + G.transpose(1, 2))
    if shared:
        G = G[:1].expand(B, n, n)
    live = torch.diagonal(G, dim1=-2, dim2=-1) > 0  # presolve: a dead input (zero column of A) is pruned for free
    smallest = _validate(G[:1], live[:1]).expand(B) if shared else _validate(G, live)

    results: list[BranchAndBoundResult | None] = [None] * B
    zero_weights = (W * live == 0).all(1)
    fits = live.sum(1) <= k
    for p in range(B):
        if k == 0 or bool(zero_weights[p]) or bool(fits[p]):
            support = live[p] if k > 0 and bool(fits[p]) and not bool(zero_weights[p]) else torch.zeros_like(live[p])
            x = torch.where(support, W[p], 0.0)
            error = max(0.0, float(reconstruction_error(G[p], W[p], x)))
            results[p] = BranchAndBoundResult(x.numpy(), error, error, "optimal", 0, 0.0, support=support.numpy())
    todo = [p for p in range(B) if results[p] is None]
    if not todo:
        return results
    index = torch.tensor(todo)
    Gt, Wt, live = G[index], W[index], live[index]
    if shared:
        Gt = G[:1].expand(len(todo), n, n)
    root_budget = torch.full((len(todo),), k)
    enumerated = _enumerated_roots(live, k)
    searched = torch.nonzero(~enumerated).flatten()
    # the diagonal split of the searched problems (an enumerated root needs none)
    if d is not None:
        d = problem_splits(Gt, torch.as_tensor(d, dtype=torch.float64).expand(B, n)[index])
    else:
        d = torch.zeros_like(Wt)
        if searched.numel():
            d[searched] = problem_splits(Gt[searched] if not shared else Gt[:1].expand(searched.numel(), n, n))
    d = torch.where(live, d, 0.0)
    problems = NodeBatch.from_problems(Gt, Wt, d, torch.zeros_like(live), live, root_budget)
    resolution = 32.0 * (n + 2) * _EPS * problems.abs_r
    floors = eigenvalue_floors(Gt, live, smallest[index])
    margin, deviation = rounding_margins(Gt, problems.b, problems.r, problems.abs_gw, problems.abs_r, live, k, floors)

    # incumbents: the heuristics where the root is searched, nothing where it is enumerated
    best = torch.zeros_like(Wt)
    best_error = torch.full((len(todo),), math.inf, dtype=torch.float64)
    if searched.numel():
        Gs, Ws = Gt[searched], Wt[searched]
        x = refit(Gs, Ws, swap_search(Gs, Ws, hard_threshold(obs_prune(Gs, Ws, k), k)))
        best[searched] = x
        best_error[searched] = reconstruction_error(Gs, Ws, x).clamp_min(0.0)
    searches = []
    for t, p in enumerate(todo):
        search = SupportSearch(p, (best[t] != 0).numpy(), float(best_error[t]), float(resolution[t]), float(margin[t]))
        search.x = best[t]
        search.push(-math.inf, np.zeros(n, dtype=bool), live[t].numpy(), None)
        searches.append(search)
    setup_share = (time.perf_counter() - start) / len(todo)
    for search in searches:
        search.seconds += setup_share

    diagonal = torch.diagonal(Gt, dim1=-2, dim2=-1)
    bar = tqdm(total=len(todo), desc="exact pruning", unit="problem", leave=False) if progress else None
    running = list(range(len(todo)))
    while running:
        round_start = time.perf_counter()
        still = [t for t in running if not searches[t].settle(node_limit, time_limit)]
        if bar is not None:
            bar.update(len(running) - len(still))
        running = still
        if not running:
            break
        quota = max(1, math.ceil(_ROUND_NODES / len(running)))
        owners, bounds, forced, free, starts = [], [], [], [], []
        for t in running:
            search = searches[t]
            for bound, forced_in, free_inputs, x in search.pop_open(min(quota, node_limit - search.nodes)):
                owners.append(t)
                bounds.append(bound)
                forced.append(forced_in)
                free.append(free_inputs)
                starts.append(x)
        if owners:
            _solve_round(searches, owners, bounds, forced, free, starts, problems, deviation, enumerated, Gt, Wt,
                         diagonal, k)
        elapsed = time.perf_counter() - round_start
        counts = np.bincount(np.asarray(owners, dtype=np.int64), minlength=len(todo)) if owners else None
        for t in running:
            share = counts[t] / len(owners) if owners else 1.0 / len(running)
            searches[t].seconds += elapsed * share
    if bar is not None:
        bar.close()

    for search in searches:  # the incumbent's refit x and its error ub
        results[search.index] = BranchAndBoundResult(
            search.x.numpy(), search.ub, min(search.lower_bound(), search.ub), search.status, search.nodes,
            search.seconds, support=search.support,
        )
    return results


def _solve_round(searches, owners, bounds, forced, free, starts, problems: NodeBatch, deviation, enumerated, G, W,
                 diagonal, k: int) -> None:
    """Enumerate or relax the round's nodes, prune or branch them, and evaluate the new leaves exactly."""
    owner = torch.tensor(owners)
    forced_in = torch.from_numpy(np.stack(forced))
    free_inputs = torch.from_numpy(np.stack(free))
    budget = k - forced_in.sum(1)
    levels = torch.tensor([searches[t].level() for t in owners], dtype=torch.float64)
    for t in owners:
        searches[t].nodes += 1
    root = torch.tensor([bound == -math.inf for bound in bounds])
    small = (support_count(free_inputs, budget) <= _ENUMERATION_SUPPORTS) | (root & enumerated[owner])
    supports, support_owner = [], []
    floats = _schur_floats(free_inputs, budget)
    for kept in torch.unique(budget[small]).tolist():  # small subtrees: every support, exactly (module doc)
        group = torch.nonzero(small & (budget == kept)).flatten()
        sizes = floats[group].clamp_min(1.0)
        parts = torch.div(sizes.cumsum(0) - sizes, _ENUMERATION_FLOATS * _ENUMERATION_GROUP, rounding_mode="floor")
        for part in torch.unique(parts).tolist():
            rows = group[parts == part]
            who = owner[rows]
            margins = torch.tensor([searches[t].margin for t in who.tolist()], dtype=torch.float64)
            node, candidates, rest = enumerate_supports(
                G.index_select(0, who), problems.b.index_select(0, who), problems.r.index_select(0, who),
                problems.d.index_select(0, who), forced_in.index_select(0, rows), free_inputs.index_select(0, rows),
                kept, margins, deviation.index_select(0, who), levels.index_select(0, rows))
            for t, value in zip(who.tolist(), rest.tolist()):
                searches[t].closed_min = min(searches[t].closed_min, value)
            supports.append(candidates)
            support_owner.append(who[node])

    relaxed = torch.nonzero(~small).flatten()
    if relaxed.numel():
        _relax_and_branch(searches, relaxed, owner, bounds, forced, free, starts, problems, forced_in, free_inputs,
                          budget, levels, diagonal, k, supports, support_owner)
    if not supports:
        return
    support = torch.cat(supports)
    who = torch.cat(support_owner)
    if who.numel() == 0:
        return
    gram = G.index_select(0, who)
    refits = masked_solve(gram, problems.b.index_select(0, who), support)
    errors = reconstruction_error(gram, W.index_select(0, who), refits).clamp_min(0.0).tolist()
    for i, (e, t, s) in enumerate(zip(errors, who.tolist(), support.numpy())):
        search = searches[t]
        if e < search.ub:
            search.ub, search.support, search.x = e, s.copy(), refits[i]
        search.closed_min = min(search.closed_min, e)


def _relax_and_branch(searches, rows, owner, bounds, forced, free, starts, problems: NodeBatch, forced_in, free_inputs,
                      budget, levels, diagonal, k: int, supports: list, support_owner: list) -> None:
    """Relax the nodes ``rows`` and push their children; the roundings and new leaves go to ``supports``."""
    n = forced_in.shape[1]
    own = owner[rows]
    row_list = rows.tolist()
    G, b, r, d, abs_gram, abs_gw, abs_r = (tensor.index_select(0, own) for tensor in (
        problems.G, problems.b, problems.r, problems.d, problems.abs_gram, problems.abs_gw, problems.abs_r))
    node_sets = (tensor.index_select(0, rows) for tensor in (forced_in, free_inputs, budget))
    nodes = NodeBatch(G, b, r, d, *node_sets, abs_gram, abs_gw, abs_r)
    x0 = torch.zeros(len(row_list), n, dtype=torch.float64)
    cold = [i for i, row in enumerate(row_list) if starts[row] is None]
    warm = [i for i, row in enumerate(row_list) if starts[row] is not None]
    if warm:
        x0[warm] = torch.from_numpy(np.stack([starts[row_list[i]] for i in warm]))
    if cold:
        x0[cold] = initial_point(nodes.select(torch.tensor(cold)))
    bound, x, _, _ = solve_relaxation(nodes, x0, level=levels[rows], max_iterations=_NEWTON_ITERATIONS)
    bound = torch.maximum(bound, torch.tensor([bounds[row] for row in row_list], dtype=torch.float64))
    z = relaxed_indicators(nodes, x)
    branch = _branch_input(z, x, nodes.choice, nodes.free, diagonal[own])
    supports.append(_rounded_supports(z, nodes.forced_in, nodes.free, nodes.budget))
    support_owner.append(own)
    leaves, leaf_owners = [], []
    x_np, bound_np, branch_np = x.numpy(), bound.tolist(), branch.tolist()
    for i, (row, t) in enumerate(zip(row_list, own.tolist())):
        search = searches[t]
        if bound_np[i] >= search.level():
            search.closed_min = min(search.closed_min, bound_np[i])
            continue
        j = branch_np[i]
        remaining = free[row].copy()
        remaining[j] = False
        included = forced[row].copy()
        included[j] = True
        out_x = x_np[i].copy()
        out_x[j] = 0.0
        for child_in, child_x in ((included, x_np[i]), (forced[row], out_x)):
            child_budget = k - int(child_in.sum())
            if child_budget == 0 or int(remaining.sum()) <= child_budget:
                leaves.append(child_in | remaining if child_budget > 0 else child_in.copy())
                leaf_owners.append(t)
            else:
                search.push(bound_np[i], child_in, remaining, child_x)
    if leaves:
        supports.append(torch.from_numpy(np.stack(leaves)))
        support_owner.append(torch.tensor(leaf_owners))


def solve_exact(
    gram,
    weights,
    k: int,
    time_limit: float | None = None,
    node_limit: int = DEFAULT_NODE_LIMIT,
    d=None,
    threads: int | None = 1,
) -> BranchAndBoundResult:
    """The best ``x`` with at most ``k`` nonzeros for ``e(x) = (w - x)'G(w - x)``, with a certified gap.

    Args:
        gram: ``(n, n)`` PSD Gram matrix (numpy or torch; float64, symmetrised).
        weights: ``(n,)`` the weights ``w``.
        k: the number of kept weights, an integer in ``[0, n]``.
        time_limit: optional wall-clock seconds; the search stops with status ``"time_limit"`` when
            exceeded (``None``, the default: no wall-clock limit).
        node_limit: the search stops with status ``"node_limit"`` after this many nodes.
        d: optional diagonal split (default :func:`pruning.perspective_bound.diagonal_split`).
        threads: torch CPU threads during the search (see :func:`solve_exact_batch`).

    Returns:
        :class:`~utils.branch_and_bound.BranchAndBoundResult` (with ``support``): ``lb <= optimum <= ub = e(x)``.
    """
    W = torch.as_tensor(weights)
    if W.dim() != 1:
        raise ValueError(f"weights must have shape (n,), got {tuple(W.shape)}; use solve_exact_batch for batches")
    return solve_exact_batch(gram, W[None], k, time_limit=time_limit, node_limit=node_limit, d=d, threads=threads)[0]
