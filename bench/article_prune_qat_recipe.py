#!/usr/bin/env python
"""The common PyTorch recipe for pruning + QAT, reproduced as a reference: its zeros regrow; ours are kept.

Reference only: the recipe is built on the deprecated ``torch.ao.quantization`` eager API (every call
warns; expected here), never used by the product code.

Data: scikit-learn's 1797 digits (8x8), upsampled bilinearly to ``--image-size`` px, grey repeated
to 3 channels, a seeded quarter held out for top-1. Model: torchvision's quantizable ResNet-18
(``torchvision.models.quantization.resnet18(weights=None, quantize=False, num_classes=10)``), random
init, trained ``--float-steps`` SGD steps in float. Both paths start from that float model, see
the same batches and take the same optimizer (SGD, momentum 0.9, weight decay 5e-4):

* **the article's recipe**: ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``
  at ``--sparsity`` over every convolution and linear weight, ``prune.remove`` (the pruning hooks
  break eager fusion and ``prepare_qat``), ``fuse_model(is_qat=True)``, the x86 QAT qconfig,
  ``prepare_qat``, ``--qat-steps`` fine-tuning steps, ``convert`` to the int8 model (CPU, x86 engine).
  Nothing keeps the zeros: the gradients and weight decay revive them.
* **our path**: the same float model compressed as ``main.py train-compressed`` does it
  (:func:`models.quantized.compress_model`: 8-bit per-channel symmetric weights with learned step
  sizes, 8-bit asymmetric activations calibrated on ``--calibration-batches`` batches, every layer
  at 8 bits, batch norm kept; LSQ gradient scaling, as the step sizes share the SGD optimizer),
  masks by global magnitude at ``--sparsity`` (the same selection as global L1), re-applied after
  every optimizer step (:class:`pruning.schedule.GradualMagnitudePruner`), the same fine-tuning
  steps; its integer weights are the quantizer's ``clamp(round(w m / s))``.

The image size matters: ResNet-18 divides it by 32, so at 32 px its last stage sees 1x1 maps, and
8 of the 9 taps of its 3x3 kernels (most of the model's weights) get no gradient: their zeros stay
in any recipe. From 33 px on (48 px by default) that stage sees 2x2 maps and every tap learns.

Every ``--check-every`` steps both print the share of exact zeros among the conv/linear weights (the
float weights being trained), then the share among the int8 weights, top-1 on the held-out digits
and the weights' bytes in each encoding of :mod:`deployment.storage` (at 8 bits). The sparsity
curve goes to ``--output-csv`` (columns ``path, stage, step, weight_sparsity, top1``).

    python bench/article_prune_qat_recipe.py --output-csv /tmp/article_recipe.csv
    python bench/article_prune_qat_recipe.py --sparsity 0.5 --qat-steps 100 --check-every 20 --output-csv out.csv
"""
from __future__ import annotations

import copy
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.utils import prune

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deployment.storage import ENCODINGS, encoded_sizes, smallest_encoding
from models.quantized import CompressionSpec, QuantSetup, calibrate_input_quantizers, compress_model
from pruning.schedule import GradualMagnitudePruner, PruningSchedule, PruningScope, magnitude_rule
from quantization.fake_quant import QuantizerConfig, RangeEstimator
from quantization.granularity import Granularity
from quantization.quantizers import QuantParams, QuantScheme, quantize
from utils.cli import DeviceType, default_device
from utils.io import check_output_path, write_csv

WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)
QUANTIZED_WEIGHT_LAYERS = (torch.ao.nn.quantized.Conv2d, torch.ao.nn.quantized.Linear)
N_BITS = 8


@dataclass(frozen=True)
class Digits:
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor


def digits_tensors(image_size: int) -> Digits:
    """The digits as ``(N, 3, size, size)`` images in ``[-1, 1]``; every fourth of a seeded order held out."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0).float()[:, None]
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 2 - 1).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).long()
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(labels)))
    val, train = order[::4], order[torch.arange(len(order)) % 4 != 0]
    return Digits(images[train], labels[train], images[val], labels[val])


Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def training_batches(data: Digits, batch_size: int, seed: int, device: torch.device) -> Batches:
    """Endless seeded random batches of the training split (the same sequence for the same seed)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        index = torch.randint(0, len(data.train_labels), (batch_size,), generator=generator)
        yield data.train_images[index].to(device), data.train_labels[index].to(device)


