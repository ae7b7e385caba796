"""Training and scoring commands: ``train-compressed``, ``evaluate`` and LIMPQ's ``train-indicators``."""
from __future__ import annotations

from pathlib import Path

import click

from commands.common import check_output, compression_errors, given_options
from training.cli_options import (
    act_range_option,
    compression_options,
    indicator_options,
    model_data_options,
    runtime_options,
    training_options,
)


def _check_pruning_epochs(options: dict, given: set[str]) -> None:
    """Refuse a pruning epoch given by the user that the run does not reach (a default one is moved, with a warning)."""
    if options["prune_method"] == "none":
        return
    for name in ("prune_epoch_start", "prune_last_epoch"):
        if name in given and options[name] >= options["max_epochs"]:
            raise click.BadParameter(
                f"epoch {options[name]} is not in a run of --max-epochs {options['max_epochs']} "
                f"(epochs count from 0: at most {options['max_epochs'] - 1})",
                param_hint=f"'--{name.replace('_', '-')}'",
            )


def _check_bit_policy(options: dict, checkpoint: Path | None = None) -> None:
    """A usage error (exit 2) for a ``--bit-policy`` file that is unreadable or does not fit the model; before any work.

    With a checkpoint, the model is the checkpoint's: only the file itself is checked here.
    """
    from training.builders import SetupError, UnknownArchitectureError, check_bit_policy, compression_spec
    from training.cli_options import config_from_options

    if options.get("bit_policy") is None:
        return
    config = config_from_options(**options)
    try:
        if checkpoint is not None:
            compression_spec(config)
        else:
            check_bit_policy(config)
    except UnknownArchitectureError as error:
        raise click.BadParameter(str(error), param_hint="'--architecture'") from None
    except SetupError as error:
        message = str(error).removeprefix("--bit-policy: ").removeprefix(f"--bit-policy {config.quant.bit_policy}: ")
        raise click.BadParameter(message, param_hint="'--bit-policy'") from None


@click.command("train-compressed")
@model_data_options
@compression_options
@training_options
@runtime_options
@click.pass_context
def train_compressed(ctx: click.Context, **options) -> None:
    """Fine-tune a pretrained classifier with quantization-aware training and/or gradual magnitude pruning.

    A dataset with other classes than the model's (e.g. 10 instead of ImageNet's 1000) gets a new
    classifier head. best.pt is chosen among the epochs at the final sparsity only. The same
    command runs distributed under `torchrun --nproc_per_node N main.py train-compressed ...`.
    With --psgd-target it trains the float weights with PSGD instead (Kim et al., NeurIPS 2020),
    e.g. from a plain run's checkpoint (--init-checkpoint) on CIFAR (--dataset cifar100).
    """
    from training.builders import UnknownArchitectureError
    from training.cli_options import config_from_options, resolve_data_options
    from training.distributed import is_main_process
    from training.run import train

    options = resolve_data_options(options, given_options(ctx))
    _check_pruning_epochs(options, given_options(ctx))
    check_output(options["save_checkpoint_dir"], "dir", "--save-checkpoint-dir")
    check_output(options["tb_logging_dir"], "dir", "--tb-logging-dir")
    _check_bit_policy(options)
    try:
        summary = train(config_from_options(**options))
    except UnknownArchitectureError as error:
        raise click.BadParameter(str(error), param_hint="'--architecture'") from None
    except compression_errors() as error:
        raise click.ClickException(str(error)) from None
    final = summary["final"]
    if final and is_main_process():
        best = (f"best.pt: top-1 {summary['best_val_top1']:.2f}% at epoch {summary['best_epoch']}"
                if summary["best_epoch"] is not None else "no best.pt: no epoch at the final sparsity")  # fmt: skip
        click.echo(f"val top-1 {final['val_top1']:.2f}%  top-5 {final['val_top5']:.2f}%  loss {final['val_loss']:.4f}  "
                   f"sparsity {final['sparsity']:.4f}  ({best})")  # fmt: skip


