"""Post-training quantization bounds per layer (paper Sec. 4): certified lower bounds, rounding methods, exact optima.

For every output channel ``c`` and input chunk ``J`` (:func:`studies.layer_problems.input_chunks`)
of a layer, with the step ``s_c`` of the layer's quantizer, the integer weights ``z`` cost

    f(z) = ||A_J w_J - s_c A_J z||^2 = z'Pz + 2q'z + r,   P = s_c^2 G_JJ,  q = -s_c G_JJ w_J,  r = w_J' G_JJ w_J,

(:meth:`quantization.qp_bounds.QuadraticProblems.from_gram`) over integers ``z`` in
``[-2^(b-1), 2^(b-1) - 1]``. Per problem this module computes

* a certified lower bound ``lb`` on ``min f`` (the Park-Boyd SDP relaxation's dual, by our batched
  solver or cvxpy; never below the trivial bound 0, since ``f`` is a squared norm),
* the error of each post-training method chosen (``methods``, default all of :data:`METHODS`):
  ``rtn`` (round to nearest), ``sdp_rounding`` (the paper's: ``3n`` Gaussian samples around the
  relaxation's primal point with covariance ``X - xx'``, rounded, then 1-opt), ``gptq``
  (sequential rounding with error feedback, from ``w / s``), ``adaround`` (then 1-opt). The
  methods do not depend on each other, so a method's numbers are the same whichever others run;
  the best point (``z``, ``ub``) is the best of those chosen,
* optionally (``exact``) the true minimum by branch and bound (:mod:`quantization.qp_exact`),
  whose certified bound replaces the relaxation's where it is larger (``exact_lb``). Its limit per
  problem is a count of nodes (``node_limit``, default :data:`quantization.qp_exact.DEFAULT_NODE_LIMIT`),
  so the results do not depend on the machine's speed or load; ``time_limit`` adds an optional
  wall-clock limit (then they do). The ``seconds`` per stage are recorded beside the results and
  are the only measured quantities in them.

Results are aggregated per chunk (over channels) and per layer as the summed error relative to
the summed energy: ``SQNR = 10 log10(sum r / sum error)``. The sum of the lower bounds bounds the
summed minimum, so ``10 log10(sum r / sum lb)`` bounds from above the SQNR any method can reach on
the chunked problems (``sqnr_upper_bound_db``, from the best certified bounds;
``sqnr_relaxation_bound_db`` from the relaxation's alone, the paper's bound). Where the layer's fan-in is at most ``max_whole_dim``, the same is done for
whole channels (one problem per channel: the layer's true output error).

Channels whose output energy ``w' G w`` is 0 (dead: zero weights or inputs that never fire) are
skipped and counted; chunk problems with ``r = 0`` get ``lb = 0`` and the methods' own values.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from quantization.ptq_rounding import adaround, one_opt, randomized_rounding, sequential_rounding
from quantization.qp_bounds import (
    QuadraticProblems,
    certify_multipliers,
    continuous_minimiser,
    default_origin,
    solve_dual,
    solve_sdp_cvxpy,
)
from quantization.qp_exact import DEFAULT_NODE_LIMIT, solve_exact_batch
from quantization.quantizers import QuantScheme, params_from_range
from quantization.range_estimators import current_minmax, mse_range
from studies.bounds_files import RunFiles, best_of, check_exact_limits, problem_bar
from studies.bounds_run import BoundsStudy, RunSetup, run_study
from studies.layer_problems import DEFAULT_MAX_WHOLE_DIM, LayerData, problem_scopes
from studies.problem_sets import ProblemSet, solve_layer, solve_with_zero_energy

__all__ = [
    "METHODS",
    "SOLVERS",
    "QuantBoundsConfig",
    "QuantProblemSet",
    "layer_problem_sets",
    "layer_step_sizes",
    "plot_label",
    "quant_bounds_layer",
    "run_quant_bounds",
    "run_stem",
    "scope_problems",
    "solve_problems",
]

logger = logging.getLogger(__name__)

METHODS = ("rtn", "sdp_rounding", "gptq", "adaround")
SOLVERS = ("ours", "clarabel", "scs")
# Std per coordinate of the samples around -P^+ q where the relaxation gave no finite point
# (randomized_rounding's default spread).
FALLBACK_STD = 0.3


@dataclass(frozen=True)
class QuantBoundsConfig:
    """Options of a quantization-bounds run (the CLI's, minus I/O).

    ``node_limit`` is the exact solver's work limit per problem (None: its
    :data:`~quantization.qp_exact.DEFAULT_NODE_LIMIT`); ``time_limit`` an optional wall-clock limit
    per problem in seconds (None: none, the results do not depend on timing). ``methods``: the
    post-training methods to run, a non-empty subset of :data:`METHODS` (kept in that order).
    """

    n_bits: int = 4
    opt_dim: int = 32
    range_method: str = "mse"
    per_channel: bool = False
    box: bool = False
    solver: str = "ours"
    tol: float = 1e-4
    exact: bool = False
    node_limit: int | None = None
    time_limit: float | None = None
    max_whole_dim: int = DEFAULT_MAX_WHOLE_DIM
    num_output_channels: int = -1
    seed: int = 0
    methods: tuple[str, ...] = METHODS

    def __post_init__(self) -> None:
        unknown = [method for method in self.methods if method not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {', '.join(METHODS)}, got {self.methods!r}")
        object.__setattr__(self, "methods", tuple(method for method in METHODS if method in self.methods))
        if self.range_method not in ("mse", "minmax"):
            raise ValueError(f"range_method must be 'mse' or 'minmax', got {self.range_method!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if not 2 <= self.n_bits <= 16:
            raise ValueError(f"n_bits must be in 2..16, got {self.n_bits}")
        if self.box and self.n_bits < 2:
            raise ValueError("the box needs at least 2 bits")
        check_exact_limits(self.node_limit, self.time_limit)

    @property
    def exact_node_limit(self) -> int:
        """The branch and bound's node limit per problem: ``node_limit``, or the solver's default."""
        return DEFAULT_NODE_LIMIT if self.node_limit is None else self.node_limit


def layer_step_sizes(weights: torch.Tensor, n_bits: int, range_method: str, per_channel: bool) -> torch.Tensor:
    """``(out_channels,)`` step sizes of the layer's symmetric ``n_bits`` weight quantizer.

    The range is the MSE-optimal one (as in the weight study) or the min-max range of the whole
    layer's weights (``per_channel=False``: one step for all channels) or of each channel.
    """
    ch_axis = 0 if per_channel else None
    if range_method == "mse":
        low, high = mse_range(weights, n_bits, QuantScheme.SYMMETRIC, ch_axis)
    else:
        low, high = current_minmax(weights, ch_axis)
    step = params_from_range(low, high, n_bits, QuantScheme.SYMMETRIC).step_size.to(torch.float64)
    return step.expand(weights.shape[0]).to(weights.device)


@dataclass(kw_only=True)
class QuantProblemSet(ProblemSet):
    """A batch of quantization problems of one size; ``status`` is the relaxation's, ``exact_status`` the
    branch and bound's (tensors on the CPU)."""

    step_size: torch.Tensor  # (B,)
    problems: QuadraticProblems  # with the b-bit box
    lam: torch.Tensor  # (B, n) dual multipliers of relaxation_lb
    mu: torch.Tensor  # (B, n) box multipliers (zeros without the box)
    origin: torch.Tensor  # (B, n)
    z: torch.Tensor  # (B, n) best integer point over all methods (and the exact solver)

    @property
    def n(self) -> int:
        return self.problems.n

    @property
    def energy(self) -> torch.Tensor:
        """``(B,)`` ``r``, the energy of each problem's (partial) output."""
        return self.problems.r

    def arrays(self) -> dict[str, torch.Tensor | np.ndarray]:
        """``P, q, lo, hi, lam, mu, origin, z, r, step_size``, ``lb`` (the relaxation's), ``ub`` and, with the
        exact solver, ``exact_status`` and ``exact_lb``."""
        arrays = {
            "P": self.problems.P, "q": self.problems.q, "lo": self.problems.lo, "hi": self.problems.hi,
            "lam": self.lam, "mu": self.mu, "origin": self.origin, "z": self.z,
            "r": self.problems.r, "step_size": self.step_size, "lb": self.relaxation_lb, "ub": self.ub,
        }
        if self.exact_status:
            arrays["exact_status"] = np.array(self.exact_status, dtype=str)
            arrays["exact_lb"] = self.exact_lb
        return arrays


