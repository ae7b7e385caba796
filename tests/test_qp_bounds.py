"""Certified lower bounds on the quantization error (quantization/qp_bounds.py).

Independent references: the error ``||A w - s A z||^2`` computed from ``A`` itself, brute-force
enumeration of every integer ``z`` of a small box, cvxpy/Clarabel solving the primal SDP, and numpy
re-evaluating the dual function and the positive definiteness of every reported multiplier.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from models.layer_inputs import capture_layer_inputs, gram_matrices, patch_matrix
from models.registry import load_model
from quantization.qp_bounds import (
    QuadraticProblems,
    certify_multipliers,
    certify_sdp_solution,
    continuous_minimiser,
    decoupled_coordinates,
    default_origin,
    dual_bound,
    shift_origin,
    solve_dual,
    solve_sdp_cvxpy,
)
from quantization.quantizers import params_from_range
from quantization.range_estimators import mse_range
from utils.images import SAMPLE_PHOTOS, sample_photo_batch

LAYER = "_blocks.5._project_conv"
CHUNK = 32
N_BITS = 4
SDP_RTOL = 1e-3


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run on one thread: with two threads on a machine whose cores are busy, OpenMP spin-waits
    made the many small batched factorisations up to 100x slower (seen on a shared 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gram_problems(A: np.ndarray, W: np.ndarray, step: np.ndarray | float, n_bits: int | None) -> QuadraticProblems:
    """Problems ``||A w - s A z||^2`` for the rows ``w`` of ``W``, through the project's float64 Gram matrix."""
    gram = gram_matrices(torch.as_tensor(A)[None])[0]
    return QuadraticProblems.from_gram(gram, torch.as_tensor(W), torch.as_tensor(step, dtype=torch.float64), n_bits)


def direct_error(A: np.ndarray, w: np.ndarray, step: float, Z: np.ndarray) -> np.ndarray:
    """``||A w - s A z||^2`` for every row ``z`` of ``Z``, straight from ``A``."""
    residual = (w[None, :] - step * Z) @ A.T
    return np.einsum("kp,kp->k", residual, residual)


def brute_force_minimum(A: np.ndarray, w: np.ndarray, step: float, n_bits: int) -> float:
    """The least error over all integer ``z`` in ``[-2^(b-1), 2^(b-1) - 1]^n``."""
    levels = np.arange(-(2 ** (n_bits - 1)), 2 ** (n_bits - 1), dtype=np.float64)
    grid = np.array(list(itertools.product(levels, repeat=A.shape[1])))
    return float(min(direct_error(A, w, step, chunk).min() for chunk in np.array_split(grid, 16)))


