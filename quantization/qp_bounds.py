"""Certified lower bounds on the post-training quantization error of a layer (paper Sec. 4).

For one output channel with weights ``w`` (``n`` inputs), step size ``s`` and input patches ``A``
(rows are output positions), integer weights ``z`` give the output error

    f(z) = ||A w - s A z||^2 = z'Pz + 2q'z + r,   P = s^2 A'A,  q = -s A'A w,  r = w'A'A w,

with ``z`` integer, optionally in the box ``[lo, hi] = [-2^(b-1), 2^(b-1) - 1]``. A lower bound on
``min f`` bounds from above the SQNR that any post-training quantization method can reach.
:class:`QuadraticProblems` holds ``B`` such problems (float64, any device).

**The relaxation (Park & Boyd, as in the paper).** Shift the origin to an integer ``c`` (by default
the floor of the continuous minimiser ``z*``, :func:`default_origin`); with ``x = z - c``

    f(c + x) = x'Px + 2 q~'x + r~,   q~ = Pc + q,   r~ = f(c),

and every integer ``x_i`` satisfies ``x_i (x_i - 1) >= 0``. The SDP relaxation is

    minimise tr(P X) + 2 q~'x + r~   s.t.   diag(X) >= x,   [[X, x], [x', 1]] PSD.

Its Lagrangian dual: for multipliers ``lambda >= 0`` with ``M = P - diag(lambda)`` positive definite,

    g(lambda) = r~ - v' M^{-1} v,   v = q~ + lambda / 2,

is the minimum over real ``x`` of ``x'Mx + 2v'x + r~ = f(c + x) - sum_i lambda_i x_i (x_i - 1)``,
which is ``<= f(c + x)`` at every integer ``x`` (weak duality), so ``g(lambda)`` is a lower bound
on ``f`` over *all* integers. ``g(0) = f(z*)`` is the continuous minimum; ``max g`` equals the SDP
optimum (strong duality holds generically).

**Box tightening (optional; the paper omits it).** For integer ``x`` in ``[l, h] = [lo - c, hi - c]``
also ``(x_i - l_i)(h_i - x_i) >= 0``; multipliers ``mu >= 0`` for it give

    M = P - diag(lambda) + diag(mu),   v = q~ + lambda / 2 - mu * (l + h) / 2,
    g(lambda, mu) = r~ + mu'(l * h) - v' M^{-1} v,

a lower bound on ``f`` over the integers of the box. In the primal SDP this adds
``diag(X) <= (l + h) * x - l * h``. With the box the origin is clamped into ``[lo, hi - 1]`` (any
integer origin gives valid bounds; a clamped one keeps the ``x (x - 1) >= 0`` cut inside the box).

**Decoupled coordinates.** An input whose row and column of ``P`` and entry of ``q`` are all exactly
zero (a dead input channel: a zero column of ``A``) does not enter ``f``. With ``lambda_i = mu_i = 0``
it drops out of the Lagrangian; :func:`dual_bound` puts 1 on ``M_ii`` (a decoupled ``x_i^2`` term
whose minimum, 0, leaves ``g`` unchanged) so that the rest can be certified by Cholesky. Any other
singular ``P`` (fewer positions than inputs, duplicated input columns) has no ``lambda >= 0`` with
``P - diag(lambda)`` positive definite: without the box no finite bound can be certified in floating
point (the stored ``P`` may have eigenvalues of rounding size below zero, and then ``f`` is
unbounded below over the integers). With the box, ``mu > 0`` makes ``M`` positive definite and such
problems are certified like any other.

:func:`solve_dual` maximises ``g`` for all problems at once (a batched primal-dual interior-point
method of our own); :func:`solve_sdp_cvxpy` solves the primal SDP with cvxpy as the reference and
:func:`certify_sdp_solution` turns its dual variables into certified bounds.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from quantization.quantizers import QuantScheme, integer_range

__all__ = [
    "DualSolution",
    "QuadraticProblems",
    "SDPSolution",
    "certify_multipliers",
    "certify_sdp_solution",
    "continuous_minimiser",
    "decoupled_coordinates",
    "default_origin",
    "dual_bound",
    "interior_multipliers",
    "shift_origin",
    "solve_dual",
    "solve_sdp_cvxpy",
]

logger = logging.getLogger(__name__)

_DTYPE = torch.float64
_UNIT_ROUNDOFF = torch.finfo(_DTYPE).eps / 2
# Back-off fractions towards an interior point tried by certify_multipliers (0: the multipliers as given).
_BACKOFF_FRACTIONS = (0.0, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1e-1, 1.0)


# --------------------------------------------------------------------------- problems


def qp_objective(P: torch.Tensor, q: torch.Tensor, r: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``f(z) = z'Pz + 2 q'z + r`` per problem: ``z`` ``(B, n)`` gives ``(B,)``, ``(B, K, n)`` gives ``(B, K)``."""
    candidates = z if z.dim() == 3 else z.unsqueeze(1)
    values = (torch.bmm(candidates, P) * candidates).sum(-1) + 2.0 * (candidates * q.unsqueeze(1)).sum(-1)
    values = values + r.unsqueeze(-1)
    return values if z.dim() == 3 else values.squeeze(1)


