#!/usr/bin/env python
"""Time the exact integer-QP solver (quantization/qp_exact.py) on a real layer's problems (issue 4).

The problems are those of ``post_training_quant_acts_sqnr.py quant-bounds-data-opt --layer-name
_blocks.5._project_conv --exact``: EfficientNet-Lite0's 1x1 projection conv (80 outputs, 240
inputs) on the 5 scikit-image sample photos, one problem per output channel and chunk of
``--opt-dim`` inputs (240/32: seven chunks of 32 and one of 16), ``--n-bits`` with the step from
the per-tensor MSE range. ``--num-problems`` of them, evenly spread over all chunks, are solved by

* ``ellipsoid``: :func:`quantization.qp_exact.solve_exact` as the study calls it (best of ``--repeats``
  per problem, after a warm-up);
* ``ellipsoid+sdp``: the same with the SDP dual's multipliers (:func:`quantization.qp_bounds.solve_dual`
  on all the layer's problems, its time per problem added) instead of the box's, as a comparison;
* ``box`` (unless ``--no-box``): the previous solver (``node_bound="box"``), once;
* Gurobi, when ``gurobipy`` is importable (``MIPGap=1e-9``, model building included).

The starting point of every search is ``one_opt(sequential_rounding)``, computed for all problems at
once (its time per problem is printed and included in the totals). Printed per solver: seconds per
problem (mean, median, max), nodes, statuses, the mean ratio to the commercial solver's 0.13 s per
problem quoted in the issue; and whether the solvers agree on the optimum (both optimal: values
within ``1e-9`` relative; otherwise each proven optimum inside the other's ``[lb, ub]``).

    python bench/bench_qp_exact.py                    # ~5 min, most of it the box solver
    python bench/bench_qp_exact.py --no-box --num-problems 640
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.registry import load_model  # noqa: E402
from quantization.ptq_rounding import one_opt, sequential_rounding  # noqa: E402
from quantization.qp_bounds import QuadraticProblems, solve_dual  # noqa: E402
from quantization.qp_exact import solve_exact  # noqa: E402
from studies.layer_problems import collect_layer_data  # noqa: E402
from studies.quant_bounds import QuantBoundsConfig, layer_problem_sets, layer_step_sizes  # noqa: E402
from utils.calibration import load_calibration_images  # noqa: E402
from utils.images import SAMPLE_PHOTOS  # noqa: E402

LAYER = "_blocks.5._project_conv"
COMMERCIAL_SECONDS = 0.13  # a commercial MIQP solver's time per problem quoted in issue 4
AGREEMENT_RTOL = 1e-9


def layer_batches(n_bits: int, opt_dim: int, n_images: int) -> list[QuadraticProblems]:
    """One batch per chunk of inputs, one problem per output channel, with the ``n_bits`` box (as the CLI)."""
    model = load_model("efficientnet_lite0")
    data = collect_layer_data(model, [LAYER], load_calibration_images(None, n_images, seed=0))[LAYER]
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
        start = time.perf_counter()
        starts = []
        for problems in batches:
            z = sequential_rounding(problems.P, problems.q, problems.lo, problems.hi)
            starts.append(one_opt(problems.P, problems.q, problems.r, z, problems.lo, problems.hi))
        best = min(best, time.perf_counter() - start)
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
    start = time.perf_counter()
    solutions = [solve_dual(problems) for problems in batches]
    seconds = (time.perf_counter() - start) / sum(problems.batch_size for problems in batches)
    names = ("lam", "mu", "origin")
    return [tuple(getattr(solutions[b], name)[i].numpy() for name in names) for b, i in chosen], seconds


def run_ours(problems: list, time_limit: float, node_bound: str, multipliers: list | None = None) -> list:
    """``[(ub, lb, status, nodes, seconds)]``, seconds measured around :func:`solve_exact`."""
    rows = []
    for k, (problem, z0) in enumerate(problems):
        extra = {} if multipliers is None else {"multipliers": multipliers[k]}
        start = time.perf_counter()
        result = solve_exact(*numpy_problem(problem), time_limit=time_limit, z0=z0, node_bound=node_bound, **extra)
        rows.append((result.ub, result.lb, result.status, result.nodes, time.perf_counter() - start))
    return rows


def run_gurobi(problems: list, time_limit: float) -> list | None:
    """Gurobi on the same problems (``None`` when ``gurobipy`` is not installed)."""
    try:
        import gurobipy as gp
        from gurobipy import GRB
    except ImportError:
        return None
    names = {GRB.OPTIMAL: "optimal", GRB.TIME_LIMIT: "time_limit"}
    env = gp.Env(empty=True)
    env.setParam("OutputFlag", 0)
    env.start()
    rows = []
    for problem, z0 in problems:
        P, q, r, lo, hi = numpy_problem(problem)
        start = time.perf_counter()
        model = gp.Model(env=env)
        model.Params.TimeLimit = time_limit
        model.Params.MIPGap = 1e-9
        z = model.addMVar(q.shape[0], lb=lo, ub=hi, vtype=GRB.INTEGER)
        z.Start = z0
        model.setObjective(z @ P @ z + 2.0 * (z @ q) + r, GRB.MINIMIZE)
        model.optimize()
        seconds = time.perf_counter() - start
        status = names.get(model.Status, str(model.Status))
        rows.append((model.ObjVal, model.ObjBound, status, int(model.NodeCount), seconds))
        model.dispose()
    env.dispose()
    return rows


def agreement(reference: list, other: list) -> int:
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


def summary(name: str, rows: list, added_seconds: float) -> str:
    """Search time per problem (mean, median, max), nodes, statuses; the mean with ``added_seconds`` per
    problem (the start, the SDP) and its ratio to the commercial solver's time."""
    seconds = [row[4] for row in rows]
    nodes = [row[3] for row in rows]
    total = statistics.fmean(seconds) + added_seconds
    return (
        f"  {name:14s} search mean {statistics.fmean(seconds) * 1e3:7.1f} ms  median "
        f"{statistics.median(seconds) * 1e3:7.1f} ms  max {max(seconds) * 1e3:7.1f} ms | nodes mean "
        f"{statistics.fmean(nodes):8.0f} max {max(nodes):8d} | {dict(Counter(row[2] for row in rows))} | "
        f"total mean {total * 1e3:7.1f} ms = {total / COMMERCIAL_SECONDS:.3f} x {COMMERCIAL_SECONDS} s"
    )


