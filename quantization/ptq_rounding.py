"""Post-training rounding methods acting on batched integer quadratic problems (paper Sec. 4).

For one output channel with weights ``w`` (``n`` inputs), step size ``s`` and layer input
patches ``A`` (rows = output positions), integer weights ``z`` cost

    f(z) = ||A w - s A z||^2 = z'Pz + 2 q'z + r,   P = s^2 A'A,  q = -s A'A w,  r = w'A'A w,

with ``z`` integer in the box ``[lo, hi]`` (``[-2^(b-1), 2^(b-1) - 1]`` for the symmetric
``b``-bit grid of :mod:`quantization.quantizers`). Any feasible ``z`` bounds the optimum from
above, i.e. the achievable SQNR from below. The methods here are batched over ``B`` problems of
size ``n``: ``P`` is ``(B, n, n)`` (symmetric positive semi-definite), ``q`` ``(B, n)``, ``r``
``(B,)``, and ``lo``/``hi`` are integers or tensors broadcastable to ``(B, n)``. Everything is
float64 on the device of ``P``; every method returns ``z`` as a ``(B, n)`` float64 tensor of
integers inside the box:

* :func:`round_to_nearest` - RTN, ``clamp(round(w / s), lo, hi)``;
* :func:`randomized_rounding` - the paper's upper bound: Gaussian samples around a continuous
  point (e.g. an SDP relaxation's ``x`` with covariance ``X - xx'``), rounded, best one kept;
* :func:`one_opt` - greedy integer coordinate descent to a 1-opt local minimum;
* :func:`sequential_rounding` - GPTQ/OBQ: one coordinate at a time, with the remaining
  continuous coordinates re-optimised after each (error feedback through ``P^-1``);
* :func:`adaround` - AdaRound (Nagel et al. 2020): learned up/down rounding with a rectified
  sigmoid and an annealed regulariser, optimised with Adam.

All functions are pure (inputs are never modified) and deterministic, except
:func:`randomized_rounding`, which draws from the ``torch.Generator`` it is given.
"""
from __future__ import annotations

import logging
import math

import torch

from quantization.qp_bounds import continuous_minimiser, qp_objective

__all__ = [
    "adaround",
    "adaround_gradient",
    "box_bounds",
    "continuous_minimiser",
    "one_opt",
    "qp_objective",
    "randomized_rounding",
    "rectified_sigmoid",
    "round_to_nearest",
    "sequential_rounding",
]

logger = logging.getLogger(__name__)

Bound = int | float | torch.Tensor

# AdaRound's stretch of the sigmoid (Nagel et al. 2020, Eq. 23).
ZETA = 1.1
GAMMA = -0.1
# Adam's moment decay rates and epsilon (torch.optim.Adam's defaults, given explicitly).
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
# A move of one_opt must lower f by more than this share of the magnitude of its terms.
_ONE_OPT_RTOL = 1e-12
# Largest (problems x samples x n) block of randomized_rounding's samples built at once.
_MAX_SAMPLE_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------- helpers


