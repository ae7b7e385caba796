"""Certified lower bounds for sparse least squares: the perspective relaxation and its dual.

Problem (one output channel, see :mod:`pruning.least_squares`): with ``b = G w``, ``r = w'Gw``,

    min_x  e(x) = x'Gx - 2b'x + r   subject to at most k nonzeros in x.

In branch and bound a node also fixes a set ``F`` of inputs *in* (free, not counted) and a set
``O`` *out* (``x_O = 0``); the other inputs ``U`` share the budget ``k' = k - |F|``; the root has
``F = O = {}``. Everything below is for such a node; ``T = F u U``.

**Diagonal split.** For ``d >= 0`` with ``G - D`` positive semidefinite (``D = diag(d)``),
``x'Gx = x'(G - D)x + sum_i d_i x_i^2``. With indicators ``z_i`` (``x_i = 0`` unless ``z_i = 1``)
the term ``d_i x_i^2`` equals its perspective ``d_i x_i^2 / z_i``; relaxing ``z`` to
``0 <= z <= 1, sum_U z <= k'`` (``z_F = 1``) gives the perspective (Boolean) relaxation

    R = min_{x, z}  x'(G - D)x - 2b'x + r + sum_F d_i x_i^2 + sum_U d_i x_i^2 / z_i  <=  optimum.

**Dual bound (closed form by sorting).** Writing ``d x^2 / z = max_a (2 a x - a^2 z / d)`` and
minimising over ``x`` and ``z`` for multipliers ``a = b - (G - D) v`` gives, for *any* ``v`` (zero
outside ``T``), with ``s = b - (G - D) v`` and ``q_i = s_i^2 / d_i``:

    phi(v) = r - v'(G - D)v - sum_{i in F} q_i - (sum of the k' largest q_i, i in U)  <=  R.

(The minimum over ``x`` of ``x'(G - D)x - 2 (G - D)v' x`` is ``-v'(G - D)v`` because ``G - D`` is
PSD, and the minimum over the capped simplex of ``-sum z_i q_i`` takes the ``k'`` largest.)
``phi`` is concave; its maximum over ``v`` is ``R`` (at ``v = x*`` of the relaxation). At the
root, ``v = 0`` gives ``r - (sum of the k largest b_i^2 / d_i)`` and ``v = w`` the sum of the
``n - k`` smallest ``d_i w_i^2``. Inputs with ``d_i = 0`` (only when ``G`` is singular) have no
perspective term: the relaxation leaves them free of the budget, their ``q_i`` is taken as 0 and
stationarity ``s_i = 0`` is assumed (it holds up to rounding at the relaxation optimum, and the
margin below adds ``2 |s_i| |v_i|`` for it: a floating-point-level heuristic, not a proof, used
only for singular ``G``); with ``d = 0`` the bound is the least-squares error of ``T``, the
monotone bound of leaps and bounds.

**Certification.** :func:`diagonal_split` returns ``d`` only after a Cholesky factorisation of
``G - D - delta I`` has succeeded with ``delta = 4 (n + 2) eps tr(G)``: by the backward error of
Cholesky (Demmel), the computed factor is exact for a perturbation of norm below ``delta``, so
``G - D`` is PSD exactly; every principal submatrix ``G_TT - D_T`` (a node that removed inputs)
is then PSD too, so one check serves the whole tree. :func:`dual_value_margin` bounds the
floating-point error of evaluating ``phi`` (of ``r``, ``b``, ``s``, the products and the sums)
from the magnitudes of the terms; the certified bound is ``phi(v) - margin``, valid whatever
``v`` is, so it does not depend on how accurately the relaxation was solved.

**Choice of d.** ``maximise sum_i d_i  s.t.  G - D PSD, d >= 0`` (a semidefinite program in
``d``; solved by a log-det barrier Newton method, :func:`diagonal_split`), then scaled by 0.999 so
that ``G - D`` keeps a margin (the relaxation is concave and nondecreasing in ``d``: at most 0.1 %
of the bound is lost, and the Newton systems below stay well conditioned). It depends on ``G``
only, so all output channels of a layer chunk share it. (Maximising the root relaxation over
``d`` per channel gives a stronger root bound but not fewer branch-and-bound nodes on the real
layer.)

**Solving the relaxation** (:func:`solve_relaxation`, batched over nodes in torch). Eliminating
``z``: ``R = min_x f(x)`` with ``f(x) = x'(G - D_U)x - 2b'x + r + Omega(u)``, ``u_i = sqrt(d_i)|x_i|``
(``i in U``) and ``Omega`` the squared ``k'``-support norm: with ``u`` sorted decreasingly and the
smallest ``m`` in ``[0, k')`` with ``u_(m+1) <= tau = (sum_{j > m} u_(j)) / (k' - m)``,
``Omega(u) = sum_{j <= m} u_(j)^2 + (k' - m) tau^2`` (and ``z_i = min(1, u_i / tau)``). ``f`` is
convex, piecewise quadratic and differentiable except where an ``x_i`` (``i in U``) is zero. A
semismooth Newton method: at ``x``, the top ``m`` inputs (``P``, ``z = 1``) and the other nonzero
ones (``Q``, fractional, signs ``sigma``; a zero input joins ``Q`` when ``|s_i| > sqrt(d_i) tau``)
define a quadratic piece whose minimiser solves the linear system

    (G x)_i = b_i  (i in F u P),    ((G - D) x)_i + sigma_i sqrt(d_i) tau = b_i  (i in Q),
    sum_Q sigma_i sqrt(d_i) x_i = (k' - |P|) tau,    x_i = 0 otherwise;

the step to it is damped: the best of the step lengths ``1, 1/2, ..., 2^-15`` and the first four
breakpoints where an input of ``U`` reaches zero (inputs of ``U`` whose sign would flip are set to
zero), taken if ``f`` decreases. ``phi`` is evaluated at every iterate and at every piece minimiser; the
iteration stops when ``phi`` reaches a requested level (the node can be pruned), when
``f(x) - phi <= 1e-9 |f(x)|`` (solved), when ``f`` stops decreasing, or after ``max_iterations``.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from pruning.least_squares import as_problems, masked_solve

__all__ = [
    "NodeBatch",
    "diagonal_split",
    "dual_value",
    "dual_value_margin",
    "initial_point",
    "lower_bound",
    "problem_splits",
    "relaxed_indicators",
    "solve_relaxation",
    "verify_split",
]

logger = logging.getLogger(__name__)

_EPS = torch.finfo(torch.float64).eps
_SOLVED_RTOL = 1e-9
# d is scaled by this after the barrier method: G - D then keeps a margin, so the quadratic pieces of
# the relaxation stay well conditioned (the bound loses at most 0.1 %, the relaxation is concave in d)
_INSIDE = 0.999
_LINE_SEARCH_STEPS = 16  # step lengths 1, 1/2, ..., 2^-15
_BREAKPOINTS = 4  # and the first breakpoints along the Newton direction


# --------------------------------------------------------------------------- the diagonal split


def verify_split(gram, d) -> bool:
    """True when ``G - diag(d)`` is certified PSD: Cholesky of ``G - D - delta I`` succeeds (module doc).

    ``gram`` ``(n, n)`` and ``d`` ``(n,)``, numpy or torch (float64). ``d = 0`` is always valid (``G``
    itself is PSD by assumption). Inputs with ``G_ii = d_i = 0`` must have a zero row in ``G`` and
    are left out of the factorisation.
    """
    G = torch.as_tensor(gram, dtype=torch.float64)
    d = torch.as_tensor(d, dtype=torch.float64)
    if (d < 0).any():
        return False
    if not (d > 0).any():
        return True
    dead = (torch.diagonal(G) == 0) & (d == 0)
    if (G[dead] != 0).any():
        return False
    live = ~dead
    n = int(live.sum())
    block = G[live][:, live] - torch.diag(d[live]) - _split_margin(G) * torch.eye(n, dtype=torch.float64)
    return int(torch.linalg.cholesky_ex(block).info) == 0


def _split_margin(G: torch.Tensor) -> float:
    """``delta = 4 (n + 2) eps tr(G)``: a bound on the backward error of Cholesky (module doc)."""
    return 4.0 * (G.shape[0] + 2) * _EPS * max(float(torch.trace(G)), 0.0)


def _barrier_objective(gram: torch.Tensor, d: torch.Tensor, mu: float) -> float:
    """``sum d + mu (log det(G - D) + sum log d)``; ``-inf`` outside ``{G - D > 0, d > 0}``."""
    if (d <= 0).any():
        return -math.inf
    factor, info = torch.linalg.cholesky_ex(gram - torch.diag(d))
    if int(info) != 0:
        return -math.inf
    logdet = 2.0 * float(torch.log(torch.diagonal(factor)).sum())
    return float(d.sum()) + mu * (logdet + float(torch.log(d).sum()))


def _max_diagonal_one(gram: torch.Tensor, tol: float, max_newton: int) -> torch.Tensor:
    """``argmax sum d s.t. G - D PSD, d >= 0`` for one positive definite ``G`` (float64 tensor).

    Barrier method: from ``d = lambda_min(S G S) diag(G) / 2`` (``S = diag(G)^(-1/2)``) and
    ``mu = tr(G) / 2n``, maximise ``sum d + mu (log det(G - D) + sum log d_i)`` by damped Newton
    steps (backtracking from the full step, keeping ``G - D`` positive definite and ``d > 0``)
    until centred, then divide ``mu`` by 5; stop when the barrier's duality gap ``2 n mu`` is
    below ``tol * sum d``.
    """
    n = gram.shape[0]
    scale = torch.diagonal(gram).rsqrt()
    # start at half the smallest eigenvalue of the Jacobi-scaled G, scaled back: well inside, balanced
    lam_min = float(torch.linalg.eigvalsh(gram * scale[:, None] * scale[None, :])[0])
    d = 0.5 * lam_min * torch.diagonal(gram).clone()
    mu = float(torch.trace(gram)) / (2 * n)  # large: sum d <= tr G, so the first centring is short
    for _ in range(max_newton):
        inverse = torch.linalg.inv(gram - torch.diag(d))
        gradient = 1.0 - mu * torch.diagonal(inverse) + mu / d
        hessian = mu * (inverse * inverse + torch.diag(1.0 / d**2))  # minus the Hessian (positive definite)
        step = torch.linalg.solve(hessian, gradient)
        decrement = float(gradient @ step)
        if decrement <= 1e-3 * mu:  # centred: Newton decrement^2 (in units of mu) below 1e-3
            if 2 * n * mu <= tol * float(d.sum()):
                break
            mu *= 0.2
            continue
        current, t = _barrier_objective(gram, d, mu), 1.0
        while t > 1e-12:
            candidate = d + t * step
            if _barrier_objective(gram, candidate, mu) >= current + 0.25 * t * decrement:
                break
            t *= 0.5
        else:
            break
        d = candidate
    return d


def diagonal_split(gram, tol: float = 1e-4, max_newton: int = 500) -> torch.Tensor:
    """A certified diagonal ``d >= 0`` with ``G - diag(d)`` PSD, close to ``argmax sum d`` (module doc).

    Args:
        gram: ``(n, n)`` (returns ``(n,)``) or ``(B, n, n)`` (returns ``(B, n)``), on the CPU.
        tol: relative duality gap ``2 n mu / sum d`` of the barrier method at which it stops.
        max_newton: Newton steps at most.

    The barrier method's ``d`` is scaled by 0.999 (smaller factors if needed until
    :func:`verify_split` passes), which keeps the relaxation's quadratic pieces well conditioned.
    Inputs with ``G_ii = 0`` get ``d_i = 0``; when the other inputs' Gram matrix is not certified
    positive definite (singular ``G``: duplicate or dependent inputs), ``d = 0`` (the bounds then
    reduce to least-squares bounds). The returned ``d`` always passes :func:`verify_split`.
    """
    G = torch.as_tensor(gram).to(device="cpu", dtype=torch.float64)
    single = G.dim() == 2
    batch = G[None] if single else G
    if batch.dim() != 3 or batch.shape[1] != batch.shape[2]:
        raise ValueError(f"gram must have shape (n, n) or (batch, n, n), got {tuple(G.shape)}")
    out = torch.zeros(batch.shape[:2], dtype=torch.float64)
    for index, matrix in enumerate(batch):
        matrix = 0.5 * (matrix + matrix.T)
        live = torch.diagonal(matrix) > 0
        if not live.any():
            continue
        sub = matrix[live][:, live]
        if int(torch.linalg.cholesky_ex(sub - _split_margin(sub) * torch.eye(sub.shape[0], dtype=torch.float64)).info):
            logger.info("diagonal_split: Gram matrix not certified positive definite; using d = 0")
            continue
        d = _max_diagonal_one(sub, tol, max_newton)
        for shrink in (_INSIDE, 0.99, 0.9, 0.5, 0.0):
            candidate = torch.zeros(matrix.shape[0], dtype=torch.float64)
            candidate[live] = d * shrink
            if verify_split(matrix, candidate):
                out[index] = candidate
                break
    return out[0] if single else out


# --------------------------------------------------------------------------- nodes and the dual bound


class NodeBatch:
    """A batch of branch-and-bound nodes (possibly of different problems), all with ``n`` inputs.

    Attributes (torch float64 / bool / long, on one device):
        G ``(B, n, n)``, b ``(B, n)`` = ``G w``, r ``(B,)`` = ``w'Gw``, d ``(B, n)`` the split,
        forced_in ``(B, n)`` (``F``), free ``(B, n)`` (``U``), budget ``(B,)`` (``k'``),
        abs_gram ``(B, n, n)`` = ``|G|``, abs_gw ``(B, n)`` = ``|G||w|``, abs_r ``(B,)`` =
        ``|w|'|G||w|`` (for the rounding margin).
    """

    def __init__(self, G, b, r, d, forced_in, free, budget, abs_gram, abs_gw, abs_r) -> None:
        self.G, self.b, self.r, self.d = G, b, r, d
        self.forced_in, self.free, self.budget = forced_in, free, budget
        self.abs_gram, self.abs_gw, self.abs_r = abs_gram, abs_gw, abs_r
        self.positive = d > 0
        # Inputs without a perspective term (d_i = 0) are relaxed to free inputs outside the budget.
        self.unconstrained = forced_in | (free & ~self.positive)
        self.choice = free & self.positive
        self.allowed = forced_in | free
        self.sqrt_d = torch.sqrt(d)
        self.inv_d = torch.where(self.positive, 1.0 / torch.where(self.positive, d, torch.ones_like(d)), 0.0)

    @classmethod
    def from_problems(cls, G, W, d, forced_in, free, budget) -> NodeBatch:
        """Build from ``G`` ``(B, n, n)``, weights ``(B, n)``, ``d`` ``(B, n)`` and the node sets."""
        b = torch.einsum("bij,bj->bi", G, W)
        abs_gram = G.abs()
        abs_gw = torch.einsum("bij,bj->bi", abs_gram, W.abs())
        return cls(G, b, torch.einsum("bi,bi->b", W, b), d, forced_in, free, budget, abs_gram, abs_gw,
                   torch.einsum("bi,bi->b", W.abs(), abs_gw))

    def select(self, index: torch.Tensor) -> NodeBatch:
        """The nodes ``index`` (a long tensor; ``index_select`` is several times faster than indexing on the CPU)."""
        return NodeBatch(*(getattr(self, name).index_select(0, index) for name in (
            "G", "b", "r", "d", "forced_in", "free", "budget", "abs_gram", "abs_gw", "abs_r")))

    @property
    def size(self) -> int:
        return self.b.shape[0]


def _sorted_rows(values: torch.Tensor) -> np.ndarray:
    """Every row of ``values`` (CPU) in ascending order: numpy sorts short rows several times faster than torch,
    and sorted values are exact, whatever the algorithm."""
    return np.sort(values.numpy(), axis=-1)


def top_sum(values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Sum of the ``count`` largest entries (all >= 0) of every row of ``values`` ``(R, n)``."""
    ordered = torch.from_numpy(_sorted_rows(values)[:, ::-1].copy())
    prefix = torch.cat([torch.zeros_like(ordered[:, :1]), ordered.cumsum(-1)], dim=-1)
    return prefix.gather(1, count.clamp(0, values.shape[-1])[:, None])[:, 0]


def _points(nodes: NodeBatch, v: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``v`` as ``(B, m, n)``, zero outside ``T``; and whether it was ``(B, n)``."""
    single = v.dim() == 2
    V = v[:, None, :] if single else v
    return torch.where(nodes.allowed[:, None, :], V, torch.zeros((), dtype=v.dtype)), single


def dual_value(nodes: NodeBatch, v: torch.Tensor) -> torch.Tensor:
    """``phi(v)`` of the module doc as computed in float64, for ``v`` ``(B, n)`` -> ``(B,)``, or for
    several points per node, ``(B, m, n)`` -> ``(B, m)``.

    Not certified: the computed value may exceed the true ``phi(v)`` by rounding; the certified bound
    is ``dual_value(nodes, v) - dual_value_margin(nodes, v)`` (:func:`dual_value_margin`).
    """
    V, single = _points(nodes, v)
    B, m, n = V.shape
    Mv = torch.bmm(V, nodes.G) - nodes.d[:, None, :] * V  # G symmetric
    s = nodes.b[:, None, :] - Mv
    q = s * s * nodes.inv_d[:, None, :]
    fixed = (q * nodes.unconstrained[:, None, :]).sum(-1)
    chosen = torch.where(nodes.choice[:, None, :], q, torch.zeros((), dtype=q.dtype))
    top = top_sum(chosen.reshape(B * m, n), nodes.budget.repeat_interleave(m)).reshape(B, m)
    value = nodes.r[:, None] - (V * Mv).sum(-1) - fixed - top
    return value[:, 0] if single else value


def dual_value_margin(nodes: NodeBatch, v: torch.Tensor) -> torch.Tensor:
    """A bound on the floating-point error of :func:`dual_value` at ``v`` (module doc), ``(B,)``.

    With ``gamma = (n + 2) eps``: ``r`` is off by at most ``gamma |w|'|G||w|``, ``v'(G - D)v`` by
    ``gamma |v|'(|G| + D)|v|``, each ``s_i`` by ``e_i = gamma ((|G||w|)_i + ((|G| + D)|v|)_i)`` and
    so ``q_i`` by ``(2 |s_i| e_i + e_i^2) / d_i + 2 eps q_i``; the sums add ``gamma`` times the sum
    of the absolute terms. For inputs with ``d_i = 0`` the stationarity residual adds
    ``2 |s_i| |v_i|``. The total is doubled.
    """
    n = v.shape[-1]
    gamma = (n + 2) * _EPS
    v = torch.where(nodes.allowed, v, torch.zeros((), dtype=v.dtype))
    av = v.abs()
    abs_mv = torch.bmm(nodes.abs_gram, av[..., None])[..., 0] + nodes.d * av
    s = (nodes.b - torch.bmm(nodes.G, v[..., None])[..., 0] + nodes.d * v).abs()
    err_s = gamma * (nodes.abs_gw + abs_mv)
    inside = nodes.allowed & nodes.positive
    q = torch.where(inside, s * s * nodes.inv_d, 0.0)
    err_q = torch.where(inside, (2.0 * s * err_s + err_s * err_s) * nodes.inv_d, 0.0) + 2.0 * _EPS * q
    residual = torch.where(nodes.allowed & ~nodes.positive, 2.0 * s * av, 0.0)
    quadratic = (av * abs_mv).sum(-1)
    total = (gamma * nodes.abs_r + gamma * quadratic + err_q.sum(-1) + residual.sum(-1)
             + gamma * (nodes.r.abs() + quadratic + q.sum(-1)))
    return 2.0 * total


# --------------------------------------------------------------------------- the relaxation


def _support_norm(u: torch.Tensor, choice: torch.Tensor, budget: torch.Tensor):
    """``(Omega(u), tau, top)``: the squared ``k'``-support norm of ``u`` over ``choice`` (module doc).

    ``top`` marks the ``m`` inputs with ``z = 1`` (ties broken by position).
    """
    n = u.shape[-1]
    u = torch.where(choice, u, torch.zeros((), dtype=u.dtype))
    # only m < k' can be the first m below, so only the first max k' columns of the descending order are needed
    ascending = _sorted_rows(u)
    width = min(max(int(budget.amax()), 1), n) if budget.numel() else 1
    ordered = torch.from_numpy(ascending[:, ::-1][:, :width].copy())
    suffix = torch.from_numpy(np.cumsum(ascending, axis=-1)[:, ::-1][:, :width].copy())  # sum_{j >= m}
    m_range = torch.arange(width)
    remaining = (budget[:, None] - m_range[None, :]).to(u.dtype)
    valid = remaining > 0
    tau_m = torch.where(valid, suffix / torch.where(valid, remaining, torch.ones_like(remaining)), 0.0)
    ok = valid & (ordered <= tau_m * (1.0 + 4.0 * _EPS))
    # the first m satisfying the condition (it exists for m = k' - 1 when k' >= 1)
    first = torch.where(ok, m_range[None, :], width).amin(-1)
    first = torch.minimum(first, (budget - 1).clamp_min(0))
    tau = tau_m.gather(1, first[:, None])[:, 0]
    # the first m of the descending order, equal values in the order of position
    threshold = ordered.gather(1, (first - 1).clamp_min(0)[:, None])
    above, tied = u > threshold, u == threshold
    top = (above | (tied & (tied.cumsum(-1) <= (first - above.sum(-1))[:, None]))) & choice
    top_sq = torch.where(top, u * u, torch.zeros((), dtype=u.dtype)).sum(-1)
    omega = top_sq + (budget - first).clamp_min(0).to(u.dtype) * tau * tau
    # budget <= 0 cannot occur for nodes that are solved; budget >= |choice| gives tau = 0 and all in top.
    return omega, tau, top


def _primal(nodes: NodeBatch, x: torch.Tensor):
    """``(f(x), tau, top)`` of the module doc for ``x`` ``(B, n)`` or ``(B, L, n)`` (zero outside ``T``)."""
    trials = x.dim() == 3
    X = x if trials else x[:, None, :]
    count = X.shape[1]
    u = nodes.sqrt_d[:, None, :] * X.abs()
    choice = nodes.choice[:, None, :].expand_as(u)
    omega, tau, top = _support_norm(u.reshape(-1, u.shape[-1]), choice.reshape(-1, u.shape[-1]),
                                    nodes.budget.repeat_interleave(count))
    quadratic = (torch.bmm(X, nodes.G) * X).sum(-1)
    linear = 2.0 * (X * nodes.b[:, None, :]).sum(-1)
    diagonal = torch.where(choice, u * u, torch.zeros((), dtype=u.dtype)).sum(-1)
    value = quadratic - linear + nodes.r[:, None] - diagonal + omega.reshape(-1, count)
    if trials:
        return value, tau.reshape(-1, count), top.reshape(X.shape)
    return value[:, 0], tau, top


def relaxed_indicators(nodes: NodeBatch, x: torch.Tensor) -> torch.Tensor:
    """``z`` of the relaxation at ``x``: 1 on ``F`` (and inputs with ``d_i = 0`` where ``x_i != 0``),
    ``min(1, sqrt(d_i)|x_i| / tau)`` on ``U``, 0 elsewhere."""
    _, tau, top = _primal(nodes, x)
    u = nodes.sqrt_d * x.abs()
    fractional = torch.where(tau[:, None] > 0, (u / torch.where(tau[:, None] > 0, tau[:, None], 1.0)).clamp(max=1.0),
                             (u > 0).to(u.dtype))
    z = torch.where(top, torch.ones_like(u), fractional)
    z = torch.where(nodes.choice, z, torch.zeros((), dtype=u.dtype))
    return torch.where(nodes.unconstrained, (x != 0).to(u.dtype) + nodes.forced_in.to(u.dtype), z).clamp(max=1.0)


def _piece_minimiser(nodes: NodeBatch, x: torch.Tensor, tau: torch.Tensor, top: torch.Tensor):
    """The minimiser of ``f``'s quadratic piece at ``x`` (the linear system of the module doc) and the signs."""
    B, n = x.shape
    dtype = x.dtype
    zero = torch.zeros((), dtype=dtype)
    s = nodes.b - torch.bmm(nodes.G, x[..., None])[..., 0] + nodes.d * x
    nonzero = nodes.choice & (x != 0)
    in_top = top & nonzero
    released = nodes.choice & (x == 0) & (s.abs() > nodes.sqrt_d * tau[:, None] * (1.0 + 1e-12))
    fractional = (nonzero & ~in_top) | released
    sign = torch.where(x != 0, torch.sign(x), torch.sign(s))
    active = nodes.unconstrained | in_top | fractional
    coupling = torch.where(fractional, sign * nodes.sqrt_d, zero)
    has_q = fractional.any(-1)
    slots = (nodes.budget - in_top.sum(-1)).to(dtype)

    K = torch.zeros(B, n + 1, n + 1, dtype=dtype)
    K[:, :n, :n] = torch.where(active[:, :, None] & active[:, None, :], nodes.G, zero)
    scale = torch.diagonal(nodes.G, dim1=-2, dim2=-1).amax(-1).clamp_min(torch.finfo(dtype).tiny)
    diagonal = torch.diagonal(K, dim1=-2, dim2=-1)[:, :n]  # a view: the diagonal terms in place
    diagonal -= torch.where(fractional, nodes.d, zero)
    diagonal += torch.where(active, zero, scale[:, None].expand(-1, n))
    K[:, :n, n] = coupling
    K[:, n, :n] = coupling
    K[:, n, n] = torch.where(has_q, -slots, scale)
    rhs = torch.zeros(B, n + 1, dtype=dtype)
    rhs[:, :n] = torch.where(active, nodes.b, zero)
    solution, info = torch.linalg.solve_ex(K, rhs)
    bad = (info != 0) | ~torch.isfinite(solution).all(-1)
    if bad.any():
        idx = torch.nonzero(bad).flatten()
        solution[idx] = torch.linalg.lstsq(K[idx], rhs[idx][..., None], driver="gelsd").solution[..., 0]
    return torch.where(active, solution[:, :n], zero), sign, fractional | in_top


def initial_point(nodes: NodeBatch) -> torch.Tensor:
    """A ridge start: the minimiser over ``x`` of the relaxation with ``z_i = min(1, k' / |U|)`` on ``U``."""
    count = nodes.choice.sum(-1).clamp_min(1).to(nodes.d.dtype)
    z = (nodes.budget.to(nodes.d.dtype) / count).clamp(max=1.0)
    penalty = torch.where(nodes.choice, nodes.d * (1.0 / z.clamp_min(1e-12) - 1.0)[:, None], 0.0)
    return masked_solve(nodes.G + torch.diag_embed(penalty), nodes.b, nodes.allowed)


def solve_relaxation(
    nodes: NodeBatch,
    x0: torch.Tensor,
    level: torch.Tensor | None = None,
    max_iterations: int = 30,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Semismooth Newton on the perspective relaxation of every node (module doc).

    Args:
        nodes: the batch.
        x0: ``(B, n)`` starting points (entries outside ``T`` are ignored).
        level: ``(B,)``; a node stops as soon as its certified bound reaches it (``None``: never).
        max_iterations: Newton iterations at most per node.

    Returns:
        ``(bound, x, primal, iterations)``: the certified lower bounds ``max phi - margin`` (at the
        best dual point seen), the final iterates, ``f`` there (an upper bound on ``R``), and the
        iterations used.
    """
    B, n = x0.shape
    zero = torch.zeros((), dtype=x0.dtype)
    x = torch.where(nodes.allowed, x0, zero)
    primal, tau, top = _primal(nodes, x)
    best_value = torch.full((B,), -math.inf, dtype=x.dtype)
    best_v = x.clone()
    iterations = torch.zeros(B, dtype=torch.long)
    target = torch.full((B,), math.inf, dtype=x.dtype) if level is None else level
    running = torch.ones(B, dtype=torch.bool)
    steps = 0.5 ** torch.arange(_LINE_SEARCH_STEPS, dtype=x.dtype)
    idx, sub = torch.arange(B), nodes
    for _ in range(max_iterations):
        current = torch.nonzero(running).flatten()
        if current.numel() == 0:
            break
        if current.numel() != idx.numel():
            sub = sub.select(torch.searchsorted(idx, current))
            idx = current
        xi, primal_i = x.index_select(0, idx), primal.index_select(0, idx)
        iterations[idx] += 1
        newton, sign, signed = _piece_minimiser(sub, xi, tau.index_select(0, idx), top.index_select(0, idx))
        points = torch.stack([xi, newton], dim=1)
        values, which = dual_value(sub, points).max(-1)
        better = values > best_value.index_select(0, idx)
        best_value[idx[better]] = values[better]
        best_v[idx[better]] = points[better, which[better]]
        best_i, target_i = best_value.index_select(0, idx), target.index_select(0, idx)
        done = primal_i - best_i <= _SOLVED_RTOL * primal_i.abs()
        reached = best_i >= target_i
        if reached.any():  # the rounding margin only where it decides pruning
            rows = torch.nonzero(reached).flatten()
            margin = dual_value_margin(sub.select(rows), best_v.index_select(0, idx.index_select(0, rows)))
            done[rows[best_i.index_select(0, rows) - margin >= target_i.index_select(0, rows)]] = True
        # damped step: the best of the steps 2^-l and the first breakpoints where an input of U
        # reaches zero; inputs of U whose sign would flip are set to zero
        direction = newton - xi
        crossing = sub.choice & signed & (sign * direction < 0)
        breakpoints = torch.where(crossing, -xi / torch.where(crossing, direction, torch.ones_like(direction)), 2.0)
        breakpoints = torch.topk(breakpoints, min(_BREAKPOINTS, n), dim=1, largest=False).values
        lengths = torch.cat([steps[None, :].expand(idx.numel(), -1), breakpoints], dim=1)
        lengths = torch.where(lengths <= 1.0, lengths, 0.0)
        trial = xi[:, None, :] + lengths[:, :, None] * direction[:, None, :]
        flips = sub.choice[:, None, :] & signed[:, None, :] & (sign[:, None, :] * trial <= 0)
        trial = torch.where(flips, zero, trial)
        trial_values, taus, tops = _primal(sub, trial)
        best_trial, choice = trial_values.min(-1)
        accepted = (best_trial < primal_i - 1e-15 * primal_i.abs()) & ~done
        rows = torch.nonzero(accepted).flatten()
        picked = rows * trial_values.shape[1] + choice.index_select(0, rows)  # in the flattened (node, trial) order
        moved = idx.index_select(0, rows)
        x.index_copy_(0, moved, trial.reshape(-1, n).index_select(0, picked))
        primal.index_copy_(0, moved, best_trial.index_select(0, rows))
        tau.index_copy_(0, moved, taus.reshape(-1).index_select(0, picked))
        top.index_copy_(0, moved, tops.reshape(-1, n).index_select(0, picked))
        running[idx[~accepted]] = False
    final = dual_value(nodes, x)  # the last iterate was not evaluated yet
    better = final > best_value
    best_value = torch.where(better, final, best_value)
    best_v = torch.where(better[:, None], x, best_v)
    margin = dual_value_margin(nodes, best_v)
    return best_value - margin, x, primal, iterations


def lower_bound(gram, weights, k: int, d=None, max_iterations: int = 200, threads: int | None = 1) -> torch.Tensor:
    """Certified lower bounds on ``min e(x)`` s.t. ``||x||_0 <= k``, one per problem (the root relaxation).

    For chunks too large to solve exactly. ``d`` defaults to :func:`diagonal_split` of each
    distinct ``G`` (:func:`problem_splits`; a given ``(n,)`` or ``(B, n)`` one is checked).
    ``threads``: torch CPU threads during the computation (restored afterwards; ``None`` keeps
    torch's setting). Returns float64 ``(B,)`` (a scalar tensor for one problem), at least 0.
    """
    G, W, batched = as_problems(gram, weights)
    G, W = G.cpu(), W.cpu()
    B, n = W.shape
    if isinstance(k, bool) or int(k) != k or not 0 <= int(k) <= n:
        raise ValueError(f"the number of kept weights k must be an integer in [0, {n}], got {k!r}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        shared = _shared(G)
        G = 0.5 * (G + G.transpose(1, 2))
        if int(k) == 0 or int(k) == n:  # x = 0 (error r) or x = w (error 0)
            bound = torch.einsum("bi,bij,bj->b", W, G, W) if int(k) == 0 else torch.zeros(B, dtype=torch.float64)
            return bound if batched else bound[0]
        d = problem_splits(G[:1].expand(B, n, n) if shared else G, d)
        nodes = NodeBatch.from_problems(G, W, d, torch.zeros(B, n, dtype=torch.bool),
                                        torch.ones(B, n, dtype=torch.bool), torch.full((B,), int(k), dtype=torch.long))
        bound, _, _, _ = solve_relaxation(nodes, initial_point(nodes), max_iterations=max_iterations)
    finally:
        torch.set_num_threads(previous_threads)
    bound = bound.clamp_min(0.0)
    return bound if batched else bound[0]


def problem_splits(G: torch.Tensor, d=None) -> torch.Tensor:
    """The diagonal split of every problem of ``G`` ``(B, n, n)`` (symmetric), ``(B, n)``.

    A given ``d`` (``(n,)`` or ``(B, n)``) is checked with :func:`verify_split` (ValueError if it
    fails); otherwise :func:`diagonal_split` is computed once per distinct matrix (a shared,
    expanded ``G`` or the repeated Gram matrix of the channels of one group).
    """
    B, n, _ = G.shape
    if d is not None:
        d = torch.as_tensor(d, dtype=torch.float64).expand(B, n).contiguous()
        for matrix, row in zip(G, d):
            if not verify_split(matrix, row):
                raise ValueError("d is not a certified diagonal split: G - diag(d) is not PSD (or d < 0)")
        return d
    if _shared(G):
        return diagonal_split(G[0]).expand(B, n).contiguous()
    distinct, which = torch.unique(G.reshape(B, n * n), dim=0, return_inverse=True)
    return diagonal_split(distinct.reshape(-1, n, n))[which]


def _shared(G: torch.Tensor) -> bool:
    """True when all matrices of the batch are the same tensor view (``(n, n)`` expanded)."""
    return G.shape[0] == 1 or G.stride(0) == 0
