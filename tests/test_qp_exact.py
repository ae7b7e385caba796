"""Branch and bound for box-constrained integer quadratic problems (quantization/qp_exact.py).

Small problems are checked against the optimum found by enumerating every integer point of the
box, and the ellipsoid node bounds against the minimum over every completion of a partial
assignment; mid-size ones against the previous solver, the best-first box search kept in
``tests/reference_solvers.py`` (an independent search), and
the root bounds against the box relaxation and the SDP dual of :mod:`quantization.qp_bounds`;
real-size ones against the heuristic ``one_opt(sequential_rounding)``.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from reference_solvers import solve_exact_box
from threadpoolctl import threadpool_limits

from quantization import qp_exact
from quantization.ptq_rounding import one_opt, qp_objective, sequential_rounding
from quantization.qp_bounds import QuadraticProblems, dual_bound, solve_dual
from quantization.qp_exact import (
    BASES,
    DEFAULT_NODE_LIMIT,
    box_multipliers,
    ellipsoid_bound,
    sdp_split,
    solve_exact,
    solve_exact_batch,
)
from utils.branch_and_bound import BranchAndBoundResult


def _objective(P: np.ndarray, q: np.ndarray, r: float, Z: np.ndarray) -> np.ndarray:
    return np.einsum("ki,ij,kj->k", Z, P, Z) + 2.0 * Z @ q + r


pytestmark = pytest.mark.usefixtures("one_thread")


def _box_points(lo, hi) -> np.ndarray:
    """Every integer point of the box, ``(N, n)``, in lexicographic order."""
    grids = np.meshgrid(*[np.arange(a, b + 1, dtype=np.float64) for a, b in zip(lo, hi)], indexing="ij")
    return np.stack([grid.ravel() for grid in grids], axis=1).reshape(-1, len(lo))


def _brute_force(P, q, r, lo, hi) -> float:
    return float(_objective(P, q, r, _box_points(lo, hi)).min())


def _scale(P, q, r, lo, hi) -> float:
    """The magnitude of f's terms over the box: the float64 resolution of f is ~1e-16 of it."""
    m = np.maximum(np.abs(lo), np.abs(hi))
    return float(m @ np.abs(P) @ m + 2.0 * np.abs(q) @ m + abs(r))


def _random_problem(rng: np.random.Generator, n: int, bits: int, rows: int, spread: float):
    A = rng.standard_normal((rows, n))
    if rng.random() < 0.3 and n > 1:  # a duplicated input column: singular P even with many rows
        A[:, -1] = A[:, 0]
    P = A.T @ A
    w = rng.standard_normal(n) * spread  # spread > 2^(bits-1): optimum on the box boundary
    q, r = -P @ w, float(w @ P @ w)
    lo = np.full(n, -(2.0 ** (bits - 1)))
    hi = np.full(n, 2.0 ** (bits - 1) - 1)
    return P, q, r, lo, hi


def _ill_conditioned_problem(rng: np.random.Generator, n: int, bits: int, spread: float):
    """Gram matrix of random-walk signals (neighbouring inputs almost equal, as the pixels of an image patch):
    condition numbers ~1e3-1e5; weights ``spread`` times the grid (clipped where it exceeds the box)."""
    A = np.cumsum(rng.standard_normal((3 * n, n)) * np.r_[1.0, np.full(n - 1, 0.05)], axis=1)
    P = A.T @ A
    w = rng.standard_normal(n) * spread
    lo, hi = np.full(n, -(2.0 ** (bits - 1))), np.full(n, 2.0 ** (bits - 1) - 1)
    return P, -P @ w, float(w @ P @ w), lo, hi


def _assert_feasible(result: BranchAndBoundResult, P, q, r, lo, hi) -> None:
    z = result.x
    assert np.array_equal(z, np.round(z)) and (z >= lo).all() and (z <= hi).all()
    assert result.ub == pytest.approx(float(_objective(P, q, r, z[None])[0]), rel=1e-12, abs=1e-14 * _scale(P, q, r, lo, hi))
    assert result.lb <= result.ub


SEARCHES = [("ellipsoid", basis) for basis in BASES] + [("box", None)]  # box: the reference search (tests/)


