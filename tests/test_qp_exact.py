"""Branch and bound for box-constrained integer quadratic problems (quantization/qp_exact.py).

Small problems are checked against the optimum found by enumerating every integer point of the
box; real-size ones against the heuristic ``one_opt(sequential_rounding)``.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from quantization.ptq_rounding import one_opt, qp_objective, sequential_rounding
from quantization.qp_bounds import QuadraticProblems
from quantization.qp_exact import ExactResult, solve_exact, solve_exact_batch


def _objective(P: np.ndarray, q: np.ndarray, r: float, Z: np.ndarray) -> np.ndarray:
    return np.einsum("ki,ij,kj->k", Z, P, Z) + 2.0 * Z @ q + r


def _brute_force(P, q, r, lo, hi) -> float:
    Z = np.array(list(itertools.product(*[np.arange(a, b + 1) for a, b in zip(lo, hi)])), dtype=np.float64)
    return float(_objective(P, q, r, Z).min())


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


def _assert_feasible(result: ExactResult, P, q, r, lo, hi) -> None:
    z = result.z
    assert np.array_equal(z, np.round(z)) and (z >= lo).all() and (z <= hi).all()
    assert result.ub == pytest.approx(float(_objective(P, q, r, z[None])[0]), rel=1e-12, abs=1e-14 * _scale(P, q, r, lo, hi))
    assert result.lb <= result.ub


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for trial in range(25):
        n = int(rng.integers(1, 7))
        bits = 2 if n == 6 else int(rng.integers(2, 4))
        rows = int(rng.integers(1, 2 * n + 1))  # rows < n: rank-deficient P
        spread = float(rng.choice([0.3, 1.0, 3.0, 10.0]))
        P, q, r, lo, hi = _random_problem(rng, n, bits, rows, spread)
        result = solve_exact(P, q, r, lo, hi, time_limit=5.0)
        best = _brute_force(P, q, r, lo, hi)
        tolerance = max(1e-9 * abs(best), 1e-13 * _scale(P, q, r, lo, hi))
        context = f"seed {seed} trial {trial} n {n} bits {bits} rows {rows}"
        assert result.status == "optimal", context
        _assert_feasible(result, P, q, r, lo, hi)
        assert abs(result.ub - best) <= tolerance, context
        assert result.lb <= best + tolerance, context
        assert result.ub - result.lb <= tolerance, context


def test_optimum_on_the_box_boundary() -> None:
    # Diagonal P: the optimum is the clamped rounding of the continuous minimiser, far outside the box.
    P = np.diag([1.0, 2.0, 3.0])
    w = np.array([10.0, -10.0, 0.4])
    q, r = -P @ w, float(w @ P @ w)
    lo, hi = np.full(3, -4.0), np.full(3, 3.0)
    result = solve_exact(P, q, r, lo, hi)
    assert result.status == "optimal"
    np.testing.assert_array_equal(result.z, [3.0, -4.0, 0.0])
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
    result = solve_exact(P, q, r, lo, hi, time_limit=2.0)
    _assert_feasible(result, P, q, r, lo, hi)
    assert result.status in ("optimal", "time_limit")
    assert result.ub <= _heuristic_value(P, q, r, lo, hi) * (1 + 1e-12)
    if result.status == "optimal":
        assert result.gap <= 1e-9


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
    results = solve_exact_batch(batch, time_limit=5.0)
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
