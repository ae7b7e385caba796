#!/usr/bin/env python
"""Pruning vs quantization toolkit: the model zoo, pretrained-model checks, compressed fine-tuning and evaluation."""
from __future__ import annotations

from pathlib import Path

import click
import torch
from click.core import ParameterSource

from training.cli_options import (
    LrScheduleType,
    act_range_option,
    compression_options,
    indicator_options,
    model_data_options,
    runtime_options,
    training_options,
)
from training.config import CIFAR_IMAGE_SIZE, DATASETS
from utils.cli import DeviceType, IntListType, default_device, setup_logging

WEIGHTS_STATUS_TEXT = {"at hand": "weights at hand", "needs download": "needs download",
                       "not installed": "weights not installed", "none exist": "no pretrained weights"}  # fmt: skip


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
    from models import list_models, model_task, weights_status

    for name in list_models(task):
        status = weights_status(name)
        if status == "at hand" or not available:
            click.echo(f"{name:40s} {model_task(name):15s} {WEIGHTS_STATUS_TEXT[status]}")


@cli.command()
@click.option("--model-name", default="efficientnet_lite0", show_default=True, help="An ImageNet classifier of the zoo.")
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Image file to classify (repeatable). Default: scikit-image's sample photos.")
@click.option("--top-k", type=click.IntRange(1, 1000), default=5, show_default=True)
@click.option("--device", type=DeviceType(), default=default_device(), show_default=True)
def predict(model_name: str, images: tuple[Path, ...], top_k: int, device: torch.device) -> None:
    """Classify images with a pretrained ImageNet model (a check that its weights load correctly)."""
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


def _check_output(path: str | Path | None, kind: str, option: str) -> None:
    """A usage error (exit 2) unless ``path`` can be written as a ``kind`` (``file`` or ``dir``); nothing is created."""
    from utils.io import OutputPathError, check_output_path

    if path is None:
        return
    try:
        check_output_path(path, kind)
    except OutputPathError as error:
        raise click.BadParameter(str(error), param_hint=f"'{option}'") from None


def _given_options(ctx: click.Context) -> set[str]:
    """The options the user set (command line or environment), not left at their defaults."""
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)
    return {name for name in ctx.params if ctx.get_parameter_source(name) in given}


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


def _compression_errors():
    """The one-line errors of the training package, for ``click.ClickException``."""
    from models import UnknownModelError, WeightsUnavailableError
    from training.builders import SetupError
    from training.checkpoint import CheckpointError
    from training.cifar import CifarFormatError
    from training.data import ImageFolderError
    from training.run import TrainingError

    return (UnknownModelError, WeightsUnavailableError, SetupError, CheckpointError, ImageFolderError, TrainingError,
            CifarFormatError, OSError)  # fmt: skip


@cli.command("train-compressed")
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

    options = resolve_data_options(options, _given_options(ctx))
    _check_pruning_epochs(options, _given_options(ctx))
    _check_output(options["save_checkpoint_dir"], "dir", "--save-checkpoint-dir")
    _check_output(options["tb_logging_dir"], "dir", "--tb-logging-dir")
    _check_bit_policy(options)
    try:
        summary = train(config_from_options(**options))
    except UnknownArchitectureError as error:
        raise click.BadParameter(str(error), param_hint="'--architecture'") from None
    except _compression_errors() as error:
        raise click.ClickException(str(error)) from None
    final = summary["final"]
    if final and is_main_process():
        best = (f"best.pt: top-1 {summary['best_val_top1']:.2f}% at epoch {summary['best_epoch']}"
                if summary["best_epoch"] is not None else "no best.pt: no epoch at the final sparsity")  # fmt: skip
        click.echo(f"val top-1 {final['val_top1']:.2f}%  top-5 {final['val_top5']:.2f}%  loss {final['val_loss']:.4f}  "
                   f"sparsity {final['sparsity']:.4f}  ({best})")  # fmt: skip


