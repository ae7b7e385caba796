#!/usr/bin/env python
"""Time the exact integer-QP solver (quantization/qp_exact.py) on a real layer's problems (issues 4, 10).

The problems are those of ``post_training_quant_acts_sqnr.py quant-bounds-data-opt --layer-name LAYER
--exact``: one problem per output channel and chunk of ``--opt-dim`` inputs of an EfficientNet-Lite0
layer, captured on the 5 scikit-image sample photos, ``--n-bits`` with the step from the per-tensor
MSE range. ``--layer``:

* ``_blocks.5._project_conv`` (default): the 1x1 projection conv (80 outputs, 240 inputs: seven
  chunks of 32 and one of 16), well conditioned;
* ``_conv_stem``: the 3x3 stem conv on RGB (32 outputs, 27 inputs: one chunk, the whole channel),
  whose Gram matrix of image patches is ill-conditioned (condition number ~1e5).

``--num-problems`` of them, evenly spread over all chunks, are solved one after another, every
solver on a problem before the next problem (interleaved, so load changes hit all columns alike):

* ``ours``: :func:`quantization.qp_exact.solve_exact` as the study calls it (the default node limit,
  no clock; best time of ``--repeats``, after a warm-up);
* ``ours+sdp`` (``--sdp``): the same with the SDP dual's multipliers
  (:func:`quantization.qp_bounds.solve_dual` on all the layer's problems, its time per problem added);
* ``reference`` (``--reference FILE``): another version of ``qp_exact.py`` (e.g. ``git show
  HEAD~1:quantization/qp_exact.py > /tmp/ref.py``) with ``--time-limit``, best of ``--repeats``;
* ``box`` (``--box``): the previous best-first solver (``solve_exact_box``, kept as a test reference in
  ``tests/reference_solvers.py`` and imported from there), once, ``--time-limit``;
* ``gurobi``: Gurobi, when ``gurobipy`` is importable (an optional bench dependency pinned in
  ``bench/requirements.txt``, imported here only), single thread, ``MIPGap=1e-9``, ``--time-limit``, model
  building included, once.

The starting point of every search is ``one_opt(sequential_rounding)``, computed for all problems at
once (its time per problem is printed and included in our totals). Printed per solver: CPU seconds (``time.process_time``) per
problem (mean, median, max; and the sum), nodes, statuses, the mean lower bound relative to the best
proven optimum, and how many problems disagree with ``ours`` (both optimal: values more than ``1e-9``
relative apart; otherwise a proven optimum outside the other's ``[lb, ub]``); then the time ratios.

    python bench/bench_qp_exact.py --num-problems 640                     # ~1 min, Gurobi ~2 min
    python bench/bench_qp_exact.py --layer _conv_stem --time-limit 10     # ~6 min, nearly all Gurobi
"""
from __future__ import annotations

import importlib.util
import math
import statistics
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path

import click
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the reference box search (--box)

from reference_solvers import solve_exact_box

from models.registry import load_model
from quantization.ptq_rounding import one_opt, sequential_rounding
from quantization.qp_bounds import QuadraticProblems, solve_dual
from quantization.qp_exact import DEFAULT_NODE_LIMIT, solve_exact
from studies.layer_problems import collect_layer_data
from studies.quant_bounds import QuantBoundsConfig, layer_problem_sets, layer_step_sizes
from utils.calibration import load_calibration_images
from utils.images import SAMPLE_PHOTOS

LAYERS = ("_blocks.5._project_conv", "_conv_stem")
AGREEMENT_RTOL = 1e-9
Row = tuple[float, float, str, int, float]  # ub, lb, status, nodes, seconds


def layer_batches(layer: str, n_bits: int, opt_dim: int, n_images: int) -> list[QuadraticProblems]:
    """One batch per chunk of inputs, one problem per output channel, with the ``n_bits`` box (as the CLI)."""
    model = load_model("efficientnet_lite0")
    data = collect_layer_data(model, [layer], load_calibration_images(None, n_images, seed=0))[layer]
    config = QuantBoundsConfig(n_bits=n_bits, opt_dim=opt_dim, max_whole_dim=0)
    step = layer_step_sizes(data.weights, n_bits, "mse", per_channel=False)
    sets = layer_problem_sets(data, torch.arange(data.out_channels), step, config)
    return [problems for _, _, _, problems, _ in sets]