@dataclass(frozen=True)
class QuadraticProblems:
    """``B`` integer quadratic problems ``min f(z) = z'Pz + 2q'z + r`` over integer ``z`` (in ``[lo, hi]``).

    Attributes:
        P: ``(B, n, n)`` symmetric positive semidefinite matrices.
        q: ``(B, n)``.
        r: ``(B,)``.
        lo, hi: optional ``(B, n)`` integer-valued float bounds of the box, both or neither.

    All float64 on one device.
    """

    P: torch.Tensor
    q: torch.Tensor
    r: torch.Tensor
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.P.dim() != 3 or self.P.shape[1] != self.P.shape[2]:
            raise ValueError(f"P must have shape (B, n, n), got {tuple(self.P.shape)}")
        batch, n = self.P.shape[:2]
        if self.q.shape != (batch, n) or self.r.shape != (batch,):
            shapes = f"{tuple(self.q.shape)} and {tuple(self.r.shape)}"
            raise ValueError(f"q must be {(batch, n)} and r {(batch,)}, got {shapes}")
        if (self.lo is None) != (self.hi is None):
            raise ValueError("give both lo and hi, or neither")
        tensors = [self.P, self.q, self.r] + ([self.lo, self.hi] if self.has_box else [])
        if any(t.dtype != _DTYPE for t in tensors) or len({t.device for t in tensors}) != 1:
            raise ValueError("all tensors must be float64 on one device")
        if self.has_box:
            if self.lo.shape != (batch, n) or self.hi.shape != (batch, n):
                raise ValueError(f"lo and hi must have shape {(batch, n)}")
            if not (torch.equal(self.lo, self.lo.round()) and torch.equal(self.hi, self.hi.round())):
                raise ValueError("lo and hi must be integers")
            if bool((self.lo > self.hi).any()):
                raise ValueError("lo must be <= hi")

    @classmethod
    def from_gram(
        cls,
        gram: torch.Tensor,
        weights: torch.Tensor,
        step_size: torch.Tensor | float,
        n_bits: int | None = None,
    ) -> QuadraticProblems:
        """Problems ``f(z) = ||A w - s A z||^2`` from the Gram matrix ``A'A``.

        Args:
            gram: ``A'A``, ``(n, n)`` shared by all problems or ``(B, n, n)``.
            weights: ``(B, n)``, one row ``w`` per problem (e.g. a chunk of an output channel).
            step_size: ``(B,)`` or a scalar, the step ``s`` of each problem.
            n_bits: if given, the symmetric signed box ``[-2^(b-1), 2^(b-1) - 1]``.

        Returns:
            ``P = s^2 A'A``, ``q = -s A'A w``, ``r = w'A'A w`` in float64 on ``weights``' device.
        """
        weights = weights.to(_DTYPE)
        if weights.dim() != 2:
            raise ValueError(f"weights must have shape (B, n), got {tuple(weights.shape)}")
        batch, n = weights.shape
        gram = gram.to(device=weights.device, dtype=_DTYPE)
        if gram.shape not in ((n, n), (batch, n, n)):
            raise ValueError(f"gram must have shape {(n, n)} or {(batch, n, n)}, got {tuple(gram.shape)}")
        gram = gram.expand(batch, n, n)
        step = torch.as_tensor(step_size, dtype=_DTYPE, device=weights.device).expand(batch)
        gram_w = torch.einsum("bij,bj->bi", gram, weights)
        box = (None, None)
        if n_bits is not None:
            q_min, q_max = integer_range(n_bits, QuantScheme.SYMMETRIC)
            box = (weights.new_full((batch, n), float(q_min)), weights.new_full((batch, n), float(q_max)))
        return cls(step[:, None, None] ** 2 * gram, -step[:, None] * gram_w, (weights * gram_w).sum(-1), *box)

    @property
    def batch_size(self) -> int:
        return self.P.shape[0]

    @property
    def n(self) -> int:
        return self.P.shape[1]

    @property
    def has_box(self) -> bool:
        return self.lo is not None

    def objective(self, z: torch.Tensor) -> torch.Tensor:
        """``z'Pz + 2q'z + r`` for ``z`` of shape ``(B, n)`` (returns ``(B,)``) or ``(B, K, n)`` (``(B, K)``)."""
        return qp_objective(self.P, self.q, self.r, z.to(_DTYPE))

    def select(self, index: int | Sequence[int] | torch.Tensor) -> QuadraticProblems:
        """The problems at ``index`` (an int keeps a batch of one)."""
        index = [index] if isinstance(index, int) else index
        index = torch.as_tensor(index, dtype=torch.long, device=self.P.device)
        box = (self.lo[index], self.hi[index]) if self.has_box else (None, None)
        return QuadraticProblems(self.P[index], self.q[index], self.r[index], *box)

    def without_box(self) -> QuadraticProblems:
        return replace(self, lo=None, hi=None)

    def to(self, device: torch.device | str) -> QuadraticProblems:
        box = (self.lo.to(device), self.hi.to(device)) if self.has_box else (None, None)
        return QuadraticProblems(self.P.to(device), self.q.to(device), self.r.to(device), *box)


