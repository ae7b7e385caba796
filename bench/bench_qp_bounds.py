#!/usr/bin/env python
"""Time the paper's post-training quantization bound (SDP + randomized rounding) against ours (paper Sec. 4).

The problems are those of ``post_training_quant_acts_sqnr.py quant-bounds-data-opt --layer-name
_blocks.5._project_conv``: EfficientNet-Lite0's 1x1 conv with 240 inputs and 80 output channels on
the scikit-image sample photos, one problem per output channel and chunk of ``--chunk`` inputs
(240/32: seven chunks of 32 and one of 16), the step from the per-tensor MSE range at ``--bits``.

* The paper's method, per problem: the SDP by cvxpy (Clarabel at tolerances 1e-10 by default, timed
  with cvxpy's model building, as a user would run it), then ``3n`` Gaussian samples around its
  primal ``x`` with covariance ``X - xx'``, rounded, and 1-opt.
* Ours: :func:`quantization.qp_bounds.solve_dual` on each chunk size's batch at once, then the same
  rounding and 1-opt batched, and GPTQ-style sequential rounding + 1-opt; the better of the two is
  our upper bound (after a warm-up run).

Prints seconds per problem of each and their ratio; over the reference problems, the largest
relative difference ``|ours - reference| / |reference|`` of the bounds, the largest excess
``(ours - reference) / |reference|`` (positive would mean our certified bound exceeds the SDP
optimum, beyond the reference's tolerance), the largest relative gap certificate ``sdp_gap``; and
the summed rounding errors (upper bounds) of both and the number of problems where ours is worse.

    python bench/bench_qp_bounds.py --device cpu
    python bench/bench_qp_bounds.py --box --reference-problems 80
"""
from __future__ import annotations

import math
import sys
import time
from collections import Counter
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.registry import load_model
from quantization.ptq_rounding import one_opt, randomized_rounding, sequential_rounding
from quantization.qp_bounds import QuadraticProblems, solve_dual, solve_sdp_cvxpy
from studies.layer_problems import collect_layer_data
from studies.quant_bounds import QuantBoundsConfig, layer_problem_sets, layer_step_sizes
from utils.calibration import load_calibration_images
from utils.cli import DeviceType
from utils.images import SAMPLE_PHOTOS

LAYER = "_blocks.5._project_conv"


def layer_problems(n_bits: int, chunk: int, n_images: int) -> list[QuadraticProblems]:
    """One batch per chunk of inputs, each with one problem per output channel and the b-bit box (as the CLI)."""
    model = load_model("efficientnet_lite0")
    data = collect_layer_data(model, [LAYER], load_calibration_images(None, n_images, seed=0))[LAYER]
    config = QuantBoundsConfig(n_bits=n_bits, opt_dim=chunk, max_whole_dim=0)
    step = layer_step_sizes(data.weights, n_bits, "mse", per_channel=False)
    return [problems for _, _, _, problems, _ in layer_problem_sets(data, torch.arange(data.out_channels), step, config)]


def rounding_error(problems: QuadraticProblems, center: torch.Tensor, covariance: torch.Tensor, seed: int) -> torch.Tensor:
    """The paper's upper bound: ``3n`` samples around the relaxation's solution, rounded into the box, 1-opt; ``f``."""
    lo, hi, P, q, r = problems.lo, problems.hi, problems.P, problems.q, problems.r
    generator = torch.Generator(device=P.device).manual_seed(seed)
    center = torch.clamp(center, lo, hi)
    z = randomized_rounding(P, q, r, lo, hi, 3 * problems.n, generator, center=center, spread=covariance)
    return problems.objective(one_opt(P, q, r, z, lo, hi))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gptq_error(problems: QuadraticProblems) -> torch.Tensor:
    """``f`` of GPTQ-style sequential rounding followed by 1-opt (one of the CLI's methods)."""
    lo, hi, P, q, r = problems.lo, problems.hi, problems.P, problems.q, problems.r
    return problems.objective(one_opt(P, q, r, sequential_rounding(P, q, lo, hi), lo, hi))


def ours(batches: list[QuadraticProblems], box: bool, tol: float) -> tuple[list, list[torch.Tensor]]:
    """Our bounds, and our upper bounds: the better of the paper's rounding (from our SDP point) and GPTQ + 1-opt."""
    solutions = [solve_dual(problems if box else problems.without_box(), tol=tol) for problems in batches]
    errors = [
        torch.minimum(rounding_error(p, s.x, s.covariance, seed=0), gptq_error(p)) for p, s in zip(batches, solutions)
    ]
    return solutions, errors


@click.command()
@click.option("--bits", type=click.IntRange(2, 8), default=4, show_default=True)
@click.option("--chunk", type=click.IntRange(1), default=32, show_default=True, help="Inputs per problem.")
@click.option("--images", type=click.IntRange(1, len(SAMPLE_PHOTOS)), default=len(SAMPLE_PHOTOS), show_default=True,
              help="Sample photos the layer's inputs are captured on.")