def _cvxpy_bounds(problems: QuadraticProblems, solver: str, box: bool) -> tuple:
    """The cvxpy reference per problem: certified bounds from its duals, its primal for the rounding."""
    import cvxpy

    batch, n = problems.batch_size, problems.n
    lb = torch.full((batch,), -math.inf, dtype=torch.float64)
    lam, mu = torch.zeros(batch, n, dtype=torch.float64), torch.zeros(batch, n, dtype=torch.float64)
    origin = default_origin(problems, clamp_to_box=box).cpu()
    centers = origin + 0.5
    covariances = torch.zeros(batch, n, n, dtype=torch.float64)
    status = []

    def as_batch(values) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float64, device=problems.P.device)[None]

    for index in range(batch):
        try:
            solution = solve_sdp_cvxpy(problems, index, solver=solver.upper(), box=box)
        except cvxpy.error.SolverError as error:
            logger.warning("cvxpy/%s failed on problem %d: %s", solver, index, error)
            status.append("solver_error")
            continue
        status.append(solution.status)
        if solution.lam is None:
            continue
        single = problems.select(index)
        bound, _, lam_c, mu_c = certify_multipliers(
            single, as_batch(solution.lam), None if solution.mu is None else as_batch(solution.mu), as_batch(solution.origin)
        )
        lb[index], lam[index] = bound.cpu()[0], lam_c.cpu()[0]
        origin[index] = torch.as_tensor(solution.origin)
        if mu_c is not None:
            mu[index] = mu_c.cpu()[0]
        if solution.x is not None and solution.X is not None:
            x = torch.as_tensor(solution.x, dtype=torch.float64)
            centers[index] = origin[index] + x
            covariances[index] = torch.as_tensor(solution.X, dtype=torch.float64) - torch.outer(x, x)
    device = problems.P.device
    return lb.to(device), lam.to(device), mu.to(device), origin.to(device), status, centers.to(device), covariances.to(device)


