"""The framework of the post-training bounds: a problem set, the zero-energy rule and the per-layer loop.

A bounds study (quantization :mod:`studies.quant_bounds`, pruning :mod:`studies.prune_bounds`)
is an instance: per layer it solves one :class:`ProblemSet` per scope of
:func:`studies.layer_problems.problem_scopes` (one problem per live output channel), and
:func:`studies.bounds_files.summarise` and :func:`studies.bounds_files.problem_arrays` read any
of them. An instance supplies

* a subclass of :class:`ProblemSet` with its own data (e.g. the QP, or the Gram matrix and
  weights), ``n``, ``energy`` and :meth:`ProblemSet.arrays` (its columns of the npz),
* a config with the fields of :class:`BoundsConfig`,
* a function solving the problems of one scope, run through :func:`solve_with_zero_energy`
  (problems of zero energy get the instance's defaults) and called by :func:`solve_layer`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from studies.bounds_files import scope_summaries, summarise
from studies.layer_problems import LayerData, problem_scopes

__all__ = ["BoundsConfig", "ProblemSet", "config_record", "solve_layer", "solve_with_zero_energy"]


class BoundsConfig(Protocol):
    """The options every bounds study has (its config is a frozen dataclass with at least these)."""

    opt_dim: int
    max_whole_dim: int
    num_output_channels: int
    methods: tuple[str, ...]

    @property
    def exact_node_limit(self) -> int: ...


@dataclass(kw_only=True)
class ProblemSet:
    """A batch of one layer's problems of one size (one per live channel) and what was computed for them.

    Attributes:
        scope: ``"chunk"`` or ``"whole_channel"``.
        chunk: the chunk index (-1 for whole channels).
        inputs: first and last input index of the chunk.
        channels: ``(B,)`` the output channels.
        relaxation_lb: ``(B,)`` the relaxation's certified lower bounds (>= 0).
        errors: method -> ``(B,)`` its error.
        ub: ``(B,)`` the least error found (the best method's, or the exact solver's).
        status: ``B`` statuses (the study says of what).
        exact_lb: ``(B,)`` the branch and bound's certified bounds, where it ran.
        exact_status: the branch and bound's ``B`` statuses, where a study keeps them apart from ``status``.
        seconds: seconds per stage.
    """

    scope: str
    chunk: int
    inputs: tuple[int, int]
    channels: torch.Tensor
    relaxation_lb: torch.Tensor
    errors: dict[str, torch.Tensor]
    ub: torch.Tensor
    status: list[str]
    exact_lb: torch.Tensor | None = None
    exact_status: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return len(self.ub)

    @property
    def n(self) -> int:
        """The problems' size (inputs of the chunk)."""
        raise NotImplementedError

    @property
    def energy(self) -> torch.Tensor:
        """``(B,)`` ``w' G w``, the energy of each problem's (partial) output."""
        raise NotImplementedError

    @property
    def best_lb(self) -> torch.Tensor:
        """The best certified lower bound: the relaxation's, or the branch and bound's when larger."""
        return self.relaxation_lb if self.exact_lb is None else torch.maximum(self.relaxation_lb, self.exact_lb)

    def chunk_record(self) -> dict:
        """The chunk's entry in the layer summary, before its sums: ``chunk``, ``inputs``, ``n``."""
        return {"chunk": self.chunk, "inputs": list(self.inputs), "n": self.n}

    def arrays(self) -> dict[str, torch.Tensor | np.ndarray]:
        """The set's own columns of the npz (:func:`studies.bounds_files.problem_arrays`): ``(B, n[, n])``
        tensors (zero-padded there), ``(B,)`` tensors or arrays."""
        raise NotImplementedError


def solve_with_zero_energy(defaults: dict[str, Any], energy: torch.Tensor, solve: Callable[[torch.Tensor], dict]) -> dict:
    """``defaults`` with ``solve(index)``'s results written in at ``index``, the problems with ``energy > 0``.

    ``defaults`` holds every problem's values for zero energy (``(B, ...)`` tensors, lists of
    ``B``, dicts of those, or None: not computed); ``solve`` returns the same keys for the
    problems ``index`` only, and its ``seconds`` replace the defaults'. Without such problems
    ``solve`` is not called. ``defaults`` is updated in place and returned.
    """
    index = (energy > 0).nonzero()[:, 0]
    if len(index) == 0:
        return defaults
    solved = solve(index)
    for key, value in defaults.items():
        if key != "seconds":
            _write_at(value, index, solved[key])
    defaults["seconds"] = solved["seconds"]
    return defaults


def _write_at(target: Any, index: torch.Tensor, values: Any) -> None:
    if target is None:
        return
    if isinstance(target, dict):
        for key, part in target.items():
            _write_at(part, index, values[key])
    elif isinstance(target, list):
        for position, value in zip(index.tolist(), values):
            target[position] = value
    else:
        target[index] = values


def solve_layer(
    data: LayerData,
    config: BoundsConfig,
    solve_scope: Callable[[str, int, torch.Tensor, torch.Tensor], ProblemSet],
    extra: dict,
    progress=None,
) -> dict:
    """All problem sets of one layer, solved: ``{"summary": ..., "sets": [ProblemSet, ...]}``.

    ``solve_scope(scope, chunk index, inputs, live channels)`` solves one scope of
    :func:`~studies.layer_problems.problem_scopes` (none without live channels); ``progress``
    (a bar of problem sets, or None) advances by one per set. The summary holds the layer's
    description, ``extra``, the sums per scope and one record per chunk.
    """
    count, live, dead = data.live_channels(config.num_output_channels)
    sets: list[ProblemSet] = []
    for scope, index, inputs in problem_scopes(data, config.opt_dim, config.max_whole_dim) if len(live) else []:
        sets.append(solve_scope(scope, index, inputs, live))
        if progress is not None:
            progress.update(1)
    summary = {
        **data.description(count, dead),
        **extra,
        "scopes": scope_summaries(sets),
        "chunks": [{**s.chunk_record(), **summarise([s])} for s in sets if s.scope == "chunk"],
    }
    return {"summary": summary, "sets": sets}


def config_record(config: BoundsConfig) -> dict:
    """The config as a JSON-ready dict, with the node limit actually used (the solver's default for None)."""
    return {**asdict(config), "node_limit": config.exact_node_limit, "methods": list(config.methods)}
