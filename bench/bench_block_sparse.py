#!/usr/bin/env python
"""Time a 1x1 convolution pruned with 1xN blocks as a block-sparse product against dense and unstructured sparsity.

A 1x1 convolution with ``C_out x C_in`` weight ``W`` on a batch of ``B`` maps of ``H x W`` positions is
the product ``Y = W X`` with ``X`` of shape ``(C_in, B H W)`` (the batch laid side by side). The weight is
random normal, pruned at rate ``p`` with the 1xN mask of :func:`pruning.block_masks.one_by_n_mask`
(``N`` consecutive output channels x 1 input channel: blocks ``(N, 1)`` of ``W``) or, for the
unstructured baseline, with :func:`pruning.block_masks.weight_magnitude_mask` at the same rate. The
kept weights are packed once (packing is not timed) and multiplied by ``X`` with:

* ``torch dense``: ``torch.matmul`` of the masked dense weight, the reference (milliseconds shown);
* ``torch CSR``: ``W.to_sparse_csr()`` then ``torch.matmul`` (MKL sparse on CPU);
* ``torch BSR``: ``W.to_sparse_bsr((N, 1))`` then ``torch.matmul``. On CPU torch hands BSR to MKL,
  which only takes square blocks, so ``N > 1`` fails ("n/a"; the error is printed once); ``N = 1`` runs;
* ``scipy CSR``: ``scipy.sparse.csr_array`` times the numpy ``X``;
* ``scipy BSR``: ``scipy.sparse.bsr_array(W, blocksize=(N, 1))`` times ``X`` (for unstructured masks
  the ``(1, 1)`` blocks of CSR).

Single thread (``torch.set_num_threads(1)``; scipy's sparse products are single-threaded). Times are
CPU times of this process (:func:`time.process_time`), not wall-clock: on a machine shared with other
jobs the wall clock mostly measures waiting for a core (medians of wall times moved by 2x between
runs, CPU times by about 10 %). Per configuration the methods run interleaved, round-robin,
``--repeats`` times after a warm-up, and the median is kept; every result is checked against the
dense product (relative max error below ``1e-4`` in float32). The table gives the dense CPU time and
each method's speedup ``dense / method`` (above 1: faster than dense); the ratios, measured
interleaved in one process, are what count, the absolute times depend on the machine and its load.

    python bench/bench_block_sparse.py
    python bench/bench_block_sparse.py --channels 512 --sides 14 --batches 1 --rates 0.9 --block-sizes 4 --repeats 3
"""
from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
import scipy.sparse
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pruning.block_masks import one_by_n_mask, weight_magnitude_mask

METHODS = ("torch CSR", "torch BSR", "scipy CSR", "scipy BSR")
RELATIVE_TOLERANCE = 1e-4


def products(weight: torch.Tensor, block_size: int) -> tuple[dict[str, Callable[[], np.ndarray]], dict[str, str]]:
    """``{method: () -> W X as numpy}`` for the packed ``weight`` (blocks ``(block_size, 1)``), ``{method: why not}``."""
    runners: dict[str, Callable] = {}
    failures: dict[str, str] = {}
    csr = weight.to_sparse_csr()
    runners["torch CSR"] = lambda x: torch.matmul(csr, x[0]).numpy()
    try:
        bsr = weight.to_sparse_bsr((block_size, 1))
        torch.matmul(bsr, torch.zeros(weight.shape[1], 1))
        runners["torch BSR"] = lambda x: torch.matmul(bsr, x[0]).numpy()
    except (RuntimeError, NotImplementedError) as error:
        failures["torch BSR"] = str(error).splitlines()[0]
    dense = weight.numpy()
    scipy_csr = scipy.sparse.csr_array(dense)
    scipy_bsr = scipy.sparse.bsr_array(dense, blocksize=(block_size, 1))
    runners["scipy CSR"] = lambda x: scipy_csr @ x[1]
    runners["scipy BSR"] = lambda x: scipy_bsr @ x[1]
    return runners, failures


def median_times(runners: dict[str, Callable], inputs: tuple[torch.Tensor, np.ndarray], repeats: int) -> dict[str, float]:
    """Median CPU seconds of each runner, interleaved round-robin after one warm-up call each."""
    for run in runners.values():
        run(inputs)
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.process_time()
            run(inputs)
            seconds[name].append(time.process_time() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def _parse(values: str, kind: type) -> list:
    return [kind(value) for value in values.split(",") if value.strip()]


@click.command()
@click.option("--channels", type=click.IntRange(1), default=512, show_default=True, help="C_out = C_in.")
@click.option("--sides", default="14,28", show_default=True, help="Feature-map sides H = W, comma-separated.")
@click.option("--batches", default="1,8", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--rates", default="0.5,0.7,0.9", show_default=True, help="Pruning rates p, comma-separated.")
@click.option("--block-sizes", default="1,4,16", show_default=True, help="Block sizes N, comma-separated.")
@click.option("--repeats", type=click.IntRange(1), default=7, show_default=True, help="Median of this many runs.")
@click.option("--seed", type=int, default=0, show_default=True)
def main(channels: int, sides: str, batches: str, rates: str, block_sizes: str, repeats: int, seed: int) -> None:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(seed)
    click.echo(f"1x1 conv {channels} -> {channels} as W X, float32, 1 thread, median CPU time of {repeats} interleaved runs; "
               f"speedup = dense / method (torch {torch.__version__}, scipy {scipy.__version__})")
    click.echo(f"{'HxW':>5s} {'B':>2s} {'p':>4s} {'pattern':>12s} {'sparsity':>8s} {'dense ms':>9s}  "
               + "  ".join(f"{name:>9s}" for name in METHODS) + "  max rel err")
    reported: set[str] = set()
    for side in _parse(sides, int):
        for batch in _parse(batches, int):
            x = torch.randn(channels, batch * side * side, generator=generator)
            inputs = (x, x.numpy())
            for rate in _parse(rates, float):
                weight = torch.randn(channels, channels, generator=generator)
                patterns = [(f"1x{n}", n, one_by_n_mask(weight, n, rate)) for n in _parse(block_sizes, int)]
                patterns.append(("unstructured", 1, weight_magnitude_mask(weight, rate)))
                for label, block_size, mask in patterns:
                    masked = weight * mask
                    reference = torch.matmul(masked, x)
                    runners, failures = products(masked, block_size)
                    runners = {"torch dense": lambda v, masked=masked: torch.matmul(masked, v[0]).numpy(), **runners}
                    for method, why in failures.items():
                        if why not in reported:
                            click.echo(f"  ({method} {label}: {why})")
                            reported.add(why)
                    error = max(
                        float(np.abs(run(inputs) - reference.numpy()).max()) for run in runners.values()
                    ) / float(reference.abs().max())
                    if error > RELATIVE_TOLERANCE:
                        raise AssertionError(f"{label} at p = {rate}: a sparse product differs from dense by {error:.1e}")
                    times = median_times(runners, inputs, repeats)
                    dense = times["torch dense"]
                    cells = [f"{dense / times[name]:9.2f}" if name in times else f"{'n/a':>9s}" for name in METHODS]
                    sparsity = 1 - float(mask.float().mean())
                    click.echo(f"{f'{side}x{side}':>5s} {batch:2d} {rate:4.1f} {label:>12s} {sparsity:8.3f} "
                               f"{1e3 * dense:9.2f}  " + "  ".join(cells) + f"  {error:.1e}")


if __name__ == "__main__":
    main()