def _sampling_start(
    problems: QuadraticProblems, center: torch.Tensor, covariance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The relaxation's point ``x`` (clipped to the box) and covariance ``X - xx'`` to sample around.

    A problem the relaxation could not solve (status ``numerical``: NaN or infinite ``x`` or ``X``)
    samples around the box-clipped continuous minimiser ``clamp(-P^+ q, lo, hi)`` with std
    :data:`FALLBACK_STD` per coordinate instead.
    """
    usable = torch.isfinite(center).all(-1) & torch.isfinite(covariance).flatten(1).all(-1)
    if not bool(usable.all()):
        logger.debug("%d problem(s) without a finite relaxation point sample around -P^+ q", int((~usable).sum()))
        fallback = continuous_minimiser(problems.P, problems.q)
        identity = torch.eye(problems.n, dtype=covariance.dtype, device=covariance.device)
        center = torch.where(usable[:, None], center, fallback)
        covariance = torch.where(usable[:, None, None], covariance, FALLBACK_STD**2 * identity)
    return torch.clamp(center, problems.lo, problems.hi), covariance


def solve_problems(
    problems: QuadraticProblems,
    w_over_s: torch.Tensor,
    config: QuantBoundsConfig,
    generator: torch.Generator,
    progress=None,
) -> dict:
    """Lower bound, the chosen methods and (optionally) the exact optimum for a batch of boxed problems.

    ``problems`` must carry the ``n_bits`` box (the methods' feasible set); the relaxation uses it
    only with ``config.box``. Returns a dict with ``relaxation_lb, lam, mu, origin, status, errors, z, ub``,
    the exact solver's ``exact_status`` and ``exact_lb`` (when run) and ``seconds`` per stage.
    ``progress``: the caller's bar of problem sets; when it is shown, a bar of the exact solver's
    problems is shown below it.
    """
    seconds: dict[str, float] = {}
    relaxed = problems if config.box else problems.without_box()
    n = problems.n
    start = time.perf_counter()
    if config.solver == "ours":
        solution = solve_dual(relaxed, tol=config.tol)
        lb, lam, origin, status = solution.bound, solution.lam, solution.origin, list(solution.status)
        mu = solution.mu if solution.mu is not None else torch.zeros_like(lam)
        center, covariance = solution.x, solution.covariance
    else:
        lb, lam, mu, origin, status, center, covariance = _cvxpy_bounds(relaxed, config.solver, config.box)
    center, covariance = _sampling_start(problems, center, covariance)
    lb = lb.clamp_min(0.0)  # f is a squared norm: 0 is always a certified bound (also for -inf)
    seconds["bound"] = time.perf_counter() - start

    lo, hi, P, q, r = problems.lo, problems.hi, problems.P, problems.q, problems.r
    methods: dict[str, Callable[[], torch.Tensor]] = {
        "rtn": lambda: torch.clamp(torch.round(w_over_s), lo, hi),
        "sdp_rounding": lambda: one_opt(
            P, q, r, randomized_rounding(P, q, r, lo, hi, 3 * n, generator, center=center, spread=covariance), lo, hi
        ),
        "gptq": lambda: sequential_rounding(P, q, lo, hi, start=w_over_s),
        "adaround": lambda: adaround(P, q, r, w_over_s, lo, hi),
    }
    points: dict[str, torch.Tensor] = {}
    for method in config.methods:  # only sdp_rounding draws from the generator
        start = time.perf_counter()
        points[method] = methods[method]()
        seconds[method] = time.perf_counter() - start
    errors = {method: problems.objective(z) for method, z in points.items()}
    z, ub = best_of(points, errors)
    result = {"relaxation_lb": lb, "lam": lam, "mu": mu, "origin": origin, "status": status, "errors": errors, "z": z,
              "ub": ub}
    if config.exact:
        start = time.perf_counter()
        exact = []
        with problem_bar(progress, problems.batch_size, "exact optima") as bar:
            for index in range(problems.batch_size):  # one at a time (as solve_exact_batch does), for the bar
                single = problems.select(torch.arange(index, index + 1, device=P.device))
                exact += solve_exact_batch(single, time_limit=config.time_limit, node_limit=config.exact_node_limit,
                                           z0=z[index : index + 1])
                bar.update(1)
        seconds["exact"] = time.perf_counter() - start
        exact_z = torch.as_tensor(np.stack([e.x for e in exact]), dtype=torch.float64, device=P.device)
        exact_value = problems.objective(exact_z)
        errors["exact"] = exact_value
        result["z"], result["ub"] = best_of({"methods": z, "exact": exact_z}, {"methods": ub, "exact": exact_value})
        exact_lb = torch.as_tensor([e.lb for e in exact], dtype=torch.float64, device=P.device).clamp_min(0.0)
        result["exact_lb"] = exact_lb
        result["exact_status"] = [e.status for e in exact]
    result["seconds"] = seconds
    return result


def scope_problems(
    data: LayerData, channels: torch.Tensor, step: torch.Tensor, inputs: torch.Tensor, n_bits: int
) -> tuple[QuadraticProblems, torch.Tensor]:
    """The boxed problems of the inputs ``inputs`` of ``channels`` (steps ``step``) and their ``w / s``."""
    weights = data.weights[channels][:, inputs]
    problems = QuadraticProblems.from_gram(data.channel_grams(channels, inputs), weights, step, n_bits)
    return problems, weights / step[:, None]


def layer_problem_sets(data: LayerData, channels: torch.Tensor, step: torch.Tensor, config: QuantBoundsConfig):
    """Yield ``(scope, chunk, inputs, problems, w_over_s)`` for the chunks (and whole channels) of the layer."""
    for scope, index, inputs in problem_scopes(data, config.opt_dim, config.max_whole_dim):
        problems, w_over_s = scope_problems(data, channels, step, inputs, config.n_bits)
        yield scope, index, (int(inputs[0]), int(inputs[-1])), problems, w_over_s


def quant_bounds_layer(data: LayerData, config: QuantBoundsConfig, progress=None) -> dict:
    """All problem sets of one layer, solved (:func:`studies.problem_sets.solve_layer`): ``{"summary": ...,
    "sets": [QuantProblemSet, ...]}``.

    ``progress`` (e.g. a tqdm bar) is advanced by one per problem set; with ``exact``, and when
    the bar is shown, a bar of the set's problems is shown below it.
    """
    generator = torch.Generator(device=data.weights.device).manual_seed(config.seed)
    step_all = layer_step_sizes(data.weights, config.n_bits, config.range_method, config.per_channel)

    def solve_scope(scope: str, index: int, inputs: torch.Tensor, live: torch.Tensor) -> QuantProblemSet:
        step = step_all[live]
        problems, w_over_s = scope_problems(data, live, step, inputs, config.n_bits)
        result = _solve_with_zero_energy(problems, w_over_s, config, generator, progress)
        return QuantProblemSet(
            scope=scope, chunk=index, inputs=(int(inputs[0]), int(inputs[-1])), channels=live.cpu(),
            step_size=step.cpu(), problems=problems.to("cpu"), **{k: _cpu(v) for k, v in result.items()},
        )

    extra = {"step_size": {"min": float(step_all.min()), "max": float(step_all.max())}}
    return solve_layer(data, config, solve_scope, extra, progress)


def _cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    return value


def _solve_with_zero_energy(
    problems: QuadraticProblems,
    w_over_s: torch.Tensor,
    config: QuantBoundsConfig,
    generator: torch.Generator,
    progress=None,
) -> dict:
    """:func:`solve_problems` on the problems with ``r > 0``; the others get ``relaxation_lb = 0`` and RTN for every
    method (:func:`studies.problem_sets.solve_with_zero_energy`)."""
    batch, n = problems.batch_size, problems.n
    rtn = torch.clamp(torch.round(w_over_s), problems.lo, problems.hi)
    rtn_value = problems.objective(rtn)
    zeros = torch.zeros(batch, n, dtype=torch.float64, device=w_over_s.device)
    methods = config.methods + (("exact",) if config.exact else ())
    defaults = {
        "relaxation_lb": torch.zeros(batch, dtype=torch.float64, device=w_over_s.device),
        "lam": zeros.clone(), "mu": zeros.clone(), "origin": zeros.clone(),
        "status": ["zero_energy"] * batch,
        "errors": {m: rtn_value.clone() for m in methods},
        "z": rtn, "ub": rtn_value.clone(), "seconds": {},
    }
    if config.exact:
        defaults["exact_lb"], defaults["exact_status"] = torch.zeros_like(rtn_value), ["zero_energy"] * batch
    return solve_with_zero_energy(
        defaults, problems.r,
        lambda index: solve_problems(problems.select(index), w_over_s[index], config, generator, progress),
    )


def run_stem(model_name: str, config: QuantBoundsConfig) -> str:
    """The name of a run's files: ``quant_bounds_<model>_<b>bits_opt<d>_<range>`` and, where they differ from the
    defaults, ``_per_channel``, ``_box``, ``_<solver>``, ``_exact`` and ``_methods-<m1>+<m2>``."""
    parts = [f"quant_bounds_{model_name}_{config.n_bits}bits_opt{config.opt_dim}_{config.range_method}"]
    parts += ["per_channel"] if config.per_channel else []
    parts += ["box"] if config.box else []
    parts += [config.solver] if config.solver != "ours" else []
    parts += ["exact"] if config.exact else []
    parts += ["methods-" + "+".join(config.methods)] if config.methods != METHODS else []
    return "_".join(parts)


def plot_label(config: QuantBoundsConfig) -> str:
    """The run's name in figures: ``INT<b>``."""
    return f"INT{config.n_bits}"


STUDY = BoundsStudy("quantization", run_stem, quant_bounds_layer, plot_label)


def run_quant_bounds(layers: dict[str, LayerData], config: QuantBoundsConfig, setup: RunSetup) -> tuple[dict, RunFiles]:
    """The study of ``layers`` (:func:`studies.bounds_run.run_study`); returns the run's record and its files."""
    return run_study(STUDY, layers, config, setup)