def _solve(node_bound: str, basis: str | None, *args, **kwargs) -> BranchAndBoundResult:
    """:func:`solve_exact` in ``basis``, or the reference box search for ``node_bound == "box"``."""
    return solve_exact_box(*args, **kwargs) if node_bound == "box" else solve_exact(*args, basis=basis, **kwargs)


@pytest.mark.parametrize("node_bound, basis", SEARCHES)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.slow
def test_matches_brute_force(seed: int, node_bound: str, basis: str | None) -> None:
    rng = np.random.default_rng(seed)
    for trial in range(25):
        n = int(rng.integers(1, 7))
        bits = 2 if n == 6 else int(rng.integers(2, 4))
        rows = int(rng.integers(1, 2 * n + 1))  # rows < n: rank-deficient P
        spread = float(rng.choice([0.3, 1.0, 3.0, 10.0]))
        P, q, r, lo, hi = _random_problem(rng, n, bits, rows, spread)
        result = _solve(node_bound, basis, P, q, r, lo, hi)
        best = _brute_force(P, q, r, lo, hi)
        tolerance = max(1e-9 * abs(best), 1e-13 * _scale(P, q, r, lo, hi))
        context = f"seed {seed} trial {trial} n {n} bits {bits} rows {rows} {node_bound} {basis}"
        assert result.status == "optimal", context
        _assert_feasible(result, P, q, r, lo, hi)
        assert abs(result.ub - best) <= tolerance, context
        assert result.lb <= best + tolerance, context
        assert result.ub - result.lb <= tolerance, context


@pytest.mark.parametrize("basis", BASES[1:])
@pytest.mark.parametrize("seed", range(3))
def test_wide_box_nearly_singular_matches_brute_force(seed: int, basis: str) -> None:
    """Two nearly equal input columns: along their difference f is almost flat, so the intervals of
    children the search evaluates are tens of integers wide (the narrow-box tests hardly exercise them);
    the reduced basis turns that direction into a lattice vector whose range is clipped by the box."""
    rng = np.random.default_rng(40 + seed)
    for trial in range(3):
        A = rng.standard_normal((6, 3))
        A[:, 2] = A[:, 0] + 10.0 ** rng.uniform(-3, -1) * rng.standard_normal(6)
        P = A.T @ A
        w = rng.standard_normal(3) * 30.0
        q, r = -P @ w, float(w @ P @ w)
        lo, hi = np.full(3, -40.0), np.full(3, 39.0)
        result = solve_exact(P, q, r, lo, hi, z0=np.zeros(3), basis=basis)  # a poor start: wide early thresholds
        best = _brute_force(P, q, r, lo, hi)
        tolerance = max(1e-9 * abs(best), 1e-13 * _scale(P, q, r, lo, hi))
        assert result.status == "optimal", f"seed {seed} trial {trial}"
        assert abs(result.ub - best) <= tolerance, f"seed {seed} trial {trial}"


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("seed", range(3))
def test_ill_conditioned_matches_brute_force(seed: int, basis: str) -> None:
    """Image-patch-like Gram matrices (the hard case of the layer problems), with weights inside the grid
    and beyond it, a duplicated input (singular P) and a few fixed coordinates."""
    rng = np.random.default_rng(60 + seed)
    for trial in range(4):
        n, bits = (6, 3) if trial % 2 else (8, 2)
        P, q, r, lo, hi = _ill_conditioned_problem(rng, n, bits, spread=float(rng.choice([0.7, 3.0])) * 2 ** (bits - 1))
        if trial == 3:
            A = np.linalg.cholesky(P + 1e-9 * np.eye(n)).T
            A[:, 1] = A[:, 0]
            P = A.T @ A
            w = rng.standard_normal(n) * 2.0
            q, r = -P @ w, float(w @ P @ w)
        if trial == 2:
            lo[[1, 4]] = hi[[1, 4]] = 0.0
        result = solve_exact(P, q, r, lo, hi, basis=basis)
        best = _brute_force(P, q, r, lo, hi)
        tolerance = max(1e-9 * abs(best), 1e-13 * _scale(P, q, r, lo, hi))
        context = f"seed {seed} trial {trial} {basis} cond {np.linalg.cond(P):.1e}"
        assert result.status == "optimal", context
        _assert_feasible(result, P, q, r, lo, hi)
        assert abs(result.ub - best) <= tolerance, context
        assert result.ub - result.lb <= tolerance, context