def starting_points(batches: list[QuadraticProblems], repeats: int) -> tuple[list[torch.Tensor], float]:
    """``one_opt(sequential_rounding)`` of every batch, and its time per problem (best of ``repeats``, after a
    warm-up)."""
    sequential_rounding(batches[0].P[:2], batches[0].q[:2], batches[0].lo[:2], batches[0].hi[:2])
    best = math.inf
    for _ in range(repeats):
        start = time.process_time()
        starts = []
        for problems in batches:
            z = sequential_rounding(problems.P, problems.q, problems.lo, problems.hi)
            starts.append(one_opt(problems.P, problems.q, problems.r, z, problems.lo, problems.hi))
        best = min(best, time.process_time() - start)
    return starts, best / sum(problems.batch_size for problems in batches)


def selected_problems(batches: list[QuadraticProblems], starts: list[torch.Tensor], count: int) -> tuple[list, list]:
    """``count`` ``(batch, index)`` pairs evenly spread over all batches, and those problems as
    ``(batch of one, z0)``."""
    total = sum(problems.batch_size for problems in batches)
    flat = [(b, i) for b, problems in enumerate(batches) for i in range(problems.batch_size)]
    chosen = [flat[int(k)] for k in np.linspace(0, total - 1, min(count, total)).round()]
    return chosen, [(batches[b].select(i), starts[b][i].numpy()) for b, i in chosen]


def numpy_problem(problem: QuadraticProblems) -> tuple:
    """``(P, q, r, lo, hi)`` of a batch of one as numpy arrays."""
    return problem.P[0].numpy(), problem.q[0].numpy(), float(problem.r[0]), problem.lo[0].numpy(), problem.hi[0].numpy()


def sdp_multipliers(batches: list[QuadraticProblems], chosen: list[tuple[int, int]]) -> tuple[list[tuple], float]:
    """``(lam, mu, origin)`` of the SDP dual (with the box) of the chosen problems, solved on every whole
    batch as a study would (after a warm-up on two problems), and the time per problem."""
    solve_dual(batches[0].select([0, 1]))
    start = time.process_time()
    solutions = [solve_dual(problems) for problems in batches]
    seconds = (time.process_time() - start) / sum(problems.batch_size for problems in batches)
    names = ("lam", "mu", "origin")
    return [tuple(getattr(solutions[b], name)[i].numpy() for name in names) for b, i in chosen], seconds


