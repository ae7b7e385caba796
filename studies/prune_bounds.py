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
from dataclasses import asdict, dataclass, field

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
from studies.bounds_files import (
    bar_shown,
    best_of,
    check_exact_limits,
    padded_stack,
    scope_summaries,
    set_columns,
    summarise,
)
from studies.layer_problems import DEFAULT_MAX_WHOLE_DIM, LayerData, problem_scopes

__all__ = [
    "METHODS",
    "PruneBoundsConfig",
    "PruneProblemSet",
    "config_record",
    "kept_weights",
    "problem_arrays",
    "prune_bounds_layer",
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


@dataclass
class PruneProblemSet:
    """A batch of pruning problems of one size (one per live channel) and everything computed for them."""

    scope: str
    chunk: int
    inputs: tuple[int, int]
    channels: torch.Tensor  # (B,)
    grams: torch.Tensor  # (B, n, n)
    weights: torch.Tensor  # (B, n)
    k: int
    r: torch.Tensor  # (B,) w'Gw
    relaxation_lb: torch.Tensor  # (B,)
    errors: dict[str, torch.Tensor]
    x: torch.Tensor  # (B, n) best pruned weights found
    ub: torch.Tensor  # (B,)
    status: list[str]  # exact solver's status, or "not_solved" (too large) / "zero_energy"
    exact_lb: torch.Tensor | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.weights.shape[0]

    @property
    def n(self) -> int:
        return self.weights.shape[1]

    @property
    def energy(self) -> torch.Tensor:
        return self.r

    @property
    def best_lb(self) -> torch.Tensor:
        return self.relaxation_lb if self.exact_lb is None else torch.maximum(self.relaxation_lb, self.exact_lb)


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
    """All problem sets of one layer, solved: ``{"summary": ..., "sets": [PruneProblemSet, ...]}``."""
    count, live, dead = data.live_channels(config.num_output_channels)
    sets: list[PruneProblemSet] = []
    for scope, index, inputs in problem_scopes(data, config.opt_dim, config.max_whole_dim) if len(live) else []:
        grams = data.channel_grams(live, inputs).cpu()
        weights = data.weights[live][:, inputs].cpu()
        k = kept_weights(len(inputs), config.sparsity)
        sets.append(_solve_set(scope, index, inputs, live.cpu(), grams, weights, k, config, progress))
        if progress is not None:
            progress.update(1)
    summary = {
        **data.description(count, dead),
        "sparsity": config.sparsity,
        "scopes": scope_summaries(sets),
        "chunks": [
            {"chunk": s.chunk, "inputs": list(s.inputs), "n": s.n, "k": s.k, **summarise([s])}
            for s in sets if s.scope == "chunk"
        ],
    }
    return {"summary": summary, "sets": sets}


def _solve_set(scope, index, inputs, channels, grams, weights, k, config, progress=None) -> PruneProblemSet:
    r = torch.einsum("bi,bij,bj->b", weights, grams, weights)
    solvable = (r > 0).nonzero()[:, 0]
    batch = weights.shape[0]
    exact = weights.shape[1] <= config.max_exact_dim
    methods = config.methods + (("exact",) if exact else ())
    zeros = torch.zeros(batch, dtype=torch.float64)
    problem_set = PruneProblemSet(
        scope=scope, chunk=index, inputs=(int(inputs[0]), int(inputs[-1])), channels=channels, grams=grams,
        weights=weights, k=k, r=r, relaxation_lb=zeros.clone(), errors={m: zeros.clone() for m in methods},
        x=torch.zeros_like(weights), ub=zeros.clone(), status=["zero_energy"] * batch,
        exact_lb=zeros.clone() if exact else None,
    )
    if len(solvable) == 0:
        return problem_set
    solved = solve_pruning_problems(grams[solvable], weights[solvable], k, config, progress)
    problem_set.relaxation_lb[solvable] = solved["relaxation_lb"]
    for method in methods:
        problem_set.errors[method][solvable] = solved["errors"][method]
    problem_set.x[solvable] = solved["x"]
    problem_set.ub[solvable] = solved["ub"]
    if exact:
        problem_set.exact_lb[solvable] = solved["exact_lb"]
    for position, status in zip(solvable.tolist(), solved["status"]):
        problem_set.status[position] = status
    problem_set.seconds = solved["seconds"]
    return problem_set


def problem_arrays(layer_sets: list[tuple[int, PruneProblemSet]], layer_names: list[str]) -> dict[str, np.ndarray]:
    """Every pruning problem of a run for the npz: ``G`` (= A'A), ``w``, ``r``, ``k``, best ``x``, ``ub``, ``lb``, ``status``.

    Zero-padded to the largest ``n`` of a scope (``n`` gives each size); keys of whole-channel
    problems start with ``whole_channel_``. ``lb`` is the best certified bound (relaxation or
    branch and bound), ``relaxation_lb`` the relaxation's alone; ``error_<method>`` per method.
    """
    arrays: dict[str, np.ndarray] = {"layer_names": np.array(layer_names, dtype=str)}
    for scope, prefix in (("chunk", ""), ("whole_channel", "whole_channel_")):
        chosen = [(index, s) for index, s in layer_sets if s.scope == scope]
        if not chosen:
            continue
        sets = [s for _, s in chosen]
        size = max(s.n for s in sets)
        stacked = {
            "G": padded_stack([s.grams for s in sets], size),
            "w": padded_stack([s.weights for s in sets], size),
            "x": padded_stack([s.x for s in sets], size),
            "r": np.concatenate([s.r.numpy() for s in sets]),
            "k": np.concatenate([np.full(s.batch_size, s.k) for s in sets]),
            "ub": np.concatenate([s.ub.numpy() for s in sets]),
            "lb": np.concatenate([s.best_lb.numpy() for s in sets]),
            "relaxation_lb": np.concatenate([s.relaxation_lb.numpy() for s in sets]),
            **set_columns(chosen),
        }
        arrays.update({prefix + key: value for key, value in stacked.items()})
    return arrays


def run_stem(model_name: str, config: PruneBoundsConfig) -> str:
    """The name of a run's files: ``prune_bounds_<model>_sparsity<s>_opt<d>`` (``<s>`` exact, e.g. ``0.875``), plus
    ``_methods-<m1>+<m2>`` when not all methods run."""
    stem = f"prune_bounds_{model_name}_sparsity{config.sparsity:g}_opt{config.opt_dim}"
    return stem + ("_methods-" + "+".join(config.methods) if config.methods != METHODS else "")


def config_record(config: PruneBoundsConfig) -> dict:
    """The config as a JSON-ready dict, with the node limit actually used (the solver's default for None)."""
    return {**asdict(config), "node_limit": config.exact_node_limit, "methods": list(config.methods)}