def test_optimum_on_the_box_boundary() -> None:
    # Diagonal P: the optimum is the clamped rounding of the continuous minimiser, far outside the box.
    P = np.diag([1.0, 2.0, 3.0])
    w = np.array([10.0, -10.0, 0.4])
    q, r = -P @ w, float(w @ P @ w)
    lo, hi = np.full(3, -4.0), np.full(3, 3.0)
    result = solve_exact(P, q, r, lo, hi)
    assert result.status == "optimal"
    np.testing.assert_array_equal(result.x, [3.0, -4.0, 0.0])
    assert result.ub == pytest.approx(_brute_force(P, q, r, lo, hi), rel=1e-12)


def test_zero_matrix_and_fixed_coordinates() -> None:
    P = np.zeros((3, 3))
    q = np.array([1.0, -2.0, 0.0])
    lo, hi = np.array([-2.0, -2.0, 1.0]), np.array([1.0, 1.0, 1.0])
    result = solve_exact(P, q, 0.5, lo, hi)
    assert result.status == "optimal"
    assert result.ub == pytest.approx(_brute_force(P, q, 0.5, lo, hi), rel=1e-12)
    assert result.lb <= result.ub


def _layer_problem(rng: np.random.Generator, n: int, bits: int = 4):
    """A layer-like problem: Gram matrix of correlated random data, weights scaled to the grid."""
    mixing = np.eye(n) + 0.9 * rng.standard_normal((n, n)) / np.sqrt(n)
    A = rng.standard_normal((4 * n, n)) @ mixing
    gram = A.T @ A
    w = rng.standard_normal(n) * 0.3
    step = 2.0 * np.abs(w).max() / (2**bits - 1)
    P, q, r = step**2 * gram, -step * gram @ w, float(w @ gram @ w)
    lo, hi = np.full(n, -(2.0 ** (bits - 1))), np.full(n, 2.0 ** (bits - 1) - 1)
    return P, q, r, lo, hi


def _heuristic_value(P, q, r, lo, hi) -> float:
    P_t, q_t, r_t = torch.from_numpy(P)[None], torch.from_numpy(q)[None], torch.tensor([r], dtype=torch.float64)
    lo_t, hi_t = torch.from_numpy(lo)[None], torch.from_numpy(hi)[None]
    z = one_opt(P_t, q_t, r_t, sequential_rounding(P_t, q_t, lo_t, hi_t), lo_t, hi_t)
    return float(qp_objective(P_t, q_t, r_t, z)[0])


@pytest.mark.parametrize("n", [16, 24, 32])
def test_real_size_no_worse_than_heuristic(n: int) -> None:
    rng = np.random.default_rng(100 + n)
    P, q, r, lo, hi = _layer_problem(rng, n)
    result = solve_exact(P, q, r, lo, hi, node_limit=200_000)
    _assert_feasible(result, P, q, r, lo, hi)
    assert result.status in ("optimal", "node_limit")
    assert result.ub <= _heuristic_value(P, q, r, lo, hi) * (1 + 1e-12)
    if result.status == "optimal":
        assert result.gap <= 1e-9


@pytest.mark.slow
def test_bases_agree_on_ill_conditioned_mid_size_problems() -> None:
    """16 and 20 patch-like inputs at 4 bits, weights inside the grid and clipped: the two bases search
    different trees with different node bounds below the root (and "auto" races them); they must agree
    on the optimum (the permutation search within its bounds where the node limit stops it)."""
    rng = np.random.default_rng(8)
    for n, spread in ((16, 6.0), (20, 6.0), (20, 10.0)):
        P, q, r, lo, hi = _ill_conditioned_problem(rng, n, 4, spread=spread)
        results = {basis: solve_exact(P, q, r, lo, hi, basis=basis, node_limit=1_000_000) for basis in BASES}
        best = results["reduced"].ub
        for basis, result in results.items():
            context = (n, spread, basis, result.status, result.nodes)
            _assert_feasible(result, P, q, r, lo, hi)
            assert result.lb <= best * (1 + 1e-9) and result.ub >= best * (1 - 1e-9), context
            if basis != "permutation":
                assert result.status == "optimal" and result.ub == pytest.approx(best, rel=1e-9), context
    # the last one is hard for the permutation basis only; "auto" needs about 65536 + 2 * 17613 nodes
    assert results["permutation"].status == "node_limit" and results["reduced"].nodes < 20_000
    assert results["auto"].nodes < 100_000


