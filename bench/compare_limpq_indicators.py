#!/usr/bin/env python
"""Learned (LIMPQ) against data-free importance indicators: the bit policies they give at one budget.

A **substitute** for the ResNet-50 ImageNet comparison, whose pretrained weights are not available
offline: the CIFAR ResNet-32 of the zoo (``resnet32_cifar``: 33 convs, 32 searched) with a 10-way
classifier, registered here as ``resnet32_digits``, on scikit-learn's digits (an image folder at
16 px, the 8x8 digits upsampled: ``tests/train_helpers.write_digits_dataset``), all on CPU, seeded:

1. a float model from a random init: ``main.py train-compressed --no-weight-quant`` (``--float-epochs``);
2. learned indicators from it: ``main.py train-indicators`` (``--indicator-epochs``, LIMPQ's recipe,
   candidates ``--bits``), its "pretrained" weights those of the float model (``resnet32_digits``
   loads them when built pretrained; train-indicators takes no ``--init-checkpoint``);
3. data-free indicators of the same float model (:func:`studies.data_free_indicators.data_free_indicators`):
   ``weight-mse`` (no data) and ``output-mse`` (``--calibration-images`` training images);
4. one search per kind of indicators at the same budget (``--wb``/``--ab`` BitOPs, ``--compression-ratio``,
   alpha 2; :func:`studies.bit_policy_search.run_bit_policy_search`, the bundled geometry);
5. per policy, the top-1 on the held-out digits of the float model quantized post hoc with it
   (``main.py evaluate --init-checkpoint --bit-policy --quant-setup LIMPQ --act-quant``, MSE ranges,
   batch-norm statistics re-estimated) and, with ``--finetune-epochs``, after that many epochs of
   ``train-compressed --bit-policy`` from the float model.

Prints, per kind, the layers whose weight or input bit-width differs from the learned policy, the
policies' BitOPs and compression ratio and the accuracies; writes ``comparison.json`` and the figures
``learned_vs_<kind>.png/.pdf`` (both policies, differing layers shaded) to ``--output-dir``.

    python bench/compare_limpq_indicators.py --output-dir /tmp/limpq_compare
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))

from train_helpers import write_digits_dataset

from main import cli
from models import load_model, register_model
from models.bit_policy import read_bit_policy
from studies.bit_policy_plots import differing_layers, write_bit_policy_figure
from studies.bit_policy_search import SearchSettings, run_bit_policy_search
from studies.data_free_indicators import data_free_indicators
from studies.indicators import Indicators, read_indicators, write_indicators
from training.checkpoint import load_checkpoint
from training.data import eval_transform
from training.run import restore_model
from utils.io import check_output_path, write_json

ARCHITECTURE = "resnet32_digits"
IMAGE_SIZE = 16
DATA_FREE = ("weight-mse", "output-mse")


def register_digits_model(float_checkpoint: Path) -> None:
    """``resnet32_digits``: the zoo's ``resnet32_cifar`` with 10 classes; pretrained: the float checkpoint's weights."""

    @register_model(ARCHITECTURE, task="classification")
    def resnet32_digits(pretrained: bool) -> nn.Module:
        model = load_model("resnet32_cifar", pretrained=False)
        model.fc = nn.Linear(model.fc.in_features, 10)
        if pretrained:
            model.load_state_dict(load_checkpoint(float_checkpoint)["model"])
        return model


def run_main(args: list[str]) -> None:
    """``main.py ARGS`` in this process (a click error ends the script with its message)."""
    cli.main(args, prog_name="main.py", standalone_mode=False)


def calibration_batch(images_dir: Path, count: int) -> torch.Tensor:
    """The first ``count`` training images of a seeded order, as the evaluation transform gives them."""
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(images_dir / "train"), transform=eval_transform(IMAGE_SIZE))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:count]
    return torch.stack([dataset[int(index)][0] for index in order])


def data_free(float_checkpoint: Path, layers: tuple[str, ...], bits: tuple[int, ...], images: torch.Tensor) -> dict:
    """Kind -> :class:`Indicators` of the float model (output-mse on ``images``)."""
    model, _ = restore_model(float_checkpoint)
    return {kind: data_free_indicators(model, layers, bits, kind, images=images if kind == "output-mse" else None)
            for kind in DATA_FREE}  # fmt: skip


def posthoc_top1(common: list[str], float_checkpoint: Path, policy: Path, output: Path) -> float:
    """Top-1 (%) of the float model quantized post hoc with ``policy`` (LIMPQ setup, MSE ranges, BN re-estimated)."""
    run_main(["evaluate", *common, "--init-checkpoint", str(float_checkpoint), "--bit-policy", str(policy),
              "--act-quant", "--quant-setup", "LIMPQ", "--weight-quant-method", "MSE", "--act-quant-method", "MSE",
              "--output-json", str(output)])  # fmt: skip
    return json.loads(output.read_text())["top1"]


def finetuned_top1(common: list[str], float_checkpoint: Path, policy: Path, epochs: int, folder: Path) -> float:
    """Top-1 (%) after ``epochs`` of quantization-aware training with ``policy`` from the float model."""
    run_main(["train-compressed", *common, "--init-checkpoint", str(float_checkpoint), "--bit-policy", str(policy),
              "--act-quant", "--quant-setup", "LIMPQ", "--weight-quant-method", "MSE", "--act-quant-method", "MSE",
              "--max-epochs", str(epochs), "--learning-rate", "0.01", "--save-checkpoint-dir", str(folder)])  # fmt: skip
    return json.loads((folder / "summary.json").read_text())["final"]["val_top1"]


@click.command()
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--float-epochs", type=click.IntRange(1), default=6, show_default=True)
@click.option("--indicator-epochs", type=click.IntRange(1), default=2, show_default=True)
@click.option("--finetune-epochs", type=click.IntRange(0), default=0, show_default=True,
              help="Also fine-tune each policy this many epochs (0: post-hoc accuracy only).")
@click.option("--bits", default="6,5,4,3,2", show_default=True, help="Candidate bit-widths.")
@click.option("--wb", type=click.IntRange(2, 8), default=3, show_default=True)
@click.option("--ab", type=click.IntRange(2, 8), default=4, show_default=True)
@click.option("--compression-ratio", type=click.FloatRange(min=0), default=12.2, show_default=True)
@click.option("--calibration-images", type=click.IntRange(1), default=256, show_default=True)
def main(output_dir: Path, float_epochs: int, indicator_epochs: int, finetune_epochs: int, bits: str, wb: int, ab: int,
         compression_ratio: float, calibration_images: int) -> None:  # fmt: skip
    """Learned vs data-free indicators on digits with the CIFAR ResNet-32 (a substitute for ResNet-50 on ImageNet)."""
    check_output_path(output_dir, "dir")
    torch.set_num_threads(1)
    candidate_bits = tuple(int(b) for b in bits.split(","))
    images_dir = write_digits_dataset(output_dir / "digits", image_size=IMAGE_SIZE)
    common = ["--architecture", ARCHITECTURE, "--images-dir", str(images_dir), "--image-size", str(IMAGE_SIZE),
              "--no-pretrained", "--num-workers", "0", "--no-progress-bar", "--device", "cpu", "--seed", "0",
              "--batch-size", "64"]  # fmt: skip
    float_dir = output_dir / "float"
    register_digits_model(float_dir / "last.pt")
    run_main(["train-compressed", *common, "--no-weight-quant", "--max-epochs", str(float_epochs),
              "--learning-rate", "0.05", "--save-checkpoint-dir", str(float_dir)])  # fmt: skip
    float_checkpoint = float_dir / "last.pt"
    float_top1 = json.loads((float_dir / "summary.json").read_text())["final"]["val_top1"]
    run_main(["train-indicators", *[arg for arg in common if arg != "--no-pretrained"], "--bits", bits,
              "--max-epochs", str(indicator_epochs), "--output-dir", str(output_dir / "learned")])  # fmt: skip
    indicators: dict[str, Indicators] = {"learned": read_indicators(output_dir / "learned" / "indicators.json")}
    layers = indicators["learned"].layers
    indicators |= data_free(float_checkpoint, layers, candidate_bits, calibration_batch(images_dir, calibration_images))

    results = {"float_top1": float_top1, "architecture": ARCHITECTURE, "image_size": IMAGE_SIZE,
               "budget": {"bits": list(candidate_bits), "wb": wb, "ab": ab, "compression_ratio": compression_ratio},
               "policies": {}}  # fmt: skip
    policies = {}
    for kind, table in indicators.items():
        indicator_file = output_dir / f"indicators_{kind}.json"
        write_indicators(indicator_file, table)
        settings = SearchSettings(architecture=ARCHITECTURE, indicators=str(indicator_file), bits=candidate_bits,
                                  wb=wb, ab=ab, compression_ratio=compression_ratio, image_size=IMAGE_SIZE)  # fmt: skip
        policy_file = output_dir / f"policy_{kind}.json"
        document = run_bit_policy_search(settings, policy_file, figure=False)
        policies[kind] = read_bit_policy(policy_file)
        entry = {"bitops": document["bitops"], "bitops_target": document["bitops_target"],
                 "compression_ratio": document["compression_ratio"],
                 "weight_bits": document["weight_bits"], "act_bits": document["act_bits"],
                 "posthoc_top1": posthoc_top1(common, float_checkpoint, policy_file, output_dir / f"eval_{kind}.json")}  # fmt: skip
        if finetune_epochs:
            entry["finetuned_top1"] = finetuned_top1(common, float_checkpoint, policy_file, finetune_epochs,
                                                     output_dir / f"finetune_{kind}")  # fmt: skip
        results["policies"][kind] = entry
    learned = policies["learned"]
    for kind in DATA_FREE:
        differing = differing_layers(learned, policies[kind])
        results["policies"][kind]["differs_from_learned"] = [learned.layers[i] for i in differing]
        write_bit_policy_figure(learned, output_dir, policies[kind], ("learned", kind), stem=f"learned_vs_{kind}")
    results["layers"] = list(layers)
    write_json(output_dir / "comparison.json", results)

    click.echo(f"{ARCHITECTURE} on digits ({IMAGE_SIZE} px), float top-1 {float_top1:.2f}%; budget: bits {bits}, "
               f"BitOPs W{wb}A{ab}, compression ratio {compression_ratio:g}")  # fmt: skip
    for kind, entry in results["policies"].items():
        tuned = f", fine-tuned {entry['finetuned_top1']:.2f}%" if "finetuned_top1" in entry else ""
        mean_w = sum(entry["weight_bits"]) / len(layers)
        mean_a = sum(entry["act_bits"]) / len(layers)
        click.echo(f"{kind:11s} mean bits W {mean_w:.2f} A {mean_a:.2f}, BitOPs {entry['bitops']:.4g} "
                   f"(target {entry['bitops_target']:.4g}), CR {entry['compression_ratio']:.2f}, "
                   f"post-hoc top-1 {entry['posthoc_top1']:.2f}%{tuned}")  # fmt: skip
    for kind in DATA_FREE:
        names = results["policies"][kind]["differs_from_learned"]
        click.echo(f"{kind} differs from learned in {len(names)} of {len(layers)} layers:")
        for name in names:
            index = layers.index(name)
            click.echo(f"  {name:24s} learned W{learned.weight_bits[index]}A{learned.act_bits[index]}  "
                       f"{kind} W{policies[kind].weight_bits[index]}A{policies[kind].act_bits[index]}")  # fmt: skip


if __name__ == "__main__":
    main()
