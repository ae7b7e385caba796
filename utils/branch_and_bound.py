"""The result of a branch and bound on one problem, shared by the exact solvers of the bounds studies.

:mod:`quantization.qp_exact` (integer least squares) and :mod:`pruning.sparse_ls` (sparse least
squares) both return, per problem, the best point found, its value (an upper bound on the
minimum), a certified lower bound, why the search stopped and what it cost.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BranchAndBoundResult"]


@dataclass(frozen=True)
class BranchAndBoundResult:
    """The result of an exact solver for one problem: ``lb <= min <= ub = f(x)``.

    Attributes:
        x: ``(n,)`` float64, the best point found (integers in the box for quantization, at most
            ``k`` nonzeros for pruning).
        ub: the objective at ``x``.
        lb: a certified lower bound on the minimum (``<= ub``).
        status: ``"optimal"`` (tree exhausted), ``"time_limit"`` or ``"node_limit"``.
        nodes: search-tree nodes the solver counted against its node limit (see each solver).
        seconds: wall-clock time spent on the problem.
        support: ``(n,)`` bool, the kept inputs of a pruning result (``x`` is zero outside), else None.
    """

    x: np.ndarray
    ub: float
    lb: float
    status: str
    nodes: int
    seconds: float
    support: np.ndarray | None = None

    @property
    def gap(self) -> float:
        """``(ub - lb) / max(|ub|, tiny)``."""
        return (self.ub - self.lb) / max(abs(self.ub), np.finfo(np.float64).tiny)