def _key(result: BranchAndBoundResult) -> tuple:
    """Everything of a result but its time, bitwise."""
    return result.x.tobytes(), result.ub, result.lb, result.status, result.nodes


@pytest.mark.slow
def test_node_limit_results_do_not_depend_on_clock_threads_or_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a time limit the solver reads no clock: the same inputs give bitwise the same result with a
    clock that jumps an hour per reading, other torch and BLAS thread counts, and a busy CPU -- both when
    the node limit stops the search (mid-race of the two bases) and when it proves the optimum."""
    rng = np.random.default_rng(9)
    P, q, r, lo, hi = _ill_conditioned_problem(rng, 20, 4, spread=10.0)

    def solve_all() -> list[tuple]:
        return [_key(solve_exact(P, q, r, lo, hi, node_limit=limit)) for limit in (20_000, 67_000, DEFAULT_NODE_LIMIT)]

    with threadpool_limits(limits=1):
        reference = solve_all()
    assert [key[3] for key in reference] == ["node_limit", "node_limit", "optimal"]
    clock = iter(np.arange(1e6) * 3600.0)
    monkeypatch.setattr(qp_exact, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: float(next(clock)))}))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert solve_all() == reference
        assert solve_exact(P, q, r, lo, hi, time_limit=1.0).status == "time_limit"  # the clock is read when asked
    finally:
        torch.set_num_threads(threads)
        busy.kill()
        busy.wait()
    assert solve_all() == reference


def test_time_and_node_limits_report_a_gap() -> None:
    rng = np.random.default_rng(7)
    P, q, r, lo, hi = _layer_problem(rng, 32)
    for kwargs, status in (({"time_limit": 0.0}, "time_limit"), ({"node_limit": 5}, "node_limit")):
        result = solve_exact(P, q, r, lo, hi, **kwargs)
        assert result.status == status
        _assert_feasible(result, P, q, r, lo, hi)
        assert result.lb < result.ub
        assert result.ub <= _heuristic_value(P, q, r, lo, hi) * (1 + 1e-12)


def test_batch_matches_single_problems() -> None:
    rng = np.random.default_rng(3)
    problems = [_random_problem(rng, 4, 3, 6, 2.0) for _ in range(3)]
    batch = QuadraticProblems(
        torch.from_numpy(np.stack([p[0] for p in problems])),
        torch.from_numpy(np.stack([p[1] for p in problems])),
        torch.tensor([p[2] for p in problems], dtype=torch.float64),
        torch.from_numpy(np.stack([p[3] for p in problems])),
        torch.from_numpy(np.stack([p[4] for p in problems])),
    )
    results = solve_exact_batch(batch)
    assert len(results) == 3
    for result, (P, q, r, lo, hi) in zip(results, problems):
        assert result.status == "optimal"
        _assert_feasible(result, P, q, r, lo, hi)
        best = _brute_force(P, q, r, lo, hi)
        assert abs(result.ub - best) <= max(1e-9 * abs(best), 1e-13 * _scale(P, q, r, lo, hi))
    with pytest.raises(ValueError):
        solve_exact_batch(batch.without_box())


def test_rejects_infeasible_start() -> None:
    P, q, r, lo, hi = np.eye(2), np.zeros(2), 0.0, np.zeros(2), np.ones(2)
    with pytest.raises(ValueError):
        solve_exact(P, q, r, lo, hi, z0=np.array([2.0, 0.0]))
    with pytest.raises(ValueError):
        solve_exact(P, q, r, np.array([0.5, 0.0]), hi)


# --------------------------------------------------------------------------- the ellipsoid node bound


def _narrow_box_problem(rng: np.random.Generator, n: int, ill_conditioned: bool = False):
    """A random problem (rank-deficient for ``rows < n``; random-walk inputs if ``ill_conditioned``) on a narrow
    box, some coordinates fixed (``lo = hi``)."""
    rows = int(rng.integers(1, 2 * n + 1))
    A = rng.standard_normal((rows, n))
    if ill_conditioned:
        A = np.cumsum(rng.standard_normal((3 * n, n)) * np.r_[1.0, np.full(n - 1, 0.05)], axis=1)
    P = A.T @ A
    w = rng.standard_normal(n) * float(rng.choice([0.5, 2.0, 5.0]))
    lo = rng.integers(-3, 2, size=n).astype(np.float64)
    hi = lo + rng.integers(0, 4, size=n)
    return P, -P @ w, float(w @ P @ w), lo, hi


def _lattice_prefix_minima(P, q, r, lo, hi, bound, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every value of the first ``k`` lattice coordinates the search fixes, ``(u_{n-1}, ..., u_{n-k})`` with
    ``z - c = U u``, over the box's integer points, and the minimum of ``f`` over each."""
    Z = _box_points(lo, hi)
    values = _objective(P, q, r, Z)
    U_inverse = np.round(np.linalg.inv(bound.basis))
    u = (Z - bound.origin) @ U_inverse.T
    prefixes, inverse = np.unique(u[:, ::-1][:, :k], axis=0, return_inverse=True)
    minima = np.full(prefixes.shape[0], np.inf)
    np.minimum.at(minima, inverse.ravel(), values)
    return prefixes, minima