def random_instances(
    seed: int, n: int, positions: int, batch: int, n_bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Correlated inputs ``A``, weights and steps that clip the largest weights (as MSE ranges do)."""
    rng = np.random.default_rng(seed)
    mixing = np.eye(n) + 0.6 * rng.standard_normal((n, n)) / math.sqrt(n)
    A = rng.standard_normal((positions, n)) @ mixing
    W = rng.standard_t(4, size=(batch, n))
    step = 0.8 * np.abs(W).max(axis=1) / (2 ** (n_bits - 1) - 1)
    return A, W, step


def numpy_dual(
    problems: QuadraticProblems, lam: torch.Tensor, mu: torch.Tensor | None, origin: torch.Tensor, i: int
) -> tuple[float, float]:
    """``(g, lambda_min(M))`` of problem ``i`` in numpy, on the coordinates that enter ``f``."""
    P, q, r = problems.P[i].numpy(), problems.q[i].numpy(), float(problems.r[i])
    keep = ~((P == 0).all(axis=0) & (P == 0).all(axis=1) & (q == 0))
    c, la = origin[i].numpy(), lam[i].numpy()
    assert np.all(la[~keep] == 0) and (mu is None or np.all(mu[i].numpy()[~keep] == 0))
    q_shift = P @ c + q
    r_shift = c @ P @ c + 2 * q @ c + r
    M, v, const = P - np.diag(la), q_shift + la / 2, r_shift
    if mu is not None:
        m, lower, upper = mu[i].numpy(), problems.lo[i].numpy() - c, problems.hi[i].numpy() - c
        M, v, const = M + np.diag(m), v - m * (lower + upper) / 2, const + m @ (lower * upper)
    M, v = M[np.ix_(keep, keep)], v[keep]
    return float(const - v @ np.linalg.solve(M, v)), float(np.linalg.eigvalsh(M)[0])


def assert_close_to_sdp(bound: float, reference: float, energy: float) -> None:
    """Within ``SDP_RTOL`` of the SDP optimum, or ``1e-8`` of the signal energy ``r`` where the optimum is ~0."""
    assert abs(bound - reference) <= SDP_RTOL * abs(reference) + 1e-8 * energy


def assert_dual_feasible(problems: QuadraticProblems, solution) -> None:
    """Every reported bound: nonnegative multipliers, ``M`` positive definite and ``g`` as numpy computes it."""
    assert solution.certified.all()
    assert (solution.lam >= 0).all() and (solution.mu is None or (solution.mu >= 0).all())
    again, certified = dual_bound(problems, solution.lam, solution.mu, solution.origin)
    assert certified.all() and torch.equal(again, solution.bound)
    for i in range(problems.batch_size):
        value, smallest = numpy_dual(problems, solution.lam, solution.mu, solution.origin, i)
        assert smallest > 0
        assert solution.bound[i].item() <= value
        assert solution.bound[i].item() == pytest.approx(value, rel=1e-9, abs=1e-12 * abs(float(problems.r[i])))


# --------------------------------------------------------------------------- the problems


def test_objective_is_the_output_error() -> None:
    A, W, step = random_instances(0, n=7, positions=30, batch=3, n_bits=4)
    problems = gram_problems(A, W, step, n_bits=4)
    rng = np.random.default_rng(1)
    Z = rng.integers(-8, 8, size=(3, 5, 7)).astype(np.float64)
    values = problems.objective(torch.as_tensor(Z))
    assert values.shape == (3, 5)
    for i in range(3):
        np.testing.assert_allclose(values[i].numpy(), direct_error(A, W[i], step[i], Z[i]), rtol=1e-12)
    np.testing.assert_allclose(problems.objective(torch.as_tensor(Z[:, 0])).numpy(), values[:, 0].numpy(), rtol=1e-14)
    assert problems.lo.unique().tolist() == [-8.0] and problems.hi.unique().tolist() == [7.0]


def test_from_gram_broadcasts_and_validates() -> None:
    gram = torch.eye(3, dtype=torch.float64) * 2
    problems = QuadraticProblems.from_gram(gram, torch.ones(4, 3), 0.5)
    torch.testing.assert_close(problems.P, gram.expand(4, 3, 3) / 4)
    torch.testing.assert_close(problems.q, -torch.ones(4, 3, dtype=torch.float64))
    torch.testing.assert_close(problems.r, torch.full((4,), 6.0, dtype=torch.float64))
    assert not problems.has_box
    with pytest.raises(ValueError, match="gram must have shape"):
        QuadraticProblems.from_gram(torch.eye(4), torch.ones(4, 3), 0.5)
    with pytest.raises(ValueError, match="both lo and hi"):
        QuadraticProblems(problems.P, problems.q, problems.r, lo=torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="integers"):
        QuadraticProblems(problems.P, problems.q, problems.r, problems.q * 0 - 0.5, problems.q * 0 + 1)
    with pytest.raises(ValueError, match="no box"):
        dual_bound(problems, torch.zeros(4, 3), mu=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="integer"):
        shift_origin(problems, torch.full((4, 3), 0.5))


def test_continuous_minimiser_and_the_trivial_bound() -> None:
    """``g(0)`` is the continuous minimum ``f(z*)``; for Gram problems ``z* = w / s``."""
    rng = np.random.default_rng(2)
    A = rng.standard_normal((4, 12, 6))
    P = torch.as_tensor(np.einsum("bpi,bpj->bij", A, A))
    q, r = torch.as_tensor(rng.standard_normal((4, 6))), torch.full((4,), 50.0, dtype=torch.float64)
    problems = QuadraticProblems(P, q, r)
    z_star = continuous_minimiser(problems.P, problems.q)
    expected = np.linalg.solve(P.numpy(), -q.numpy()[..., None])[..., 0]
    np.testing.assert_allclose(z_star.numpy(), expected, rtol=1e-10)
    bound, certified = dual_bound(problems, torch.zeros(4, 6))
    assert certified.all()
    continuous = problems.objective(z_star)
    np.testing.assert_allclose(bound.numpy(), continuous.numpy(), rtol=1e-10)
    assert (bound <= continuous).all()
    A_real, W, step = random_instances(3, n=6, positions=20, batch=2, n_bits=4)
    gram = gram_problems(A_real, W, step, n_bits=None)
    np.testing.assert_allclose(continuous_minimiser(gram.P, gram.q).numpy(), W / step[:, None], rtol=1e-9)


# --------------------------------------------------------------------------- against brute force


@pytest.mark.parametrize(
    ("seed", "n", "n_bits"), [(10, 4, 3), (11, 5, 3), (12, 6, 3), (13, 8, 2), (14, 7, 2)]
)
@pytest.mark.slow
def test_certified_bounds_are_below_the_integer_optimum(seed: int, n: int, n_bits: int) -> None:
    A, W, step = random_instances(seed, n=n, positions=3 * n, batch=3, n_bits=n_bits)
    problems = gram_problems(A, W, step, n_bits)
    with_box, without_box = solve_dual(problems), solve_dual(problems, use_box=False)
    assert_dual_feasible(problems, with_box)
    assert_dual_feasible(problems.without_box(), without_box)
    rng = np.random.default_rng(seed)
    for i in range(3):
        optimum = brute_force_minimum(A, W[i], step[i], n_bits)
        assert with_box.bound[i].item() <= optimum
        assert without_box.bound[i].item() <= optimum
        # Without the box the bound holds for every integer vector, also far outside the box.
        far = rng.integers(-60, 61, size=(2000, n)).astype(np.float64)
        near = np.round(W[i] / step[i])[None, :] + rng.integers(-2, 3, size=(2000, n))
        assert without_box.bound[i].item() <= direct_error(A, W[i], step[i], np.concatenate([far, near])).min()
        # The cvxpy path reports certified bounds too.
        reference = solve_sdp_cvxpy(problems, i, box=True)
        certified_value, certified = certify_sdp_solution(problems, i, reference)
        assert certified and certified_value <= optimum
        assert certified_value == pytest.approx(reference.value, rel=1e-6)
        assert with_box.bound[i].item() == pytest.approx(reference.value, rel=SDP_RTOL)


# --------------------------------------------------------------------------- against the SDP (Clarabel)


@pytest.fixture(scope="module")
def lite0_problems() -> dict[int, QuadraticProblems]:
    """EfficientNet-Lite0 ``_blocks.5._project_conv`` (240 -> 80, 1x1) on three sample photos, INT4.

    One problem per output channel and chunk of 32 inputs (the last chunk has 16); per-channel
    steps from the MSE range of the layer's weights. Input channel 217 is dead on these photos
    (a zero column of ``A``), so chunk 6 has a decoupled coordinate.
    """
    model = load_model("efficientnet_lite0")
    layer = dict(model.named_modules())[LAYER]
    inputs = capture_layer_inputs(model, [LAYER], sample_photo_batch(SAMPLE_PHOTOS[:3]))[LAYER]
    gram = gram_matrices(patch_matrix(layer, inputs))[0]
    weights = layer.weight.detach().reshape(layer.out_channels, -1).double()
    low, high = mse_range(weights, N_BITS, ch_axis=0)
    step = params_from_range(low, high, N_BITS, "symmetric").step_size
    chunks = torch.arange(weights.shape[1]).split(CHUNK)
    return {
        k: QuadraticProblems.from_gram(gram[index][:, index], weights[:, index], step, N_BITS)
        for k, index in enumerate(chunks)
    }


@pytest.mark.slow
def test_lite0_bounds_match_clarabel(lite0_problems: dict[int, QuadraticProblems]) -> None:
    assert decoupled_coordinates(lite0_problems[6]).any(dim=0).sum() == 1
    cases = [(0, 0, False), (0, 17, False), (0, 3, True), (6, 5, False), (6, 50, True), (7, 42, False)]
    solutions = {}
    for chunk, index, box in cases:
        problems = lite0_problems[chunk] if box else lite0_problems[chunk].without_box()
        if (chunk, box) not in solutions:
            solutions[chunk, box] = solve_dual(problems)
            assert_dual_feasible(problems, solutions[chunk, box])
            assert set(solutions[chunk, box].status) == {"optimal"}
        ours = solutions[chunk, box]
        reference = solve_sdp_cvxpy(problems, index, box=box)
        assert reference.status == "optimal"
        bound, gap = ours.bound[index].item(), ours.sdp_gap[index].item()
        assert bound == pytest.approx(reference.value, rel=SDP_RTOL)
        # Our bound is dual feasible, so at most the SDP optimum; our primal point bounds it from above.
        assert bound <= reference.value * (1 + 1e-8)
        assert reference.value <= (bound + gap) * (1 + 1e-8)
        assert gap <= 1e-4 * abs(bound) + 1e-10


@pytest.mark.slow
def test_synthetic_bounds_match_clarabel() -> None:
    A, W, step = random_instances(20, n=12, positions=40, batch=4, n_bits=4)
    problems = gram_problems(A, W, step, n_bits=4)
    for box in (False, True):
        selected = problems if box else problems.without_box()
        ours = solve_dual(selected, tol=1e-6)
        assert_dual_feasible(selected, ours)
        for i in range(2):
            reference = solve_sdp_cvxpy(selected, i, box=box)
            assert ours.bound[i].item() == pytest.approx(reference.value, rel=1e-5)
    scs = solve_sdp_cvxpy(problems.without_box(), 0, solver="SCS")
    assert scs.value == pytest.approx(solve_dual(problems.without_box()).bound[0].item(), rel=SDP_RTOL)


@pytest.mark.slow
def test_all_lite0_bounds_are_dual_feasible(lite0_problems: dict[int, QuadraticProblems]) -> None:
    for problems in lite0_problems.values():
        for box in (False, True):
            selected = problems if box else problems.without_box()
            solution = solve_dual(selected)
            assert set(solution.status) == {"optimal"}
            assert_dual_feasible(selected, solution)
            # The solver stops at a gap of 1e-4 relative to the shifted, normalised problem's dual value;
            # the certified bound (dual_bound, backed off where certification needs it) may sit a little
            # lower in the original units: within twice that here.
            assert (solution.sdp_gap <= 2e-4 * solution.bound.abs() + 1e-10).all()
            assert (solution.sdp_gap <= 1e-4 * solution.bound.abs() + 1e-10).float().mean() > 0.95
            # Rounding to nearest gives an integer point of the box: no bound may exceed its error.
            rounded = torch.clamp(torch.round(continuous_minimiser(problems.P, problems.q)), problems.lo, problems.hi)
            assert (solution.bound <= problems.objective(rounded)).all()


# --------------------------------------------------------------------------- rank deficiency, infeasibility, batching


@pytest.mark.parametrize("kind", ["few_positions", "duplicated_column", "dead_input"])
@pytest.mark.slow
def test_rank_deficient_gram(kind: str) -> None:
    n, n_bits = 6, 3
    A, W, step = random_instances(30, n=n, positions=18, batch=3, n_bits=n_bits)
    if kind == "few_positions":
        A = A[:4]
    elif kind == "duplicated_column":
        A[:, 4] = A[:, 1]
    else:
        A[:, 2] = 0.0
    problems = gram_problems(A, W, step, n_bits)
    z_star = continuous_minimiser(problems.P, problems.q)
    assert torch.isfinite(z_star).all()
    # A z* reproduces A w / s: the continuous minimum of ||A (w - s z)||^2 is zero.
    np.testing.assert_allclose(A @ (W - step[:, None] * z_star.numpy()).T, 0.0, atol=1e-9 * np.abs(A @ W.T).max())
    without_box = solve_dual(problems, use_box=False)
    with_box = solve_dual(problems)
    assert_dual_feasible(problems, with_box)
    if kind == "dead_input":
        assert_dual_feasible(problems.without_box(), without_box)
    else:
        assert without_box.status == ("infeasible",) * 3
        assert not without_box.certified.any() and torch.isinf(without_box.bound).all()
    for i in range(3):
        optimum = brute_force_minimum(A, W[i], step[i], n_bits)
        assert with_box.bound[i].item() <= optimum and without_box.bound[i].item() <= optimum
        reference = solve_sdp_cvxpy(problems, i, box=True)
        assert_close_to_sdp(with_box.bound[i].item(), reference.value, problems.r[i].item())


def test_infeasible_multipliers_are_not_certified() -> None:
    A, W, step = random_instances(40, n=5, positions=15, batch=2, n_bits=4)
    problems = gram_problems(A, W, step, n_bits=4)
    smallest = torch.linalg.eigvalsh(problems.P)[:, 0]
    feasible = (0.5 * smallest)[:, None].expand(2, 5).clone()
    bound, certified = dual_bound(problems.without_box(), feasible)
    assert certified.all() and torch.isfinite(bound).all()
    boundary = smallest[:, None].expand(2, 5)
    for lam in (boundary, 1.001 * boundary, 2 * problems.P.diagonal(dim1=1, dim2=2)):
        bound, certified = dual_bound(problems.without_box(), lam)
        assert not certified.any() and (bound == -math.inf).all()
    negative = feasible.clone()
    negative[0, 1] = -1e-9
    bound, certified = dual_bound(problems.without_box(), negative)
    assert certified.tolist() == [False, True] and bound[0] == -math.inf
    not_a_number = feasible.clone()
    not_a_number[1, 0] = math.nan
    assert dual_bound(problems.without_box(), not_a_number)[1].tolist() == [True, False]
    mu = torch.ones(2, 5, dtype=torch.float64)
    mu[1, 3] = -1.0
    assert dual_bound(problems, feasible, mu)[1].tolist() == [True, False]
    # Approximate multipliers slightly past the boundary are backed off into the interior and certified.
    outside = 1.001 * boundary
    bound, certified, lam, _ = certify_multipliers(problems.without_box(), outside, None, default_origin(problems))
    assert certified.all() and (lam < smallest[:, None]).all()


@pytest.mark.slow
def test_batched_equals_per_problem() -> None:
    A, W, step = random_instances(50, n=10, positions=30, batch=6, n_bits=4)
    problems = gram_problems(A, W, step, n_bits=4)
    for box in (False, True):
        selected = problems if box else problems.without_box()
        batched = solve_dual(selected)
        for i in range(6):
            single = solve_dual(selected.select(i))
            assert single.status == (batched.status[i],)
            np.testing.assert_allclose(single.bound.numpy(), batched.bound[i : i + 1].numpy(), rtol=1e-9)
            np.testing.assert_allclose(single.lam.numpy(), batched.lam[i : i + 1].numpy(), rtol=1e-6, atol=1e-9)
            mu = None if batched.mu is None else batched.mu[i : i + 1]
            bound, certified = dual_bound(selected.select(i), batched.lam[i : i + 1], mu, batched.origin[i : i + 1])
            assert certified.all() and bound.item() == batched.bound[i].item()