@cli.command()
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

    options = resolve_data_options(options, _given_options(ctx))
    _check_output(output_json, "file", "--output-json")
    _check_bit_policy(options, checkpoint)
    try:
        result = evaluate_run(config_from_options(**options), checkpoint, _given_options(ctx))
        if output_json is not None and is_main_process():
            write_json(output_json, result)
    except OptionConflictError as error:
        raise click.UsageError(str(error)) from None
    except UnknownArchitectureError as error:
        raise click.BadParameter(str(error), param_hint="'--architecture'") from None
    except _compression_errors() as error:
        raise click.ClickException(str(error)) from None
    if not is_main_process():
        return
    click.echo(f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
               f"sparsity {result['sparsity']:.4f}  ({result['images']} images)")  # fmt: skip


@cli.command("train-indicators")
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

    options = resolve_data_options(options, _given_options(ctx))
    _check_output(options["save_checkpoint_dir"], "dir", "--output-dir")
    _check_output(options["tb_logging_dir"], "dir", "--tb-logging-dir")
    config = indicator_config_from_options(**options)
    try:
        check_searchable_layers(config)
        summary = train(config)
    except ArchitectureError as error:
        raise click.BadParameter(str(error), param_hint="'--architecture'") from None
    except _compression_errors() as error:
        raise click.ClickException(str(error)) from None
    final = summary["final"]
    if final and is_main_process():
        click.echo(f"indicators at {','.join(map(str, config.indicators.bits))} bits -> {summary['indicators']}  "
                   f"(val top-1 at {max(config.indicators.bits)} bits {final['val_top1']:.2f}%, "
                   f"loss {final['val_loss']:.4f})")  # fmt: skip


@cli.command("psgd-compare")
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
    _check_output(options["output_dir"], "dir", "--output-dir")
    options["images_dir"] = options["images_dir"] or ""
    try:
        summary = run_comparison(ComparisonSettings(bits=tuple(bits), device=str(device), **options))
    except _compression_errors() + (ComparisonError,) as error:
        raise click.ClickException(str(error)) from None
    for row in summary.itertuples():
        click.echo(f"b={row.bits} {row.arm:12s} {row.compression:16s} top-1 {row.posthoc_top1:6.2f}% "
                   f"(float {row.float_top1:6.2f}%)  mean layer SQNR {row.mean_sqnr_db:6.2f} dB")


@cli.command("weight-histograms")
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

    _check_output(output_dir, "dir", "--output-dir")
    names = [layer.strip() for layer in layers.split(",") if layer.strip()] if layers else None
    try:
        paths = write_weight_histograms(psgd_checkpoint, plain_checkpoint, output_dir, name, names)
    except _compression_errors() + (HistogramError,) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {', '.join(map(str, paths))}")


@cli.command("search-bit-policy")
@click.option("--architecture", default="resnet50", show_default=True, help="A classifier of the model zoo.")
@click.option("--indicators", default=None,
              help="Importance indicators: a JSON file or LIMPQ's pickle ({'weight', 'act', 'layer_name'}), or "
                   "weight-mse / output-mse to compute data-free ones from the pretrained model. Default: the "
                   "published ResNet-50 indicators (data/limpq/resnet50_indicators.json).")  # fmt: skip
@click.option("--bits", type=IntListType(2, 8, distinct=True, descending=True), default="6,5,4,3,2", show_default=True,
              help="Candidate bit-widths (distinct; a list or a range like 2-6).")
@click.option("--wb", type=click.IntRange(1, 32), default=3, show_default=True,
              help="BitOPs budget: that of every searched layer at WB-bit weights ...")
@click.option("--ab", type=click.IntRange(1, 32), default=4, show_default=True, help="... and AB-bit inputs.")
@click.option("--compression-ratio", type=click.FloatRange(min=0), default=12.2, show_default=True,
              help="The model's weights at most 32-bit size / CR (first conv and classifier at 8 bits); 0: off.")