def weight_sparsity(model: nn.Module) -> float:
    """Share of exact zeros among the weights of the convolution and linear layers (fused QAT layers included)."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, WEIGHT_LAYERS)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def int_sparsity(int_weights: dict[str, torch.Tensor]) -> float:
    return sum(int((w == 0).sum()) for w in int_weights.values()) / sum(w.numel() for w in int_weights.values())


@torch.no_grad()
def top1(model: nn.Module, data: Digits, device: torch.device) -> float:
    model.eval()
    predictions = torch.cat([model(images.to(device)).argmax(1).cpu() for images in data.val_images.split(256)])
    return float((predictions == data.val_labels).double().mean())


def fine_tune(
    model: nn.Module,
    batches: Batches,
    steps: int,
    lr: float,
    check_every: int,
    after_step: Callable[[], None] | None = None,
) -> list[tuple[int, float]]:
    """``steps`` SGD steps (``after_step`` after each); ``(step, weight sparsity)`` at 0, every ``check_every`` steps
    and at the end."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    curve = [(0, weight_sparsity(model))]
    for step in range(1, steps + 1):
        images, labels = next(batches)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        if step % check_every == 0 or step == steps:
            curve.append((step, weight_sparsity(model)))
    return curve


@dataclass(frozen=True)
class PathResult:
    curve: list[tuple[int, float]]
    int_weights: dict[str, torch.Tensor]
    top1: float


def article_recipe(float_model: nn.Module, data: Digits, sparsity: float, steps: int, lr: float, check_every: int,
                   batches: Iterator, device: torch.device) -> PathResult:  # fmt: skip
    """Global L1 pruning, ``prune.remove``, eager QAT (fuse, x86 qconfig, prepare_qat, fine-tune), ``convert``."""
    model = copy.deepcopy(float_model)
    pruned = [(m, "weight") for m in model.modules() if isinstance(m, WEIGHT_LAYERS)]
    prune.global_unstructured(pruned, pruning_method=prune.L1Unstructured, amount=sparsity)
    for module, name in pruned:
        prune.remove(module, name)
    model.train()
    model.fuse_model(is_qat=True)
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
    torch.ao.quantization.prepare_qat(model, inplace=True)
    curve = fine_tune(model, batches, steps, lr, check_every)
    torch.backends.quantized.engine = "x86"
    converted = torch.ao.quantization.convert(model.cpu().eval())
    int_weights = {name: m.weight().int_repr() for name, m in converted.named_modules()
                   if isinstance(m, QUANTIZED_WEIGHT_LAYERS)}  # fmt: skip
    return PathResult(curve, int_weights, top1(converted, data, torch.device("cpu")))


def our_path(float_model: nn.Module, data: Digits, sparsity: float, steps: int, lr: float, check_every: int,
             batches: Iterator, calibration_batches: int) -> PathResult:  # fmt: skip
    """8-bit QAT of the compressed layers with the global magnitude masks re-applied after every step."""
    model = copy.deepcopy(float_model)
    spec = CompressionSpec(
        weight_quant=QuantizerConfig(n_bits=N_BITS, granularity=Granularity.per_channel(0), grad_scaling=True),
        act_quant=QuantizerConfig(n_bits=N_BITS, scheme=QuantScheme.ASYMMETRIC,
                                  range_estimator=RangeEstimator.RUNNING_MINMAX, grad_scaling=True),
        quant_setup=QuantSetup.ALL, prune=True,
    )  # fmt: skip
    layers = compress_model(model, spec)
    one_shot = PruningSchedule(sparsity, sparsity, 0, 1, 1)
    pruner = GradualMagnitudePruner(layers, one_shot, magnitude_rule(PruningScope.GLOBAL))
    pruner.update(0)  # the masks, set once
    calibrate_input_quantizers(model, (next(batches)[0] for _ in range(calibration_batches)))
    curve = fine_tune(model, batches, steps, lr, check_every, after_step=pruner.apply_masks)
    int_weights = {}
    with torch.no_grad():
        for name, layer in layers.items():
            quantizer, weight = layer.weight_quantizer, layer.masked_weight()
            granularity = quantizer.config.granularity
            step_size = granularity.expand(quantizer.step_size, weight.shape)
            zero_point = granularity.expand(quantizer.zero_point, weight.shape)
            params = QuantParams(step_size, zero_point, quantizer.q_min, quantizer.q_max)
            int_weights[name] = quantize(weight, params).to(torch.int8).cpu()
    return PathResult(curve, int_weights, top1(model, data, next(model.parameters()).device))