def continuous_minimiser(P: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``z* = -P^+ q``, a minimiser of ``z'Pz + 2q'z`` over real ``z`` (``P``: ``(B, n, n)``, returns ``(B, n)``).

    Solved by Cholesky where ``P`` is positive definite; problems where the factorisation fails
    (rank-deficient ``P``: fewer positions than inputs, dead or duplicated input channels) use the
    pseudo-inverse (``torch.linalg.pinv(hermitian=True)``: an eigendecomposition, eigenvalues below
    ``n * eps * max`` treated as zero), i.e. the minimiser of least norm. For problems made by
    :meth:`QuadraticProblems.from_gram` (``q`` in the range of ``P``) ``f(z*)`` is the continuous
    minimum, and ``z* = w / s`` is another minimiser.
    """
    factor, info = torch.linalg.cholesky_ex(P)
    singular = info != 0
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    factor = torch.where(singular[:, None, None], eye, factor)
    minimiser = -torch.cholesky_solve(q[..., None], factor)[..., 0]
    if bool(singular.any()):
        logger.debug("%d singular P: continuous minimiser by pseudo-inverse", int(singular.sum()))
        pseudo = torch.linalg.pinv(P[singular], hermitian=True)
        minimiser[singular] = -torch.einsum("bij,bj->bi", pseudo, q[singular])
    return minimiser


def default_origin(problems: QuadraticProblems, clamp_to_box: bool = False) -> torch.Tensor:
    """The integer origin ``c = floor(z*)``, optionally clamped into ``[lo, max(lo, hi - 1)]``."""
    origin = torch.floor(continuous_minimiser(problems.P, problems.q))
    if clamp_to_box:
        _require_box(problems)
        origin = torch.minimum(torch.maximum(origin, problems.lo), torch.maximum(problems.lo, problems.hi - 1))
    return origin


def shift_origin(problems: QuadraticProblems, origin: torch.Tensor) -> QuadraticProblems:
    """The problems in ``x = z - c`` for an integer origin ``c``: ``f(c + x) = x'Px + 2 q~'x + r~``.

    ``q~ = Pc + q``, ``r~ = f(c)``, box ``[lo - c, hi - c]``. Integer ``x`` and integer ``z`` are the
    same set shifted, so bounds on the shifted problem hold for the original.
    """
    origin = origin.to(_DTYPE)
    if not torch.equal(origin, origin.round()):
        raise ValueError("the origin must be integer")
    q_shifted = torch.einsum("bij,bj->bi", problems.P, origin) + problems.q
    box = (problems.lo - origin, problems.hi - origin) if problems.has_box else (None, None)
    return QuadraticProblems(problems.P, q_shifted, problems.objective(origin), *box)


def decoupled_coordinates(problems: QuadraticProblems) -> torch.Tensor:
    """``(B, n)`` bool: inputs whose row and column of ``P`` and entry of ``q`` are exactly zero.

    ``f`` does not depend on them; shifting the origin keeps them decoupled (``q~_i = (Pc)_i + q_i = 0``).
    """
    zero = problems.P == 0
    return zero.all(dim=2) & zero.all(dim=1) & (problems.q == 0)


def _require_box(problems: QuadraticProblems) -> None:
    if not problems.has_box:
        raise ValueError("the problems have no box (build them with n_bits, or give lo and hi)")


def _problem_scale(problems: QuadraticProblems) -> torch.Tensor:
    """``tr(P) / n`` per problem (1 where it is zero): the unit of ``P``, ``lambda`` and ``mu``."""
    scale = problems.P.diagonal(dim1=1, dim2=2).mean(-1)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


# --------------------------------------------------------------------------- dual bounds


def _lagrangian(
    shifted: QuadraticProblems, lam: torch.Tensor, mu: torch.Tensor | None, decoupled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(M, v, const)`` with ``L(x) = x'Mx + 2v'x + const`` for shifted problems, ``g = const - v'M^{-1}v``.

    ``M = P - diag(lam) (+ diag(mu))``, plus 1 on the diagonal of decoupled coordinates whose
    multipliers are zero; ``v = q~ + lam/2 (- mu (l + h)/2)``; ``const = r~ (+ mu'(l h))``.
    """
    diagonal = -lam
    v = shifted.q + lam / 2
    const = shifted.r
    if mu is not None:
        diagonal = diagonal + mu
        v = v - mu * (shifted.lo + shifted.hi) / 2
        const = const + (mu * shifted.lo * shifted.hi).sum(-1)
    inactive = (lam == 0) if mu is None else (lam == 0) & (mu == 0)
    diagonal = diagonal + (decoupled & inactive).to(_DTYPE)
    return shifted.P + torch.diag_embed(diagonal), v, const


def _certification_margin(shifted: QuadraticProblems, lam: torch.Tensor, mu: torch.Tensor | None) -> torch.Tensor:
    """``delta = 8 (n + 1) u tau``, ``tau = sum_i (|P_ii| + lam_i + mu_i + 1)`` >= ``tr(M)``, per problem.

    Floating-point Cholesky of ``M - delta I`` that succeeds yields ``L L' = M - delta I + E`` with
    ``||E||_2 <= gamma_{n+1} tr(L L') ~ (n + 1) u tr(M)`` (Higham, *Accuracy and Stability*, Thm 10.5);
    the triangular solve adds a backward error ``F`` of the order ``2 n u tr(M)`` and forming the
    diagonal of ``M`` ``2 u tau``. ``delta`` exceeds their sum, so ``M - delta I + E + F`` is ``<= M``.
    """
    tau = shifted.P.diagonal(dim1=1, dim2=2).abs().sum(-1) + lam.sum(-1) + shifted.n
    if mu is not None:
        tau = tau + mu.sum(-1)
    return 8 * (shifted.n + 1) * _UNIT_ROUNDOFF * tau


def _rounding_allowance(
    problems: QuadraticProblems,
    origin: torch.Tensor,
    shifted: QuadraticProblems,
    lam: torch.Tensor,
    mu: torch.Tensor | None,
    y: torch.Tensor,
    quadratic: torch.Tensor,
    margin: torch.Tensor,
) -> torch.Tensor:
    """A bound on the rounding error of ``const`` and ``v'M^{-1}v`` as computed, doubled.

    With ``gamma = (n + 3) u``: ``const = f(c) (+ mu'(l h))`` is a sum of products of magnitude
    ``|c|'|P||c| + 2|q|'|c| + |r| (+ |mu|'|l h|)``, each entry of ``v`` one of ``|P||c| + |q| + lam/2
    (+ mu |l + h|/2)``, so their errors are at most ``gamma`` times those (``e_v`` for ``v``). An error
    ``e`` in ``v`` changes ``v'M^{-1}v`` by ``2 y'e + e'M^{-1}e <= 2|y|'e_v + 2 ||e_v||^2 / delta``
    (``y = M^{-1}v``, ``lambda_min(M) >= delta / 2``); the sum of squares itself is within
    ``gamma * quadratic``.
    """
    gamma = (problems.n + 3) * _UNIT_ROUNDOFF
    abs_c = origin.abs()
    abs_p_c = torch.einsum("bij,bj->bi", problems.P.abs(), abs_c)
    const_size = (abs_c * abs_p_c).sum(-1) + 2 * (problems.q.abs() * abs_c).sum(-1) + problems.r.abs()
    v_size = abs_p_c + problems.q.abs() + lam / 2
    if mu is not None:
        const_size = const_size + (mu * (shifted.lo * shifted.hi).abs()).sum(-1)
        v_size = v_size + mu * (shifted.lo + shifted.hi).abs() / 2
    v_error = gamma * v_size
    v_effect = 2 * (y.abs() * v_error).sum(-1) + 2 * (v_error**2).sum(-1) / margin
    return 2 * (gamma * (const_size + quadratic) + v_effect)


def dual_bound(
    problems: QuadraticProblems,
    lam: torch.Tensor,
    mu: torch.Tensor | None = None,
    origin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The certified dual bound ``g(lambda[, mu])`` of every problem: ``(bound (B,), certified (B,) bool)``.

    ``g`` is evaluated in the coordinates ``x = z - c`` (see the module docstring):
    ``g = r~ (+ mu'(l h)) - v'M^{-1}v``. Without ``mu`` it bounds ``f`` over all integers, with ``mu``
    over the integers of the box. ``origin`` defaults to :func:`default_origin` (clamped into the box
    when ``mu`` is given); pass :attr:`DualSolution.origin` to re-check a solution.

    A problem is certified when ``lam >= 0`` (and ``mu >= 0``), everything is finite and the Cholesky
    factorisation (``torch.linalg.cholesky_ex``, ``info == 0``) of ``M - delta I`` succeeds, with the
    safety margin ``delta`` of :func:`_certification_margin` (about ``1e-14 tr(M)`` for ``n = 32``).
    Why the reported number is a true lower bound, however the multipliers were found:

    * weak duality holds for *every* ``lambda, mu >= 0`` with ``M`` positive definite, so solver
      tolerances only affect how tight the bound is, never its validity;
    * the factorisation of ``M - delta I`` succeeding in floating point proves ``M`` positive
      definite: ``delta`` exceeds the backward error of the factorisation;
    * ``v'M^{-1}v`` is evaluated as ``||L^{-1} v||^2`` with the factor of ``M - delta I``, whose
      exact value is ``v'(M - delta I)^{-1} v >= v'M^{-1}v``; ``delta`` also covers the solve's
      backward error, so the subtracted term is overestimated;
    * the remaining rounding of ``r~``, ``v`` and the sums (:func:`_rounding_allowance`, relative
      size ``~1e-14``) is subtracted.

    The bound is certified for the stored float64 ``P, q, r``. ``lam = 0`` gives the continuous
    minimum ``f(z*)`` when ``P`` is positive definite. Uncertified problems get ``-inf``.
    """
    if mu is not None:
        _require_box(problems)
    if origin is None:
        origin = default_origin(problems, clamp_to_box=mu is not None)
    lam = lam.to(_DTYPE)
    mu = None if mu is None else mu.to(_DTYPE)
    shifted = shift_origin(problems, origin)
    matrix, v, const = _lagrangian(shifted, lam, mu, decoupled_coordinates(shifted))
    margin = _certification_margin(shifted, lam, mu)
    eye = torch.eye(problems.n, dtype=_DTYPE, device=matrix.device)
    factor, info = torch.linalg.cholesky_ex(matrix - margin[:, None, None] * eye)
    valid = (info == 0) & (lam >= 0).all(-1) & torch.isfinite(matrix).all(-1).all(-1) & torch.isfinite(v).all(-1)
    if mu is not None:
        valid &= (mu >= 0).all(-1)
    factor = torch.where(valid[:, None, None], factor, eye)  # keeps failed problems free of NaN
    solved = torch.linalg.solve_triangular(factor, v[..., None], upper=False)
    quadratic = (solved[..., 0] ** 2).sum(-1)
    y = torch.linalg.solve_triangular(factor.transpose(1, 2), solved, upper=True)[..., 0]
    allowance = _rounding_allowance(problems, origin, shifted, lam, mu, y, quadratic, margin)
    bound = const - quadratic - allowance
    valid &= torch.isfinite(bound)
    return torch.where(valid, bound, torch.full_like(bound, -math.inf)), valid


def interior_multipliers(
    problems: QuadraticProblems, use_box: bool, origin: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Strictly feasible multipliers (zero on decoupled coordinates), where there are any.

    * box: ``mu_i = eps_i``, ``lambda_i = eps_i / 2`` with ``eps_i = tr(P)/n / max(1, |l_i h_i|)``, so
      ``M = P + diag(eps) / 2`` and the box term costs at most ``tr(P)`` in ``g``;
    * no box: ``lambda = lambda_min(P) / 2`` (``P`` with its decoupled coordinates set to 1), which is
      strictly feasible iff ``P`` is positive definite there; otherwise zero (and infeasible).
    """
    decoupled = decoupled_coordinates(problems)
    active = (~decoupled).to(_DTYPE)
    scale = _problem_scale(problems)
    if use_box:
        _require_box(problems)
        if origin is None:
            origin = default_origin(problems, clamp_to_box=True)
        lower, upper = problems.lo - origin, problems.hi - origin
        eps = scale[:, None] / (lower * upper).abs().clamp_min(1.0) * active
        return eps / 2, eps
    reduced = problems.P + torch.diag_embed(decoupled.to(_DTYPE))
    smallest = torch.linalg.eigvalsh(reduced)[:, 0].clamp_min(0.0)
    return (smallest / 2)[:, None] * active, None


def certify_multipliers(
    problems: QuadraticProblems,
    lam: torch.Tensor,
    mu: torch.Tensor | None,
    origin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Certified bounds from approximate multipliers (e.g. an SDP solver's duals): ``(bound, certified, lam, mu)``.

    Solvers return multipliers that are feasible only up to their tolerance: slightly negative
    entries, or ``M`` with an eigenvalue slightly below zero when the optimum lies on the boundary
    ``det M = 0``. The multipliers are clipped at zero (and set to zero on decoupled coordinates),
    then moved a fraction ``theta`` towards :func:`interior_multipliers` ``(lambda0, mu0)``:
    ``M`` is linear in the multipliers, so ``(1 - theta) M + theta M0`` is positive definite for
    ``theta`` large enough. Every ``theta`` in ``0, 1e-12, ..., 1e-1, 1`` is evaluated with
    :func:`dual_bound` and the best certified bound is kept, with its multipliers.
    """
    decoupled = decoupled_coordinates(problems)
    lam = torch.where(decoupled, 0.0, lam.to(_DTYPE).clamp_min(0.0))
    mu = None if mu is None else torch.where(decoupled, 0.0, mu.to(_DTYPE).clamp_min(0.0))
    lam0, mu0 = interior_multipliers(problems, use_box=mu is not None, origin=origin)
    best = torch.full_like(problems.r, -math.inf)
    best_lam, best_mu = lam.clone(), None if mu is None else mu.clone()
    for theta in _BACKOFF_FRACTIONS:
        trial_lam = (1 - theta) * lam + theta * lam0
        trial_mu = None if mu is None else (1 - theta) * mu + theta * mu0
        bound, certified = dual_bound(problems, trial_lam, trial_mu, origin)
        better = certified & (bound > best)
        best = torch.where(better, bound, best)
        best_lam = torch.where(better[:, None], trial_lam, best_lam)
        if mu is not None:
            best_mu = torch.where(better[:, None], trial_mu, best_mu)
    return best, torch.isfinite(best), best_lam, best_mu


# --------------------------------------------------------------------------- batched dual solver


@dataclass(frozen=True)
class DualSolution:
    """Result of :func:`solve_dual`.

    Attributes:
        bound: ``(B,)`` certified lower bounds on ``min f`` (over all integers, or over the box when
            ``mu`` is not None); ``-inf`` where none could be certified.
        certified: ``(B,)`` bool, ``bound`` is the :func:`dual_bound` of ``(lam, mu, origin)``.
        lam, mu: ``(B, n)`` multipliers in the units of ``P`` (``mu`` None without the box).
        origin: ``(B, n)`` the integer origin ``c`` of the shift.
        iterations: ``(B,)`` interior-point iterations per problem.
        sdp_gap: ``(B,)`` ``p - bound`` for the objective ``p`` of the solver's primal-feasible point
            of the SDP: the SDP optimum lies in ``[bound, bound + sdp_gap]`` (up to rounding), so the
            bound is at most ``sdp_gap`` below what the relaxation can give (``inf`` if uncertified).
        status: per problem ``"optimal"`` (gap within ``tol``), ``"max_iters"``, ``"stalled"`` (the
            dual matrix lost positive definiteness in floating point; the last point is kept),
            ``"infeasible"`` (no strictly dual-feasible point: ``P`` singular without the box) or
            ``"numerical"`` (the final point could not be certified).
        x: ``(B, n)`` the solver's primal point of the relaxation in the original coordinates
            (``origin + x`` of the lifted ``[[X, x], [x', 1]]``), where the paper's randomized
            rounding centres its samples.
        covariance: ``(B, n, n)`` ``X - x x'`` of that primal point (positive semidefinite up to
            rounding), the paper's sampling covariance.
    """

    bound: torch.Tensor
    certified: torch.Tensor
    lam: torch.Tensor
    mu: torch.Tensor | None
    origin: torch.Tensor
    iterations: torch.Tensor
    sdp_gap: torch.Tensor
    status: tuple[str, ...]
    x: torch.Tensor
    covariance: torch.Tensor


@dataclass(frozen=True)
class _StandardForm:
    """The SDP of shifted, normalised problems as ``min <C, Y>`` over ``Y = [[X, x], [x', 1]] >= 0``.

    ``N = n + 1``, ``C = [[P, q~], [q~', r~]]``. Row 0 is ``<E, Y> = Y_NN = 1``; the ``K = n`` (``2n``
    with the box) inequality rows read ``<A_k, Y> = s_k >= 0`` with
    ``A_k = T_k [[a_k, b_k], [b_k, c_k]] T_k'``, ``T_k = [e_i, e_N]``, ``i = k mod n``:
    ``X_ii - x_i >= 0`` is ``(a, b, c) = (1, -1/2, 0)``, ``(l + h) x_i - l h - X_ii >= 0`` is
    ``(-1, (l + h)/2, -l h)``. The dual: ``max gamma`` s.t. ``Z = C - gamma E - sum_k u_k A_k >= 0``,
    ``u = [lambda (, mu)] >= 0``; ``Z``'s top-left block is ``M`` and the last pivot of its
    Cholesky factor gives ``g(u) = gamma + (Z_NN - v'M^{-1}v)``. Decoupled coordinates get
    ``C_ii = 1`` and no rows (``active`` False), matching :func:`_lagrangian`.
    """

    C: torch.Tensor  # (B, N, N)
    a: torch.Tensor  # (B, K)
    b: torch.Tensor
    c: torch.Tensor
    active: torch.Tensor  # (B, K) bool

    @property
    def repeats(self) -> int:
        return self.a.shape[1] // (self.C.shape[-1] - 1)

    def tile(self, values: torch.Tensor) -> torch.Tensor:
        """Per-coordinate ``(B, n)`` values laid out along the rows: ``(B, K)``."""
        return values.repeat(1, self.repeats)

    def fold(self, values: torch.Tensor) -> torch.Tensor:
        """Row values ``(B, K)`` summed per coordinate: ``(B, n)``."""
        return values.reshape(values.shape[0], self.repeats, -1).sum(1)

    def apply(self, matrix: torch.Tensor) -> torch.Tensor:
        """``[<E, G>, <A_k, G>]`` for symmetric ``G``: ``[G_NN, a G_ii + 2 b G_iN + c G_NN]``, ``(B, K + 1)``."""
        corner = matrix[:, -1, -1, None]
        diagonal, column = self.tile(matrix.diagonal(dim1=1, dim2=2)[:, :-1]), self.tile(matrix[:, :-1, -1])
        return torch.cat([corner, self.a * diagonal + 2 * self.b * column + self.c * corner], dim=1)

    def adjoint(self, xi: torch.Tensor) -> torch.Tensor:
        """``gamma E + sum_k u_k A_k`` for ``xi = [gamma, u]``."""
        gamma, u = xi[:, 0], xi[:, 1:]
        column = self.fold(u * self.b)
        corner = gamma + (u * self.c).sum(-1)
        matrix = torch.diag_embed(torch.cat([self.fold(u * self.a), corner[:, None]], dim=1))
        matrix[:, :-1, -1] += column
        matrix[:, -1, :-1] += column
        return matrix

    def schur(self, Y: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """The HKM Schur complement ``H = [tr(A_k Y A_l W)]`` over ``[E, A_1, ..., A_K]``, ``(B, K + 1, K + 1)``.

        For the inequality rows, with ``Ys = Y[i_k, i_l]``, ``y = Y[i_k, N]`` (``Ws``, ``w`` from ``W``)
        and ``Q_k = [[a, b], [b, c]]``, ``H_kl = tr(Q_k (T_k'Y T_l) Q_l (T_l'W T_k))``; the entries of
        the 2x2 products that depend on ``k`` or ``l`` alone collect into outer products:

            H = (a a') * Ys * Ws + Ys * (a w b' + b beta') + Ws * (b (a y)' + alpha b') + U V',

        ``alpha = a y + b Y_NN``, ``beta = a w + b W_NN``, ``U = [b w, alpha w, c, b y + c Y_NN]``,
        ``V = [b y, c, beta y, b w + c W_NN]`` (products elementwise). Row 0:
        ``H_00 = Y_NN W_NN``, ``H_0l = a y w + b (y W_NN + Y_NN w) + c Y_NN W_NN``.
        """
        repeats = self.repeats
        y_sub, w_sub = Y[:, :-1, :-1].repeat(1, repeats, repeats), W[:, :-1, :-1].repeat(1, repeats, repeats)
        y, w = self.tile(Y[:, :-1, -1]), self.tile(W[:, :-1, -1])
        y_nn, w_nn = Y[:, -1, -1, None], W[:, -1, -1, None]
        a, b, c = self.a, self.b, self.c
        alpha, beta = a * y + b * y_nn, a * w + b * w_nn

        def outer(left: list[torch.Tensor], right: list[torch.Tensor]) -> torch.Tensor:
            """``sum_j left_j right_j'`` by broadcasting (cheaper than a thin batched product here)."""
            return sum(x[:, :, None] * z[:, None, :] for x, z in zip(left, right))

        block = y_sub * (w_sub * outer([a], [a]) + outer([a * w, b], [b, beta])) + w_sub * outer([b, alpha], [a * y, b])
        block = block + outer([b * w, alpha * w, c, b * y + c * y_nn], [b * y, c, beta * y, b * w + c * w_nn])
        first = a * y * w + b * (y * w_nn + y_nn * w) + c * y_nn * w_nn
        top = torch.cat([y_nn * w_nn, first], dim=1)[:, None, :]
        block = torch.cat([first[:, :, None], (block + block.transpose(1, 2)) / 2], dim=2)
        return torch.cat([top, block], dim=1)


def _standard_form(normalised: QuadraticProblems, decoupled: torch.Tensor, use_box: bool) -> _StandardForm:
    """:class:`_StandardForm` of shifted, normalised problems."""
    matrix = normalised.P + torch.diag_embed(decoupled.to(_DTYPE))
    top = torch.cat([matrix, normalised.q[:, :, None]], dim=2)
    bottom = torch.cat([normalised.q, normalised.r[:, None]], dim=1)[:, None, :]
    ones = torch.ones_like(normalised.q)
    a, b, c, active = ones, -ones / 2, 0 * ones, ~decoupled
    if use_box:
        lower, upper = normalised.lo, normalised.hi
        a, b, c = torch.cat([a, -ones], 1), torch.cat([b, (lower + upper) / 2], 1), torch.cat([c, -lower * upper], 1)
        active = active.repeat(1, 2)
    return _StandardForm(torch.cat([top, bottom], dim=1), a, b, c, active)


def _primal_start(normalised: QuadraticProblems, use_box: bool) -> torch.Tensor:
    """A strictly feasible ``Y``: ``x = 1/2``, ``X = x x' + diag(kappa)``.

    ``X_ii - x_i = kappa_i - 1/4``; with the box ``(l + h) x_i - l h - X_ii = room_i - kappa_i``,
    ``room = (1/2 - l)(h - 1/2) > 1/4`` for ``l <= 0 < 1 <= h`` (origin clamped, ``hi - lo >= 2``).
    ``kappa = 1/4 + min(1/2, (room - 1/4)/2)``.
    """
    x = torch.full_like(normalised.q, 0.5)
    kappa = torch.full_like(x, 0.75)
    if use_box:
        room = (0.5 - normalised.lo) * (normalised.hi - 0.5)
        kappa = 0.25 + ((room - 0.25) / 2).clamp_max(0.5)
    top = torch.cat([x[:, :, None] * x[:, None, :] + torch.diag_embed(kappa), x[:, :, None]], dim=2)
    bottom = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)[:, None, :]
    return torch.cat([top, bottom], dim=1)


def _dual_start(form: _StandardForm, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``xi = [gamma, u]`` with ``gamma = g(u) - 1`` (the Schur complement of ``Z`` is 1), and where ``M(u)`` is PD."""
    xi = torch.cat([torch.zeros_like(u[:, :1]), u], dim=1)
    Z = form.C - form.adjoint(xi)
    factor, info = torch.linalg.cholesky_ex(Z[:, :-1, :-1])
    eye = torch.eye(factor.shape[-1], dtype=_DTYPE, device=u.device)
    factor = torch.where((info == 0)[:, None, None], factor, eye)
    solved = torch.linalg.solve_triangular(factor, Z[:, :-1, -1:], upper=False)[..., 0]
    xi[:, 0] = Z[:, -1, -1] - (solved**2).sum(-1) - 1.0
    return xi, info == 0


def _factor_and_inverse(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L, M^{-1}, ok)`` through the inverse of the Cholesky factor (failed ones: identity)."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    ok = info == 0
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    factor = torch.where(ok[:, None, None], factor, eye)
    factor_inverse = torch.linalg.solve_triangular(factor, eye.expand_as(factor), upper=False)
    return factor, factor_inverse.transpose(1, 2) @ factor_inverse, ok


def _ratio_step(values: torch.Tensor, direction: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """The largest ``alpha`` with ``values + alpha direction >= 0`` on ``active`` entries (``inf`` if none)."""
    shrinking = active & (direction < 0)
    return torch.where(shrinking, -values / torch.where(shrinking, direction, -1.0), math.inf).amin(-1)


def _psd_step(
    matrix: torch.Tensor, direction: torch.Tensor, start: torch.Tensor, shrink: float, tries: int
) -> torch.Tensor:
    """The largest ``alpha = start shrink^j``, ``j < tries``, with ``matrix + alpha direction`` positive definite.

    Tested by Cholesky; 0 where no such ``alpha`` was found.
    """
    alpha = start.clone()
    for _ in range(tries):
        _, info = torch.linalg.cholesky_ex(torch.addcmul(matrix, alpha[:, None, None], direction))
        failed = (info != 0) & (alpha > 0)
        if not bool(failed.any()):
            return alpha
        alpha = torch.where(failed, alpha * shrink, alpha)
    return torch.where(failed, 0.0, alpha)


@dataclass(frozen=True)
class _Direction:
    Y: torch.Tensor
    s: torch.Tensor
    xi: torch.Tensor
    Z: torch.Tensor


def _search_direction(
    form: _StandardForm,
    Y: torch.Tensor,
    W: torch.Tensor,
    s: torch.Tensor,
    u: torch.Tensor,
    schur_factor: torch.Tensor,
    scaling: torch.Tensor,
    rc_w: torch.Tensor,
    r_lp: torch.Tensor,
) -> _Direction:
    """The HKM Newton direction, keeping primal and dual feasibility.

    ``rc_w = R_c Z^{-1}`` and ``r_lp`` are the targets of the linearised complementarity
    ``dY Z + Y dZ = R_c``, ``u ds + s du = r_lp``. Then ``(H + diag(0, s/u)) dxi = [0, r_lp/u] -
    [<A_k, sym(R_c Z^{-1})>]``, ``dZ = -(dgamma E + sum du_k A_k)``, ``dY = sym(R_c Z^{-1} - Y dZ Z^{-1})``,
    ``ds = (r_lp - s du)/u``. Inactive rows keep ``du = ds = 0``.
    """
    safe_u = torch.where(form.active, u, 1.0)
    rhs = -form.apply((rc_w + rc_w.transpose(1, 2)) / 2)
    rhs[:, 1:] = torch.where(form.active, rhs[:, 1:] + r_lp / safe_u, 0.0)
    dxi = scaling * torch.cholesky_solve((scaling * rhs)[..., None], schur_factor)[..., 0]
    dZ = -form.adjoint(dxi)
    dY = rc_w - Y @ dZ @ W
    ds = torch.where(form.active, (r_lp - s * dxi[:, 1:]) / safe_u, 0.0)
    return _Direction((dY + dY.transpose(1, 2)) / 2, ds, dxi, dZ)


def _step_lengths(
    form: _StandardForm,
    Y: torch.Tensor,
    Z: torch.Tensor,
    s: torch.Tensor,
    u: torch.Tensor,
    direction: _Direction,
    shrink: float,
    tries: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Primal and dual steps ``min(1, alpha_lp) shrink^j`` that keep ``Y``, ``Z`` positive definite.

    ``alpha_lp`` is the ratio test that keeps ``s`` (primal) or ``u`` (dual) nonnegative.
    """
    primal = _psd_step(Y, direction.Y, _ratio_step(s, direction.s, form.active).clamp_max(1.0), shrink, tries)
    dual = _psd_step(Z, direction.Z, _ratio_step(u, direction.xi[:, 1:], form.active).clamp_max(1.0), shrink, tries)
    return primal, dual


def _mean_complementarity(
    form: _StandardForm, Y: torch.Tensor, Z: torch.Tensor, s: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """``(<Y, Z> + s'u) / (N + #rows)``: the duality gap of feasible iterates per complementary pair."""
    return ((Y * Z).sum((-2, -1)) + (s * u).sum(-1)) / (Y.shape[-1] + form.active.sum(-1))


def _factor_schur(
    form: _StandardForm, Y: torch.Tensor, W: torch.Tensor, s: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky factor of ``D (H + diag(0, s/u)) D`` with ``D`` the Jacobi scaling, and ``D``'s diagonal.

    Rows of inactive (decoupled) constraints become identity rows.
    """
    keep = torch.cat([torch.ones_like(form.active[:, :1]), form.active], dim=1).to(_DTYPE)
    lp_diagonal = torch.cat([torch.zeros_like(s[:, :1]), s / torch.where(form.active, u, 1.0)], dim=1)
    schur = (form.schur(Y, W) + torch.diag_embed(lp_diagonal)) * keep[:, :, None] * keep[:, None, :]
    schur = schur + torch.diag_embed(1 - keep)
    scaling = schur.diagonal(dim1=1, dim2=2).rsqrt()
    factor, _ = torch.linalg.cholesky_ex(scaling[:, :, None] * schur * scaling[:, None, :])
    return factor, scaling


def _moved(
    form: _StandardForm,
    Y: torch.Tensor,
    s: torch.Tensor,
    xi: torch.Tensor,
    direction: _Direction,
    alpha_p: torch.Tensor,
    alpha_d: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Y, s, xi, Z)`` after primal and dual steps; ``Z = C - gamma E - sum u_k A_k`` recomputed exactly."""
    Y = torch.addcmul(Y, alpha_p[:, None, None], direction.Y)
    s = torch.addcmul(s, alpha_p[:, None], direction.s)
    xi = torch.addcmul(xi, alpha_d[:, None], direction.xi)
    return Y, s, xi, form.C - form.adjoint(xi)


def _normalised_problems(problems: QuadraticProblems, origin: torch.Tensor) -> tuple[QuadraticProblems, torch.Tensor]:
    """The problems shifted to ``origin`` and divided by their scale ``tr(P)/n``; and the scale."""
    scale = _problem_scale(problems)
    shifted = shift_origin(problems, origin)
    normalised = QuadraticProblems(
        shifted.P / scale[:, None, None], shifted.q / scale[:, None], shifted.r / scale, shifted.lo, shifted.hi
    )
    return normalised, scale


def solve_dual(
    problems: QuadraticProblems,
    use_box: bool | None = None,
    max_iters: int = 50,
    tol: float = 1e-4,
) -> DualSolution:
    """Maximise the dual bound ``g`` of every problem at once: a batched primal-dual interior-point method.

    The SDP of each problem (:class:`_StandardForm`: ``Y = [[X, x], [x', 1]]`` of order
    ``N = n + 1``, ``n`` or ``2n`` inequality rows) is solved by feasible primal-dual
    path-following with the HKM direction (Helmberg, Rendl, Vanderbei & Wolkowicz 1996) and
    Mehrotra's predictor-corrector. Per iteration: ``Z^{-1}`` from a Cholesky factorisation; the
    Schur complement ``H_kl = tr(A_k Y A_l Z^{-1}) + diag(0, s/u)`` of order ``n + 1`` (``2n + 1``),
    factorised once (after a Jacobi scaling) and solved for the predictor (target ``YZ = 0``) and
    the corrector (target ``sigma mu I``, ``sigma = (mu_aff / mu)^3``, plus the second-order term);
    steps that keep ``s, u > 0`` and ``Y, Z`` positive definite (Cholesky, backtracking by 0.8),
    times 0.95. Both starts are strictly feasible (:func:`_primal_start`; ``u`` from
    :func:`interior_multipliers`, ``gamma = g(u) - 1``) and ``Z`` is recomputed as
    ``C - gamma E - sum u_k A_k``, so every iterate is feasible: ``<C, Y>`` bounds the SDP optimum
    from above and ``g(u)`` from below. A problem stops when ``<C, Y> - g(u) <= tol |g(u)|`` (plus
    ``1e-12`` of its scale ``tr(P)/n``). Problems are shifted (:func:`default_origin`), divided by
    ``tr(P)/n`` and run in lockstep, finished ones frozen. The reported bound is
    :func:`dual_bound` of the final multipliers, i.e. certified whatever the solver's accuracy.

    Args:
        use_box: add the box multipliers ``mu`` (default: when the problems have a box; the solver
            needs ``hi - lo >= 2``).
        max_iters: iterations at most.
        tol: relative gap to the SDP optimum at which a problem stops.

    Returns:
        A :class:`DualSolution`. Problems without a strictly feasible dual point (``P`` singular and
        no box) get ``-inf`` and status ``"infeasible"``.
    """
    use_box = problems.has_box if use_box is None else use_box
    if use_box:
        _require_box(problems)
        if bool((problems.hi - problems.lo < 2).any()):
            raise ValueError("the solver needs boxes with hi - lo >= 2")
    batch = problems.batch_size
    origin = default_origin(problems, clamp_to_box=use_box)
    normalised, scale = _normalised_problems(problems, origin)
    decoupled = decoupled_coordinates(normalised)
    form = _standard_form(normalised, decoupled, use_box)
    lam0, mu0 = interior_multipliers(normalised, use_box, origin=torch.zeros_like(origin))
    u0 = lam0 if mu0 is None else torch.cat([lam0, mu0], dim=1)
    xi, feasible = _dual_start(form, u0)
    feasible &= ((u0 > 0) | ~form.active).all(-1)
    if not bool(feasible.all()):
        logger.info("%d of %d problems have no strictly dual-feasible point", int((~feasible).sum()), batch)
    Y = _primal_start(normalised, use_box)
    s = form.apply(Y)[:, 1:]
    Z = form.C - form.adjoint(xi)
    done, converged, stalled = ~feasible, torch.zeros_like(feasible), torch.zeros_like(feasible)
    iterations = torch.zeros(batch, dtype=torch.long, device=Y.device)
    for _ in range(max_iters):
        factor, W, dual_ok = _factor_and_inverse(Z)
        stalled |= ~done & ~dual_ok
        done |= stalled
        g = xi[:, 0] + factor[:, -1, -1] ** 2
        converged |= ~done & ((form.C * Y).sum((-2, -1)) - g <= tol * g.abs() + 1e-12)
        done |= converged
        if bool(done.all()):
            break
        u = xi[:, 1:]
        mu_current = _mean_complementarity(form, Y, Z, s, u)
        schur_factor, scaling = _factor_schur(form, Y, W, s, u)
        predictor = _search_direction(form, Y, W, s, u, schur_factor, scaling, -Y, -s * u)
        alpha_p, alpha_d = _step_lengths(form, Y, Z, s, u, predictor, shrink=0.5, tries=3)
        Y_a, s_a, xi_a, Z_a = _moved(form, Y, s, xi, predictor, alpha_p, alpha_d)
        sigma = (_mean_complementarity(form, Y_a, Z_a, s_a, xi_a[:, 1:]) / mu_current).clamp(0.0, 1.0) ** 3
        target = sigma * mu_current
        rc_w = target[:, None, None] * W - Y - predictor.Y @ predictor.Z @ W
        r_lp = target[:, None] - s * u - predictor.s * predictor.xi[:, 1:]
        corrector = _search_direction(form, Y, W, s, u, schur_factor, scaling, rc_w, r_lp)
        alpha_p, alpha_d = _step_lengths(form, Y, Z, s, u, corrector, shrink=0.8, tries=40)
        alpha_p, alpha_d = torch.where(done, 0.0, 0.95 * alpha_p), torch.where(done, 0.0, 0.95 * alpha_d)
        Y, s, xi, Z = _moved(form, Y, s, xi, corrector, alpha_p, alpha_d)
        iterations += (~done).long()
    return _dual_solution(problems, form, origin, scale, Y, xi, feasible, converged, stalled, iterations)


def _dual_solution(
    problems: QuadraticProblems,
    form: _StandardForm,
    origin: torch.Tensor,
    scale: torch.Tensor,
    Y: torch.Tensor,
    xi: torch.Tensor,
    feasible: torch.Tensor,
    converged: torch.Tensor,
    stalled: torch.Tensor,
    iterations: torch.Tensor,
) -> DualSolution:
    """Certify the final multipliers with :func:`dual_bound` (original units) and collect the result.

    Where the optimum lies on the boundary ``det M = 0`` (e.g. a rank-deficient ``P`` whose box
    relaxation is the continuous minimum) the last iterate can be positive definite by less than the
    certification margin; those multipliers are backed off into the interior (:func:`certify_multipliers`).
    """
    n = problems.n
    u = torch.where(form.active, xi[:, 1:], 0.0) * scale[:, None]
    lam, mu = u[:, :n], (u[:, n:] if form.repeats == 2 else None)
    bound, certified = dual_bound(problems, lam, mu, origin)
    retry = feasible & ~certified
    if bool(retry.any()):
        index = retry.nonzero()[:, 0]
        selected = problems.select(index)
        backed_off = certify_multipliers(selected, lam[index], None if mu is None else mu[index], origin[index])
        bound[index], certified[index], lam[index] = backed_off[0], backed_off[1], backed_off[2]
        if mu is not None:
            mu[index] = backed_off[3]
    sdp_gap = torch.where(certified, (form.C * Y).sum((-2, -1)) * scale - bound, math.inf)
    status = tuple(
        "infeasible" if not f else "numerical" if not c else "optimal" if k else "stalled" if st else "max_iters"
        for f, c, k, st in zip(feasible.tolist(), certified.tolist(), converged.tolist(), stalled.tolist())
    )
    shifted_x = Y[:, :n, n]
    covariance = Y[:, :n, :n] - shifted_x[:, :, None] * shifted_x[:, None, :]
    return DualSolution(bound, certified, lam, mu, origin, iterations, sdp_gap, status, origin + shifted_x, covariance)


# --------------------------------------------------------------------------- cvxpy reference


@dataclass(frozen=True)
class SDPSolution:
    """The primal SDP of one problem solved by cvxpy (:func:`solve_sdp_cvxpy`).

    Attributes:
        value: the solver's optimal value (in the units of ``f``; a solver's number, not certified).
        X, x: the primal solution in the shifted coordinates ``x = z - origin`` (numpy; None if the
            solver returned none).
        status: cvxpy's status string.
        lam, mu: ``(n,)`` dual variables of ``diag(X) >= x`` (and of the box rows), in the units of ``P``.
        origin: ``(n,)`` the integer origin used.
    """

    value: float
    X: np.ndarray | None
    x: np.ndarray | None
    status: str
    lam: np.ndarray | None
    mu: np.ndarray | None
    origin: np.ndarray


_TIGHT_OPTIONS = {
    "CLARABEL": {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10, "max_iter": 500},
    "SCS": {"eps_abs": 1e-9, "eps_rel": 1e-9, "max_iters": 200_000},
}


def solve_sdp_cvxpy(
    problems: QuadraticProblems,
    index: int = 0,
    solver: str = "CLARABEL",
    box: bool = False,
    origin: torch.Tensor | None = None,
    **solver_options: object,
) -> SDPSolution:
    """The paper's SDP relaxation of problem ``index``, solved by cvxpy (the reference).

    In ``x = z - c`` (origin ``c``, by default :func:`default_origin`, clamped with the box):

        minimise tr(P X) + 2 q~'x + r~
        s.t.     diag(X) >= x,  [[X, x], [x', 1]] PSD
                 (box: diag(X) <= (l + h) * x - l * h).

    The data are divided by ``tr(P)/n`` for the solver's conditioning (the value and the duals are
    scaled back). Tight tolerances by default (Clarabel: gaps and feasibility ``1e-10``; SCS:
    ``1e-9``), overridden by ``solver_options``.
    """
    import cvxpy as cp

    single = problems.select(index)
    if box:
        _require_box(single)
    origin = default_origin(single, clamp_to_box=box) if origin is None else origin.reshape(1, -1).to(single.P)
    shifted = shift_origin(single, origin)
    scale = float(_problem_scale(single)[0])
    matrix = (shifted.P[0] / scale).cpu().numpy()
    matrix = (matrix + matrix.T) / 2
    linear, constant = (shifted.q[0] / scale).cpu().numpy(), float(shifted.r[0]) / scale
    n = single.n
    lifted = cp.Variable((n + 1, n + 1), PSD=True)
    X, x = lifted[:n, :n], lifted[:n, n]
    integrality = cp.diag(X) >= x
    constraints = [lifted[n, n] == 1, integrality]
    box_rows = None
    if box:
        lower, upper = shifted.lo[0].cpu().numpy(), shifted.hi[0].cpu().numpy()
        box_rows = cp.diag(X) <= cp.multiply(lower + upper, x) - lower * upper
        constraints.append(box_rows)
    objective = cp.Minimize(cp.sum(cp.multiply(matrix, X)) + 2 * linear @ x + constant)
    program = cp.Problem(objective, constraints)
    options = {**_TIGHT_OPTIONS.get(solver.upper(), {}), **solver_options}
    program.solve(solver=solver.upper(), **options)
    if program.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        logger.warning("cvxpy/%s: status %s for problem %d", solver, program.status, index)
    X_value = None if X.value is None else np.asarray(X.value)
    x_value = None if x.value is None else np.asarray(x.value)

    def dual(constraint: cp.Constraint | None) -> np.ndarray | None:
        if constraint is None or constraint.dual_value is None:
            return None
        return np.asarray(constraint.dual_value, dtype=np.float64).reshape(n) * scale

    value = math.nan if program.value is None else float(program.value) * scale
    origin_value = origin[0].cpu().numpy()
    return SDPSolution(value, X_value, x_value, program.status, dual(integrality), dual(box_rows), origin_value)


def certify_sdp_solution(problems: QuadraticProblems, index: int, solution: SDPSolution) -> tuple[float, bool]:
    """A certified bound from a cvxpy solution's duals (:func:`certify_multipliers`): ``(bound, certified)``."""
    single = problems.select(index)
    if solution.lam is None:
        return -math.inf, False

    def batch_of_one(values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values, dtype=_DTYPE, device=single.P.device)[None]

    mu = None if solution.mu is None else batch_of_one(solution.mu)
    bound, certified, _, _ = certify_multipliers(single, batch_of_one(solution.lam), mu, batch_of_one(solution.origin))
    return float(bound[0]), bool(certified[0])
