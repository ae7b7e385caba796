"""Post-training rounding methods on integer quadratic problems (quantization/ptq_rounding.py).

Objectives are checked against the residual ``||A w - s A z||^2`` computed from ``A`` itself, and
small problems against the optimum found by enumerating every integer point of the box.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from reference_solvers import adaround_loss

from models.layer_inputs import capture_layer_inputs, gram_matrices, patch_matrix
from models.registry import load_model
from quantization.ptq_rounding import (
    adaround,
    adaround_gradient,
    box_bounds,
    continuous_minimiser,
    one_opt,
    qp_objective,
    randomized_rounding,
    rectified_sigmoid,
    round_to_nearest,
    sequential_rounding,
)
from quantization.quantizers import QuantParams, QuantScheme, integer_range, params_from_range, quantize
from quantization.range_estimators import mse_range
from utils.images import SAMPLE_PHOTOS, sample_photo_batch

F64 = torch.float64


@dataclass(frozen=True)
class Problems:
    """``B`` layer problems ``||A w - s A z||^2`` and their quadratic form ``z'Pz + 2q'z + r``."""

    A: torch.Tensor  # (B, m, n)
    w: torch.Tensor  # (B, n)
    s: torch.Tensor  # (B, 1)
    lo: torch.Tensor  # (B, n)
    hi: torch.Tensor  # (B, n)

    @property
    def gram(self) -> torch.Tensor:
        return self.A.transpose(1, 2) @ self.A

    @property
    def P(self) -> torch.Tensor:
        return self.s.unsqueeze(-1) ** 2 * self.gram

    @property
    def q(self) -> torch.Tensor:
        return -self.s * (self.gram @ self.w.unsqueeze(-1)).squeeze(-1)

    @property
    def r(self) -> torch.Tensor:
        return ((self.gram @ self.w.unsqueeze(-1)).squeeze(-1) * self.w).sum(-1)

    def residual(self, z: torch.Tensor) -> torch.Tensor:
        """``||A (w - s z)||^2`` for ``z`` of shape ``(B, n)`` or ``(B, K, n)``, straight from ``A``."""
        error = (self.w.unsqueeze(1) - self.s.unsqueeze(1) * (z if z.dim() == 3 else z.unsqueeze(1)))
        values = (error @ self.A.transpose(1, 2)).pow(2).sum(-1)
        return values if z.dim() == 3 else values.squeeze(1)


def make_problems(
    batch: int, n: int, n_bits: int, seed: int, positions: int | None = None, orthogonal: bool = False
) -> Problems:
    """Correlated inputs (or orthogonal columns), weights that partly fall outside the grid."""
    gen = torch.Generator().manual_seed(seed)
    m = positions if positions is not None else 3 * n
    if orthogonal:
        columns = torch.linalg.qr(torch.randn(batch, m, n, generator=gen, dtype=F64)).Q
        A = columns * torch.exp(torch.randn(batch, 1, n, generator=gen, dtype=F64))
    else:
        mixing = torch.eye(n, dtype=F64) + 0.6 * torch.randn(batch, n, n, generator=gen, dtype=F64)
        A = torch.randn(batch, m, n, generator=gen, dtype=F64) @ mixing
    w = torch.randn(batch, n, generator=gen, dtype=F64)
    q_min, q_max = integer_range(n_bits, QuantScheme.SYMMETRIC)
    s = w.abs().amax(dim=1, keepdim=True) / q_max * 0.8  # the largest weights clip
    return Problems(A, w, s, torch.full_like(w, q_min), torch.full_like(w, q_max))


def brute_force(problems: Problems) -> tuple[torch.Tensor, torch.Tensor]:
    """Per problem the least ``||A (w - s z)||^2`` over every integer ``z`` in its box, and a minimiser."""
    values, points = [], []
    for b in range(problems.w.shape[0]):
        ranges = [range(int(lo), int(hi) + 1) for lo, hi in zip(problems.lo[b], problems.hi[b])]
        grid = torch.tensor(list(itertools.product(*ranges)), dtype=F64)
        single = Problems(problems.A[b : b + 1], problems.w[b : b + 1], problems.s[b : b + 1], problems.lo, problems.hi)
        objective = single.residual(grid.unsqueeze(0))[0]
        values.append(objective.min())
        points.append(grid[objective.argmin()])
    return torch.stack(values), torch.stack(points)


def assert_feasible(z: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
    assert z.dtype == F64 and z.shape == lo.shape
    assert torch.equal(z, z.round())
    assert bool((z >= lo).all()) and bool((z <= hi).all())


Method = Callable[[Problems], torch.Tensor]

METHODS: dict[str, Method] = {
    "rtn": lambda p: round_to_nearest(p.w, p.s, p.lo, p.hi),
    "randomized": lambda p: randomized_rounding(p.P, p.q, p.r, p.lo, p.hi, 200, torch.Generator().manual_seed(3)),
    "one_opt_rtn": lambda p: one_opt(p.P, p.q, p.r, round_to_nearest(p.w, p.s, p.lo, p.hi), p.lo, p.hi),
    "sequential": lambda p: sequential_rounding(p.P, p.q, p.lo, p.hi),
    "sequential_natural": lambda p: sequential_rounding(p.P, p.q, p.lo, p.hi, order=None),
    "adaround": lambda p: adaround(p.P, p.q, p.r, p.w / p.s, p.lo, p.hi, iterations=300),
    "adaround_unrefined": lambda p: adaround(p.P, p.q, p.r, p.w / p.s, p.lo, p.hi, iterations=300, refine=False),
}


# --------------------------------------------------------------------------- objective and helpers


def test_qp_objective_is_the_residual() -> None:
    problems = make_problems(4, 6, 3, seed=0)
    gen = torch.Generator().manual_seed(1)
    z = torch.randint(-4, 4, (4, 6), generator=gen).to(F64)
    candidates = torch.randint(-4, 4, (4, 5, 6), generator=gen).to(F64)
    P, q, r = problems.P, problems.q, problems.r
    torch.testing.assert_close(qp_objective(P, q, r, z), problems.residual(z), rtol=1e-12, atol=0)
    torch.testing.assert_close(qp_objective(P, q, r, candidates), problems.residual(candidates), rtol=1e-12, atol=0)


def test_continuous_minimiser() -> None:
    full_rank = make_problems(3, 5, 4, seed=2)
    torch.testing.assert_close(continuous_minimiser(full_rank.P, full_rank.q), full_rank.w / full_rank.s)
    # 3 positions for 5 inputs: the least-norm minimiser, which reproduces A w / s exactly.
    singular = make_problems(3, 5, 4, seed=2, positions=3)
    x = continuous_minimiser(singular.P, singular.q)
    torch.testing.assert_close(singular.residual(x), torch.zeros(3, dtype=F64), rtol=0, atol=1e-20)
    lstsq_norm = torch.linalg.lstsq(singular.A, (singular.A @ (singular.w / singular.s).unsqueeze(-1)), driver="gelsd")
    torch.testing.assert_close(x, lstsq_norm.solution.squeeze(-1), rtol=1e-8, atol=1e-8)


def test_box_bounds_validation() -> None:
    like = torch.zeros(2, 3, dtype=F64)
    lo, hi = box_bounds(-2, torch.tensor([1, 2, 3]), like)
    assert lo.shape == hi.shape == (2, 3) and hi[1].tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="integers"):
        box_bounds(-2.5, 1, like)
    with pytest.raises(ValueError, match="empty box"):
        box_bounds(2, 1, like)


@pytest.mark.parametrize("n_bits", [2, 4, 8])
def test_round_to_nearest_equals_quantize(n_bits: int) -> None:
    gen = torch.Generator().manual_seed(n_bits)
    w = torch.randn(7, 33, generator=gen, dtype=F64) * torch.logspace(-3, 1, 7, dtype=F64)[:, None]
    _, threshold = mse_range(w, n_bits, ch_axis=0)
    params = params_from_range(-threshold, threshold, n_bits, QuantScheme.SYMMETRIC)
    s = params.step_size[:, None]
    expected = quantize(w, QuantParams(s, torch.zeros_like(s), params.q_min, params.q_max))
    z = round_to_nearest(w, s, params.q_min, params.q_max)
    assert torch.equal(z, expected)
    assert_feasible(z, *box_bounds(params.q_min, params.q_max, z))


def test_methods_do_not_modify_their_inputs() -> None:
    problems = make_problems(3, 6, 3, seed=5)
    P, q, r, w_over_s = problems.P, problems.q, problems.r, problems.w / problems.s
    start, lo, hi = round_to_nearest(problems.w, problems.s, -4, 3), problems.lo, problems.hi
    inputs = (P, q, r, w_over_s, start, lo, hi)
    copies = [t.clone() for t in inputs]
    one_opt(P, q, r, start, lo, hi)
    sequential_rounding(P, q, lo, hi, start=w_over_s)
    randomized_rounding(P, q, r, lo, hi, 10, torch.Generator().manual_seed(0), center=w_over_s)
    adaround(P, q, r, w_over_s, lo, hi, iterations=10)
    assert all(torch.equal(t, c) for t, c in zip(inputs, copies))


# --------------------------------------------------------------------------- small problems: brute force


BRUTE_FORCE_CASES = [(1, 3), (3, 2), (5, 3), (8, 2)]  # (n, bits)


@functools.cache
def brute_force_case(n: int, n_bits: int) -> tuple[Problems, torch.Tensor]:
    problems = make_problems(5, n, n_bits, seed=10 * n + n_bits)
    return problems, brute_force(problems)[0]


@pytest.mark.parametrize(("n", "n_bits"), BRUTE_FORCE_CASES)
@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.slow
def test_methods_are_feasible_and_above_the_optimum(name: str, n: int, n_bits: int) -> None:
    problems, optimum = brute_force_case(n, n_bits)
    z = METHODS[name](problems)
    assert_feasible(z, problems.lo, problems.hi)
    assert bool((problems.residual(z) >= optimum * (1 - 1e-12)).all())


def test_methods_with_per_coordinate_boxes() -> None:
    base = make_problems(4, 5, 3, seed=7)
    gen = torch.Generator().manual_seed(8)
    lo = -torch.randint(0, 3, base.lo.shape, generator=gen).to(F64)
    hi = lo + torch.randint(0, 4, base.lo.shape, generator=gen).to(F64)
    problems = Problems(base.A, base.w, base.s, lo, hi)
    optimum, _ = brute_force(problems)
    for name, method in METHODS.items():
        z = method(problems)
        assert_feasible(z, lo, hi)
        assert bool((problems.residual(z) >= optimum * (1 - 1e-12)).all()), name


def test_one_opt_reaches_the_optimum_often() -> None:
    """Not a guarantee, but 1-opt from RTN finds the exact optimum of most tiny problems."""
    problems = make_problems(20, 4, 2, seed=11)
    optimum, _ = brute_force(problems)
    z = METHODS["one_opt_rtn"](problems)
    assert (problems.residual(z) <= optimum * (1 + 1e-9)).float().mean() >= 0.6


# --------------------------------------------------------------------------- one_opt


def single_changes(problems: Problems, z: torch.Tensor) -> torch.Tensor:
    """The residual of every point that differs from ``z`` in one coordinate: ``(B, n * levels)``."""
    batch, n = z.shape
    candidates = []
    for i in range(n):
        for value in range(int(problems.lo.min()), int(problems.hi.max()) + 1):
            moved = z.clone()
            level = torch.full((batch,), float(value), dtype=F64)
            moved[:, i] = torch.clamp(level, problems.lo[:, i], problems.hi[:, i])
            candidates.append(moved)
    return problems.residual(torch.stack(candidates, dim=1))


@pytest.mark.parametrize("positions", [None, 4])  # full rank, and rank 4 < n = 10
def test_one_opt_descends_to_a_1_opt_point(positions: int | None) -> None:
    problems = make_problems(30, 10, 3, seed=12, positions=positions)
    gen = torch.Generator().manual_seed(13)
    start = torch.randint(-4, 4, problems.w.shape, generator=gen).to(F64)
    start_copy = start.clone()
    z = one_opt(problems.P, problems.q, problems.r, start, -4, 3)
    assert torch.equal(start, start_copy)
    assert_feasible(z, problems.lo, problems.hi)
    assert bool((problems.residual(z) <= problems.residual(start)).all())
    tolerance = 1e-10 * problems.residual(z)
    assert bool((single_changes(problems, z) >= (problems.residual(z) - tolerance).unsqueeze(1)).all())


def test_one_opt_with_a_dead_input() -> None:
    """``P_ii = 0`` (an input that is always zero): the coordinate has no effect and stays put."""
    base = make_problems(3, 6, 4, seed=14)
    A = base.A.clone()
    A[:, :, 2] = 0.0
    problems = Problems(A, base.w, base.s, base.lo, base.hi)
    start = round_to_nearest(problems.w, problems.s, problems.lo, problems.hi)
    z = one_opt(problems.P, problems.q, problems.r, start, problems.lo, problems.hi)
    assert torch.equal(z[:, 2], start[:, 2])
    assert bool((problems.residual(z) <= problems.residual(start)).all())
    assert_feasible(sequential_rounding(problems.P, problems.q, problems.lo, problems.hi), problems.lo, problems.hi)


def test_one_opt_rejects_infeasible_start() -> None:
    problems = make_problems(2, 3, 2, seed=15)
    with pytest.raises(ValueError, match="inside the box"):
        one_opt(problems.P, problems.q, problems.r, torch.full((2, 3), 2.0, dtype=F64), -2, 1)
    with pytest.raises(ValueError, match="inside the box"):
        one_opt(problems.P, problems.q, problems.r, torch.full((2, 3), 0.5, dtype=F64), -2, 1)


# --------------------------------------------------------------------------- sequential rounding


def test_sequential_rounding_in_one_dimension_is_exact() -> None:
    problems = make_problems(50, 1, 3, seed=16)
    optimum, best = brute_force(problems)
    z = sequential_rounding(problems.P, problems.q, -4, 3)
    torch.testing.assert_close(problems.residual(z), optimum, rtol=1e-12, atol=0)
    torch.testing.assert_close(z, torch.clamp(torch.round(-problems.q / problems.P[:, :, 0]), -4, 3), rtol=0, atol=0)
    assert torch.equal(z, best)


def test_sequential_rounding_of_diagonal_P_rounds_the_minimiser() -> None:
    gen = torch.Generator().manual_seed(17)
    diagonal = torch.rand(6, 9, generator=gen, dtype=F64) + 0.1
    q = torch.randn(6, 9, generator=gen, dtype=F64) * 3.0
    P = torch.diag_embed(diagonal)
    expected = torch.clamp(torch.round(-q / diagonal), -4, 3)
    for order in (None, "diag", torch.randperm(9, generator=gen)):
        assert torch.equal(sequential_rounding(P, q, -4, 3, order=order), expected)


def naive_sequential(P: np.ndarray, q: np.ndarray, lo: int, hi: int, order: list[int]) -> np.ndarray:
    """Fix coordinates in ``order``; after each, re-solve ``min f`` over the free ones with the others fixed."""
    x = np.linalg.solve(P, -q)
    fixed: list[int] = []
    for i in order:
        x[i] = np.clip(np.round(x[i]), lo, hi)
        fixed.append(i)
        free = [j for j in range(len(q)) if j not in fixed]
        if free:
            x[free] = np.linalg.solve(P[np.ix_(free, free)], -(q[free] + P[np.ix_(free, fixed)] @ x[fixed]))
    return x


def test_sequential_rounding_is_the_conditional_optimum() -> None:
    problems = make_problems(6, 12, 3, seed=18)
    gen = torch.Generator().manual_seed(19)
    orders = torch.stack([torch.randperm(12, generator=gen) for _ in range(6)])
    z = sequential_rounding(problems.P, problems.q, -4, 3, order=orders, damping=0.0)
    for b in range(6):
        expected = naive_sequential(problems.P[b].numpy(), problems.q[b].numpy(), -4, 3, orders[b].tolist())
        np.testing.assert_array_equal(z[b].numpy(), expected)
    by_diag = sequential_rounding(problems.P, problems.q, -4, 3, damping=0.0)
    for b in range(6):
        order = np.argsort(-problems.P[b].diagonal().numpy(), kind="stable").tolist()
        expected = naive_sequential(problems.P[b].numpy(), problems.q[b].numpy(), -4, 3, order)
        np.testing.assert_array_equal(by_diag[b].numpy(), expected)


def test_sequential_rounding_damping_and_validation() -> None:
    singular = make_problems(2, 6, 3, seed=20, positions=3)
    with pytest.raises(ValueError, match="not positive definite"):
        sequential_rounding(singular.P, singular.q, -4, 3, damping=0.0)
    assert_feasible(sequential_rounding(singular.P, singular.q, singular.lo, singular.hi), singular.lo, singular.hi)
    with pytest.raises(ValueError, match="permutation"):
        sequential_rounding(singular.P, singular.q, -4, 3, order=torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="order"):
        sequential_rounding(singular.P, singular.q, -4, 3, order="random")


# --------------------------------------------------------------------------- orthogonal inputs: separable problems


@pytest.mark.parametrize("name", list(METHODS))
def test_orthogonal_inputs_every_method_is_optimal(name: str) -> None:
    """Orthogonal columns of ``A``: ``P`` is diagonal, the problem separable, and RTN optimal."""
    problems = make_problems(6, 6, 2, seed=21, orthogonal=True)
    off_diagonal = problems.P - torch.diag_embed(problems.P.diagonal(dim1=1, dim2=2))
    assert float(off_diagonal.abs().max()) < 1e-12 * float(problems.P.abs().max())
    optimum, best = brute_force(problems)
    z = METHODS[name](problems)
    assert torch.equal(z, best)
    torch.testing.assert_close(problems.residual(z), optimum, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- randomized rounding


def test_randomized_rounding_is_reproducible() -> None:
    problems = make_problems(8, 10, 3, seed=22, positions=6)
    P, q, r = problems.P, problems.q, problems.r

    def run(seed: int, **kwargs: object) -> torch.Tensor:
        return randomized_rounding(P, q, r, -4, 3, 300, torch.Generator().manual_seed(seed), **kwargs)

    assert torch.equal(run(5), run(5))
    # An SDP-style (center, covariance) pair, with a singular covariance X - x x'.
    gen = torch.Generator().manual_seed(23)
    center = problems.w / problems.s + 0.3 * torch.randn(8, 10, generator=gen, dtype=F64)
    factor = torch.randn(8, 10, 3, generator=gen, dtype=F64) * 0.4
    covariance = factor @ factor.transpose(1, 2)
    first = run(6, center=center, spread=covariance)
    assert torch.equal(first, run(6, center=center, spread=covariance))
    assert_feasible(first, problems.lo, problems.hi)
    # No noise: the rounded center; samples never lose to it.
    rounded_center = torch.clamp(torch.round(center), -4, 3)
    assert torch.equal(run(6, center=center, spread=0.0), rounded_center)
    assert bool((problems.residual(first) <= problems.residual(rounded_center) * (1 + 1e-12)).all())
    assert torch.equal(run(6, center=center, spread=torch.zeros(8, 10, 10, dtype=F64)), rounded_center)


def test_randomized_rounding_keeps_the_best_sample() -> None:
    """The result equals the best of the same samples drawn and rounded by hand."""
    problems = make_problems(3, 4, 2, seed=24)
    center = torch.clamp(problems.w / problems.s, -2, 1)
    z = randomized_rounding(problems.P, problems.q, problems.r, -2, 1, 50, torch.Generator().manual_seed(7), spread=0.4)
    noise = torch.randn(3, 50, 4, dtype=F64, generator=torch.Generator().manual_seed(7))
    samples = torch.cat([center.unsqueeze(1), center.unsqueeze(1) + 0.4 * noise], dim=1).round().clamp(-2, 1)
    values = problems.residual(samples)
    torch.testing.assert_close(problems.residual(z), values.min(dim=1).values, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- AdaRound


def test_rectified_sigmoid() -> None:
    v = torch.tensor([-100.0, -3.0, 0.0, 3.0, 100.0], dtype=F64)
    expected = np.clip(1.2 / (1.0 + np.exp(-v.numpy())) - 0.1, 0.0, 1.0)
    np.testing.assert_allclose(rectified_sigmoid(v).numpy(), expected, rtol=1e-15)
    assert float(rectified_sigmoid(torch.tensor(0.0, dtype=F64))) == pytest.approx(0.5, abs=1e-15)


@pytest.mark.parametrize("beta", [None, 20.0, 2.0])
def test_adaround_gradient_matches_autograd_and_finite_differences(beta: float | None) -> None:
    """The closed-form gradient ``adaround`` follows against autograd on the loss (``tests/reference_solvers.py``)
    and against central differences of the loss, per coordinate."""
    problems = make_problems(4, 7, 2, seed=25)
    gen = torch.Generator().manual_seed(26)
    v = (3.0 * torch.randn(4, 7, generator=gen, dtype=F64)).requires_grad_(True)
    floor = torch.floor(problems.w / problems.s)
    scale = problems.P.diagonal(dim1=1, dim2=2).mean(-1)
    args = (problems.P, problems.q, problems.r)

    def loss(values: torch.Tensor) -> torch.Tensor:
        return adaround_loss(*args, values, floor, problems.lo, problems.hi, scale, 0.3, beta)

    (gradient,) = torch.autograd.grad(loss(v), v)
    by_hand = adaround_gradient(problems.P, problems.q, v.detach(), floor, problems.lo, problems.hi, scale, 0.3, beta)
    torch.testing.assert_close(gradient, by_hand, rtol=1e-10, atol=1e-12)
    # central differences; the loss has kinks only where the stretched sigmoid leaves [0, 1], v = +-log(11)
    step = 1e-5
    kink = math.log(11.0)
    assert float(((v.detach().abs() - kink).abs()).min()) > 100 * step
    assert bool((gradient != 0).any() and (gradient == 0).any())  # both sides of the kinks are exercised
    differences = torch.zeros_like(gradient)
    with torch.no_grad():
        for index in itertools.product(range(4), range(7)):
            shift = torch.zeros_like(v)
            shift[index] = step
            differences[index] = (loss(v + shift) - loss(v - shift)) / (2 * step)
    torch.testing.assert_close(differences, gradient, rtol=1e-8, atol=1e-8)  # measured: <= 2e-10


def test_adaround_refine_is_one_opt_of_the_rounded_result() -> None:
    problems = make_problems(5, 9, 3, seed=28)
    args = (problems.P, problems.q, problems.r, problems.w / problems.s, -4, 3)
    unrefined = adaround(*args, iterations=100, refine=False)
    refined = adaround(*args, iterations=100)
    assert torch.equal(refined, one_opt(problems.P, problems.q, problems.r, unrefined, -4, 3))


def test_adaround_without_iterations_rounds_to_nearest() -> None:
    """``h`` starts at the fractional part, so rounding it at once is RTN."""
    problems = make_problems(5, 9, 3, seed=27)
    z = adaround(problems.P, problems.q, problems.r, problems.w / problems.s, -4, 3, iterations=0, refine=False)
    assert torch.equal(z, round_to_nearest(problems.w, problems.s, -4, 3))


# --------------------------------------------------------------------------- a real layer


@dataclass(frozen=True)
class LayerProblems:
    P: torch.Tensor
    q: torch.Tensor
    r: torch.Tensor
    w_over_s: torch.Tensor
    rtn: torch.Tensor


@pytest.fixture(scope="module")
def project_conv_problems() -> list[LayerProblems]:
    """EfficientNet-Lite0 ``_blocks.5._project_conv`` (240 inputs, 80 outputs) on 5 photos, 4 bits, one MSE
    step for the layer, inputs in chunks of 32: a batch of 7 x 80 problems of size 32 and one of 80 of size 16."""
    name = "_blocks.5._project_conv"
    model = load_model("efficientnet_lite0")
    module = dict(model.named_modules())[name]
    layer_input = capture_layer_inputs(model, [name], sample_photo_batch(SAMPLE_PHOTOS))[name]
    gram = gram_matrices(patch_matrix(module, layer_input))[0]
    w = module.weight.detach().to(F64).reshape(module.out_channels, -1)
    _, threshold = mse_range(w, 4)
    s = float(threshold) / 7
    chunks: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for start in range(0, w.shape[1], 32):
        g, wc = gram[start : start + 32, start : start + 32], w[:, start : start + 32]
        chunks.setdefault(wc.shape[1], []).append((g.expand(len(wc), -1, -1), wc))
    batches = []
    for pieces in chunks.values():
        g, wc = (torch.cat(parts) for parts in zip(*pieces))
        gw = (g @ wc.unsqueeze(-1)).squeeze(-1)
        batches.append(LayerProblems(s * s * g, -s * gw, (gw * wc).sum(-1), wc / s, round_to_nearest(wc, s, -8, 7)))
    return batches


@pytest.fixture(scope="module")
def project_conv_adaround(project_conv_problems: list[LayerProblems]) -> list[torch.Tensor]:
    """AdaRound with its defaults, before the final 1-opt (shared by two tests: it is the slow part).

    On one thread: its 1000 steps of small batched ops run ~1.5 s, but 5-8 s on two threads of a
    busy 2-core machine, where every parallel ``bmm`` waits for a descheduled thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [adaround(p.P, p.q, p.r, p.w_over_s, -8, 7, refine=False) for p in project_conv_problems]
    finally:
        torch.set_num_threads(threads)


