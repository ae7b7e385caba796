"""Post-training 1xN block-pruning bounds per layer: exact group-sparse least squares, certified bounds, real methods.

The third instance of the bounds framework (:mod:`studies.problem_sets`), beside
:mod:`studies.quant_bounds` and :mod:`studies.prune_bounds`. 1xN pruning (Lin et al., TPAMI 2022,
:mod:`pruning.block_masks`) cuts a layer's output channels into block rows of ``N`` consecutive
channels (:func:`pruning.block_masks.block_rows`); a block is one row x one input channel x the
whole kernel. Per block row ``R`` and input chunk ``J`` (whole input channels,
:func:`studies.layer_problems.input_chunks`: ``m`` input channels of ``g = k x k`` inputs each)
pruning keeps the blocks of ``K`` input channels ``S``, the same for the row's channels, and refits:

    E = min sum_{c in R} (w_c,J - x_c)' G_JJ (w_c,J - x_c),   x_c zero outside the inputs of S,

``K = m - floor(p m)`` at sparsity ``p`` (:func:`kept_blocks`: the 1xN count
:func:`pruning.block_masks.num_blocks_pruned` within the row's ``m`` blocks of the chunk). A problem
is a (block row, chunk) pair; its energy is ``sum_c w_c' G w_c``. Per problem
(:mod:`pruning.group_sparse_ls`):

* ``relaxation_lb``: the larger of two certified bounds, both kept in the npz and summed in the
  JSON: ``unstructured_lb`` (the channels' unstructured perspective bounds at ``K g`` kept weights:
  block pruning can do no better than unstructured pruning of the same count) and
  ``group_relaxation_lb`` (the group perspective relaxation, which sees the blocks);
* the errors of the chosen methods (``methods``, default all of :data:`METHODS`): ``magnitude``
  (the 1xN L1 mask, no refit), ``magnitude_refit``, ``obs`` (group OBS greedy) and ``swap`` (local
  search from the best of the three; with ``swap`` all run, so a method's numbers do not depend on
  the others chosen);
* for chunks of at most ``max_exact_dim`` inputs the exact optimum by branch and bound over
  input channels (:func:`pruning.group_sparse_ls.solve_block_exact_batch`, node limit
  ``node_limit``, default :data:`pruning.group_sparse_ls.DEFAULT_NODE_LIMIT`; ``time_limit`` adds an
  optional wall-clock limit), its certified bound replacing the relaxation's where larger.

The rows are the layer's (the last one smaller when ``N`` does not divide the channels of a group);
``num_output_channels`` is rounded up to whole rows and the rows with a live channel are solved,
with all their channels. Aggregation, scopes (``chunk``; ``whole_channel`` up to ``max_whole_dim``
inputs, where ``K`` is the 1xN count of the whole row) and files are the framework's
(:func:`studies.bounds_run.run_layers`), named by :func:`run_stem`. Problems of zero energy get error
0 from every method. The real 1xN mask prunes the ``floor(p B)`` weakest blocks of the whole layer,
so its per-row counts vary; here every row and chunk prunes its own share.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from pruning.block_masks import block_rows, num_blocks_pruned
from pruning.group_sparse_ls import (
    DEFAULT_NODE_LIMIT,
    METHODS,
    block_error,
    block_lower_bound,
    block_magnitude_prune,
    block_magnitude_refit,
    block_obs_prune,
    block_pruning_methods,
    block_support,
    solve_block_exact_batch,
    torch_threads,
    unstructured_lower_bound,
)
from pruning.perspective_bound import problem_splits
from studies.bounds_files import RunFiles, bar_shown, best_of, check_exact_limits, format_percent, sqnr_db
from studies.bounds_run import BoundsStudy, RunSetup, run_study
from studies.layer_problems import DEFAULT_MAX_WHOLE_DIM, LayerData, problem_scopes
from studies.problem_sets import ProblemSet, solve_layer, solve_with_zero_energy

__all__ = [
    "METHODS",
    "BlockPruneBoundsConfig",
    "BlockPruneProblemSet",
    "block_prune_bounds_layer",
    "kept_blocks",
    "plot_label",
    "run_block_prune_bounds",
    "run_stem",
    "solve_block_problems",
]

logger = logging.getLogger(__name__)

BOUNDS = ("unstructured_lb", "group_relaxation_lb")
"""The two certified bounds whose larger is ``relaxation_lb``, kept apart in the npz and the JSON."""


@dataclass(frozen=True)
class BlockPruneBoundsConfig:
    """Options of a 1xN block-pruning-bounds run (the CLI's, minus I/O).

    ``block_size``: ``N``, output channels per block; ``sparsity``: ``p``, the share of blocks removed
    from every row and chunk (``floor(p m)`` of ``m``); ``node_limit``: the exact solver's nodes per
    problem (None: :data:`~pruning.group_sparse_ls.DEFAULT_NODE_LIMIT`); ``time_limit``: optional
    seconds per problem; ``methods``: a non-empty subset of :data:`METHODS` (kept in that order).
    """

    block_size: int = 4
    sparsity: float = 0.5
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
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        check_exact_limits(self.node_limit, self.time_limit)

    @property
    def exact_node_limit(self) -> int:
        """The branch and bound's node limit per problem: ``node_limit``, or the solver's default."""
        return DEFAULT_NODE_LIMIT if self.node_limit is None else self.node_limit


def kept_blocks(blocks: int, sparsity: float) -> int:
    """``K = m - floor(p m)`` (:func:`pruning.block_masks.num_blocks_pruned`): the blocks a row keeps of ``m``."""
    return blocks - num_blocks_pruned(blocks, sparsity)


@dataclass(kw_only=True)
class BlockPruneProblemSet(ProblemSet):
    """A batch of block problems of one chunk, one per block row; ``status`` is the exact solver's, or
    ``"not_solved"`` (too large) / ``"zero_energy"``. ``channels`` holds each row's first output channel."""

    grams: torch.Tensor  # (B, n, n)
    weights: torch.Tensor  # (B, N, n), rows with fewer channels padded with zeros
    group_size: int
    kept: int
    r: torch.Tensor  # (B,) sum_c w_c'Gw_c
    x: torch.Tensor  # (B, N, n) best pruned weights found
    rows: torch.Tensor  # (B,) block row indices
    unstructured_lb: torch.Tensor  # (B,)
    group_relaxation_lb: torch.Tensor  # (B,)
    width: int  # the npz's padded width (the scope's largest n)

    @property
    def n(self) -> int:
        return self.weights.shape[2]

    @property
    def energy(self) -> torch.Tensor:
        return self.r

    def chunk_record(self) -> dict:
        """``chunk``, ``inputs``, ``n``, the blocks ``m`` and kept ``K`` per row, and the sums of both bounds."""
        return {**super().chunk_record(), "blocks": self.n // self.group_size, "kept_blocks": self.kept,
                **{f"{name}_sum": float(getattr(self, name).sum()) for name in BOUNDS}}

    def arrays(self) -> dict[str, torch.Tensor | np.ndarray]:
        """``G``, ``w`` and the best ``x`` (``(B, N, width)``, zero-padded), ``r``, ``kept_blocks``, ``group_size``,
        ``block_row``, ``ub``, ``lb`` (the best certified bound), ``relaxation_lb`` and both bounds it is made of."""
        pad = (0, self.width - self.n)
        return {
            "G": self.grams, "w": torch.nn.functional.pad(self.weights, pad).numpy(),
            "x": torch.nn.functional.pad(self.x, pad).numpy(), "r": self.r,
            "kept_blocks": np.full(self.batch_size, self.kept), "group_size": np.full(self.batch_size, self.group_size),
            "block_row": self.rows, "ub": self.ub, "lb": self.best_lb, "relaxation_lb": self.relaxation_lb,
            **{name: getattr(self, name) for name in BOUNDS},
        }


def chosen_methods(grams: torch.Tensor, weights: torch.Tensor, group_size: int, kept: int,
                   methods: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``{method: X}`` for ``methods`` (in :data:`METHODS` order), each as
    :func:`~pruning.group_sparse_ls.block_pruning_methods` computes it; that runs all when ``swap`` is chosen."""
    if "swap" in methods:
        points = block_pruning_methods(grams, weights, group_size, kept)
    else:
        single = {
            "magnitude": lambda: block_magnitude_prune(weights, group_size, kept),
            "magnitude_refit": lambda: block_magnitude_refit(grams, weights, group_size, kept),
            "obs": lambda: block_obs_prune(grams, weights, group_size, kept),
        }
        points = {method: single[method]() for method in methods}
    return {method: points[method] for method in METHODS if method in methods}


def _flat(points: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: x.reshape(x.shape[0], -1) for name, x in points.items()}


def solve_block_problems(grams: torch.Tensor, weights: torch.Tensor, group_size: int, kept: int,
                         config: BlockPruneBoundsConfig, progress=None) -> dict:
    """Both certified bounds, the chosen methods and (for small ``n``) the exact optimum of every block problem.

    ``grams`` ``(B, n, n)`` and ``weights`` ``(B, N, n)`` on the CPU, float64; ``progress``: the caller's bar of
    problem sets (when shown, the exact solver shows a bar of its finished problems below it). Runs on one torch
    thread (:func:`~pruning.group_sparse_ls.torch_threads`).
    """
    with torch_threads(1):
        return _solve_block_problems(grams, weights, group_size, kept, config, progress)


def _solve_block_problems(grams, weights, group_size, kept, config, progress) -> dict:
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    splits = problem_splits(0.5 * (grams + grams.transpose(1, 2)))
    bounds = {
        "unstructured_lb": unstructured_lower_bound(grams, weights, group_size, kept, d=splits),
        "group_relaxation_lb": block_lower_bound(grams, weights, group_size, kept, d=splits),
    }
    seconds["bound"] = time.perf_counter() - start
    start = time.perf_counter()
    points = chosen_methods(grams, weights, group_size, kept, config.methods)
    seconds["methods"] = time.perf_counter() - start
    errors = {method: block_error(grams, weights, x) for method, x in points.items()}
    x, ub = best_of(_flat(points), errors)
    x = x.reshape(weights.shape)
    result = {**bounds, "relaxation_lb": torch.maximum(*bounds.values()), "errors": errors, "x": x, "ub": ub,
              "status": ["not_solved"] * weights.shape[0], "exact_lb": None}
    if weights.shape[2] <= config.max_exact_dim:
        start = time.perf_counter()
        exact = solve_block_exact_batch(
            grams, weights, group_size, kept, node_limit=config.exact_node_limit, time_limit=config.time_limit,
            d=splits, initial_support=block_support(x, group_size, kept), progress=bar_shown(progress))
        seconds["exact"] = time.perf_counter() - start
        exact_x = torch.as_tensor(np.stack([e.x for e in exact]), dtype=torch.float64)
        errors["exact"] = block_error(grams, weights, exact_x)
        best_x, result["ub"] = best_of(_flat({"methods": x, "exact": exact_x}), {"methods": ub, "exact": errors["exact"]})
        result["x"] = best_x.reshape(weights.shape)
        result["exact_lb"] = torch.as_tensor([e.lb for e in exact], dtype=torch.float64).clamp_min(0.0)
        result["status"] = [e.status for e in exact]
    result["seconds"] = seconds
    return result


def block_prune_bounds_layer(data: LayerData, config: BlockPruneBoundsConfig, progress=None) -> dict:
    """All problem sets of one layer, solved (:func:`studies.problem_sets.solve_layer`): ``{"summary": ...,
    "sets": [BlockPruneProblemSet, ...]}``. The summary's scopes also hold the sums of both certified bounds
    (``unstructured_lower_bound``, ``group_relaxation_lower_bound``) and their SQNRs in dB.

    Raises ValueError when the block size does not fit the layer (e.g. a depthwise convolution).
    """
    N = config.block_size
    rows = block_rows(data.out_channels, N, data.grams.shape[0])
    count = data.out_channels if config.num_output_channels < 0 else min(config.num_output_channels, data.out_channels)
    whole_rows = int((rows <= rows[count - 1]).sum())  # the first channels, rounded up to whole rows
    widths: dict[str, int] = {}
    for scope, _, inputs in problem_scopes(data, config.opt_dim, config.max_whole_dim):
        widths[scope] = max(widths.get(scope, 0), len(inputs))
    g = data.kernel_elements
    members = [torch.nonzero(rows == row).flatten() for row in range(int(rows[-1]) + 1)]  # each row's channels

    def solve_scope(scope: str, index: int, inputs: torch.Tensor, live: torch.Tensor) -> BlockPruneProblemSet:
        inputs = inputs.cpu()
        live_rows = torch.unique(rows[live.cpu()])
        weights = torch.zeros(len(live_rows), N, len(inputs), dtype=torch.float64)
        first = torch.zeros(len(live_rows), dtype=torch.long)
        for b, row in enumerate(live_rows.tolist()):
            channels = members[row]
            weights[b, : len(channels)] = data.weights[channels.to(data.weights.device)][:, inputs].cpu()
            first[b] = channels[0]
        grams = data.channel_grams(first.to(data.weights.device), inputs.to(data.weights.device)).cpu()
        kept = kept_blocks(len(inputs) // g, config.sparsity)
        return _solve_set(scope, index, inputs, first, live_rows, grams, weights, g, kept, widths[scope], config,
                          progress)

    extra = {"sparsity": config.sparsity, "block_size": N, "block_rows": int(rows[whole_rows - 1]) + 1}
    result = solve_layer(data, replace(config, num_output_channels=whole_rows), solve_scope, extra, progress)
    for scope, record in result["summary"]["scopes"].items():
        sets = [s for s in result["sets"] if s.scope == scope]
        for name, key in zip(BOUNDS, ("unstructured_lower_bound", "group_relaxation_lower_bound")):
            record[key] = sum(float(getattr(s, name).sum()) for s in sets)
            record[f"sqnr_{key.removesuffix('_lower_bound')}_bound_db"] = sqnr_db(record["energy"], record[key])
    return result


def _solve_set(scope, index, inputs, channels, rows, grams, weights, group_size, kept, width, config,
               progress=None) -> BlockPruneProblemSet:
    """:func:`solve_block_problems` on the problems with energy > 0; the others get error 0 from every method
    (:func:`studies.problem_sets.solve_with_zero_energy`)."""
    r = torch.einsum("bci,bij,bcj->b", weights, grams, weights)
    batch = weights.shape[0]
    exact = weights.shape[2] <= config.max_exact_dim
    methods = config.methods + (("exact",) if exact else ())
    zeros = torch.zeros(batch, dtype=torch.float64)
    defaults = {
        "relaxation_lb": zeros.clone(), **{name: zeros.clone() for name in BOUNDS},
        "errors": {m: zeros.clone() for m in methods}, "x": torch.zeros_like(weights), "ub": zeros.clone(),
        "status": ["zero_energy"] * batch, "exact_lb": zeros.clone() if exact else None, "seconds": {},
    }
    solved = solve_with_zero_energy(
        defaults, r,
        lambda solvable: solve_block_problems(grams[solvable], weights[solvable], group_size, kept, config, progress),
    )
    return BlockPruneProblemSet(scope=scope, chunk=index, inputs=(int(inputs[0]), int(inputs[-1])), channels=channels,
                                grams=grams, weights=weights, group_size=group_size, kept=kept, r=r, rows=rows,
                                width=width, **solved)


def run_stem(model_name: str, config: BlockPruneBoundsConfig) -> str:
    """The name of a run's files: ``block_prune_bounds_<model>_1x<N>_sparsity<p>_opt<d>``, plus
    ``_methods-<m1>+<m2>`` when not all methods run."""
    stem = f"block_prune_bounds_{model_name}_1x{config.block_size}_sparsity{config.sparsity:g}_opt{config.opt_dim}"
    return stem + ("_methods-" + "+".join(config.methods) if config.methods != METHODS else "")


def plot_label(config: BlockPruneBoundsConfig) -> str:
    """The run's name in figures: ``1x<N> pruning <sparsity in %>``."""
    return f"1x{config.block_size} pruning {format_percent(config.sparsity)}"


STUDY = BoundsStudy("block_pruning", run_stem, block_prune_bounds_layer, plot_label)


def run_block_prune_bounds(layers: dict[str, LayerData], config: BlockPruneBoundsConfig, setup: RunSetup) -> tuple[dict, RunFiles]:
    """The study of ``layers`` (:func:`studies.bounds_run.run_study`); returns the run's record and its files."""
    return run_study(STUDY, layers, config, setup)
