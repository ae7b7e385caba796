#!/usr/bin/env python
"""Post-training, per-layer analysis of quantization and pruning with real layer inputs."""
from __future__ import annotations

import click

from utils.cli import setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Per-layer post-training quantization and pruning on calibration data."""
    setup_logging()


@cli.command("list-layers")
@click.option("--model-name", default="efficientnet_lite0", show_default=True)
def list_layers(model_name: str) -> None:
    """Print the name, type and weight shape of every Conv/Linear layer of a model."""
    from models import UnknownModelError, WeightsUnavailableError, load_model
    from models.layers import weight_layers

    try:
        model = load_model(model_name)
    except (UnknownModelError, WeightsUnavailableError) as error:
        raise click.ClickException(str(error)) from None
    for name, module in weight_layers(model):
        click.echo(f"{name:50s} {type(module).__name__:16s} {tuple(module.weight.shape)}")


if __name__ == "__main__":
    cli()
