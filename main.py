#!/usr/bin/env python
"""Pruning vs quantization toolkit: the model zoo, pretrained-model checks, compressed fine-tuning and evaluation.

The commands live in :mod:`commands`, one module per group, each imported when its command runs (``--help``
imports none), so a command pays only for its own imports: ``search-bit-policy`` runs without torch.
"""
from __future__ import annotations

import click

from commands.lazy_group import LazyGroup
from utils.cli import setup_logging

COMMANDS = {  # name -> "module:function" (sorted in --help)
    "list-models": "commands.zoo:list_models_command",
    "predict": "commands.zoo:predict",
    "train-compressed": "commands.training:train_compressed",
    "evaluate": "commands.training:evaluate",
    "train-indicators": "commands.training:train_indicators",
    "psgd-compare": "commands.psgd:psgd_compare",
    "weight-histograms": "commands.psgd:weight_histograms",
    "search-bit-policy": "commands.search:search_bit_policy",
    "export": "commands.export:export",
}


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Compare and combine quantization and pruning of neural networks."""
    setup_logging()


if __name__ == "__main__":
    cli()
