"""Exact sparse least squares, certified bounds and pruning heuristics (pruning/sparse_ls*.py).

Every optimum is checked against an independent brute force: all supports of size ``k`` are
enumerated and each is refit by ``numpy.linalg.pinv`` of the patch matrix ``A`` itself (not of
``G = A'A``), the error being ``||A w - A_S x_S||^2``.
"""
from __future__ import annotations

import itertools
import math
from fractions import Fraction

import cvxpy as cp
import numpy as np
import pytest
import torch

from pruning import sparse_ls
from pruning.least_squares import reconstruction_error, refit, support_error
from pruning.perspective_bound import (
    NodeBatch,
    diagonal_split,
    dual_value,
    dual_value_margin,
    initial_point,
    lower_bound,
    solve_relaxation,
    verify_split,
)
from pruning.sparse_ls import DEFAULT_NODE_LIMIT, solve_exact, solve_exact_batch
from pruning.sparse_ls_cvxpy import available_backends, solve_mip
from pruning.sparse_ls_heuristics import (
    METHODS,
    iht_prune,
    magnitude_prune,
    obs_prune,
    pruning_methods,
    swap_search,
)
from pruning.support_enumeration import eigenvalue_floors, enumerate_supports, rounding_margins, support_count


def _patches(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    """A patch matrix ``A`` of one of several kinds (its Gram matrix is the problem's ``G``)."""
    if kind == "random":
        return rng.standard_normal((3 * n, n))
    if kind == "rank_deficient":  # fewer positions than inputs
        return rng.standard_normal((n // 2, n))
    if kind == "duplicate":  # two identical inputs and a dead one
        A = rng.standard_normal((3 * n, n))
        A[:, 1] = A[:, 0]
        A[:, -1] = 0.0
        return A
    if kind == "dead_inputs":  # several inputs that never fire (zero columns: zero diagonal entries of G)
        A = rng.standard_normal((3 * n, n))
        A[:, rng.choice(n, size=n // 3, replace=False)] = 0.0
        return A
    if kind == "real_like":  # correlated, ill-conditioned inputs with very different scales (post-ReLU-like)
        mixing = np.eye(n) + 0.6 * rng.standard_normal((n, n)) / np.sqrt(n)
        A = np.maximum(rng.standard_normal((4 * n, n)) @ mixing, 0.0) * np.exp(rng.uniform(-2.5, 2.5, n))
        return A
    raise ValueError(kind)


def _problem(rng: np.random.Generator, kind: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    A = _patches(rng, kind, n)
    w = rng.laplace(size=n) * np.exp(rng.uniform(-1.0, 1.0, n))
    return A, A.T @ A, w


def _brute_force(A: np.ndarray, w: np.ndarray, k: int) -> float:
    """``min over |S| = k of ||A w - A_S pinv(A_S) A w||^2`` (all supports, independent of our code)."""
    y = A @ w
    supports = np.array(list(itertools.combinations(range(A.shape[1]), k)))
    if k == 0:
        return float(y @ y)
    blocks = A[:, supports].transpose(1, 0, 2)  # (supports, positions, k)
    coefficients = np.linalg.pinv(blocks) @ y
    residual = y[None, :] - np.einsum("spk,sk->sp", blocks, coefficients)
    return float((residual**2).sum(1).min())


def _tolerance(A: np.ndarray, w: np.ndarray) -> float:
    """Absolute float64 resolution of an error: 1e-12 of ``|| |A| |w| ||^2``."""
    return 1e-12 * float(np.sum((np.abs(A) @ np.abs(w)) ** 2))


# --------------------------------------------------------------------------- least squares


def test_refit_is_least_squares_optimum_for_its_support() -> None:
    rng = np.random.default_rng(0)
    for kind in ("random", "rank_deficient", "duplicate", "real_like"):
        A, G, w = _problem(rng, kind, 9)
        for _ in range(5):
            support = rng.random(9) < 0.6
            support[:2] = True  # includes the duplicated pair for "duplicate"
            x = refit(G, w, torch.from_numpy(support)).numpy()
            assert (x[~support] == 0).all()
            expected = np.zeros(9)
            expected[support] = np.linalg.pinv(A[:, support]) @ (A @ w)  # minimum-norm least squares
            error = float(np.sum((A @ (w - expected)) ** 2))
            tol = _tolerance(A, w)
            assert float(support_error(G, w, torch.from_numpy(support))) == pytest.approx(error, rel=1e-8, abs=tol)
            assert float(reconstruction_error(G, w, x)) == pytest.approx(error, rel=1e-8, abs=tol)
            np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-8 * np.abs(expected).max())


# --------------------------------------------------------------------------- exact solver


# enumeration thresholds: every node searched (relaxations and branching only), small subtrees
# enumerated, and the default (these problems are then mostly enumerated at the root)
@pytest.mark.parametrize(("seed", "enumeration"), [(0, None), (1, None), (2, None), (3, None), (0, 0), (1, 0),
                                                   (2, 40), (3, 40)])
@pytest.mark.parametrize("kind", ["random", "rank_deficient", "duplicate", "real_like", "dead_inputs"])
@pytest.mark.slow
def test_exact_solver_matches_brute_force(seed: int, kind: str, enumeration, monkeypatch) -> None:
    if enumeration is not None:
        monkeypatch.setattr(sparse_ls, "_ENUMERATION_SUPPORTS", enumeration)
    rng = np.random.default_rng(100 * seed + len(kind))
    n = int(rng.integers(8, 15))
    A, G, w = _problem(rng, kind, n)
    ks = sorted({1, int(rng.integers(2, n - 1)), n // 2, n - 1})
    for k in ks:
        optimum = _brute_force(A, w, k)
        result = solve_exact(G, w, k)
        tol = _tolerance(A, w)
        assert result.status == "optimal"
        assert result.ub == pytest.approx(optimum, rel=1e-9, abs=tol)
        assert np.count_nonzero(result.x) <= k and result.support.sum() <= k
        assert (result.x[~result.support] == 0).all()
        assert result.ub == pytest.approx(float(np.sum((A @ (w - result.x)) ** 2)), rel=1e-9, abs=tol)
        assert result.lb <= optimum + tol and result.lb <= result.ub
        assert result.gap <= 1e-9 or result.ub - result.lb <= tol
        if enumeration is not None:
            continue
        # every pruning method is feasible, no better than the optimum and above the certified bounds
        root = float(lower_bound(G, w, k))
        assert root <= optimum + tol
        for name, x in pruning_methods(G, w, k).items():
            x = x.numpy()
            assert np.count_nonzero(x) <= k, name
            error = float(np.sum((A @ (w - x)) ** 2))
            assert error >= optimum - tol, name
            assert result.lb <= error + tol and root <= error + tol, name


@pytest.mark.slow
def test_real_like_n16_against_brute_force_and_batch() -> None:
    rng = np.random.default_rng(7)
    A = _patches(rng, "real_like", 16)
    G = A.T @ A
    W = rng.laplace(size=(3, 16))
    k = 6
    batch = solve_exact_batch(G, W, k)
    for w, result in zip(W, batch):
        assert result.status == "optimal"
        optimum = _brute_force(A, w, k)
        assert result.ub == pytest.approx(optimum, rel=1e-9, abs=_tolerance(A, w))
        single = solve_exact(G, w, k)
        assert single.ub == pytest.approx(result.ub, rel=1e-12) and np.array_equal(single.support, result.support)
    again = solve_exact_batch(torch.from_numpy(G), torch.from_numpy(W), k)  # same inputs -> same outputs
    for first, second in zip(batch, again):
        assert np.array_equal(first.x, second.x) and first.lb == second.lb and first.nodes == second.nodes


def test_degenerate_inputs() -> None:
    rng = np.random.default_rng(3)
    A, G, w = _problem(rng, "random", 6)
    r = float(w @ G @ w)
    assert float(lower_bound(G, w, 0)) == pytest.approx(r) and float(lower_bound(G, w, 6)) == 0.0
    everything = refit(G, w, torch.ones(6, dtype=torch.bool)).numpy()
    assert np.array_equal(iht_prune(G, w, 6, iterations=5).numpy(), everything)
    full = solve_exact(G, w, 6)
    assert full.status == "optimal" and full.ub == 0.0 and full.lb == 0.0 and np.array_equal(full.x, w)
    empty = solve_exact(G, w, 0)
    assert empty.status == "optimal" and not empty.x.any() and empty.ub == pytest.approx(r) and empty.lb == empty.ub
    zero = solve_exact(G, np.zeros(6), 3)
    assert zero.status == "optimal" and zero.ub == 0.0 and not zero.x.any()
    # a singular G (rank 2 < k): error 0 is reachable with k = 3 and the solver proves it
    A = rng.standard_normal((2, 6))
    singular = solve_exact(A.T @ A, w, 3)
    assert singular.status == "optimal" and singular.ub <= 1e-9 * float(np.sum((A @ w) ** 2))
    assert singular.lb <= singular.ub
    # the all-zero Gram matrix: every x has error 0
    assert solve_exact(np.zeros((5, 5)), rng.standard_normal(5), 2).ub == 0.0


def test_dead_inputs_are_pruned_first() -> None:
    """Inputs with a zero column of A cost nothing to prune: with k >= the live inputs the error is 0."""
    rng = np.random.default_rng(12)
    A = rng.standard_normal((40, 10))
    A[:, [1, 4, 5, 8]] = 0.0
    G, w = A.T @ A, rng.laplace(size=10)
    for k in (6, 7, 9):
        result = solve_exact(G, w, k)
        assert result.status == "optimal" and result.ub == pytest.approx(0.0, abs=_tolerance(A, w))
        assert not result.support[[1, 4, 5, 8]].any() and result.support.sum() == 6
    for k in (1, 3, 5):
        result = solve_exact(G, w, k)
        assert result.status == "optimal" and not result.support[[1, 4, 5, 8]].any()
        assert result.ub == pytest.approx(_brute_force(A, w, k), rel=1e-9, abs=_tolerance(A, w))


def test_enumeration_of_a_node_matches_brute_force() -> None:
    """enumerate_supports with inputs fixed in: the refit candidates hold the best completion."""
    rng = np.random.default_rng(13)
    A, G, w = _problem(rng, "real_like", 10)
    Gt, wt = torch.from_numpy(G)[None], torch.from_numpy(w)[None]
    b = Gt[0] @ wt[0]
    forced = torch.zeros(1, 10, dtype=torch.bool)
    forced[0, [2, 7]] = True
    free = ~forced
    free[0, 0] = False  # input 0 fixed out
    assert float(support_count(free, torch.tensor([3]))[0]) == 35  # C(7, 3)
    values = {}
    for extra in itertools.combinations(np.flatnonzero(free[0].numpy()), 3):
        support = np.zeros(10, dtype=bool)
        support[[2, 7, *extra]] = True
        values[tuple(np.flatnonzero(support))] = float(np.sum((A @ w - A[:, support] @ np.linalg.lstsq(
            A[:, support], A @ w, rcond=None)[0]) ** 2))
    best = min(values.values())
    d = diagonal_split(G)[None]
    margin = torch.tensor([1e-9 * best], dtype=torch.float64)
    for level in (math.inf, best * 1.5, best * 0.5):
        owner, candidates, rest = enumerate_supports(Gt, b[None], (wt[0] @ b)[None], d, forced, free, 3, margin,
                                                     torch.zeros(1, 10, dtype=torch.float64),
                                                     torch.tensor([level], dtype=torch.float64))
        assert (owner == 0).all() and (candidates.sum(1) == 5).all() and (candidates & forced).sum() == 2 * len(owner)
        found = [values[tuple(np.flatnonzero(c.numpy()))] for c in candidates]
        if level > best:  # the best support is among the candidates; the others are bounded below by rest
            assert min(found) == pytest.approx(best, rel=1e-12)
            assert float(rest[0]) <= min(v for key, v in values.items() if v > min(found) * (1 + 1e-6)) + 1e-9
        else:  # nothing reaches the level: the bound says so
            assert min(found, default=math.inf) >= level or float(rest[0]) >= level
            assert float(rest[0]) <= best * (1 + 1e-9)


def test_enumeration_of_nodes_with_different_live_inputs_matches_each_alone() -> None:
    """Nodes enumerated together (each reduced to its own inputs of F u U, padded to the widest) give what each gives
    alone, and each node's candidates hold its brute-force best support."""
    rng = np.random.default_rng(5)
    A, G, w = _problem(rng, "real_like", 10)
    Gt, wt = torch.from_numpy(G), torch.from_numpy(w)
    b = Gt @ wt
    forced = torch.zeros(4, 10, dtype=torch.bool)
    forced[:, 3] = True
    free = ~forced
    for node, out in enumerate(([], [0], [1, 8, 9], [0, 2, 4, 6])):  # |F u U| = 10, 9, 7, 6
        free[node, out] = False
    d = diagonal_split(G)[None].expand(4, 10)
    margin = torch.full((4,), 1e-12, dtype=torch.float64)
    deviation = torch.zeros(4, 10, dtype=torch.float64)
    level = torch.full((4,), math.inf, dtype=torch.float64)
    together = enumerate_supports(Gt.expand(4, 10, 10), b.expand(4, 10), (wt @ b).expand(4), d, forced, free, 2,
                                  margin, deviation, level)
    for node in range(4):
        alone = enumerate_supports(Gt[None], b[None], (wt @ b)[None], d[:1], forced[node:node + 1],
                                   free[node:node + 1], 2, margin[:1], deviation[:1], level[:1])
        mine = together[0] == node
        assert torch.equal(together[1][mine], alone[1]) and torch.equal(together[2][node:node + 1], alone[2])
        def error(pair: tuple[int, int]) -> float:  # the refit by least squares on A itself
            patch = A[:, [3, *pair]]
            return float(np.sum((A @ w - patch @ np.linalg.lstsq(patch, A @ w, rcond=None)[0]) ** 2))

        best = min(itertools.combinations(np.flatnonzero(free[node].numpy()), 2), key=error)
        expected = torch.from_numpy(np.isin(np.arange(10), [3, *best]))
        assert any(torch.equal(candidate, expected) for candidate in together[1][mine])


def _support_norm_by_stable_sort(u: torch.Tensor, choice: torch.Tensor, budget: torch.Tensor):
    """The reference ``(Omega, tau, top)``: the descending order and ranks from a stable sort of every row."""
    n = u.shape[-1]
    u = torch.where(choice, u, 0.0)
    ordered, order = torch.sort(u, dim=-1, descending=True, stable=True)
    suffix = torch.flip(torch.flip(ordered, [-1]).cumsum(-1), [-1])
    m_range = torch.arange(n)
    remaining = (budget[:, None] - m_range[None, :]).to(u.dtype)
    valid = remaining > 0
    tau_m = torch.where(valid, suffix / torch.where(valid, remaining, 1.0), 0.0)
    ok = valid & (ordered <= tau_m * (1.0 + 4.0 * torch.finfo(torch.float64).eps))
    first = torch.minimum(torch.where(ok, m_range[None, :], n).amin(-1), (budget - 1).clamp_min(0))
    tau = tau_m.gather(1, first[:, None])[:, 0]
    rank = torch.empty_like(order).scatter_(1, order, m_range[None, :].expand_as(order))
    top = (rank < first[:, None]) & choice
    omega = torch.where(top, u * u, 0.0).sum(-1) + (budget - first).clamp_min(0).to(u.dtype) * tau * tau
    return omega, tau, top


@pytest.mark.parametrize("n", [1, 2, 5, 32])
def test_support_norm_and_top_sums_match_a_stable_sort_with_ties(n: int) -> None:
    """Rows with many equal values (a few levels and zeros) and every budget: the same bits as the stable-sort
    reference, ties broken by position; ``top_sum`` as the sum of a sorted row's first entries."""
    from pruning.perspective_bound import _support_norm, top_sum

    generator = torch.Generator().manual_seed(n)
    rows = 600
    u = torch.randint(0, 4, (rows, n), generator=generator).to(torch.float64) * 0.25
    u[: rows // 2] += torch.rand(rows // 2, n, generator=generator, dtype=torch.float64) * (u[: rows // 2] > 0.5)
    choice = torch.rand(rows, n, generator=generator) > 0.2
    budget = torch.randint(1, n + 1, (rows,), generator=generator)
    for got, expected in zip(_support_norm(u, choice, budget), _support_norm_by_stable_sort(u, choice, budget)):
        assert torch.equal(got, expected)
    count = torch.randint(0, n + 1, (rows,), generator=generator)
    ordered = torch.sort(u, dim=-1, descending=True).values
    expected = torch.stack([ordered[i, : int(count[i])].sum() for i in range(rows)])
    assert torch.allclose(top_sum(u, count), expected, rtol=1e-15, atol=0.0)


def _exact_support_error(G: np.ndarray, w: np.ndarray, support) -> Fraction:
    """``e(S) = r - b_S' G_SS^-1 b_S`` in exact rational arithmetic (the float entries of ``G`` and ``w`` as given)."""
    n = len(w)
    Gq = [[Fraction(float(G[i, j])) for j in range(n)] for i in range(n)]
    wq = [Fraction(float(value)) for value in w]
    b = [sum(Gq[i][j] * wq[j] for j in range(n)) for i in range(n)]
    S = list(support)
    rows = [[Gq[i][j] for j in S] + [b[i]] for i in S]  # Gauss-Jordan on [G_SS | b_S]
    for p in range(len(S)):
        rows[p] = [value / rows[p][p] for value in rows[p]]
        for q in range(len(S)):
            if q != p:
                rows[q] = [a - rows[q][p] * c for a, c in zip(rows[q], rows[p])]
    return sum(wq[i] * b[i] for i in range(n)) - sum(b[i] * row[-1] for i, row in zip(S, rows))


def _tied_problem(seed: int, floor: float, n: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(G, w, s)``: ``G = H + P H P + diag(s)``, ``H`` with eigenvalues from 1 down to 1e-9 and ``P`` the swap of
    inputs 0 and 5, ``s >= floor`` swap-symmetric, and ``w_0 = w_5``: every support containing one of the two has a
    twin with exactly the same error, evaluated by different float operations (float addition commutes, so the
    symmetry is exact). ``G - diag(s)`` is PSD: ``0.999 s`` is a diagonal split."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    H = (Q * np.geomspace(1.0, 1e-9, n)) @ Q.T
    swap = np.arange(n)
    swap[[0, 5]] = [5, 0]
    spread = floor * rng.uniform(1.0, 100.0, n)
    spread = spread + spread[swap]
    G = H + H[swap][:, swap] + np.diag(spread)
    w = rng.standard_normal(n)
    w[5] = w[0]
    return G, w, spread


@pytest.mark.slow
def test_enumeration_margin_is_certified_on_ill_conditioned_ties() -> None:
    """``rest`` is a lower bound on the exact (rational) error of every support not returned, with the
    certified margin, at the root and at a node with an input fixed in (partial sets pruned with the split);
    without the margin the exactly tied twins break it; the solver's lb never exceeds the exact optimum."""
    k, n = 3, 8
    broken = 0
    for seed, floor in itertools.product(range(3), (0.0, 1e-4)):
        G, w, spread = _tied_problem(seed, floor)
        exact = {S: _exact_support_error(G, w, S) for S in itertools.combinations(range(n), k)}
        Gt, wt = torch.from_numpy(G)[None], torch.from_numpy(w)[None]
        live = torch.ones(1, n, dtype=torch.bool)
        problem = NodeBatch.from_problems(Gt, wt, torch.zeros_like(wt), ~live, live, torch.tensor([k]))
        mu = eigenvalue_floors(Gt, live, torch.linalg.eigvalsh(Gt)[:, 0])
        assert 0 < float(mu[0]) <= np.linalg.eigvalsh(G)[0]
        margin, deviation = rounding_margins(Gt, problem.b, problem.r, problem.abs_gw, problem.abs_r, live, k, mu)
        assert torch.isfinite(margin).all() and float(margin[0]) < 1e-3 * float(problem.r[0])
        forced = torch.zeros(1, n, dtype=torch.bool)
        forced[0, 2] = True
        best_with_2 = min(value for S, value in exact.items() if 2 in S)
        d = torch.from_numpy(0.999 * spread)[None]
        assert verify_split(G, d[0])
        cases = ((~live, live, k, torch.zeros_like(wt), math.inf),  # the root, every support
                 (forced, ~forced, k - 1, d, float(best_with_2) * (1 + 1e-9)))  # a node: F = {2}, a prune level
        for forced_in, free, budget, split, level in cases:
            inside = {S: value for S, value in exact.items() if all(i in S for i in np.flatnonzero(forced_in[0]))}
            for certified in (True, False):
                m, dev = (margin, deviation) if certified else (torch.zeros(1), torch.zeros(1, n))
                _, candidates, rest = enumerate_supports(Gt, problem.b, problem.r, split, forced_in, free, budget, m,
                                                         dev, torch.tensor([level], dtype=torch.float64))
                returned = {tuple(np.flatnonzero(c)) for c in candidates.numpy()}
                others = min((value for S, value in inside.items() if S not in returned), default=math.inf)
                holds = float(rest[0]) == math.inf or Fraction(float(rest[0])) <= others
                if certified:
                    assert holds
                else:
                    broken += not holds
        result = solve_exact(G, w, k)
        optimum = min(exact.values())
        resolution = 32 * (n + 2) * np.finfo(np.float64).eps * float(np.abs(w) @ np.abs(G) @ np.abs(w))
        assert result.status == "optimal" and Fraction(result.lb) <= optimum + Fraction(resolution)  # module doc
        assert exact[tuple(np.flatnonzero(result.support))] == optimum
    assert broken >= 2  # the test is sensitive to the margin: the float values alone misrank tied twins


@pytest.mark.slow
def test_node_limit_results_are_reproducible_across_runs_and_threads() -> None:
    """The default (work) limit: identical results whatever the load and torch's thread count."""
    rng = np.random.default_rng(14)
    A = _patches(rng, "real_like", 26)
    G, W = A.T @ A, rng.laplace(size=(3, 26))
    previous = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            runs.append(solve_exact_batch(G, W, 9, node_limit=12) + [solve_exact(G, W[0], 9)])
    finally:
        torch.set_num_threads(previous)
    assert {result.status for result in runs[0][:3]} == {"node_limit"} and runs[0][3].status == "optimal"
    for run in runs[1:]:
        for first, again in zip(runs[0], run):
            assert np.array_equal(first.x, again.x) and np.array_equal(first.support, again.support)
            assert (first.ub, first.lb, first.status, first.nodes) == (again.ub, again.lb, again.status, again.nodes)
    assert DEFAULT_NODE_LIMIT >= 10_000
    assert runs[0][3].nodes < DEFAULT_NODE_LIMIT


@pytest.mark.slow
def test_time_and_node_limits_report_a_certified_gap() -> None:
    rng = np.random.default_rng(11)
    A = _patches(rng, "real_like", 28)
    G, w = A.T @ A, rng.laplace(size=28)
    heuristic = min(float(reconstruction_error(G, w, x)) for x in pruning_methods(G, w, 10).values())
    full = solve_exact(G, w, 10)
    assert full.status == "optimal"
    limited = [solve_exact(G, w, 10, time_limit=1e-4), solve_exact(G, w, 10, node_limit=5)]
    assert [result.status for result in limited] == ["time_limit", "node_limit"]
    for result in limited:
        assert 0.0 <= result.lb <= full.ub <= result.ub <= heuristic * (1 + 1e-12)
        assert result.gap > 0.0 and result.nodes <= 5
        assert np.count_nonzero(result.x) <= 10
        assert result.ub == pytest.approx(float(reconstruction_error(G, w, result.x)), rel=1e-12)
    assert limited[1].lb > 0.0  # five relaxations already give a positive certified bound


@pytest.mark.parametrize(
    ("k", "message"), [(7, "k must be in"), (-1, "k must be in"), (2.5, "must be an integer")]
)
def test_bad_budget_is_a_clear_value_error(k, message: str) -> None:
    G, w = np.eye(6), np.ones(6)
    with pytest.raises(ValueError, match=message):
        solve_exact(G, w, k)
    with pytest.raises(ValueError, match=message):
        pruning_methods(G, w, k)


def test_bad_matrices_are_value_errors() -> None:
    with pytest.raises(ValueError, match="positive semidefinite"):
        solve_exact(np.diag([1.0, -1.0, 1.0]), np.ones(3), 1)
    with pytest.raises(ValueError, match="does not fit"):
        solve_exact(np.eye(4), np.ones(3), 1)
    with pytest.raises(ValueError, match="time_limit"):
        solve_exact(np.eye(3), np.ones(3), 1, time_limit=0)


# --------------------------------------------------------------------------- certified bounds


def test_diagonal_split_is_dual_feasible_and_near_the_sdp_optimum() -> None:
    rng = np.random.default_rng(5)
    for kind in ("random", "real_like"):
        _, G, _ = _problem(rng, kind, 10)
        d = diagonal_split(G).numpy()
        assert (d >= 0).all() and verify_split(G, d)
        assert np.linalg.eigvalsh(G - np.diag(d))[0] >= -1e-12 * np.abs(G).max()
        variable = cp.Variable(10, nonneg=True)
        cp.Problem(cp.Maximize(cp.sum(variable)), [G - cp.diag(variable) >> 0]).solve(solver="CLARABEL")
        assert d.sum() == pytest.approx(0.999 * variable.value.sum(), rel=1e-3)  # 0.999: kept inside the cone
        assert not verify_split(G, d + 1e-3 * d.sum())  # a larger diagonal is rejected
    for kind in ("rank_deficient", "duplicate"):  # singular: no positive split is certified
        _, G, _ = _problem(rng, kind, 10)
        d = diagonal_split(G).numpy()
        assert verify_split(G, d) and np.linalg.eigvalsh(G - np.diag(d))[0] >= -1e-9 * np.abs(G).max()


def _perspective_relaxation(G: np.ndarray, w: np.ndarray, k: int, d: np.ndarray) -> float:
    """The perspective relaxation value by Clarabel (an independent conic solver).

    In Jacobi-scaled variables ``x_i = y_i / sqrt(G_ii)`` (Clarabel is inaccurate on badly scaled inputs).
    """
    n = w.size
    scale = 1.0 / np.sqrt(np.diag(G))
    values, vectors = np.linalg.eigh((G - np.diag(d)) * np.outer(scale, scale))
    factor = vectors * np.sqrt(np.clip(values, 0.0, None))
    x, z, t = cp.Variable(n), cp.Variable(n), cp.Variable(n)
    constraints = [z >= 0, z <= 1, cp.sum(z) <= k] + [cp.quad_over_lin(x[i], z[i]) <= t[i] for i in range(n)]
    objective = cp.sum_squares(factor.T @ x) - 2 * (scale * (G @ w)) @ x + w @ G @ w + (d * scale**2) @ t
    problem = cp.Problem(cp.Minimize(objective), constraints)
    problem.solve(solver="CLARABEL")
    return float(problem.value)


def _water_filling(u: np.ndarray, k: int) -> np.ndarray:
    """``z`` minimising ``sum u_i^2 / z_i`` over ``0 <= z <= 1, sum z <= k``: ``min(1, u / tau)`` (bisection on tau)."""
    if np.count_nonzero(u) <= k:
        return (u > 0).astype(float)
    low, high = 0.0, u.sum()
    for _ in range(200):
        tau = 0.5 * (low + high)
        low, high = (tau, high) if np.minimum(1.0, u / tau).sum() > k else (low, tau)
    return np.minimum(1.0, u / high)


def test_relaxation_is_solved_to_a_matching_primal_point() -> None:
    """The certified root bound equals the value of a feasible relaxed point (so both are the optimum)."""
    rng = np.random.default_rng(9)
    for kind in ("random", "real_like", "real_like"):
        _, G, w = _problem(rng, kind, 10)
        k = 4
        d = diagonal_split(G).numpy()
        assert np.linalg.eigvalsh(G - np.diag(d))[0] >= -1e-12 * np.abs(G).max()
        nodes = NodeBatch.from_problems(torch.from_numpy(G)[None], torch.from_numpy(w)[None], torch.from_numpy(d)[None],
                                        torch.zeros(1, 10, dtype=torch.bool), torch.ones(1, 10, dtype=torch.bool),
                                        torch.full((1,), k))
        bound, x, _, _ = solve_relaxation(nodes, initial_point(nodes), max_iterations=100)
        x = x[0].numpy()
        z = _water_filling(np.sqrt(d) * np.abs(x), k)
        assert z.sum() <= k + 1e-9 and (z <= 1).all() and (z[x != 0] > 0).all()
        active = x != 0
        value = x @ G @ x - 2 * (G @ w) @ x + w @ G @ w + np.sum(d[active] * x[active] ** 2 * (1 / z[active] - 1))
        assert float(bound[0]) <= value and value - float(bound[0]) <= 1e-7 * value
        assert float(lower_bound(G, w, k)) == pytest.approx(float(bound[0]), rel=1e-9)


def test_root_bound_matches_clarabel_and_any_dual_point_is_below_it() -> None:
    rng = np.random.default_rng(9)
    _, G, w = _problem(rng, "random", 10)
    k = 4
    d = diagonal_split(G).numpy()
    relaxation = _perspective_relaxation(G, w, k, d)
    assert float(lower_bound(G, w, k)) == pytest.approx(relaxation, rel=1e-5)  # Clarabel's accuracy
    assert float(lower_bound(G, w, k, d=0.5 * d)) <= float(lower_bound(G, w, k))  # the relaxation grows with d
    nodes = NodeBatch.from_problems(
        torch.from_numpy(G)[None].expand(20, -1, -1), torch.from_numpy(w)[None].expand(20, -1),
        torch.from_numpy(d)[None].expand(20, -1), torch.zeros(20, 10, dtype=torch.bool),
        torch.ones(20, 10, dtype=torch.bool), torch.full((20,), k),
    )
    v = torch.from_numpy(rng.standard_normal((20, 10)) * np.abs(w).max())
    v[0], v[1] = 0.0, torch.from_numpy(w)
    values = dual_value(nodes, v) - dual_value_margin(nodes, v)
    assert (values <= float(lower_bound(G, w, k)) * (1 + 1e-12)).all()
    # closed forms at v = 0 and v = w (module doc)
    q = (G @ w) ** 2 / d
    assert float(values[0]) == pytest.approx(w @ G @ w - np.sort(q)[-k:].sum(), rel=1e-9)
    assert float(values[1]) == pytest.approx(np.sort(d * w * w)[: 10 - k].sum(), rel=1e-9)


# --------------------------------------------------------------------------- heuristics


def test_heuristics_behave_as_documented() -> None:
    rng = np.random.default_rng(21)
    _, G, w = _problem(rng, "real_like", 10)
    k = 4
    magnitude = magnitude_prune(w, k).numpy()
    keep = np.argsort(-np.abs(w), kind="stable")[:k]
    assert set(np.flatnonzero(magnitude)) == set(keep) and np.array_equal(magnitude[keep], w[keep])
    # OBS removing one weight picks the best single removal
    removal = obs_prune(G, w, 9).numpy()
    errors = []
    for i in range(10):
        support = np.ones(10, dtype=bool)
        support[i] = False
        errors.append(float(support_error(G, w, torch.from_numpy(support))))
    assert float(reconstruction_error(G, w, removal)) == pytest.approx(min(errors), rel=1e-9)
    # swap search ends in a local optimum: no single swap improves its support
    start = torch.from_numpy(np.isin(np.arange(10), keep))
    support = swap_search(G, w, start).numpy()
    assert support.sum() == k
    final = float(support_error(G, w, torch.from_numpy(support)))
    assert final <= float(support_error(G, w, start)) * (1 + 1e-12)
    for i in np.flatnonzero(support):
        for j in np.flatnonzero(~support):
            swapped = support.copy()
            swapped[i], swapped[j] = False, True
            assert float(support_error(G, w, torch.from_numpy(swapped))) >= final * (1 - 1e-9)
    methods = pruning_methods(G, w, k)
    assert list(methods) == list(METHODS)
    errors = {name: float(reconstruction_error(G, w, x)) for name, x in methods.items()}
    # the refits and IHT (which starts from the magnitude solution and keeps its best iterate) improve on it
    assert errors["magnitude_refit"] <= errors["magnitude"] and errors["iht"] <= errors["magnitude"]
    assert errors["swap"] <= min(errors[name] for name in METHODS[:-1]) * (1 + 1e-12)


# --------------------------------------------------------------------------- optional external solver


@pytest.mark.skipif("SCIP" not in available_backends(), reason="SCIP (pyscipopt) is not installed")
def test_scip_backend_finds_the_same_optimum() -> None:
    rng = np.random.default_rng(4)
    for formulation, n, k in (("bigm", 10, 4), ("perspective", 6, 2)):  # SCIP is slow on the cones
        _, G, w = _problem(rng, "random", n)
        ours = solve_exact(G, w, k)
        theirs = solve_mip(G, w, k, solver="SCIP", formulation=formulation, time_limit=60)
        assert theirs.status == "optimal"
        assert theirs.error == pytest.approx(ours.ub, rel=1e-7)
        assert theirs.support.sum() <= k


def test_backend_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="not installed"):
        solve_mip(np.eye(3), np.ones(3), 1, solver="NO_SUCH_SOLVER")
    if available_backends():
        with pytest.raises(ValueError, match="positive definite"):
            solve_mip(np.zeros((3, 3)), np.ones(3), 1, solver=available_backends()[0])
