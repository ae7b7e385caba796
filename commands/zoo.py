"""Commands of the model zoo: ``list-models`` and ``predict`` (a check that pretrained weights load)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from utils.cli import DeviceType, default_device

if TYPE_CHECKING:
    import torch

WEIGHTS_STATUS_TEXT = {"at hand": "weights at hand", "needs download": "needs download",
                       "not installed": "weights not installed", "none exist": "no pretrained weights"}  # fmt: skip


@click.command("list-models")
@click.option("--task", type=click.Choice(["classification", "detection", "segmentation", "video"]), default=None,
              help="Only models of this task.")
@click.option("--available", is_flag=True, help="Only models whose pretrained weights are at hand offline.")
def list_models_command(task: str | None, available: bool) -> None:
    """List the model zoo: name, task, and whether the pretrained weights are at hand."""
    from models import list_models, model_task, weights_status

    for name in list_models(task):
        status = weights_status(name)
        if status == "at hand" or not available:
            click.echo(f"{name:40s} {model_task(name):15s} {WEIGHTS_STATUS_TEXT[status]}")


@click.command()
@click.option("--model-name", default="efficientnet_lite0", show_default=True, help="An ImageNet classifier of the zoo.")
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Image file to classify (repeatable). Default: scikit-image's sample photos.")
@click.option("--top-k", type=click.IntRange(1, 1000), default=5, show_default=True)
@click.option("--device", type=DeviceType(), default=default_device(), show_default=True)
def predict(model_name: str, images: tuple[Path, ...], top_k: int, device: torch.device) -> None:
    """Classify images with a pretrained ImageNet model (a check that its weights load correctly)."""
    import torch
    from PIL import Image, UnidentifiedImageError

    from models import UnknownModelError, WeightsUnavailableError, check_model_name, eval_transform, load_model
    from utils.images import SAMPLE_PHOTOS, imagenet_class_names, load_sample_photo

    try:
        check_model_name(model_name, "classification")
    except UnknownModelError as error:
        raise click.BadParameter(str(error), param_hint="'--model-name'") from None
    try:
        model = load_model(model_name).to(device)
    except WeightsUnavailableError as error:
        raise click.ClickException(str(error)) from None
    transform = eval_transform(model_name)
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
