#!/usr/bin/env python
"""Time one step of LIMPQ's joint indicator training against one float training step, in the same process.

Reference: the classifier (random init) in floating point, one forward/backward pass and one SGD
step (momentum 0.9) on a fixed batch. LIMPQ: the same model prepared as ``main.py train-indicators``
does it (:func:`training.limpq.prepare_indicator_model`: multi-bit LSQ on every conv but the first,
switchable batch norm), one step of :class:`training.limpq.JointIndicatorStep` (a pass at each of
the ``|B|`` candidate bit-widths and one at a random mixed policy) with the gradient clip, one SGD
step over weights and step sizes. Both steps run through the training loop
(:func:`training.engine.train_one_epoch` on a one-batch loader) and take turns; prints the best of
``--repeats`` timed steps (after warm-up) of each and their ratio. Target: at most ``|B| + 1.2``
times the float step (6.2x for 5 candidates): the ``|B| + 1`` passes, and quantization costing at
most a fifth of a float step.

    python bench/bench_limpq_step.py --device cpu --architecture resnet18 --batch-size 16 --image-size 224
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import click
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_train_step import best_seconds
from models import load_model
from training.cli_options import CANDIDATE_BITS
from training.config import INDICATOR_RECIPE
from training.data import Batch
from training.distributed import DistributedContext
from training.engine import StepOptions, TrainCallback, cross_entropy_loss, single_pass_step, train_one_epoch
from training.limpq import ClipGradientValues, JointIndicatorStep, example_images, prepare_indicator_model
from utils.cli import DeviceType, default_device


def make_step(model: nn.Module, batch: Batch, device: torch.device, step_fn=single_pass_step,
              callbacks: Sequence[TrainCallback] = ()) -> Callable[[], None]:  # fmt: skip
    """One training step of ``model`` on ``batch``: the loop over a one-batch loader, SGD over every parameter."""
    optim = INDICATOR_RECIPE.optim
    optimizer = torch.optim.SGD(model.parameters(), lr=optim.learning_rate, momentum=optim.momentum,
                                weight_decay=optim.weight_decay)  # fmt: skip
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    loss_fn = partial(cross_entropy_loss, label_smoothing=optim.label_smoothing)
    return partial(train_one_epoch, model, [batch], [optimizer], [], scaler, 0, DistributedContext(device=device),
                   StepOptions(device), list(callbacks), loss_fn=loss_fn, step_fn=step_fn)  # fmt: skip


@click.command()
@click.option("--architecture", default="resnet18", show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--image-size", type=click.IntRange(16), default=224, show_default=True)
@click.option("--bits", type=CANDIDATE_BITS, default="6,5,4,3,2", show_default=True, help="Candidate bit-widths.")
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True)
@click.option("--warmup", type=click.IntRange(0), default=2, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="torch CPU threads (default: torch's).")
@click.option("--device", type=DeviceType(), default=default_device(), show_default=True)
def main(architecture: str, batch_size: int, image_size: int, bits: tuple[int, ...], repeats: int, warmup: int,
         threads: int | None, device: torch.device) -> None:  # fmt: skip
    if threads is not None:
        torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    batch = Batch(images, torch.randint(0, 1000, (batch_size,), generator=generator), 0)
    torch.manual_seed(0)
    float_model = load_model(architecture, pretrained=False).to(device)
    torch.manual_seed(0)
    limpq_model = load_model(architecture, pretrained=False)
    layers = prepare_indicator_model(limpq_model, example_images(image_size), bits)
    limpq_model.to(device)
    joint_step = JointIndicatorStep(limpq_model, bits)
    steps = {
        "float": make_step(float_model, batch, device),
        "limpq": make_step(limpq_model, batch, device, joint_step, [ClipGradientValues(limpq_model.parameters())]),
    }
    best = best_seconds(steps, device, warmup, repeats)
    ratio, target = best["limpq"] / best["float"], len(bits) + 1.2
    click.echo(f"{architecture} batch {batch_size} at {image_size} px on {device} ({torch.get_num_threads()} threads), "
               f"{len(layers)} searchable layers, bits {','.join(map(str, bits))}; best of {repeats}:")
    click.echo(f"  float step      {best['float'] * 1e3:9.1f} ms")
    click.echo(f"  LIMPQ step      {best['limpq'] * 1e3:9.1f} ms   ({len(bits) + 1} passes)")
    click.echo(f"  ratio LIMPQ / float: {ratio:.2f}  (target <= {target:.1f}: {'met' if ratio <= target else 'missed'})")
    click.echo(f"  per pass: {ratio / (len(bits) + 1):.3f} float steps")


if __name__ == "__main__":
    main()
