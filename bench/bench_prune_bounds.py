#!/usr/bin/env python
"""Time the exact sparse least-squares solver against Gurobi (when installed), row by row.

Every problem is ``min (w - x)'G(w - x)`` with at most ``k`` nonzeros in ``x``: an output channel's
weights on one chunk of a layer's inputs, ``G`` the chunk's Gram matrix from EfficientNet-Lite0
(ImageNet weights) on the 5 bundled sample photos, as the CLI's ``prune-bounds-data-opt`` builds
them (:mod:`studies.layer_problems`; ``k`` = the CLI's count at 75 % sparsity). The rows (issue 10),
each a deterministic problem set (the first channels of a layer):

========  =====================================================================================
row       problems
========  =====================================================================================
pc32_8    ``_blocks.5._project_conv`` chunk 0 (inputs 0-31), channels 0-79, k = 8
pc32_4    the same chunk, channels 0-15, k = 4
head32_8  ``_conv_head`` chunk 0 (inputs 0-31), channels 0-23, k = 8
hard      the 10 problems of ``_blocks.5._project_conv`` (all 8 chunks, 640 problems, k = 8) that
          took the most nodes with the solver of commit 435b799 (the ones the CLI's 10 s limit
          stopped under load): ``HARD_PROBLEMS`` (chunk, channel)
stem27_7  ``_conv_stem`` whole channels (3 x 3 x 3 = 27 inputs), channels 0-7, k = 7
pc16_4    ``_blocks.5._project_conv`` chunk 7 (inputs 224-239, the layer's last chunk), channels 0-19, k = 4
pc9_2     ``_blocks.5._project_conv`` inputs 0-8 (``--opt-dim 9``, chunk 0), channels 0-7, k = 2
========  =====================================================================================

Per row, interleaved problem by problem in this process: ours one at a time
(:func:`pruning.sparse_ls.solve_exact`, everything included: diagonal split, heuristics, search)
and Gurobi (single thread, ``MIPGap = 1e-9``; the indicator formulation ``z_i = 0 -> x_i = 0`` by
default, or big-M with the valid bound ``|x_i| <= sqrt(w'Gw / lambda_min(G))``; the model is built
before the clock starts, its building time is reported separately); then ours on the whole row
at once (:func:`pruning.sparse_ls.solve_exact_batch`, best of ``--repeats``). Prints the mean CPU
milliseconds per problem (``time.process_time``; both sides single-threaded, so other processes' load does
not count), the ratios Gurobi / ours, our statuses and nodes, and whether the optima agree: the largest
``|ours - Gurobi| / ours`` of the errors, and that each side's lower bound is at most the other side's error
(up to ``1e-9`` relative). Gurobi is optional (pinned in
``bench/requirements.txt``; its size-limited pip licence suffices); without it that column is skipped.

    python bench/bench_prune_bounds.py
    python bench/bench_prune_bounds.py --rows pc9_2,pc16_4 --max-problems 4 --repeats 1
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.registry import load_model
from pruning.sparse_ls import DEFAULT_NODE_LIMIT, solve_exact, solve_exact_batch
from studies.layer_problems import collect_layer_data
from studies.prune_bounds import kept_weights
from utils.calibration import load_calibration_images

PROJECT, HEAD, STEM = "_blocks.5._project_conv", "_conv_head", "_conv_stem"
HARD_PROBLEMS = ((1, 78), (1, 41), (1, 24), (5, 28), (1, 58), (1, 57), (1, 5), (1, 11), (1, 50), (5, 45))
ROWS = ("pc32_8", "pc32_4", "head32_8", "hard", "stem27_7", "pc16_4", "pc9_2")
SPARSITY = 0.75


def row_problems(row: str, layers: dict) -> tuple[str, torch.Tensor, torch.Tensor, int]:
    """``(description, G (B, n, n), W (B, n), k)`` of one row (module doc)."""

    def chunk(layer: str, inputs: range, channels: range) -> tuple[torch.Tensor, torch.Tensor]:
        data = layers[layer]
        index = torch.tensor(list(inputs))
        gram = data.grams[0][index][:, index]
        return gram.expand(len(channels), -1, -1).contiguous(), data.weights[list(channels)][:, index]

    if row == "hard":
        pairs = [chunk(PROJECT, range(32 * c, 32 * c + 32), range(ch, ch + 1)) for c, ch in HARD_PROBLEMS]
        grams, weights = zip(*pairs)
        G, W = torch.cat(grams), torch.cat(weights)
        description = f"{PROJECT} hardest 10 of 640"
    else:
        layer, inputs, channels, name = {
            "pc32_8": (PROJECT, range(32), range(80), f"{PROJECT} chunk 0"),
            "pc32_4": (PROJECT, range(32), range(16), f"{PROJECT} chunk 0"),
            "head32_8": (HEAD, range(32), range(24), f"{HEAD} chunk 0"),
            "stem27_7": (STEM, range(27), range(8), f"{STEM} whole channels"),
            "pc16_4": (PROJECT, range(224, 240), range(20), f"{PROJECT} chunk 7"),
            "pc9_2": (PROJECT, range(9), range(8), f"{PROJECT} inputs 0-8"),
        }[row]
        G, W = chunk(layer, inputs, channels)
        description = name
    n = W.shape[1]
    k = {"pc32_4": 4, "pc9_2": 2}.get(row, kept_weights(n, SPARSITY))
    return description, G, W, k


def gurobi_solver(formulation: str):
    """A function ``(G, w, k) -> (error, bound, status, build_s, solve_s, nodes)`` or ``None`` without gurobipy."""
    try:
        import gurobipy as gp
    except ImportError:
        return None
    env = gp.Env(empty=True)
    env.setParam("OutputFlag", 0)
    env.start()

    def solve(G: np.ndarray, w: np.ndarray, k: int):
        start = time.process_time()
        n = w.size
        b = G @ w
        r = float(w @ b)
        model = gp.Model(env=env)
        model.Params.Threads = 1
        model.Params.MIPGap = 1e-9
        x = model.addMVar(n, lb=-gp.GRB.INFINITY)
        z = model.addMVar(n, vtype=gp.GRB.BINARY)
        model.addConstr(z.sum() <= k)
        if formulation == "indicator":
            for i in range(n):
                model.addGenConstrIndicator(z[i].item(), False, x[i].item() == 0.0)
        else:  # |x_i|^2 <= x'Gx / lambda_min <= r / lambda_min at every refit (x'Gx = b'x <= r)
            big_m = float(np.sqrt(r / np.linalg.eigvalsh(G)[0]))
            model.addConstr(x <= big_m * z)
            model.addConstr(x >= -big_m * z)
        model.setObjective(x @ G @ x - 2.0 * b @ x + r)
        model.update()
        built = time.process_time()
        model.optimize()
        solved = time.process_time()
        status = {gp.GRB.OPTIMAL: "optimal", gp.GRB.TIME_LIMIT: "time_limit"}.get(model.Status, str(model.Status))
        return model.ObjVal, model.ObjBound, status, built - start, solved - built, int(model.NodeCount)

    return solve


@click.command()
@click.option("--rows", default=",".join(ROWS), show_default=True, help="Comma-separated rows (module doc).")
@click.option("--max-problems", type=click.IntRange(1), default=None,
              help="At most this many problems per row (the first ones) for a quick run.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True, help="Best of this many batched runs.")
@click.option("--gurobi-formulation", type=click.Choice(["indicator", "bigm"]), default="indicator", show_default=True)
@click.option("--node-limit", type=click.IntRange(1), default=DEFAULT_NODE_LIMIT, show_default=True,
              help="Our solver's node limit per problem.")
def main(rows: str, max_problems: int | None, repeats: int, gurobi_formulation: str, node_limit: int) -> None:
    chosen = [row.strip() for row in rows.split(",") if row.strip()]
    unknown = sorted(set(chosen) - set(ROWS))
    if unknown:
        raise click.BadParameter(f"unknown rows {unknown}; choose from {', '.join(ROWS)}", param_hint="'--rows'")
    torch.manual_seed(0)
    layers = collect_layer_data(load_model("efficientnet_lite0"), [PROJECT, HEAD, STEM],
                                load_calibration_images(None, 5, 0))
    gurobi = gurobi_solver(gurobi_formulation)
    if gurobi is None:
        click.echo("gurobipy is not installed: the Gurobi column is skipped (pip install -r bench/requirements.txt)")
    click.echo(f"CPU ms per problem; ours: node limit {node_limit}, 1 thread; Gurobi: {gurobi_formulation}, 1 thread, "
               "MIPGap 1e-9, model building excluded (shown as 'build')")
    header = (f"{'row':9s} {'(n, k)':8s} {'B':>3s} {'ours':>8s} {'batched':>8s} {'Gurobi':>8s} {'build':>6s} "
              f"{'G/ours':>7s} {'G/batch':>7s}  {'agree':>9s}  ours nodes mean/max, statuses; Gurobi nodes mean")
    click.echo(header)
    _, G, W, k = row_problems("pc9_2", layers)  # warm up both solvers (first calls load and allocate)
    solve_exact(G[0], W[0], k)
    if gurobi is not None:
        gurobi(G[0].numpy(), W[0].numpy(), k)
    for row in chosen:
        description, G, W, k = row_problems(row, layers)
        if max_problems is not None:
            G, W = G[:max_problems], W[:max_problems]
        B, n = W.shape
        ours, theirs = [], []
        for p in range(B):
            start = time.process_time()
            ours.append(solve_exact(G[p], W[p], k, node_limit=node_limit))
            ours[-1] = (ours[-1], time.process_time() - start)
            if gurobi is not None:
                theirs.append(gurobi(G[p].numpy(), W[p].numpy(), k))
        batch_seconds = []
        for _ in range(repeats):
            start = time.process_time()
            batch = solve_exact_batch(G, W, k, node_limit=node_limit)
            batch_seconds.append(time.process_time() - start)
        single_ms = 1e3 * float(np.mean([seconds for _, seconds in ours]))
        batch_ms = 1e3 * min(batch_seconds) / B
        results = [result for result, _ in ours]
        nodes = np.array([result.nodes for result in results])
        statuses = dict(Counter(result.status for result in results))
        same = max(abs(a.ub - b.ub) / max(a.ub, 1e-300) for a, b in zip(results, batch))
        line = f"{row:9s} {f'({n}, {k})':8s} {B:3d} {single_ms:8.1f} {batch_ms:8.1f} "
        if theirs:
            gurobi_ms = 1e3 * float(np.mean([t[4] for t in theirs]))
            build_ms = 1e3 * float(np.mean([t[3] for t in theirs]))
            difference = max(abs(t[0] - result.ub) / max(result.ub, 1e-300) for t, result in zip(theirs, results))
            consistent = all(result.lb <= t[0] * (1 + 1e-9) + 1e-12 and t[1] <= result.ub * (1 + 1e-9) + 1e-12
                             for t, result in zip(theirs, results))
            agree = f"{difference:.1e}{'' if consistent else '!'}"
            line += (f"{gurobi_ms:8.1f} {build_ms:6.1f} {gurobi_ms / single_ms:7.2f} {gurobi_ms / batch_ms:7.2f}  "
                     f"{agree:>9s}  ")
            tail = f"; Gurobi {dict(Counter(t[2] for t in theirs))}, nodes {np.mean([t[5] for t in theirs]):.0f}"
        else:
            line += f"{'-':>8s} {'-':>6s} {'-':>7s} {'-':>7s}  {'-':>9s}  "
            tail = ""
        click.echo(f"{line}{nodes.mean():.0f}/{nodes.max()}, {statuses}{tail}  [{description}; batched = single "
                   f"within {same:.0e}]")


if __name__ == "__main__":
    main()