@click.option("--box/--no-box", default=False, show_default=True,
              help="Add the box multipliers (the paper's relaxation has none).")
@click.option("--tol", type=click.FloatRange(0, min_open=True), default=1e-4, show_default=True,
              help="Relative SDP gap at which our solver stops.")
@click.option("--solver", type=click.Choice(["CLARABEL", "SCS"]), default="CLARABEL", show_default=True)
@click.option("--reference-problems", type=click.IntRange(0), default=0, show_default=True,
              help="Problems solved by cvxpy, evenly spread (0: all).")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True, help="Our runs; the best counts.")
@click.option("--device", type=DeviceType(), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="torch CPU threads (default: torch's).")
def main(
    bits: int,
    chunk: int,
    images: int,
    box: bool,
    tol: float,
    solver: str,
    reference_problems: int,
    repeats: int,
    device: torch.device,
    threads: int | None,
) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    batches = [problems.to(device) for problems in layer_problems(bits, chunk, images)]
    total = sum(p.batch_size for p in batches)
    sizes = Counter(p.n for p in batches for _ in range(p.batch_size))
    ours(batches, box, tol)  # warm-up
    ours_seconds = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.process_time()
        solutions, our_errors = ours(batches, box, tol)
        synchronize(device)
        ours_seconds = min(ours_seconds, time.process_time() - start)

    flat = [(b, i) for b, problems in enumerate(batches) for i in range(problems.batch_size)]
    count = total if reference_problems == 0 else min(reference_problems, total)
    chosen = [flat[int(k)] for k in np.linspace(0, total - 1, count).round()]
    relative, excess, gaps, statuses = [], [], [], Counter()
    our_sum = reference_sum = 0.0
    worse = 0
    start = time.process_time()
    for done, (b, i) in enumerate(chosen, 1):
        single = batches[b].select(i)
        reference = solve_sdp_cvxpy(single if box else single.without_box(), 0, solver=solver, box=box)
        x = torch.as_tensor(reference.x, dtype=torch.float64, device=device)
        covariance = torch.as_tensor(reference.X, dtype=torch.float64, device=device) - torch.outer(x, x)
        origin = torch.as_tensor(reference.origin, dtype=torch.float64, device=device)
        reference_error = float(rounding_error(single, (origin + x)[None], covariance[None], seed=done)[0])
        statuses[reference.status] += 1
        bound = solutions[b].bound[i].item()
        relative.append(abs(bound - reference.value) / abs(reference.value))
        excess.append((bound - reference.value) / abs(reference.value))
        gaps.append(solutions[b].sdp_gap[i].item() / abs(bound))
        our_error = our_errors[b][i].item()
        our_sum, reference_sum = our_sum + our_error, reference_sum + reference_error
        worse += our_error > reference_error * (1 + 1e-12)
        if done % 80 == 0:
            click.echo(f"  {done}/{count} reference problems", err=True)
    reference_seconds = (time.process_time() - start) / count

    ours_per_problem = ours_seconds / total
    our_statuses = Counter(s for solution in solutions for s in solution.status)
    certified = sum(int(solution.certified.sum()) for solution in solutions)
    iterations = torch.cat([solution.iterations.cpu() for solution in solutions]).float()
    click.echo(
        f"{LAYER} of efficientnet_lite0, {images} photos, INT{bits}, {'box' if box else 'no box (paper)'}: {total} "
        f"problems ({', '.join(f'{k} of n={n}' for n, k in sorted(sizes.items()))}), device {device}, "
        f"{torch.get_num_threads()} threads\n"
        f"  ours (bound + rounding + GPTQ)  {ours_per_problem * 1e3:8.3f} ms per problem (best of {repeats}), "
        f"iterations mean {iterations.mean():.1f} max {iterations.max():.0f}, {certified}/{total} certified, "
        f"{dict(our_statuses)}\n"
        f"  paper: cvxpy/{solver} + rounding {reference_seconds * 1e3:8.1f} ms per problem over {count} problems, "
        f"{dict(statuses)}\n"
        f"  ratio     {reference_seconds / ours_per_problem:8.0f}x per problem\n"
        f"  bounds: max |ours - reference| / |reference| = {max(relative):.2e}, "
        f"max (ours - reference) / |reference| = {max(excess):+.2e}, max sdp_gap / bound = {max(gaps):.2e}\n"
        f"  rounding (upper bounds) summed over the reference problems: ours {our_sum:.6g}, paper's {reference_sum:.6g} "
        f"({our_sum / reference_sum - 1:+.2%}); ours worse on {worse}/{count} problems"
    )


if __name__ == "__main__":
    main()
