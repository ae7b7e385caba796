#!/usr/bin/env python
"""Time the batched dual solver for the SDP bound against cvxpy solving each SDP (paper Sec. 4).

The problems: EfficientNet-Lite0 ``_blocks.5._project_conv`` (240 inputs -> 80 output channels,
1x1) on scikit-image sample photos, one problem per output channel and chunk of ``--chunk`` inputs
(240/32: seven chunks of 32 and one of 16), step sizes from the per-channel MSE range of the
layer's weights at ``--bits``. Ours: :func:`quantization.qp_bounds.solve_dual` on every chunk size's
batch at once (after a warm-up run); the reference: :func:`quantization.qp_bounds.solve_sdp_cvxpy`
per problem (Clarabel at tolerances 1e-10 by default), timed with cvxpy's model building, as a user
would run it.

Prints seconds per problem of each, their ratio, and over the reference problems the largest
relative difference ``|ours - reference| / |reference|`` of the bounds, the largest excess
``(ours - reference) / |reference|`` (positive would mean our certified bound exceeds the SDP
optimum, beyond the reference's tolerance), and the largest relative gap certificate ``sdp_gap``.

    python bench/bench_qp_bounds.py --device cpu
    python bench/bench_qp_bounds.py --box --reference-problems 80
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

from models.layer_inputs import capture_layer_inputs, gram_matrices, patch_matrix  # noqa: E402
from models.registry import load_model  # noqa: E402
from quantization.qp_bounds import QuadraticProblems, solve_dual, solve_sdp_cvxpy  # noqa: E402
from quantization.quantizers import params_from_range  # noqa: E402
from quantization.range_estimators import mse_range  # noqa: E402
from utils.cli import DeviceType  # noqa: E402
from utils.images import SAMPLE_PHOTOS, sample_photo_batch  # noqa: E402

LAYER = "_blocks.5._project_conv"


def layer_problems(n_bits: int, chunk: int, n_images: int, box: bool) -> list[QuadraticProblems]:
    """One batch per chunk of inputs, each with one problem per output channel."""
    model = load_model("efficientnet_lite0")
    layer = dict(model.named_modules())[LAYER]
    inputs = capture_layer_inputs(model, [LAYER], sample_photo_batch(SAMPLE_PHOTOS[:n_images]))[LAYER]
    gram = gram_matrices(patch_matrix(layer, inputs))[0]
    weights = layer.weight.detach().reshape(layer.out_channels, -1).double()
    low, high = mse_range(weights, n_bits, ch_axis=0)
    step = params_from_range(low, high, n_bits, "symmetric").step_size
    batches = []
    for index in torch.arange(weights.shape[1]).split(chunk):
        problems = QuadraticProblems.from_gram(gram[index][:, index], weights[:, index], step, n_bits)
        batches.append(problems if box else problems.without_box())
    return batches


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@click.command()
@click.option("--bits", type=click.IntRange(2, 8), default=4, show_default=True)
@click.option("--chunk", type=click.IntRange(1), default=32, show_default=True, help="Inputs per problem.")
@click.option("--images", type=click.IntRange(1, len(SAMPLE_PHOTOS)), default=3, show_default=True,
              help="Sample photos the layer's inputs are captured on.")
@click.option("--box/--no-box", default=False, show_default=True,
              help="Add the box multipliers (the paper's relaxation has none).")
@click.option("--tol", type=click.FloatRange(0, min_open=True), default=1e-4, show_default=True,
              help="Relative SDP gap at which our solver stops.")
@click.option("--solver", type=click.Choice(["CLARABEL", "SCS"]), default="CLARABEL", show_default=True)
@click.option("--reference-problems", type=click.IntRange(0), default=0, show_default=True,
              help="Problems solved by cvxpy, evenly spread (0: all).")
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
    device: torch.device,
    threads: int | None,
) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    batches = [problems.to(device) for problems in layer_problems(bits, chunk, images, box)]
    total = sum(p.batch_size for p in batches)
    sizes = Counter(p.n for p in batches for _ in range(p.batch_size))
    for problems in batches:  # warm-up
        solve_dual(problems, tol=tol)
    synchronize(device)
    start = time.perf_counter()
    solutions = [solve_dual(problems, tol=tol) for problems in batches]
    synchronize(device)
    ours_seconds = time.perf_counter() - start

    flat = [(b, i) for b, problems in enumerate(batches) for i in range(problems.batch_size)]
    count = total if reference_problems == 0 else min(reference_problems, total)
    chosen = [flat[int(k)] for k in np.linspace(0, total - 1, count).round()]
    relative, excess, gaps, statuses = [], [], [], Counter()
    start = time.perf_counter()
    for done, (b, i) in enumerate(chosen, 1):
        reference = solve_sdp_cvxpy(batches[b], i, solver=solver, box=box)
        statuses[reference.status] += 1
        ours = solutions[b].bound[i].item()
        relative.append(abs(ours - reference.value) / abs(reference.value))
        excess.append((ours - reference.value) / abs(reference.value))
        gaps.append(solutions[b].sdp_gap[i].item() / abs(ours))
        if done % 80 == 0:
            click.echo(f"  {done}/{count} reference problems", err=True)
    reference_seconds = (time.perf_counter() - start) / count

    ours_per_problem = ours_seconds / total
    our_statuses = Counter(s for solution in solutions for s in solution.status)
    certified = sum(int(solution.certified.sum()) for solution in solutions)
    iterations = torch.cat([solution.iterations.cpu() for solution in solutions]).float()
    click.echo(
        f"{LAYER} of efficientnet_lite0, INT{bits}, {'box' if box else 'no box (paper)'}: {total} problems "
        f"({', '.join(f'{k} of n={n}' for n, k in sorted(sizes.items()))}), device {device}, "
        f"{torch.get_num_threads()} threads\n"
        f"  ours      {ours_seconds:8.4f} s for all, {ours_per_problem * 1e3:8.4f} ms per problem, "
        f"iterations mean {iterations.mean():.1f} max {iterations.max():.0f}, {certified}/{total} certified, "
        f"{dict(our_statuses)}\n"
        f"  cvxpy/{solver} {reference_seconds * 1e3:8.1f} ms per problem over {count} problems, {dict(statuses)}\n"
        f"  ratio     {reference_seconds / ours_per_problem:8.0f}x per problem\n"
        f"  bounds: max |ours - reference| / |reference| = {max(relative):.2e}, "
        f"max (ours - reference) / |reference| = {max(excess):+.2e}, max sdp_gap / bound = {max(gaps):.2e}"
    )


if __name__ == "__main__":
    main()
