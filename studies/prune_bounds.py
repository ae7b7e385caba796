"""Post-training pruning bounds per layer (paper Sec. 4): exact sparse least squares, certified bounds, real methods.

For every output channel ``c`` and input chunk ``J`` (:func:`studies.layer_problems.input_chunks`)
of a layer, pruning keeps ``k`` of the chunk's ``n`` weights and costs

    e(x) = ||A_J (w_J - x)||^2 = (w_J - x)' G_JJ (w_J - x),   at most k nonzeros in x,

with ``k = n - round((1 - density) n)`` (the rounding of :func:`pruning.masks.num_pruned`),
``density = b / 16`` at the bit-width ``b`` of equal compression, or ``1 - sparsity``. Per
problem this module computes

* the certified lower bound of the perspective relaxation (``relaxation_lower_bound``,
  :func:`pruning.perspective_bound.lower_bound`), for any size;
* the error of each post-training method chosen (``methods``, default all of
  :data:`pruning.sparse_ls_heuristics.METHODS`): ``magnitude`` (largest ``|w|`` kept),
  ``magnitude_refit`` (least-squares refit of the kept weights), ``obs`` (OBS/SparseGPT-style
  greedy with error feedback), ``iht`` (iterative hard thresholding), ``swap`` (local search from
  the best of the other four: with ``swap`` all of them run, and only the chosen are reported), so a
  method's numbers are the same whichever others are chosen; the best point is the best of those chosen;
* for chunks of at most ``max_exact_dim`` inputs, the exact optimum by branch and bound
  (:func:`pruning.sparse_ls.solve_exact_batch`; its certified bound replaces the relaxation's
  where larger). Its limit per problem is a count of nodes (``node_limit``, default
  :data:`pruning.sparse_ls.DEFAULT_NODE_LIMIT`), so the results do not depend on the machine's
  speed or load; ``time_limit`` adds an optional wall-clock limit (then they do). The ``seconds``
  per stage are recorded beside the results and are the only measured quantities in them.

Aggregation and file layout are those of :mod:`studies.quant_bounds`: summed errors relative to
the summed energy ``sum w' G w``, per chunk and per layer (scopes ``chunk`` and, where the fan-in
is at most ``max_whole_dim``, ``whole_channel``). Dead channels (zero output energy) are skipped
and counted; chunk problems with zero energy get error 0 from every method.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from pruning.least_squares import reconstruction_error
from pruning.masks import num_pruned
from pruning.perspective_bound import lower_bound
from pruning.sparse_ls import DEFAULT_NODE_LIMIT, solve_exact_batch
from pruning.sparse_ls_heuristics import (
    METHODS,
    iht_prune,
    magnitude_prune,
    magnitude_refit,
    obs_prune,
    pruning_methods,
)
from studies.bounds_files import RunFiles, bar_shown, best_of, check_exact_limits, format_percent
from studies.bounds_run import BoundsStudy, RunSetup, run_study
from studies.layer_problems import DEFAULT_MAX_WHOLE_DIM, LayerData
from studies.problem_sets import ProblemSet, solve_layer, solve_with_zero_energy

__all__ = [
    "METHODS",
    "PruneBoundsConfig",
    "PruneProblemSet",
    "kept_weights",
    "plot_label",
    "prune_bounds_layer",
    "run_prune_bounds",
    "run_stem",
    "solve_pruning_problems",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneBoundsConfig:
    """Options of a pruning-bounds run (the CLI's, minus I/O). ``sparsity`` is the share of weights removed.

    ``node_limit`` is the exact solver's work limit per problem (None: its
    :data:`~pruning.sparse_ls.DEFAULT_NODE_LIMIT`); ``time_limit`` an optional wall-clock limit per
    problem in seconds (None: none, the results do not depend on timing). ``methods``: the pruning
    methods to report, a non-empty subset of :data:`METHODS` (kept in that order).
    """

    sparsity: float = 0.75
    opt_dim: int = 32
    node_limit: int | None = None
    time_limit: float | None = None
    max_exact_dim: int = 48
    max_whole_dim: int = DEFAULT_MAX_WHOLE_DIM
    num_output_channels: int = -1
    methods: tuple[str, ...] = METHODS

    def __post_init__(self) -> None:
        unknown = [method for method in self.methods if method not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {', '.join(METHODS)}, got {self.methods!r}")
        object.__setattr__(self, "methods", tuple(method for method in METHODS if method in self.methods))
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        check_exact_limits(self.node_limit, self.time_limit)

    @property
    def exact_node_limit(self) -> int:
        """The branch and bound's node limit per problem: ``node_limit``, or the solver's default."""
        return DEFAULT_NODE_LIMIT if self.node_limit is None else self.node_limit


def kept_weights(n: int, sparsity: float) -> int:
    """``k = n - num_pruned(n, sparsity)``: the weights a chunk of ``n`` keeps."""
    return n - num_pruned(n, sparsity)


@dataclass(kw_only=True)
class PruneProblemSet(ProblemSet):
    """A batch of pruning problems of one size; ``status`` is the exact solver's, or ``"not_solved"`` (too large)
    / ``"zero_energy"``."""

    grams: torch.Tensor  # (B, n, n)
    weights: torch.Tensor  # (B, n)
    k: int
    r: torch.Tensor  # (B,) w'Gw
    x: torch.Tensor  # (B, n) best pruned weights found

    @property
    def n(self) -> int:
        return self.weights.shape[1]

    @property
    def energy(self) -> torch.Tensor:
        return self.r

    def chunk_record(self) -> dict:
        """``chunk``, ``inputs``, ``n`` and the kept weights ``k``."""
        return {**super().chunk_record(), "k": self.k}

    def arrays(self) -> dict[str, torch.Tensor | np.ndarray]:
        """``G`` (= A'A), ``w``, best ``x``, ``r``, ``k``, ``ub``, ``lb`` (the best certified bound) and
        ``relaxation_lb``."""
        return {
            "G": self.grams, "w": self.weights, "x": self.x, "r": self.r, "k": np.full(self.batch_size, self.k),
            "ub": self.ub, "lb": self.best_lb, "relaxation_lb": self.relaxation_lb,
        }


def chosen_methods(grams: torch.Tensor, weights: torch.Tensor, k: int, methods: tuple[str, ...]) -> dict:
    """``{method: x}`` for ``methods`` (in :data:`METHODS` order), each as
    :func:`~pruning.sparse_ls_heuristics.pruning_methods` computes it; that runs all when ``swap`` is chosen."""
    if "swap" in methods:
        points = pruning_methods(grams, weights, k)
    else:
        single = {
            "magnitude": lambda: magnitude_prune(weights, k),
            "magnitude_refit": lambda: magnitude_refit(grams, weights, k),
            "obs": lambda: obs_prune(grams, weights, k),
            "iht": lambda: iht_prune(grams, weights, k),
        }
        points = {method: single[method]() for method in methods}
    return {method: points[method] for method in METHODS if method in methods}


def solve_pruning_problems(
    grams: torch.Tensor, weights: torch.Tensor, k: int, config: PruneBoundsConfig, progress=None
) -> dict:
    """Relaxation bound, the chosen methods and (for small ``n``) the exact optimum; inputs on the CPU, float64.

    ``progress``: the caller's bar of problem sets; when it is shown, the exact solver shows a bar
    of its finished problems below it.
    """
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    relaxation_lb = lower_bound(grams, weights, k)
    seconds["bound"] = time.perf_counter() - start
    start = time.perf_counter()
    points = chosen_methods(grams, weights, k, config.methods)
    seconds["methods"] = time.perf_counter() - start
    errors = {method: reconstruction_error(grams, weights, x) for method, x in points.items()}
    x, ub = best_of(points, errors)
    result = {"relaxation_lb": relaxation_lb, "errors": errors, "x": x, "ub": ub,
              "status": ["not_solved"] * weights.shape[0], "exact_lb": None}
    if weights.shape[1] <= config.max_exact_dim:
        start = time.perf_counter()
        exact = solve_exact_batch(grams, weights, k, time_limit=config.time_limit,
                                  node_limit=config.exact_node_limit, progress=bar_shown(progress))
        seconds["exact"] = time.perf_counter() - start
        exact_x = torch.as_tensor(np.stack([e.x for e in exact]), dtype=torch.float64)
        exact_error = reconstruction_error(grams, weights, exact_x)
        errors["exact"] = exact_error
        result["x"], result["ub"] = best_of({"methods": x, "exact": exact_x}, {"methods": ub, "exact": exact_error})
        result["exact_lb"] = torch.as_tensor([e.lb for e in exact], dtype=torch.float64).clamp_min(0.0)
        result["status"] = [e.status for e in exact]
    result["seconds"] = seconds
    return result


def prune_bounds_layer(data: LayerData, config: PruneBoundsConfig, progress=None) -> dict:
    """All problem sets of one layer, solved (:func:`studies.problem_sets.solve_layer`): ``{"summary": ...,
    "sets": [PruneProblemSet, ...]}``."""

    def solve_scope(scope: str, index: int, inputs: torch.Tensor, live: torch.Tensor) -> PruneProblemSet:
        grams = data.channel_grams(live, inputs).cpu()
        weights = data.weights[live][:, inputs].cpu()
        return _solve_set(scope, index, inputs, live.cpu(), grams, weights, kept_weights(len(inputs), config.sparsity),
                          config, progress)

    return solve_layer(data, config, solve_scope, {"sparsity": config.sparsity}, progress)


def _solve_set(scope, index, inputs, channels, grams, weights, k, config, progress=None) -> PruneProblemSet:
    """:func:`solve_pruning_problems` on the problems with ``w'Gw > 0``; the others get error 0 from every method
    (:func:`studies.problem_sets.solve_with_zero_energy`)."""
    r = torch.einsum("bi,bij,bj->b", weights, grams, weights)
    batch = weights.shape[0]
    exact = weights.shape[1] <= config.max_exact_dim
    methods = config.methods + (("exact",) if exact else ())
    zeros = torch.zeros(batch, dtype=torch.float64)
    defaults = {
        "relaxation_lb": zeros.clone(), "errors": {m: zeros.clone() for m in methods}, "x": torch.zeros_like(weights),
        "ub": zeros.clone(), "status": ["zero_energy"] * batch, "exact_lb": zeros.clone() if exact else None,
        "seconds": {},
    }
    solved = solve_with_zero_energy(
        defaults, r, lambda solvable: solve_pruning_problems(grams[solvable], weights[solvable], k, config, progress)
    )
    return PruneProblemSet(scope=scope, chunk=index, inputs=(int(inputs[0]), int(inputs[-1])), channels=channels,
                           grams=grams, weights=weights, k=k, r=r, **solved)


def run_stem(model_name: str, config: PruneBoundsConfig) -> str:
    """The name of a run's files: ``prune_bounds_<model>_sparsity<s>_opt<d>`` (``<s>`` exact, e.g. ``0.875``), plus
    ``_methods-<m1>+<m2>`` when not all methods run."""
    stem = f"prune_bounds_{model_name}_sparsity{config.sparsity:g}_opt{config.opt_dim}"
    return stem + ("_methods-" + "+".join(config.methods) if config.methods != METHODS else "")


def plot_label(config: PruneBoundsConfig) -> str:
    """The run's name in figures: ``pruning <sparsity in %>``."""
    return f"pruning {format_percent(config.sparsity)}"


STUDY = BoundsStudy("pruning", run_stem, prune_bounds_layer, plot_label)


def run_prune_bounds(layers: dict[str, LayerData], config: PruneBoundsConfig, setup: RunSetup) -> tuple[dict, RunFiles]:
    """The study of ``layers`` (:func:`studies.bounds_run.run_study`); returns the run's record and its files."""
    return run_study(STUDY, layers, config, setup)