REAL_METHODS: dict[str, Callable[[LayerProblems, torch.Tensor], torch.Tensor]] = {
    "one_opt_rtn": lambda p, _: one_opt(p.P, p.q, p.r, p.rtn, -8, 7),
    "sequential": lambda p, _: sequential_rounding(p.P, p.q, -8, 7),
    "randomized": lambda p, _: randomized_rounding(p.P, p.q, p.r, -8, 7, 300, torch.Generator().manual_seed(0)),
    "adaround_unrefined": lambda _, unrefined: unrefined,
    "adaround": lambda p, unrefined: one_opt(p.P, p.q, p.r, unrefined, -8, 7),  # = adaround(..., refine=True)
}


@pytest.mark.parametrize("name", list(REAL_METHODS))
@pytest.mark.slow
def test_real_layer_methods_beat_rtn(
    project_conv_problems: list[LayerProblems], project_conv_adaround: list[torch.Tensor], name: str
) -> None:
    assert [tuple(p.P.shape) for p in project_conv_problems] == [(560, 32, 32), (80, 16, 16)]
    rtn_values, values = [], []
    for problems, unrefined in zip(project_conv_problems, project_conv_adaround):
        z = REAL_METHODS[name](problems, unrefined)
        lo, hi = box_bounds(-8, 7, z)
        assert_feasible(z, lo, hi)
        rtn_values.append(qp_objective(problems.P, problems.q, problems.r, problems.rtn))
        values.append(qp_objective(problems.P, problems.q, problems.r, z))
    rtn_value, value = torch.cat(rtn_values), torch.cat(values)
    assert bool((value >= 0).all())
    if name == "one_opt_rtn":
        assert bool((value <= rtn_value).all())
    # Measured mean objective relative to RTN: 0.20 (1-opt), 0.17 (sequential), 0.39 (randomized, 300 samples),
    # 0.28 (AdaRound unrefined), 0.16 (AdaRound + 1-opt); the bounds leave a wide margin.
    assert float(value.sum() / rtn_value.sum()) < 0.6
    assert float((value < rtn_value).float().mean()) > 0.6