def load_reference(path: str):
    """The module ``path`` (another version of ``quantization/qp_exact.py``)."""
    spec = importlib.util.spec_from_file_location("qp_exact_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def timed(solve, repeats: int) -> Row:
    """``(ub, lb, status, nodes, seconds)`` of ``solve()``, the best time of ``repeats`` runs."""
    best = None
    for _ in range(repeats):
        start = time.process_time()
        result = solve()
        seconds = time.process_time() - start
        if best is None or seconds < best[4]:
            best = (result.ub, result.lb, result.status, result.nodes, seconds)
    return best


class Gurobi:
    """Gurobi 13 on one problem at a time: single thread, ``MIPGap=1e-9``, the heuristic start as MIP start;
    ``ub`` is ``f`` of its point evaluated in float64 (its ``ObjVal`` differs by ~1e-11 on near-zero optima)."""

    def __init__(self, time_limit: float) -> None:
        import gurobipy  # optional: only this bench uses it

        self.gp, self.GRB = gurobipy, gurobipy.GRB
        self.env = gurobipy.Env(empty=True)
        self.env.setParam("OutputFlag", 0)
        self.env.start()
        self.time_limit = time_limit
        self.names = {self.GRB.OPTIMAL: "optimal", self.GRB.TIME_LIMIT: "time_limit"}

    def __call__(self, P, q, r, lo, hi, z0) -> Row:
        start = time.process_time()
        model = self.gp.Model(env=self.env)
        model.Params.TimeLimit = self.time_limit
        model.Params.Threads = 1
        model.Params.MIPGap = 1e-9
        z = model.addMVar(q.shape[0], lb=lo, ub=hi, vtype=self.GRB.INTEGER)
        z.Start = z0
        model.setObjective(z @ P @ z + 2.0 * (z @ q) + r, self.GRB.MINIMIZE)
        model.optimize()
        seconds = time.process_time() - start
        point = np.round(z.X)
        value = float(point @ P @ point + 2.0 * (q @ point) + r)  # in float64 as ours (Gurobi's ObjVal is looser)
        row = (value, model.ObjBound, self.names.get(model.Status, str(model.Status)), int(model.NodeCount), seconds)
        model.dispose()
        return row


def disagreements(reference: list[Row], other: list[Row]) -> int:
    """Problems on which two solvers' results are inconsistent (see the module doc)."""
    bad = 0
    for (ub_a, lb_a, status_a, *_), (ub_b, lb_b, status_b, *_) in zip(reference, other):
        tolerance = AGREEMENT_RTOL * max(abs(ub_a), abs(ub_b))
        if status_a == "optimal" and status_b == "optimal":
            bad += abs(ub_a - ub_b) > tolerance
        elif status_a == "optimal":
            bad += not lb_b - tolerance <= ub_a <= ub_b + tolerance
        elif status_b == "optimal":
            bad += not lb_a - tolerance <= ub_b <= ub_a + tolerance
    return bad


def summary(name: str, rows: list[Row], added_seconds: float, optima: list[float]) -> str:
    """Time per problem (mean, median, max; the mean with ``added_seconds`` per problem: the start, the SDP;
    the sum), nodes, statuses, and the mean of ``lb / optimum`` over the problems with a positive optimum."""
    seconds = [row[4] + added_seconds for row in rows]
    nodes = [row[3] for row in rows]
    ratios = [row[1] / best for row, best in zip(rows, optima) if best > 0]
    bound = f"lb/opt mean {statistics.fmean(ratios):.4f} min {min(ratios):.4f}" if ratios else "lb/opt -"
    return (
        f"  {name:10s} mean {statistics.fmean(seconds) * 1e3:8.1f} ms  "
        f"median {statistics.median(seconds) * 1e3:8.1f} ms"
        f"  max {max(seconds) * 1e3:8.1f} ms  sum {sum(seconds):7.2f} s | nodes mean {statistics.fmean(nodes):9.0f} "
        f"max {max(nodes):9d} | {dict(Counter(row[2] for row in rows))} | {bound}"
    )


@click.command()
@click.option("--layer", type=click.Choice(LAYERS), default=LAYERS[0], show_default=True)
@click.option("--num-problems", type=click.IntRange(1), default=80, show_default=True,
              help="Problems, evenly spread over all chunks and channels (more than there are: all).")
@click.option("--n-bits", type=click.IntRange(2, 8), default=4, show_default=True)
@click.option("--opt-dim", type=click.IntRange(1), default=32, show_default=True, help="Inputs per chunk.")
@click.option("--images", type=click.IntRange(1, len(SAMPLE_PHOTOS)), default=len(SAMPLE_PHOTOS), show_default=True,
              help="Sample photos the layer's inputs are captured on.")
@click.option("--node-limit", type=click.IntRange(1), default=DEFAULT_NODE_LIMIT, show_default=True,
              help="Our node limit (no clock).")
@click.option("--time-limit", type=click.FloatRange(0, min_open=True), default=10.0, show_default=True,
              help="Seconds per problem for Gurobi, the box solver and the reference.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True,
              help="Runs of ours, the reference and the start; the best time per problem counts.")
@click.option("--reference", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Another version of quantization/qp_exact.py to time side by side.")
@click.option("--box/--no-box", default=False, show_default=True, help="Also run the previous solver (slow).")
@click.option("--sdp/--no-sdp", default=True, show_default=True, help="Also run ours with SDP multipliers.")
@click.option("--gurobi/--no-gurobi", default=True, show_default=True, help="Also run Gurobi (if importable).")
@click.option("--per-problem", is_flag=True, help="Print every problem's row.")
def main(layer: str, num_problems: int, n_bits: int, opt_dim: int, images: int, node_limit: int, time_limit: float,
         repeats: int, reference: str | None, box: bool, sdp: bool, gurobi: bool, per_problem: bool) -> None:
    torch.manual_seed(0)
    batches = layer_batches(layer, n_bits, opt_dim, images)
    starts, start_seconds = starting_points(batches, repeats)
    chosen, problems = selected_problems(batches, starts, num_problems)
    sizes = Counter(problem.n for problem, _ in problems)
    solvers = {"ours": lambda args, z0, extra: solve_exact(*args, node_limit=node_limit, z0=z0, **extra)}
    added = {"ours": start_seconds}
    multipliers = [{}] * len(problems)
    if sdp:
        found, dual_seconds = sdp_multipliers(batches, chosen)
        multipliers = [{"multipliers": m} for m in found]
        solvers["ours+sdp"] = lambda args, z0, extra: solve_exact(*args, node_limit=node_limit, z0=z0, **extra)
        added["ours+sdp"] = start_seconds + dual_seconds
    if reference is not None:
        module = load_reference(reference)
        solvers["reference"] = lambda args, z0, extra: module.solve_exact(*args, time_limit=time_limit, z0=z0)
        added["reference"] = start_seconds
    if box:
        solvers["box"] = lambda args, z0, extra: solve_exact_box(*args, time_limit=time_limit, z0=z0)
        added["box"] = start_seconds
    runner = None
    if gurobi:
        try:
            runner = Gurobi(time_limit)
        except ImportError:
            runner = None
    for name, solve in solvers.items():  # warm-up
        solve(numpy_problem(problems[0][0]), problems[0][1], multipliers[0] if name == "ours+sdp" else {})
    rows: dict[str, list[Row]] = {name: [] for name in solvers}
    rows.update({"gurobi": []} if runner is not None else {})
    for k, (problem, z0) in enumerate(problems):
        args = numpy_problem(problem)
        for name, solve in solvers.items():
            extra = multipliers[k] if name == "ours+sdp" else {}
            count = 1 if name == "box" else repeats
            rows[name].append(timed(partial(solve, args, z0, extra), count))
        if runner is not None:
            rows["gurobi"].append(runner(*args, z0))
        if per_problem:
            click.echo(f"  problem {k:3d} {chosen[k]}: " + " | ".join(
                f"{name} {row[-1][2]} ub {row[-1][0]:.6g} lb {row[-1][1]:.6g} {row[-1][4] * 1e3:.0f} ms"
                for name, row in rows.items()))
    optima = [min(table[k][0] for table in rows.values() if table[k][2] == "optimal") if any(
        table[k][2] == "optimal" for table in rows.values()) else math.nan for k in range(len(problems))]
    click.echo(
        f"{layer} of efficientnet_lite0, {images} photos, INT{n_bits}, {len(problems)} problems "
        f"({', '.join(f'{c} of n={n}' for n, c in sorted(sizes.items()))}); ours: node limit {node_limit}, no "
        f"clock; others: {time_limit:g} s; {torch.get_num_threads()} torch threads\n"
        f"  start one_opt(sequential_rounding): {start_seconds * 1e3:.2f} ms per problem (batched, best of {repeats}),"
        f" included in the times of ours{', the SDP dual in ours+sdp' if sdp else ''}"
    )
    for name, table in rows.items():
        line = summary(name, table, added.get(name, 0.0), optima)
        if name != "ours":
            line += f" | disagreements with ours: {disagreements(rows['ours'], table)}"
        click.echo(line)
    if runner is None and gurobi:
        click.echo("  gurobi: gurobipy not importable, skipped")
    ours = statistics.fmean(row[4] for row in rows["ours"]) + start_seconds
    for name, table in rows.items():
        if name != "ours":
            other = statistics.fmean(row[4] for row in table) + added.get(name, 0.0)
            click.echo(f"  {name} / ours mean time: {other / ours:.2f}")
    gaps = [(row[0] - row[1]) / max(abs(row[0]), np.finfo(np.float64).tiny) for row in rows["ours"]]
    click.echo(f"  ours: largest (ub - lb) / ub = {max(gaps):.2e}, all lb <= ub: {all(g >= 0 for g in gaps)}, "
               f"all lb finite: {all(math.isfinite(row[1]) for row in rows['ours'])}")


if __name__ == "__main__":
    main()