def _box_minimiser_scipy(P, q, lo, hi) -> np.ndarray:
    from scipy.optimize import minimize

    start = (lo + hi) / 2.0
    result = minimize(lambda x: (x @ P @ x + 2 * q @ x, 2 * (P @ x + q)), start, jac=True, method="L-BFGS-B",
                      bounds=list(zip(lo, hi)), options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 1000})
    return result.x


def _splits(rng: np.random.Generator, P, q, r, lo, hi) -> dict:
    """``(diagonal, linear, origin)`` of the splits under test; None entries use the defaults."""
    centre = np.floor((lo + hi) / 2.0)
    lam, mu = rng.random(len(q)) * np.trace(P) / len(q), rng.random(len(q)) * np.trace(P) / len(q)
    return {
        "zero": (None, None, None),
        "box": (None, box_multipliers(P, q, lo, hi, _box_minimiser_scipy(P, q, lo, hi)), None),
        "random": (*sdp_split(lam, mu, lo - centre, hi - centre), centre),
    }


@pytest.mark.parametrize("basis", BASES[1:])
@pytest.mark.parametrize("seed", range(4))
def test_ellipsoid_bound_below_every_completion(seed: int, basis: str) -> None:
    rng = np.random.default_rng(20 + seed)
    transformed = 0
    for trial in range(8):
        n = int(rng.integers(1, 7))
        P, q, r, lo, hi = _narrow_box_problem(rng, n, ill_conditioned=trial % 2 == 1)
        scale = _scale(P, q, r, lo, hi)
        for name, (diagonal, linear, origin) in _splits(rng, P, q, r, lo, hi).items():
            bound = ellipsoid_bound(P, q, r, lo, hi, diagonal, linear, origin, basis=basis)
            U = bound.basis
            assert np.array_equal(U, np.round(U)) and round(abs(np.linalg.det(U))) == 1  # unimodular
            if basis == "permutation":
                assert np.array_equal(np.sort(U, axis=0)[-1], np.ones(n)) and (np.abs(U).sum(0) == 1).all()
            transformed += int((np.abs(U).sum(0) > 1).any())
            context = f"seed {seed} trial {trial} n {n} split {name} {basis}"
            for k in range(n + 1):
                prefixes, minima = _lattice_prefix_minima(P, q, r, lo, hi, bound, k)
                bounds = bound.bounds(prefixes)
                assert (bounds <= minima + 1e-12 * scale).all(), context
                if k == n:  # a leaf: the bound is f itself up to the certification margins
                    np.testing.assert_allclose(bounds, minima, rtol=0, atol=1e-9 * scale, err_msg=context)
    assert (transformed > 0) == (basis == "reduced")  # the reduced basis is exercised beyond permutations


def _dual_function(P, q, r, lam, mu, origin, lower, upper) -> float:
    """``g(lam, mu) = r~ + mu'(l h) - v'M^-1 v`` of :mod:`quantization.qp_bounds`, evaluated plainly (not certified)."""
    M = P - np.diag(lam) + np.diag(mu)
    v = P @ origin + q + lam / 2 - mu * (lower + upper) / 2
    return float(_objective(P, q, r, origin[None])[0] + mu @ (lower * upper) - v @ np.linalg.solve(M, v))


