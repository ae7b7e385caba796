#!/usr/bin/env python
"""Time the exact sparse least-squares solver against SCIP (and Gurobi / MOSEK when installed).

The problems (paper Sec. 4, pruning side): EfficientNet-Lite0 ``_blocks.5._project_conv`` (a 1x1
conv, 240 inputs -> 80 output channels) on the scikit-image sample photos; per output channel the
first ``--opt-dim`` inputs (one chunk), ``min (w - x)'G(w - x)`` with at most
``k = round(density * n)`` nonzeros (``--n-bits b`` means ``density = b / 16``).

Ours: :func:`pruning.sparse_ls.solve_exact_batch` on all ``--num-problems`` channels at once
(best of ``--repeats``), and :func:`pruning.sparse_ls.solve_exact` one problem at a time. The
references: :func:`pruning.sparse_ls_cvxpy.solve_mip` (big-M formulation, as the paper's MIQP)
with every installed backend on ``--reference-problems`` channels spread evenly, timed with
cvxpy's model building. Prints seconds per problem, the ratios, whether the optima agree (the
largest relative difference of the errors), and each pruning heuristic's mean relative gap to the
optimum.

    python bench/bench_prune_bounds.py
    python bench/bench_prune_bounds.py --num-problems 80 --reference-problems 4 --n-bits 3
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
from pruning.least_squares import reconstruction_error  # noqa: E402
from pruning.sparse_ls import solve_exact, solve_exact_batch  # noqa: E402
from pruning.sparse_ls_cvxpy import available_backends, solve_mip  # noqa: E402
from pruning.sparse_ls_heuristics import pruning_methods  # noqa: E402
from utils.images import SAMPLE_PHOTOS, sample_photo_batch  # noqa: E402

LAYER = "_blocks.5._project_conv"


def layer_problems(opt_dim: int, n_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, W)``: the Gram matrix of the layer's first ``opt_dim`` inputs and the weights of every channel."""
    model = load_model("efficientnet_lite0")
    layer = dict(model.named_modules())[LAYER]
    inputs = capture_layer_inputs(model, [LAYER], sample_photo_batch(SAMPLE_PHOTOS[:n_images]))[LAYER]
    gram = gram_matrices(patch_matrix(layer, inputs))[0]
    weights = layer.weight.detach().reshape(layer.out_channels, -1).double()
    return gram[:opt_dim, :opt_dim].contiguous(), weights[:, :opt_dim].contiguous()


@click.command()
@click.option("--num-problems", type=click.IntRange(1, 80), default=80, show_default=True,
              help="Output channels solved by our solver (the first ones).")
@click.option("--opt-dim", type=click.IntRange(2, 240), default=32, show_default=True, help="Inputs per problem.")
@click.option("--density", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Kept fraction of the weights (default: --n-bits / 16).")
@click.option("--n-bits", type=click.IntRange(1, 15), default=4, show_default=True,
              help="Bit-width whose compression ratio sets the density b / 16.")
@click.option("--time-limit", type=click.FloatRange(0, min_open=True), default=60.0, show_default=True,
              help="Seconds per problem, ours and the references.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True, help="Best of this many batched runs.")
@click.option("--reference-problems", type=click.IntRange(0), default=3, show_default=True,
              help="Problems solved by each installed MIP backend, evenly spread (SCIP takes 20-40 s each).")
@click.option("--images", type=click.IntRange(1, len(SAMPLE_PHOTOS)), default=len(SAMPLE_PHOTOS), show_default=True,
              help="Sample photos the layer's inputs are captured on.")
def main(num_problems: int, opt_dim: int, density: float | None, n_bits: int, time_limit: float, repeats: int,
         reference_problems: int, images: int) -> None:
    gram, weights = layer_problems(opt_dim, images)
    weights = weights[:num_problems]
    n = gram.shape[0]
    density = n_bits / 16 if density is None else density
    k = round(density * n)
    click.echo(f"{LAYER} of efficientnet_lite0 on {images} sample photos: {num_problems} problems, n = {n}, "
               f"k = {k} (density {density:.4g}), cond(G) = {float(torch.linalg.cond(gram)):.3g}, "
               f"{torch.get_num_threads()} torch threads outside the solver")

    batch_seconds, results = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        results = solve_exact_batch(gram, weights, k, time_limit=time_limit)
        batch_seconds.append(time.perf_counter() - start)
    batch_per_problem = min(batch_seconds) / num_problems
    start = time.perf_counter()
    singles = [solve_exact(gram, w, k, time_limit=time_limit) for w in weights]
    single_per_problem = (time.perf_counter() - start) / num_problems
    statuses = Counter(r.status for r in results)
    nodes = np.array([r.nodes for r in results])
    optima = np.array([r.ub for r in results])
    agree = max(abs(a.ub - b.ub) / max(a.ub, 1e-300) for a, b in zip(results, singles))
    click.echo(
        f"  ours, batched    {batch_per_problem:8.4f} s per problem (best of {repeats}: "
        f"{', '.join(f'{s:.2f}' for s in batch_seconds)} s for all), {dict(statuses)}, "
        f"nodes mean {nodes.mean():.0f} max {nodes.max()}, max gap {max(r.gap for r in results):.1e}\n"
        f"  ours, one by one {single_per_problem:8.4f} s per problem (max {max(r.seconds for r in singles):.3f} s), "
        f"same optima as batched within {agree:.1e}"
    )

    methods = pruning_methods(gram, weights, k)
    for name, x in methods.items():
        errors = reconstruction_error(gram, weights, x).numpy()
        gaps = (errors - optima) / optima
        click.echo(f"  {name:16s} mean gap to the optimum {gaps.mean():8.2%}, max {gaps.max():8.2%}, "
                   f"optimal on {int((gaps <= 1e-9).sum())}/{num_problems}")

    backends = available_backends()
    if not backends:
        click.echo("  no MIP backend installed (pip install pyscipopt for SCIP)")
    count = min(reference_problems, num_problems)
    chosen = [int(i) for i in np.linspace(0, num_problems - 1, count).round()] if count else []
    for backend in backends:
        seconds, differences, backend_statuses = [], [], Counter()
        for i in chosen:
            heuristic = float(min(reconstruction_error(gram, weights[i], x[i]) for x in methods.values()))
            result = solve_mip(gram, weights[i], k, solver=backend, formulation="bigm", time_limit=time_limit,
                               upper_bound=heuristic)
            seconds.append(result.seconds)
            differences.append((result.error - optima[i]) / optima[i])
            backend_statuses[result.status] += 1
            click.echo(f"    {backend} channel {i}: {result.seconds:.2f} s, {result.status}, "
                       f"error {result.error:.10g} vs ours {optima[i]:.10g} ({singles[i].seconds:.3f} s)", err=True)
        per_problem = float(np.mean(seconds))
        ours = float(np.mean([singles[i].seconds for i in chosen]))
        click.echo(
            f"  {backend:8s} big-M  {per_problem:8.3f} s per problem over {count} problems, {dict(backend_statuses)}; "
            f"ratio {per_problem / ours:6.1f}x ours one by one on the same problems ({ours:.3f} s), "
            f"{per_problem / batch_per_problem:6.1f}x ours batched; "
            f"(backend - ours) / ours: max {max(differences):+.1e}, min {min(differences):+.1e}"
        )


if __name__ == "__main__":
    main()
