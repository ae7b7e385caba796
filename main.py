#!/usr/bin/env python
"""Pruning vs quantization toolkit: the model zoo, pretrained-model checks, compressed fine-tuning and evaluation."""
from __future__ import annotations

from pathlib import Path

import click
import torch

from training.cli_options import compression_options, model_data_options, runtime_options, training_options
from utils.cli import DeviceType, default_device, setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Compare and combine quantization and pruning of neural networks."""
    setup_logging()


@cli.command("list-models")
@click.option("--task", type=click.Choice(["classification", "detection", "segmentation", "video"]), default=None,
              help="Only models of this task.")
@click.option("--available", is_flag=True, help="Only models whose pretrained weights are at hand offline.")
def list_models_command(task: str | None, available: bool) -> None:
    """List the model zoo: name, task, and whether the pretrained weights are at hand."""
    from models import is_weights_available, list_models, model_task

    for name in list_models(task):
        at_hand = is_weights_available(name)
        if at_hand or not available:
            click.echo(f"{name:40s} {model_task(name):15s} {'weights at hand' if at_hand else 'needs download'}")


@cli.command()
@click.option("--model-name", default="efficientnet_lite0", show_default=True, help="An ImageNet classifier of the zoo.")
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Image file to classify (repeatable). Default: scikit-image's sample photos.")
@click.option("--top-k", type=click.IntRange(1, 1000), default=5, show_default=True)
@click.option("--device", type=DeviceType(), default=default_device(), show_default=True)
def predict(model_name: str, images: tuple[Path, ...], top_k: int, device: torch.device) -> None:
    """Classify images with a pretrained ImageNet model (a check that its weights load correctly)."""
    from PIL import Image, UnidentifiedImageError

    from models import UnknownModelError, WeightsUnavailableError, load_model, model_task
    from utils.images import SAMPLE_PHOTOS, imagenet_class_names, imagenet_eval_transform, load_sample_photo

    try:
        if model_task(model_name) != "classification":
            raise click.BadParameter(f"'{model_name}' is a {model_task(model_name)} model", param_hint="'--model-name'")
        model = load_model(model_name).to(device)
    except (UnknownModelError, WeightsUnavailableError) as error:
        raise click.ClickException(str(error)) from None
    transform = imagenet_eval_transform()
    try:
        photos = {str(path): Image.open(path).convert("RGB") for path in images} or {
            name: load_sample_photo(name) for name in SAMPLE_PHOTOS
        }
    except (UnidentifiedImageError, OSError) as error:
        raise click.ClickException(f"cannot read image: {error}") from None
    batch = torch.stack([transform(photo) for photo in photos.values()]).to(device)
    with torch.inference_mode():
        probabilities = model(batch).float().softmax(dim=1).cpu()
    names = imagenet_class_names()
    for label, row in zip(photos, probabilities):
        values, indices = row.topk(top_k)
        ranked = ", ".join(f"{i} {names[i]} ({p:.1%})" for p, i in zip(values.tolist(), indices.tolist()))
        click.echo(f"{label}: {ranked}")


def _compression_errors():
    """The one-line errors of the training package, for ``click.ClickException``."""
    from models import UnknownModelError, WeightsUnavailableError
    from training.builders import SetupError
    from training.checkpoint import CheckpointError
    from training.data import ImageFolderError
    from training.run import TrainingError

    return (UnknownModelError, WeightsUnavailableError, SetupError, CheckpointError, ImageFolderError, TrainingError,
            OSError)  # fmt: skip


@cli.command("train-compressed")
@model_data_options
@compression_options
@training_options
@runtime_options
def train_compressed(**options) -> None:
    """Fine-tune a pretrained classifier with quantization-aware training and/or gradual magnitude pruning.

    The same command runs distributed under `torchrun --nproc_per_node N main.py train-compressed ...`.
    """
    from training.cli_options import config_from_options
    from training.distributed import is_main_process
    from training.run import train

    try:
        summary = train(config_from_options(**options))
    except _compression_errors() as error:
        raise click.ClickException(str(error)) from None
    final = summary["final"]
    if final and is_main_process():
        click.echo(f"val top-1 {final['val_top1']:.2f}%  top-5 {final['val_top5']:.2f}%  loss {final['val_loss']:.4f}  "
                   f"sparsity {final['sparsity']:.4f}  (best top-1 {summary['best_val_top1']:.2f}%)")  # fmt: skip


@cli.command()
@model_data_options
@compression_options
@runtime_options
@click.option("--checkpoint", type=click.Path(exists=True, path_type=Path), default=None,
              help="A train-compressed checkpoint (file, or folder with last.pt); its options define the model. "
                   "Without it: the pretrained model compressed without training.")  # fmt: skip
@click.option("--output-json", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write top-1, top-5, loss, per-layer sparsity and bits here.")  # fmt: skip
def evaluate(checkpoint: Path | None, output_json: Path | None, **options) -> None:
    """Score a checkpoint, or the post-training compressed pretrained model, on --images-dir/val."""
    from training.cli_options import config_from_options
    from training.distributed import is_main_process
    from training.run import evaluate_run
    from utils.io import write_json

    try:
        result = evaluate_run(config_from_options(**options), checkpoint)
        if output_json is not None and is_main_process():
            write_json(output_json, result)
    except _compression_errors() as error:
        raise click.ClickException(str(error)) from None
    if not is_main_process():
        return
    click.echo(f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
               f"sparsity {result['sparsity']:.4f}  ({result['images']} images)")  # fmt: skip


if __name__ == "__main__":
    cli()