@click.command()
@model_data_options
@compression_options
@act_range_option
@runtime_options
@click.option("--checkpoint", type=click.Path(exists=True, path_type=Path), default=None,
              help="A train-compressed checkpoint (file, or folder with last.pt). Its options define the model and "
                   "its compression (--architecture, --n-bits, --image-size, ...: giving another value is an error); "
                   "only --images-dir, --batch-size, --num-workers, --device, --amp, --channels-last, "
                   "--progress-bar, --seed, --deterministic and --data-dir apply. Without it: the pretrained model "
                   "compressed without training.")  # fmt: skip
@click.option("--output-json", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write top-1, top-5, loss, and per layer its sparsity, weight_bits and act_bits (null: float) here.")  # fmt: skip
@click.pass_context
def evaluate(ctx: click.Context, checkpoint: Path | None, output_json: Path | None, **options) -> None:
    """Score a checkpoint, or the post-training compressed pretrained model (or --init-checkpoint's weights), on
    --images-dir/val (the test split of --dataset cifar10/cifar100).

    With --init-checkpoint (a float train-compressed run, e.g. a PSGD one) its weights are compressed post hoc
    without training as the options given say (--n-bits, --quant-setup, --act-quant with --act-range,
    --prune-method zhu_gupta --s-f): the options it was trained with do not apply.
    """
    from training.builders import UnknownArchitectureError
    from training.cli_options import config_from_options, resolve_data_options
    from training.distributed import is_main_process
    from training.run import OptionConflictError, evaluate_run
    from utils.io import write_json

    options = resolve_data_options(options, given_options(ctx))
    check_output(output_json, "file", "--output-json")
    _check_bit_policy(options, checkpoint)
    try:
        result = evaluate_run(config_from_options(**options), checkpoint, given_options(ctx))
        if output_json is not None and is_main_process():
            write_json(output_json, result)
    except OptionConflictError as error:
        raise click.UsageError(str(error)) from None
    except UnknownArchitectureError as error:
        raise click.BadParameter(str(error), param_hint="'--architecture'") from None
    except compression_errors() as error:
        raise click.ClickException(str(error)) from None
    if not is_main_process():
        return
    click.echo(f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
               f"sparsity {result['sparsity']:.4f}  ({result['images']} images)")  # fmt: skip


@click.command("train-indicators")
@model_data_options
@indicator_options
@runtime_options
@click.pass_context
def train_indicators(ctx: click.Context, **options) -> None:
    """LIMPQ, stage 1: learn the importance indicators of every convolution but the first (Tang et al., ECCV 2022).

    Each quantizer learns one step size per candidate bit-width (--bits): every batch runs one
    pass at each candidate and one at a random per-layer mix, gradients are clipped to [-1, 1],
    one SGD step trains weights and step sizes. After every epoch the output folder receives
    indicators.json (LIMPQ's layout: the input of `search-bit-policy --indicators`) and its
    figure; validation runs at the largest bit-width. Resumable (--resume) like train-compressed,
    and distributed under `torchrun --nproc_per_node N main.py train-indicators ...`.
    """
    from training.builders import ArchitectureError
    from training.cli_options import indicator_config_from_options, resolve_data_options
    from training.distributed import is_main_process
    from training.limpq import check_searchable_layers
    from training.run import train

    options = resolve_data_options(options, given_options(ctx))
    check_output(options["save_checkpoint_dir"], "dir", "--output-dir")
    check_output(options["tb_logging_dir"], "dir", "--tb-logging-dir")
    config = indicator_config_from_options(**options)
    try:
        check_searchable_layers(config)
        summary = train(config)
    except ArchitectureError as error:
        raise click.BadParameter(str(error), param_hint="'--architecture'") from None
    except compression_errors() as error:
        raise click.ClickException(str(error)) from None
    final = summary["final"]
    if final and is_main_process():
        click.echo(f"indicators at {','.join(map(str, config.indicators.bits))} bits -> {summary['indicators']}  "
                   f"(val top-1 at {max(config.indicators.bits)} bits {final['val_top1']:.2f}%, "
                   f"loss {final['val_loss']:.4f})")  # fmt: skip