def box_bounds(lo: Bound, hi: Bound, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``lo`` and ``hi`` as tensors of ``like``'s shape, dtype and device.

    Raises:
        ValueError: a bound is not an integer, or ``lo > hi`` somewhere.
    """
    lo_t = torch.as_tensor(lo, dtype=like.dtype, device=like.device).expand_as(like)
    hi_t = torch.as_tensor(hi, dtype=like.dtype, device=like.device).expand_as(like)
    if not (torch.equal(lo_t, lo_t.round()) and torch.equal(hi_t, hi_t.round())):
        raise ValueError("the box bounds lo and hi must be integers")
    if (lo_t > hi_t).any():
        raise ValueError("empty box: lo > hi for some coordinate")
    return lo_t, hi_t


def _check_problems(P: torch.Tensor, q: torch.Tensor, r: torch.Tensor | None = None) -> None:
    if P.dim() != 3 or P.shape[1] != P.shape[2]:
        raise ValueError(f"P must have shape (B, n, n), got {tuple(P.shape)}")
    if q.shape != P.shape[:2]:
        raise ValueError(f"q must have shape {tuple(P.shape[:2])}, got {tuple(q.shape)}")
    if r is not None and r.shape != P.shape[:1]:
        raise ValueError(f"r must have shape {tuple(P.shape[:1])}, got {tuple(r.shape)}")
    if P.dtype != torch.float64 or q.dtype != torch.float64:
        raise ValueError("P and q must be float64")


# --------------------------------------------------------------------------- round to nearest


def round_to_nearest(w: torch.Tensor, step_size: float | torch.Tensor, lo: Bound, hi: Bound) -> torch.Tensor:
    """RTN: ``z = clamp(round(w / s), lo, hi)`` (round half to even), in float64.

    ``step_size`` broadcasts against ``w``: a scalar, or e.g. ``(B, 1)`` for one step per problem.
    """
    x = w.to(torch.float64) / torch.as_tensor(step_size, dtype=torch.float64, device=w.device)
    lo_t, hi_t = box_bounds(lo, hi, x)
    return torch.clamp(torch.round(x), lo_t, hi_t)


# --------------------------------------------------------------------------- randomized rounding


def _sampling_factor(spread: float | torch.Tensor, batch: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """``L`` with ``Sigma = L L'``, shape ``(B, n, n)``, or per-coordinate std ``(B, n)``.

    ``spread``: a float (std of every coordinate), a ``(B, n)`` std per coordinate, or a
    ``(B, n, n)`` covariance, factorised as ``V diag(sqrt(max(l, 0)))`` from its
    eigendecomposition, so a singular covariance (e.g. ``X - xx'`` of an SDP solution) is fine.
    """
    spread_t = torch.as_tensor(spread, dtype=torch.float64, device=like.device)
    if spread_t.dim() == 3:
        if spread_t.shape != (batch, n, n):
            raise ValueError(f"a covariance spread must have shape {(batch, n, n)}, got {tuple(spread_t.shape)}")
        eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (spread_t + spread_t.transpose(1, 2)))
        return eigenvectors * eigenvalues.clamp_min(0.0).sqrt().unsqueeze(1)
    if (spread_t < 0).any():
        raise ValueError("a standard deviation spread must be >= 0")
    return spread_t.expand(batch, n)


def randomized_rounding(
    P: torch.Tensor,
    q: torch.Tensor,
    r: torch.Tensor,
    lo: Bound,
    hi: Bound,
    n_samples: int,
    generator: torch.Generator,
    center: torch.Tensor | None = None,
    spread: float | torch.Tensor = 0.3,
) -> torch.Tensor:
    """Best of rounded Gaussian samples around a continuous point (the paper's upper bound).

    Samples ``x_k = c + L e_k`` with ``e_k ~ N(0, I)`` and ``L L' = Sigma``, rounds them to
    ``z_k = clamp(round(x_k), lo, hi)`` and returns, per problem, the ``z_k`` of least
    ``f(z_k)`` among the ``n_samples`` samples and ``z_0 = clamp(round(c), lo, hi)`` (the
    sample with zero noise, so the result is never worse than rounding the center).

    Args:
        center: ``c``, ``(B, n)``; default the box-clipped continuous minimiser
            ``clamp(-P^+ q, lo, hi)``. For an SDP relaxation's solution ``(x, X)``, pass
            ``center=x`` and ``spread=X - x x'``.
        spread: ``Sigma``: a float (isotropic std), a ``(B, n)`` std per coordinate or a
            ``(B, n, n)`` covariance (positive semi-definite; singular is fine). The default,
            std 0.3 per coordinate, did best among isotropic stds 0.1..0.4 and covariances
            ``c P^-1`` on real layers (2..8 bits, 1000 samples).
        generator: a seeded ``torch.Generator`` on ``P``'s device; the same seed gives the same
            result. Samples are drawn in blocks of at most ``2^22`` numbers, in a fixed order.
    """
    _check_problems(P, q, r)
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    batch, n = q.shape
    lo_t, hi_t = box_bounds(lo, hi, q)
    center = torch.clamp(continuous_minimiser(P, q), lo_t, hi_t) if center is None else center.to(torch.float64)
    factor = _sampling_factor(spread, batch, n, q)
    best = torch.clamp(torch.round(center), lo_t, hi_t)
    best_value = qp_objective(P, q, r, best)
    chunk = max(1, _MAX_SAMPLE_ELEMENTS // max(1, batch * n))
    for start in range(0, n_samples, chunk):
        size = min(chunk, n_samples - start)
        noise = torch.randn(batch, size, n, dtype=torch.float64, device=P.device, generator=generator)
        noise = torch.bmm(noise, factor.transpose(1, 2)) if factor.dim() == 3 else noise * factor.unsqueeze(1)
        samples = torch.clamp(torch.round(center.unsqueeze(1) + noise), lo_t.unsqueeze(1), hi_t.unsqueeze(1))
        values = qp_objective(P, q, r, samples)
        chunk_value, index = values.min(dim=1)
        improved = chunk_value < best_value
        chosen = samples[torch.arange(batch, device=P.device), index]
        best = torch.where(improved.unsqueeze(1), chosen, best)
        best_value = torch.where(improved, chunk_value, best_value)
    return best


# --------------------------------------------------------------------------- 1-opt local search


def _check_integer_point(z: torch.Tensor, lo_t: torch.Tensor, hi_t: torch.Tensor) -> None:
    if not torch.equal(z, z.round()) or (z < lo_t).any() or (z > hi_t).any():
        raise ValueError("z must hold integers inside the box [lo, hi]")


def one_opt(
    P: torch.Tensor,
    q: torch.Tensor,
    r: torch.Tensor,
    z: torch.Tensor,
    lo: Bound,
    hi: Bound,
    max_sweeps: int = 100,
) -> torch.Tensor:
    """Greedy integer coordinate descent from ``z`` to a 1-opt local minimum.

    With the gradient half ``g = Pz + q``, changing coordinate ``i`` by an integer ``d``
    changes ``f`` by ``P_ii d^2 + 2 g_i d``, a convex parabola in ``d``: its best integer in the
    box is ``d = clamp(round(-g_i / P_ii), lo_i - z_i, hi_i - z_i)`` (for ``P_ii = 0`` the box
    edge against the sign of ``g_i``). A sweep visits ``i = 1..n`` in turn, applies ``d`` when
    it lowers ``f`` (by more than ``1e-12`` of the terms' magnitude, against round-off) and
    updates ``g += d P[:, i]`` in ``O(n)``; ``g`` is recomputed at the start of every sweep.
    Sweeps stop when none of the problems improved (then no single-coordinate integer change
    improves any problem) or after ``max_sweeps``. ``f`` never increases.

    Args:
        z: ``(B, n)`` integers inside the box, the starting point (not modified).
        r: used only for debug logging of the objective.
    """
    _check_problems(P, q, r)
    lo_t, hi_t = box_bounds(lo, hi, q)
    z = z.to(torch.float64).clone()
    _check_integer_point(z, lo_t, hi_t)
    diagonal = P.diagonal(dim1=1, dim2=2)
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        gradient = torch.bmm(P, z.unsqueeze(-1)).squeeze(-1) + q
        improved = torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
        for i in range(q.shape[1]):
            g_i, p_ii = gradient[:, i], diagonal[:, i]
            step = torch.nan_to_num(torch.round(-g_i / p_ii), nan=0.0, posinf=math.inf, neginf=-math.inf)
            step = torch.clamp(step, lo_t[:, i] - z[:, i], hi_t[:, i] - z[:, i])
            quadratic, linear = p_ii * step * step, 2.0 * g_i * step
            accept = quadratic + linear < -_ONE_OPT_RTOL * (quadratic + linear.abs())
            step = torch.where(accept, step, torch.zeros_like(step))
            z[:, i] += step
            gradient += step.unsqueeze(-1) * P[:, :, i]
            improved |= accept
        if not improved.any():
            break
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("one_opt: %d sweeps, mean objective %.6g", sweeps, qp_objective(P, q, r, z).mean().item())
    return z


# --------------------------------------------------------------------------- sequential (GPTQ/OBQ) rounding


def _orders(P: torch.Tensor, order: str | torch.Tensor | None) -> torch.Tensor:
    """``(B, n)`` permutations: ``None`` natural, ``"diag"`` descending ``P_ii``, or given ``(n,)``/``(B, n)``."""
    batch, n = P.shape[:2]
    if order is None:
        return torch.arange(n, device=P.device).expand(batch, n)
    if isinstance(order, str):
        if order != "diag":
            raise ValueError(f"order must be None, 'diag' or a permutation tensor, got {order!r}")
        return torch.argsort(P.diagonal(dim1=1, dim2=2), dim=1, descending=True, stable=True)
    permutation = torch.as_tensor(order, device=P.device).long().expand(batch, n)
    if not torch.equal(permutation.sort(dim=1).values, torch.arange(n, device=P.device).expand(batch, n)):
        raise ValueError("order must hold a permutation of 0..n-1 (per problem)")
    return permutation


def _inverse_cholesky_upper(P: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper ``U`` with ``U'U = H^-1``, ``H = P + damping * mean(diag P) * I`` (``I`` if ``P = 0``)."""
    mean_diag = P.diagonal(dim1=1, dim2=2).mean(-1)
    shift = torch.where(mean_diag > 0, damping * mean_diag, torch.ones_like(mean_diag))
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    lower, info = torch.linalg.cholesky_ex(P + shift[:, None, None] * eye)
    if (info != 0).any():
        raise ValueError("P + damping * mean(diag P) * I is not positive definite: increase damping")
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def sequential_rounding(
    P: torch.Tensor,
    q: torch.Tensor,
    lo: Bound,
    hi: Bound,
    order: str | torch.Tensor | None = "diag",
    damping: float = 0.01,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """GPTQ/OBQ-style rounding: fix coordinates one at a time, re-optimising the others.

    Starting from the continuous minimiser ``x`` (``start``, default ``-P^+ q``; ``w / s`` for
    a layer), the coordinates are visited in ``order``. Coordinate ``i`` is fixed to
    ``z_i = clamp(round(x_i), lo_i, hi_i)`` and the not yet fixed ones ``R`` move to their
    continuous optimum given all fixed ones, ``x_R = argmin f``. With ``H^-1 = U'U`` (``U``
    upper triangular, rows in visiting order) this is the error feedback

        x_j <- x_j - (x_i - z_i) / U_ii * U_ij   for every later j,

    (OBS's ``-(x_i - z_i) / [H_R^-1]_ii * [H_R^-1]_{:,i}``, with the Cholesky rows standing in
    for the shrinking inverses). ``H = P + damping * mean(diag P) * I`` (GPTQ's 1% relative
    damping) keeps singular ``P`` invertible; the updates are then the exact conditional
    optima of ``f(x) + damping * mean(diag P) * ||x - x_start||^2``, i.e. of ``f`` for
    ``damping = 0`` (which needs a positive definite ``P``).

    Args:
        order: ``"diag"`` (descending ``P_ii``, GPTQ's act-order; the default, which roughly
            halves the natural order's objective on real layers), ``None`` (natural order) or a
            permutation, ``(n,)`` for all problems or ``(B, n)``.
        damping: relative damping, ``>= 0``.
    Raises:
        ValueError: ``H`` is not positive definite (``damping = 0`` with a singular ``P``).
    """
    _check_problems(P, q)
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    lo_t, hi_t = box_bounds(lo, hi, q)
    x = continuous_minimiser(P, q) if start is None else start.to(torch.float64)
    permutation = _orders(P, order)
    rows = torch.arange(q.shape[0], device=P.device)[:, None, None]
    upper = _inverse_cholesky_upper(P[rows, permutation.unsqueeze(-1), permutation.unsqueeze(1)], damping)
    x = x.gather(1, permutation).clone()
    lo_p, hi_p = lo_t.gather(1, permutation), hi_t.gather(1, permutation)
    z = torch.empty_like(x)
    for i in range(q.shape[1]):
        z[:, i] = torch.clamp(torch.round(x[:, i]), lo_p[:, i], hi_p[:, i])
        error = (x[:, i] - z[:, i]) / upper[:, i, i]
        x[:, i + 1 :] -= error.unsqueeze(-1) * upper[:, i, i + 1 :]
    return torch.empty_like(z).scatter_(1, permutation, z)


# --------------------------------------------------------------------------- AdaRound


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's ``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``, ``zeta = 1.1``, ``gamma = -0.1``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _beta(iteration: int, iterations: int, warmup: float, beta_range: tuple[float, float]) -> float | None:
    """AdaRound's annealing: ``None`` (no regulariser) for the first ``warmup`` share of the
    iterations, then ``beta`` falling linearly from ``beta_range[0]`` to ``beta_range[1]``."""
    warm_iterations = int(warmup * iterations)
    if iteration < warm_iterations:
        return None
    progress = (iteration - warm_iterations) / max(1, iterations - warm_iterations)
    start, end = beta_range
    return end + (start - end) * max(0.0, 1.0 - progress)


def adaround_gradient(
    P: torch.Tensor,
    q: torch.Tensor,
    v: torch.Tensor,
    floor: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    scale: torch.Tensor,
    reg_weight: float,
    beta: float | None,
) -> torch.Tensor:
    """Gradient w.r.t. ``V`` of AdaRound's loss, summed over the problems, in closed form:

        L(V) = sum_b f_b(clamp(floor + h(V), lo, hi)) / scale_b + reg_weight * sum_i (1 - |2 h_i - 1|^beta),

        dL/dh_i = 2 (Pz + q)_i / scale [lo_i <= floor_i + h_i <= hi_i] - 2 reg_weight beta |c_i|^(beta - 1) sign(c_i),
        dL/dV_i = dL/dh_i (zeta - gamma) sigma(V_i) (1 - sigma(V_i)) [0 <= (zeta - gamma) sigma(V_i) + gamma <= 1],

    ``h`` the rectified sigmoid (:func:`rectified_sigmoid`), ``c = 2h - 1``, the regulariser left
    out when ``beta`` is ``None``; clamps pass gradients inside their closed ranges (as
    ``torch.clamp``'s autograd does). The tests check it against autograd on ``L`` and against
    finite differences. It is used instead of autograd because it is 1.5-4x faster here and
    autograd's differently rounded gradient (equal within 2e-16) moves AdaRound's end point on
    ill-conditioned layers (6 of 32 ``_conv_stem`` problems), which would change published results.
    """
    raw = torch.sigmoid(v)
    stretched = raw * (ZETA - GAMMA) + GAMMA
    h = torch.clamp(stretched, 0.0, 1.0)
    soft = floor + h
    z = torch.clamp(soft, lo, hi)
    grad_h = 2.0 * (torch.bmm(P, z.unsqueeze(-1)).squeeze(-1) + q) / scale.unsqueeze(-1)
    grad_h = grad_h * ((soft >= lo) & (soft <= hi))
    if beta is not None:
        centred = 2.0 * h - 1.0
        grad_h = grad_h - reg_weight * 2.0 * beta * centred.abs().pow(beta - 1.0) * centred.sign()
    inside = (stretched >= 0.0) & (stretched <= 1.0)
    return grad_h * inside * (ZETA - GAMMA) * raw * (1.0 - raw)


def adaround(
    P: torch.Tensor,
    q: torch.Tensor,
    r: torch.Tensor,
    w_over_s: torch.Tensor,
    lo: Bound,
    hi: Bound,
    iterations: int = 1000,
    lr: float = 0.05,
    beta_range: tuple[float, float] = (20.0, 2.0),
    reg_weight: float = 0.3,
    warmup: float = 0.2,
    refine: bool = True,
) -> torch.Tensor:
    """AdaRound (Nagel et al. 2020) on each problem, then optionally :func:`one_opt`.

    ``z = floor(w/s) + h(V)`` with the rectified sigmoid ``h`` (:func:`rectified_sigmoid`),
    ``V`` initialised so that ``h(V) = w/s - floor(w/s)`` (the fractional part, as in the
    paper). ``torch.optim.Adam`` (betas 0.9, 0.999, eps 1e-8: ``V -= lr m_hat / (sqrt(v_hat) + eps)``
    with the bias-corrected moments) minimises, with the gradient of :func:`adaround_gradient`, the loss

        f(clamp(z, lo, hi)) / mean(diag P) + reg_weight * sum_i (1 - |2 h_i - 1|^beta)

    for ``iterations`` steps with learning rate ``lr``; the regulariser is off for the first
    ``warmup`` share of the steps, then ``beta`` anneals linearly from ``beta_range[0]`` to
    ``beta_range[1]``. Dividing ``f`` by ``mean(diag P)`` makes ``reg_weight`` independent of
    the scale of the problem: ``f / mean(diag P)`` is about ``sum_i e_i^2`` for rounding
    errors ``e_i`` (in steps) on uncorrelated inputs, so ``reg_weight`` is the price of an
    undecided ``h_i = 1/2`` in squared steps. The defaults (``reg_weight`` 0.3, ``lr`` 0.05,
    1000 steps) came within 2% of the best mean objective on a real layer (EfficientNet-Lite0,
    chunks of 32 inputs; ``reg_weight`` 0.03..1 at 2..8 bits, ``lr`` 0.01..0.2 and 500..2000
    steps at 4 bits); ``reg_weight`` 0.01 (the paper's value for its differently scaled loss)
    leaves many ``h`` undecided and loses to RTN on about a quarter of the problems. The result
    rounds ``h`` to ``{0, 1}``, ``z = clamp(floor(w/s) + [h >= 1/2], lo, hi)`` (decided as
    ``V >= 0``, free of round-off), then runs :func:`one_opt` if ``refine``.
    Problems are independent: Adam acts element-wise, so batching changes nothing.
    """
    _check_problems(P, q, r)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    lo_t, hi_t = box_bounds(lo, hi, q)
    w_over_s = w_over_s.to(torch.float64)
    floor = torch.floor(w_over_s)
    v = torch.logit(((w_over_s - floor) - GAMMA) / (ZETA - GAMMA))
    scale = P.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(torch.finfo(P.dtype).tiny)
    optimizer = torch.optim.Adam([v], lr=lr, betas=_ADAM_BETAS, eps=_ADAM_EPS)
    for iteration in range(iterations):
        beta = _beta(iteration, iterations, warmup, beta_range)
        v.grad = adaround_gradient(P, q, v, floor, lo_t, hi_t, scale, reg_weight, beta)
        optimizer.step()
    z = torch.clamp(floor + (v >= 0.0).to(torch.float64), lo_t, hi_t)  # h(V) >= 1/2 <=> V >= 0
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("adaround: mean objective %.6g after rounding h", qp_objective(P, q, r, z).mean().item())
    return one_opt(P, q, r, z, lo_t, hi_t) if refine else z
