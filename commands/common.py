"""Checks and error lists that several commands share: output paths, options the user gave, one-line errors."""
from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

__all__ = ["check_output", "compression_errors", "given_options"]


def check_output(path: str | Path | None, kind: str, option: str) -> None:
    """A usage error (exit 2) unless ``path`` can be written as a ``kind`` (``file`` or ``dir``); nothing is created."""
    from utils.io import OutputPathError, check_output_path

    if path is None:
        return
    try:
        check_output_path(path, kind)
    except OutputPathError as error:
        raise click.BadParameter(str(error), param_hint=f"'{option}'") from None


def given_options(ctx: click.Context) -> set[str]:
    """The options the user set (command line or environment), not left at their defaults."""
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)
    return {name for name in ctx.params if ctx.get_parameter_source(name) in given}


def compression_errors() -> tuple[type[Exception], ...]:
    """The one-line errors of the training package, for ``click.ClickException``."""
    from models import UnknownModelError, WeightsUnavailableError
    from training.builders import SetupError
    from training.checkpoint import CheckpointError
    from training.cifar import CifarFormatError
    from training.data import ImageFolderError
    from training.run import TrainingError

    return (UnknownModelError, WeightsUnavailableError, SetupError, CheckpointError, ImageFolderError, TrainingError,
            CifarFormatError, OSError)  # fmt: skip