def compare_recipes(sparsity: float, float_steps: int, qat_steps: int, check_every: int, image_size: int,
                    batch_size: int, lr: float, calibration_batches: int, seed: int,
                    device: torch.device) -> pd.DataFrame:  # fmt: skip
    """Run both paths from one float model; print the sparsity curves, the int8 results and their storage."""
    data = digits_tensors(image_size)
    torch.manual_seed(seed)
    float_model = torchvision.models.quantization.resnet18(weights=None, quantize=False, num_classes=10).to(device)
    fine_tune(float_model, training_batches(data, batch_size, seed, device), float_steps, lr, max(float_steps, 1))
    print(f"float ResNet-18 after {float_steps} steps: top-1 {top1(float_model, data, device):.3f} on "
          f"{len(data.val_labels)} held-out digits")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization: expected, reference only
        warnings.simplefilter("ignore", UserWarning)
        article = article_recipe(float_model, data, sparsity, qat_steps, lr, check_every,
                                 training_batches(data, batch_size, seed + 1, device), device)  # fmt: skip
    ours = our_path(float_model, data, sparsity, qat_steps, lr, check_every,
                    training_batches(data, batch_size, seed + 1, device), calibration_batches)  # fmt: skip
    rows = []
    for name, result in (("article", article), ("ours", ours)):
        rows += [{"path": name, "stage": "qat", "step": step, "weight_sparsity": value, "top1": None}
                 for step, value in result.curve]  # fmt: skip
        rows.append({"path": name, "stage": "int8", "step": qat_steps,
                     "weight_sparsity": int_sparsity(result.int_weights), "top1": result.top1})  # fmt: skip
    table = pd.DataFrame(rows)
    curves = table[table.stage == "qat"].pivot(index="step", columns="path", values="weight_sparsity")
    print(f"\nsparsity of the conv/linear weights during QAT (pruned to {sparsity:.0%} at step 0):")
    print(curves.to_string(float_format=lambda value: f"{value:.4f}"))
    print("\nint8 model:")
    header = " ".join(f"{encoding:>14}" for encoding in ENCODINGS)
    print(f"{'path':8} {'sparsity':>8} {'top-1':>6} {header} {'smallest':>14}")
    for name, result in (("article", article), ("ours", ours)):
        sizes = encoded_sizes(result.int_weights, dict.fromkeys(result.int_weights, N_BITS))
        print(f"{name:8} {int_sparsity(result.int_weights):8.4f} {result.top1:6.3f} "
              + " ".join(f"{sizes[encoding]:14,d}" for encoding in ENCODINGS) + f" {smallest_encoding(sizes):>14}")
    return table


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--device", type=DeviceType(), default=default_device, show_default="cuda if available",
              help="Training device (the int8 conversion and its evaluation run on the CPU).")
@click.option("--sparsity", type=click.FloatRange(0, 1, max_open=True), default=0.75, show_default=True)
@click.option("--float-steps", type=click.IntRange(0), default=40, show_default=True,
              help="Float training steps first.")
@click.option("--qat-steps", type=click.IntRange(1), default=40, show_default=True,
              help="Fine-tuning steps of each path.")
@click.option("--check-every", type=click.IntRange(1), default=5, show_default=True,
              help="Measure the sparsity every k steps.")
@click.option("--image-size", type=click.IntRange(16), default=48, show_default=True,
              help="Digits upsampled to this size (at 32 px the last stage sees 1x1 maps: see the doc).")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=0.01, show_default=True)
@click.option("--calibration-batches", type=click.IntRange(1), default=4, show_default=True,
              help="Batches that set our activation ranges before QAT.")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--output-csv", type=click.Path(dir_okay=False), required=True, help="Sparsity per path, stage and step.")
def main(device: torch.device, sparsity: float, float_steps: int, qat_steps: int, check_every: int,
         image_size: int, batch_size: int, lr: float, calibration_batches: int, threads: int, seed: int,
         output_csv: str) -> None:  # fmt: skip
    try:
        check_output_path(output_csv)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--output-csv") from None
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    torch.set_num_threads(threads)
    table = compare_recipes(sparsity, float_steps, qat_steps, check_every, image_size, batch_size, lr,
                            calibration_batches, seed, device)  # fmt: skip
    write_csv(output_csv, table)
    print(f"\nwrote {output_csv}")


if __name__ == "__main__":
    main()