@pytest.mark.slow
def test_root_bounds_match_the_relaxations() -> None:
    """D = 0 with the box's KKT multipliers gives the box relaxation's minimum; the SDP multipliers give
    the dual bound ``g`` plus, per coordinate, how far ``lam t (t - 1) + mu (t - l)(h - t)`` stays above 0
    on the integers of the box."""
    rng = np.random.default_rng(11)
    batch = []
    for _ in range(4):
        P, q, r, lo, hi = _layer_problem(rng, 6, bits=3)
        w = rng.standard_normal(6) * 6.0  # beyond the 3-bit grid: the box relaxation exceeds the continuous minimum
        batch.append((P, -P @ w, float(w @ P @ w), lo, hi))
    problems = QuadraticProblems(*(torch.from_numpy(np.stack([p[k] for p in batch])) for k in (0, 1)),
                                 torch.tensor([p[2] for p in batch], dtype=torch.float64),
                                 *(torch.from_numpy(np.stack([p[k] for p in batch])) for k in (3, 4)))
    solution = solve_dual(problems)
    for b, (P, q, r, lo, hi) in enumerate(batch):
        scale, best = _scale(P, q, r, lo, hi), _brute_force(P, q, r, lo, hi)
        x = _box_minimiser_scipy(P, q, lo, hi)
        box = ellipsoid_bound(P, q, r, lo, hi, linear=box_multipliers(P, q, lo, hi, x))
        assert box.root == pytest.approx(float(_objective(P, q, r, x[None])[0]), abs=1e-8 * scale)
        assert box.root > 0.5 * best  # the continuous minimum is 0: the box's multipliers matter here
        lam, mu, origin = (t[b].numpy() for t in (solution.lam, solution.mu, solution.origin))
        lower, upper = lo - origin, hi - origin
        sdp = ellipsoid_bound(P, q, r, lo, hi, *sdp_split(lam, mu, lower, upper), origin)
        excess = sum(
            min(lam[i] * t * (t - 1) + mu[i] * (t - lower[i]) * (upper[i] - t)
                for t in np.arange(lower[i], upper[i] + 1))
            for i in range(6)
        )
        expected = _dual_function(P, q, r, lam, mu, origin, lower, upper) + excess
        assert expected - 1e-9 * scale <= sdp.root <= expected + 1e-13 * scale
        multipliers = (t[b:b + 1] for t in (solution.lam, solution.mu, solution.origin))
        g, certified = dual_bound(problems.select(b), *multipliers)
        assert bool(certified[0]) and float(g[0]) - 1e-9 * scale <= sdp.root <= best
        result = solve_exact(P, q, r, lo, hi, multipliers=(lam, mu, origin))
        assert result.status == "optimal"
        assert result.ub == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("spread", [0.3, 1.5])
def test_node_bounds_agree_on_mid_size_problems(spread: float) -> None:
    """The ellipsoid search and the reference box search are independent (bounds, order, tree): on 14 inputs
    they must prove the same optimum.

    ``spread`` 1.5 puts many weights outside the 4-bit grid (clipping, the box's multipliers at work).
    """
    rng = np.random.default_rng(5)
    for _ in range(2):
        P, q, r, lo, hi = _layer_problem(rng, 14)
        w = rng.standard_normal(14) * spread * 8
        q, r = -P @ w, float(w @ P @ w)
        results = [solve_exact(P, q, r, lo, hi), solve_exact_box(P, q, r, lo, hi)]
        for result in results:
            assert result.status == "optimal"
            _assert_feasible(result, P, q, r, lo, hi)
        assert results[0].ub == pytest.approx(results[1].ub, rel=1e-9)


def test_rejects_bad_options() -> None:
    P, q, r, lo, hi = np.eye(2), np.zeros(2), 0.0, np.zeros(2), np.ones(2)
    with pytest.raises(ValueError):
        solve_exact(P, q, r, lo, hi, basis="sdp")
    with pytest.raises(ValueError):
        ellipsoid_bound(P, q, r, lo, hi, origin=np.array([0.5, 0.0]))