@click.command()
@click.option("--num-problems", type=click.IntRange(1), default=80, show_default=True,
              help="Problems, evenly spread over all chunks and channels.")
@click.option("--n-bits", type=click.IntRange(2, 8), default=4, show_default=True)
@click.option("--opt-dim", type=click.IntRange(1), default=32, show_default=True, help="Inputs per chunk.")
@click.option("--images", type=click.IntRange(1, len(SAMPLE_PHOTOS)), default=len(SAMPLE_PHOTOS), show_default=True,
              help="Sample photos the layer's inputs are captured on.")
@click.option("--time-limit", type=click.FloatRange(0, min_open=True), default=10.0, show_default=True,
              help="Seconds per problem for every solver.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True,
              help="Runs of the default solver and of the start; the best time per problem counts.")
@click.option("--box/--no-box", default=True, show_default=True, help="Also run the previous solver (slow).")
@click.option("--sdp/--no-sdp", default=True, show_default=True,
              help="Also run the ellipsoid search with SDP multipliers.")
def main(num_problems: int, n_bits: int, opt_dim: int, images: int, time_limit: float, repeats: int, box: bool,
         sdp: bool) -> None:
    torch.manual_seed(0)
    batches = layer_batches(n_bits, opt_dim, images)
    starts, heuristic_seconds = starting_points(batches, repeats)
    chosen, problems = selected_problems(batches, starts, num_problems)
    sizes = Counter(problem.n for problem, _ in problems)
    run_ours(problems[:2], time_limit, "ellipsoid")  # warm-up
    ours = run_ours(problems, time_limit, "ellipsoid")
    for _ in range(repeats - 1):
        again = run_ours(problems, time_limit, "ellipsoid")
        ours = [min(a, b, key=lambda row: row[4]) for a, b in zip(ours, again)]
    click.echo(
        f"{LAYER} of efficientnet_lite0, {images} photos, INT{n_bits}, {len(problems)} problems "
        f"({', '.join(f'{k} of n={n}' for n, k in sorted(sizes.items()))}), time limit {time_limit:g} s, "
        f"{torch.get_num_threads()} torch threads\n"
        f"  start one_opt(sequential_rounding): {heuristic_seconds * 1e3:.2f} ms per problem (batched, best of "
        f"{repeats}), included in the totals\n"
        + summary("ellipsoid", ours, heuristic_seconds) + f" (best of {repeats})"
    )
    if sdp:
        multipliers, dual_seconds = sdp_multipliers(batches, chosen)
        with_sdp = run_ours(problems, time_limit, "ellipsoid", multipliers)
        click.echo(summary("ellipsoid+sdp", with_sdp, heuristic_seconds + dual_seconds)
                   + f" (solve_dual {dual_seconds * 1e3:.1f} ms per problem in the total); "
                   f"disagreements with ellipsoid: {agreement(ours, with_sdp)}")
    if box:
        reference = run_ours(problems, time_limit, "box")
        click.echo(summary("box (previous)", reference, heuristic_seconds)
                   + f"; disagreements with ellipsoid: {agreement(ours, reference)}")
        ratio = statistics.fmean(row[4] for row in reference) / statistics.fmean(row[4] for row in ours)
        click.echo(f"  previous / ellipsoid search time: {ratio:.1f}x")
    gurobi = run_gurobi(problems, time_limit)
    if gurobi is None:
        click.echo("  gurobi: gurobipy not importable, skipped")
    else:
        click.echo(summary("gurobi", gurobi, 0.0) + f"; disagreements with ellipsoid: {agreement(ours, gurobi)}")
        ours_total = statistics.fmean(row[4] for row in ours) + heuristic_seconds
        ratio = ours_total / statistics.fmean(row[4] for row in gurobi)
        click.echo(f"  ellipsoid / gurobi time: {ratio:.2f}")
    gaps = [(row[0] - row[1]) / max(abs(row[0]), np.finfo(np.float64).tiny) for row in ours]
    click.echo(f"  ellipsoid: largest (ub - lb) / ub = {max(gaps):.2e}, all lb <= ub: {all(g >= 0 for g in gaps)}, "
               f"all lb finite: {all(math.isfinite(row[1]) for row in ours)}")


if __name__ == "__main__":
    main()