@click.option("--bitops/--no-bitops", default=True, show_default=True, help="The BitOPs constraint.")
@click.option("--alpha", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Weight of the weight indicators in the objective.")
@click.option("--bitops-geometry", type=click.Choice(["floored", "official"]), default="floored", show_default=True,
              help="MACs from the real (floored) output sizes, or LIMPQ's true-division count.")
@click.option("--image-size", type=click.IntRange(16, 4096), default=224, show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The policy file to write (a valid --bit-policy file); its figure goes beside it (.png, .pdf).")
@click.option("--compare-with", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Another policy file of the same layers, drawn below the new one in the figure.")
@click.option("--figure/--no-figure", default=True, show_default=True,
              help="Draw the policy beside the file (<output stem>.png, .pdf); --no-figure saves a second or two.")
def search_bit_policy(output: Path, indicators: str | None, bits: list[int], bitops_geometry: str,
                      compare_with: Path | None, figure: bool, **options) -> None:  # fmt: skip
    """LIMPQ's ILP search of per-layer weight and activation bit-widths (every conv but the first)."""
    from studies.bit_policy_search import (
        BUNDLED_INDICATORS,
        BitPolicySearchError,
        SearchSettings,
        run_bit_policy_search,
    )

    _check_output(output, "file", "--output")
    settings = SearchSettings(indicators=indicators or str(BUNDLED_INDICATORS), bits=tuple(bits),
                              geometry=bitops_geometry, **options)  # fmt: skip
    try:
        policy = run_bit_policy_search(settings, output, compare_with, figure)
    except BitPolicySearchError as error:
        if error.option:
            raise click.BadParameter(str(error), param_hint=f"'{error.option}'") from None
        raise click.ClickException(str(error)) from None
    target = f" (target {policy['bitops_target']:.4g})" if policy["bitops_target"] is not None else ""
    click.echo(f"{policy['status']}: {len(policy['layers'])} layers, objective {policy['objective']:.6g}, "
               f"BitOPs {policy['bitops']:.4g}{target}, compression ratio {policy['compression_ratio']:.3f}, "
               f"solved in {policy['solve_seconds'] * 1e3:.0f} ms -> {output}")  # fmt: skip


@cli.command("export")
@click.option("--checkpoint", type=click.Path(exists=True, path_type=Path), required=True,
              help="A train-compressed checkpoint (file, or folder with last.pt): QAT at <= 8 bits, or float.")
@click.option("--format", "export_format", type=click.Choice(["onnx-int8", "pt2e-x86", "onnx-fp32"]), required=True,
              help="onnx-int8: int8 QDQ ONNX for onnxruntime; pt2e-x86: torchao PT2E int8 program (.pt2) for "
                   "torch.compile/inductor; onnx-fp32: the dense folded float model as ONNX.")  # fmt: skip
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The model file; its report goes to OUTPUT.json.")
@click.option("--images-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="train/ and val/ class folders: train calibrates the 8-bit activations, val checks the export.")
@click.option("--calibration-batches", type=click.IntRange(1), default=4, show_default=True,
              help="Training batches (of --batch-size) that calibrate the activations.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--pack", is_flag=True, help="Also write the int8 weights in their smallest encoding to OUTPUT.weights.npz.")
def export(checkpoint: Path, export_format: str, output: Path, images_dir: Path | None, calibration_batches: int,
           batch_size: int, pack: bool) -> None:  # fmt: skip
    """A train-compressed checkpoint as a real int8 model (or the dense folded float model), checked on --images-dir."""
    from deployment.export import ExportError, ExportFormat, ExportSettings, export_checkpoint
    from utils.io import OutputPathError

    settings = ExportSettings(checkpoint, ExportFormat(export_format), output, images_dir, calibration_batches,
                              batch_size, pack)  # fmt: skip
    try:
        report = export_checkpoint(settings)
    except OutputPathError as error:
        raise click.BadParameter(str(error), param_hint="'--output'") from None
    except ExportError as error:
        raise click.ClickException(str(error)) from None
    check = report["check"]
    checked = (f"; top-1 {check['top1_exported']:.2f}% (fake-quantized {check['top1_reference']:.2f}%, agreement "
               f"{check['top1_agreement']:.1f}%), max logit error {check['max_logit_error']:.3g}"
               if check is not None else "")  # fmt: skip
    sizes = report["weight_bytes"]
    click.echo(f"{export_format} -> {output} ({report['output_bytes']} bytes, {report['export_seconds']:.1f} s){checked}; "
               f"weights: float32 {sizes['float32']} B, int8 {sizes['int8']} B, smallest {report['smallest_encoding']} "
               f"{sizes[report['smallest_encoding']]} B")  # fmt: skip


if __name__ == "__main__":
    cli()
