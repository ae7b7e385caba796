#!/usr/bin/env python
"""Time one training step of quantization-aware training against the float step, in the same process.

Reference: ResNet-18 (random init) in floating point, SGD with momentum. Ours: the same model
compressed for QAT as ``main.py train-compressed`` does it by default (4-bit per-tensor
symmetric weights, MSE-initialised and learned step sizes with their own Adam optimizer,
first and last layer at 8 bits, activations in float). A step is forward, cross-entropy,
backward and the optimizer steps on a fixed batch. The two steps take turns; prints the best
of ``--repeats`` timed steps (after warm-up; CPU time on CPU, wall time on a GPU) of each and their ratio; target: QAT <= 1.3x float.

    python bench/bench_train_step.py --device cpu --batch-size 16 --image-size 224
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.builders import build_compressed_model, build_optimizers
from training.config import TrainConfig
from utils.cli import DeviceType, default_device


def make_step(config: TrainConfig, images: torch.Tensor, targets: torch.Tensor) -> Callable[[], None]:
    """One training step of the model ``config`` describes, on a fixed batch."""
    model = build_compressed_model(config).to(images.device).train()
    optimizers = list(build_optimizers(model, config).values())

    def step() -> None:
        loss = F.cross_entropy(model(images), targets)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()

    return step


def timed(step: Callable[[], None], device: torch.device) -> float:
    """Seconds of one step: CPU time of the process on CPU (other processes on a shared machine do not count),
    wall time on an accelerator (after synchronising it)."""
    if device.type == "cpu":
        start = time.process_time()
        step()
        return time.process_time() - start
    torch.accelerator.synchronize(device)
    start = time.perf_counter()
    step()
    torch.accelerator.synchronize(device)
    return time.perf_counter() - start


def best_seconds(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Best time of each step; the steps take turns, so load changes on the machine hit both alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    best = {name: float("inf") for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            best[name] = min(best[name], timed(step, device))
    return best


@click.command()
@click.option("--architecture", default="resnet18", show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--image-size", type=click.IntRange(16), default=224, show_default=True)
@click.option("--n-bits", type=click.IntRange(2, 16), default=4, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True)
@click.option("--warmup", type=click.IntRange(0), default=2, show_default=True)
@click.option("--device", type=DeviceType(), default=default_device(), show_default=True)
def main(architecture: str, batch_size: int, image_size: int, n_bits: int, repeats: int, warmup: int,
         device: torch.device) -> None:  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device)
    targets = torch.randint(0, 1000, (batch_size,), generator=generator).to(device)
    common = {"architecture": architecture, "pretrained": False, "image_size": image_size, "learning_rate": 0.01}
    float_config = TrainConfig.from_options(weight_quant=False, **common)
    qat_config = TrainConfig.from_options(weight_quant=True, n_bits=n_bits, weight_quant_method="mse", **common)
    steps = {"float": make_step(float_config, images, targets), "qat": make_step(qat_config, images, targets)}
    best = best_seconds(steps, device, warmup, repeats)
    float_seconds, qat_seconds = best["float"], best["qat"]
    click.echo(f"{architecture} batch {batch_size} at {image_size}px on {device}, best of {repeats}:")
    click.echo(f"  float step {float_seconds * 1e3:9.1f} ms")
    click.echo(f"  QAT W{n_bits} step {qat_seconds * 1e3:9.1f} ms   (learned step sizes, MSE init)")
    click.echo(f"  ratio QAT / float: {qat_seconds / float_seconds:.3f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
