#!/usr/bin/env python
"""Time one PSGD training step against the plain step, in the same process.

Both steps train ResNet-32 for CIFAR (random init, 100 classes) with SGD (momentum 0.9, weight
decay 1e-4) on a fixed batch of 32x32 images: forward, cross-entropy, backward, optimizer step.
The PSGD step also runs :class:`training.callbacks.PositionScaledGradientCallback` after backward
(every conv and linear weight scaled towards its ``--n-bits`` grid, first and last layer at 8 bits
below 4 bits, range trackers updated). The steps take turns; prints the best of ``--repeats``
timed steps (after warm-up) of each, of the callback alone, and the ratios; target: PSGD <= 1.15x
plain. On a loaded machine whole steps vary more than the callback costs: the ratio built from
the callback's own time is the steadier figure.

    python bench/bench_psgd_step.py --device cpu --batch-size 128 --threads 1
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

import click
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_train_step import best_seconds
from models.cifar import resnet32_cifar
from quantization.position_scaling import scaled_tensor_bits
from training.callbacks import PositionScaledGradientCallback
from training.engine import TrainCallback
from utils.cli import DeviceType, default_device


def make_steps(images: torch.Tensor, targets: torch.Tensor, n_bits: int | None) -> dict[str, Callable[[], None]]:
    """The plain and the PSGD step of a fresh ResNet-32 on a fixed batch, and the PSGD callback alone."""
    steps = {}
    for name, psgd in (("plain", False), ("psgd", True)):
        torch.manual_seed(0)
        model = resnet32_cifar().to(images.device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        callback = PositionScaledGradientCallback(model, scaled_tensor_bits(model, n_bits)) if psgd else TrainCallback()

        def step(model=model, optimizer=optimizer, callback=callback) -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), targets).backward()
            callback.after_backward(0)
            optimizer.step()

        steps[name] = step
    steps["callback"] = functools.partial(callback.after_backward, 0)  # on the PSGD model's last gradients
    return steps


@click.command()
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True)
@click.option("--n-bits", type=click.IntRange(2, 16), default=4, show_default=True)
@click.option("--pruning", is_flag=True, help="The zero target (pruning) instead of the grid.")
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True)
@click.option("--warmup", type=click.IntRange(0), default=2, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None,
              help="torch CPU threads (default: torch's); 1 on a loaded machine, where parallel element-wise ops "
                   "wait for a second core")  # fmt: skip
@click.option("--device", type=DeviceType(), default=default_device(), show_default=True)
def main(batch_size: int, n_bits: int, pruning: bool, repeats: int, warmup: int, threads: int | None,
         device: torch.device) -> None:  # fmt: skip
    if threads is not None:
        torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, 32, 32, generator=generator).to(device)
    targets = torch.randint(0, 100, (batch_size,), generator=generator).to(device)
    bits = None if pruning else n_bits
    best = best_seconds(make_steps(images, targets, bits), device, warmup, repeats)
    target = "zero target" if pruning else f"W{n_bits} grid"
    click.echo(f"resnet32_cifar batch {batch_size} on {device} ({torch.get_num_threads()} threads), best of {repeats}:")
    click.echo(f"  plain step {best['plain'] * 1e3:9.1f} ms")
    click.echo(f"  PSGD step  {best['psgd'] * 1e3:9.1f} ms   ({target})")
    click.echo(f"  callback   {best['callback'] * 1e3:9.1f} ms   (after_backward alone)")
    click.echo(f"  ratio PSGD / plain: {best['psgd'] / best['plain']:.3f}  (target <= 1.15)")
    click.echo(f"  (plain + callback) / plain: {1 + best['callback'] / best['plain']:.3f}  (less sensitive to load)")


if __name__ == "__main__":
    main()
