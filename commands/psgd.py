"""PSGD's studies: ``psgd-compare`` (PSGD toward a grid vs toward zero vs SGD) and ``weight-histograms``."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import click

from commands.common import check_output, compression_errors
from training.cli_options import LrScheduleType
from training.config import AUGMENTATIONS, CIFAR_IMAGE_SIZE, DATASETS, DataConfig
from utils.cli import DeviceType, IntListType, default_device

if TYPE_CHECKING:
    import torch


@click.command("psgd-compare")
@click.option("--float-checkpoint", type=click.Path(exists=True, path_type=str), required=True,
              help="The float start: a train-compressed --no-weight-quant checkpoint (file, or folder with last.pt).")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=str), required=True,
              help="runs/<run>/, comparison.csv, layers.csv, comparison.json and comparison.md go here.")
@click.option("--architecture", default="resnet32_cifar", show_default=True, help="The float checkpoint's model.")
@click.option("--dataset", type=click.Choice(DATASETS), default="folder", show_default=True,
              help="folder: --images-dir (train/ and val/ class folders); cifar10/cifar100: the archive in --data-dir.")
@click.option("--images-dir", type=click.Path(exists=True, file_okay=False, path_type=str), default=None)
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=str), default=None)
@click.option("--image-size", type=click.IntRange(8, 1024), default=32, show_default=True,
              help="--dataset folder only (CIFAR is 32 px).")
@click.option("--augmentation", type=click.Choice(AUGMENTATIONS), default=DataConfig.augmentation, show_default=True,
              help="--dataset folder: the training transforms of every run (train-compressed --help).")
@click.option("--bits", type=IntListType(2, 8), default="2,3,4", show_default=True,
              help="Bit-widths b: PSGD toward the b-bit grid, against PSGD toward zero pruned to 1 - b/16.")
@click.option("--epochs", type=click.IntRange(1), default=3, show_default=True, help="The budget of every run.")
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True)
@click.option("--learning-rate", type=click.FloatRange(0.0, min_open=True), default=0.01, show_default=True)
@click.option("--learning-rate-schedule", type=LrScheduleType(), default="constant", show_default=True)
@click.option("--weight-decay", type=click.FloatRange(0.0), default=1e-4, show_default=True,
              help="Of every run (none for PSGD at 2 bits, as the official recipe).")
@click.option("--psgd-lambda", type=click.FloatRange(0.0, min_open=True), default=150.0, show_default=True)
@click.option("--num-workers", type=click.IntRange(0), default=0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=DeviceType(), default=default_device(), show_default=True)
@click.option("--progress-bar/--no-progress-bar", default=True, show_default=True)
@click.option("--reestimate-bn-stats/--no-reestimate-bn-stats", default=False, show_default=True,
              help="Re-estimate the batch-norm statistics on training batches before each post-hoc evaluation "
                   "(the paper does not).")  # fmt: skip
def psgd_compare(bits: list[int], device: torch.device, **options) -> None:
    """PSGD toward the INT-b grid vs PSGD toward zero at sparsity 1 - b/16 vs plain SGD, from one float checkpoint
    at the same budget: post-hoc top-1 and per-layer weight SQNR (studies/psgd_comparison.py)."""
    from studies.psgd_comparison import ComparisonError, ComparisonSettings, run_comparison

    if options["dataset"] == "folder" and options["images_dir"] is None:
        raise click.UsageError("Missing option '--images-dir' (the class folders of --dataset folder)")
    if options["dataset"] != "folder":
        if options["data_dir"] is None:
            raise click.UsageError(f"--dataset {options['dataset']} needs --data-dir (the folder of the CIFAR archive)")
        options["image_size"] = CIFAR_IMAGE_SIZE
    check_output(options["output_dir"], "dir", "--output-dir")
    options["images_dir"] = options["images_dir"] or ""
    try:
        summary = run_comparison(ComparisonSettings(bits=tuple(bits), device=str(device), **options))
    except compression_errors() + (ComparisonError,) as error:
        raise click.ClickException(str(error)) from None
    for row in summary.itertuples():
        distance = "" if math.isnan(row.mean_grid_distance) else f"  grid distance {row.mean_grid_distance:.3f}"
        click.echo(f"b={row.bits} {row.arm:12s} {row.compression:16s} top-1 {row.posthoc_top1:6.2f}% "
                   f"(float {row.float_top1:6.2f}%)  mean layer SQNR {row.mean_sqnr_db:6.2f} dB{distance}")


@click.command("weight-histograms")
@click.option("--psgd-checkpoint", type=click.Path(exists=True, path_type=str), required=True,
              help="A train-compressed --psgd-target checkpoint (file, or folder with last.pt).")
@click.option("--plain-checkpoint", type=click.Path(exists=True, path_type=str), required=True,
              help="A plain float checkpoint of the same architecture.")
@click.option("--layers", default=None, help="Comma-separated layer names (default: the second, the middle and the "
                                             "second-to-last layer PSGD scaled).")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--name", default="psgd_weight_histograms", show_default=True, help="File stem: NAME.png and NAME.pdf.")
def weight_histograms(psgd_checkpoint: str, plain_checkpoint: str, layers: str | None, output_dir: Path,
                      name: str) -> None:  # fmt: skip
    """Weight distributions of a PSGD model beside a plain one, the PSGD grid (or zero) marked (PNG and PDF)."""
    from studies.psgd_histograms import HistogramError, write_weight_histograms

    check_output(output_dir, "dir", "--output-dir")
    names = [layer.strip() for layer in layers.split(",") if layer.strip()] if layers else None
    try:
        paths = write_weight_histograms(psgd_checkpoint, plain_checkpoint, output_dir, name, names)
    except compression_errors() + (HistogramError,) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {', '.join(map(str, paths))}")
