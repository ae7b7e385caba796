"""The ``train-compressed``, ``train-indicators`` and ``evaluate`` runs: set-up, epoch loop, checkpoints, metrics files.

One run trains with one *method* (:class:`TrainingMethod`): :class:`CompressionTraining`
(``train-compressed``: quantization-aware training and/or gradual pruning) or
:class:`training.limpq.IndicatorTraining` (``train-indicators``: LIMPQ's joint training of the
importance indicators), chosen by the config (:func:`training_method`). The method builds the
model, plugs its step function and callbacks into the loop, prepares each evaluation and adds
its own state to the checkpoints and its own files to the outputs; set-up, epoch loop,
distribution, checkpoints, resuming and metrics are the run's.

Outputs of a training run (in ``--save-checkpoint-dir``, written by rank 0, atomically):

* ``last.pt`` after every epoch and ``best.pt``: the epoch with the best validation top-1
  among those that end at the final compression (the last pruning-mask update, at ``--s-f``,
  done; without pruning every epoch qualifies), so that ``best.pt`` is never an
  under-compressed model (see :mod:`training.checkpoint`);
* ``metrics.csv``: one row per epoch (train loss/top-1, validation loss/top-1/top-5, the
  learning rate, the mean sparsity, skipped images, epoch time);
* ``summary.json`` at the end: final and best metrics, per-layer sparsity and bit-widths, options;
* TensorBoard scalars in ``--tb-logging-dir`` when asked;
* the method's files after every epoch (``indicators.json`` and its figure for ``train-indicators``).
"""
from __future__ import annotations

import importlib.util
import logging
import math
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models.bit_policy import BitPolicy
from models.quantized import calibrate_input_quantizers, compressed_layers, layer_report, reestimate_bn_stats
from pruning.schedule import PruningScope, set_magnitude_masks
from quantization.bn_ranges import BatchNormRangeError, parse_act_range, set_batch_norm_input_ranges
from training.builders import (
    bit_policy_of,
    build_compressed_model,
    build_optimizers,
    build_pruner,
    build_psgd_callback,
    build_schedulers,
    check_architecture,
    configure_determinism,
    image_size_check,
    output_classes,
)
from training.callbacks import GradualPruningCallback, PositionScaledGradientCallback
from training.checkpoint import BEST, LAST, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from training.config import PSGD_GRID_METHOD, TrainConfig, differing_options, option_flag, saved_config
from training.data import (
    DataLoaders,
    FolderAugmentation,
    SkipRecorder,
    TrainUse,
    build_cifar_loaders,
    build_loaders,
    check_images_dir,
)
from training.distributed import (
    DistributedContext,
    barrier,
    init_distributed,
    shutdown_distributed,
)
from training.engine import (
    Metrics,
    NonFiniteLossError,
    StepFunction,
    StepOptions,
    TrainCallback,
    cross_entropy_loss,
    evaluate,
    image_batches,
    single_pass_step,
    train_one_epoch,
)
from training.limpq import IndicatorTraining
from utils.io import OutputPathError, check_output_path, ensure_writable_dir, write_csv, write_json

logger = logging.getLogger(__name__)

METRICS_CSV = "metrics.csv"
SUMMARY_JSON = "summary.json"


# The options of a checkpoint evaluation that are not taken from the checkpoint.
EVALUATION_OPTIONS = ("images_dir", "batch_size", "num_workers", "device", "amp", "channels_last", "progress_bar",
                      "seed", "deterministic", "data_dir")  # fmt: skip
SHOWN_SKIPPED_PATHS = 5


class TrainingError(RuntimeError):
    """A run that cannot start or continue (one-line message for the command line)."""


class OptionConflictError(TrainingError):
    """Options given on the command line that contradict a checkpoint's (a usage error)."""


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def _step_options(config: TrainConfig, context: DistributedContext) -> StepOptions:
    runtime = config.runtime
    return StepOptions(context.device, runtime.amp, runtime.channels_last, runtime.progress_bar and context.is_main)


def _loaders(config: TrainConfig, context: DistributedContext, train_use: TrainUse) -> DataLoaders:
    data = config.data
    if data.batch_size % context.world_size:
        raise TrainingError(f"--batch-size {data.batch_size} is not divisible by the {context.world_size} processes")
    common = (data.batch_size // context.world_size, data.num_workers, config.runtime.seed, context.rank,
              context.world_size, train_use, context.device.type == "cuda")  # fmt: skip
    if data.is_cifar:
        if not data.data_dir:
            raise TrainingError(f"--dataset {data.dataset} needs --data-dir (the folder of the CIFAR archive)")
        return build_cifar_loaders(Path(data.data_dir), data.dataset, *common)
    _check_images_dir_given(config)
    return build_loaders(Path(data.images_dir), data.image_size, *common, FolderAugmentation(data.augmentation))


def _check_images_dir_given(config: TrainConfig) -> None:
    if not config.data.images_dir:
        raise TrainingError(f"--dataset {config.data.dataset} needs --images-dir")


def _check_classes(model: nn.Module, config: TrainConfig, num_classes: int) -> int:
    """The number of classes ``model`` predicts: at least the dataset's ``num_classes``, else :class:`TrainingError`."""
    with image_size_check(config):
        outputs = output_classes(model, config.data.image_size)
    if num_classes > outputs:
        raise TrainingError(f"the dataset has {num_classes} classes but {config.model.architecture} predicts {outputs}")
    return outputs


def _reestimate_bn(model: nn.Module, loaders: DataLoaders, config: TrainConfig, options: StepOptions) -> None:
    if config.bn.reestimate_bn_stats and loaders.estimation is not None:
        reestimate_bn_stats(model, image_batches(loaders.estimation, config.bn.bn_est_batches, options))


def _mean_sparsity(model: nn.Module) -> float:
    report = layer_report(model)
    total = sum(layer["numel"] for layer in report.values())
    return sum(layer["sparsity"] * layer["numel"] for layer in report.values()) / max(total, 1)


class TrainingMethod(Protocol):
    """What a training run trains: the parts of the run that differ between ``train-compressed`` and ``train-indicators``.

    The run calls, in this order: :meth:`load_state_dict` (when resuming, with the state a
    checkpoint stored), :meth:`build_model` (on CPU), :meth:`start` (a fresh run, the model on
    its device), :meth:`plugins` (after the optimizers are built); every epoch
    :meth:`before_evaluation`, then on rank 0 :meth:`state_dict` (into the checkpoint) and
    :meth:`write_epoch_outputs`.
    """

    find_unused_parameters: bool  # for DistributedDataParallel: some parameters take no part in a pass

    def describe(self) -> str:
        """One line for the run's log: what is trained."""

    def build_model(self, num_classes: int | None, for_state_dict: bool) -> nn.Module:
        """The model to train, with a new ``num_classes``-way head when the base model predicts another number;
        ``for_state_dict``: a checkpoint's state is loaded next (no pretrained weights needed)."""

    def start(self, model: nn.Module, loaders: DataLoaders, options: StepOptions) -> None:
        """Set-up of a fresh run before the first epoch (e.g. activation ranges from training batches)."""

    def plugins(self, model: nn.Module) -> tuple[StepFunction, list[TrainCallback]]:
        """The step function and the callbacks of the training loop for ``model`` (unwrapped)."""

    def before_evaluation(self, model: nn.Module, loaders: DataLoaders, options: StepOptions) -> None:
        """Prepare ``model`` for the validation pass after each epoch."""

    def state_dict(self) -> dict[str, Any]:
        """The method's own state, for a checkpoint (tensors and plain containers)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s state."""

    def write_epoch_outputs(self, model: nn.Module, out_dir: Path) -> dict[str, Any]:
        """Write the method's files after an epoch (rank 0); their paths, for the summary."""


class CompressionTraining:
    """``train-compressed``: QAT and/or gradual pruning (:func:`training.builders.build_compressed_model`).

    A fresh run estimates the activation ranges on training batches (in train mode); each
    evaluation is preceded by the batch-norm re-estimation (``--reestimate-bn-stats``). One
    forward/backward pass per step; the pruning callback is the run's (it needs the schedule).
    With ``--psgd-target`` the PSGD callback scales the gradients
    (:func:`training.builders.build_psgd_callback`); its grid ranges go into the checkpoints.
    """

    find_unused_parameters = False

    def __init__(self, config: TrainConfig, bit_policy: BitPolicy | None) -> None:
        self.config = config
        self.bit_policy = bit_policy
        self.psgd: PositionScaledGradientCallback | None = None
        self._psgd_state: dict[str, Any] | None = None  # from a checkpoint, for the callback made in plugins()

    def describe(self) -> str:
        return f"compression: {_describe_compression(self.config)}"

    def build_model(self, num_classes: int | None, for_state_dict: bool) -> nn.Module:
        initial = None if for_state_dict else self.config.model.init_checkpoint
        return build_compressed_model(self.config, for_state_dict=for_state_dict, num_classes=num_classes,
                                      bit_policy=self.bit_policy, init_checkpoint=initial)  # fmt: skip

    def start(self, model: nn.Module, loaders: DataLoaders, options: StepOptions) -> None:
        estimation = image_batches(loaders.estimation, self.config.quant.num_est_batches, options)
        calibrate_input_quantizers(model, estimation, train_mode=True)

    def plugins(self, model: nn.Module) -> tuple[StepFunction, list[TrainCallback]]:
        self.psgd = build_psgd_callback(model, self.config)
        if self.psgd is None:
            return single_pass_step, []
        if self._psgd_state is not None:
            self.psgd.load_state_dict(self._psgd_state)
        return single_pass_step, [self.psgd]

    def before_evaluation(self, model: nn.Module, loaders: DataLoaders, options: StepOptions) -> None:
        _reestimate_bn(model, loaders, self.config, options)

    def state_dict(self) -> dict[str, Any]:
        return {"psgd": self.psgd.state_dict()} if self.psgd is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._psgd_state = state.get("psgd")
        if self.config.psgd.enabled and self._psgd_state is None:
            raise TrainingError("the checkpoint has no PSGD state (it was written without --psgd-target)")

    def write_epoch_outputs(self, model: nn.Module, out_dir: Path) -> dict[str, Any]:
        return {}


def training_method(config: TrainConfig, bit_policy: BitPolicy | None = None) -> TrainingMethod:
    """LIMPQ's indicator training when ``config.indicators`` names candidate bit-widths, else QAT/pruning
    (with ``bit_policy``, the ``--bit-policy`` file's)."""
    if config.indicators.enabled:
        return IndicatorTraining(config)
    return CompressionTraining(config, bit_policy)


@dataclass
class RunState:
    """What the epoch loop carries from one epoch to the next (and through a checkpoint)."""

    epoch: int = 0  # next epoch to run
    step: int = 0
    best_top1: float = -math.inf  # among the epochs at the final compression
    best_epoch: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    num_classes: int = 1000  # outputs of the model's head


def train(config: TrainConfig) -> dict[str, Any]:
    """Train ``config.model.architecture`` with the config's method (:func:`training_method`); returns the summary dict."""
    try:
        config.validate()
    except ValueError as error:
        raise TrainingError(str(error)) from None
    if config.quant.weight_quant_method == PSGD_GRID_METHOD:  # (its restricted levels are not saved in checkpoints)
        raise TrainingError(f"--weight-quant-method {PSGD_GRID_METHOD} is for evaluate (post hoc), not for training")
    runtime, pruning, max_epochs = config.runtime, config.pruning, config.optim.max_epochs
    if runtime.tb_logging_dir and not tensorboard_available():
        raise TrainingError("--tb-logging-dir needs the tensorboard package (pip install tensorboard)")
    check_architecture(config)
    if not config.data.is_cifar:
        _check_images_dir_given(config)
        check_images_dir(Path(config.data.images_dir))
    outputs = {"--save-checkpoint-dir": runtime.save_checkpoint_dir, "--tb-logging-dir": runtime.tb_logging_dir}
    for option, folder in outputs.items():
        if folder:
            try:
                check_output_path(folder, "dir")
            except OutputPathError as error:
                raise TrainingError(f"{option}: {error}") from None
    if pruning.is_gradual and pruning.prune_last_epoch >= max_epochs:
        logger.warning("--prune-last-epoch %d is beyond this run's last epoch (--max-epochs %d): pruning reaches "
                       "--s-f %g at the end of epoch %d instead", pruning.prune_last_epoch, max_epochs, pruning.s_f,
                       max_epochs - 1)  # fmt: skip
    context = init_distributed(torch.device(runtime.device))
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(config, context)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        shutdown_distributed(context)


def _train(config: TrainConfig, context: DistributedContext) -> dict[str, Any]:
    configure_determinism(config.runtime.seed, config.runtime.deterministic, context.device)
    out_dir = Path(config.runtime.save_checkpoint_dir)
    checkpoint = _load_resume_checkpoint(config) if config.runtime.resume else None
    bit_policy = bit_policy_of(config)
    method = training_method(config, bit_policy)
    if checkpoint is not None:
        method.load_state_dict(checkpoint.get("method", {}))
    options = _step_options(config, context)
    loaders = _loaders(config, context, TrainUse.TRAINING)
    steps_per_epoch = len(loaders.train)
    if context.is_main:
        _log_header(config, method, loaders, context, out_dir)
    num_classes = _head_classes(checkpoint, loaders.num_classes, config)
    model = method.build_model(num_classes, for_state_dict=checkpoint is not None)
    state = RunState(num_classes=_check_classes(model, config, loaders.num_classes))
    if context.is_main:  # every input is checked: now the output folder may be created
        ensure_writable_dir(out_dir)
    model.to(context.device)
    if checkpoint is None:
        loaders.set_epoch(0)
        method.start(model, loaders, options)
    else:
        model.load_state_dict(checkpoint["model"])
        _freeze_input_quantizers(model)
    if config.runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    if config.bn.sync_bn and context.is_distributed:
        if context.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            logger.warning("--sync-bn needs CUDA devices; batch norms use per-process statistics")
    optimizers = build_optimizers(model, config)
    schedulers = build_schedulers(optimizers, config, steps_per_epoch)
    pruner = build_pruner(model, config, steps_per_epoch)
    step_fn, callbacks = method.plugins(model)
    if pruner is not None:
        callbacks.append(GradualPruningCallback(pruner))
    loss_fn = partial(cross_entropy_loss, label_smoothing=config.optim.label_smoothing)
    scaler = torch.amp.GradScaler(context.device.type, enabled=config.runtime.amp and context.device.type == "cuda")
    if checkpoint is not None:
        state = _restore(checkpoint, optimizers, schedulers, scaler, state.num_classes)
        logger.info("resumed from %s at epoch %d", config.runtime.resume, state.epoch)
    trained = (
        DistributedDataParallel(model, device_ids=[context.device.index] if context.device.type == "cuda" else None,
                                find_unused_parameters=method.find_unused_parameters)
        if context.is_distributed
        else model
    )  # fmt: skip
    writer = _tensorboard_writer(config) if context.is_main else None
    train_batches, val_batches = SkipRecorder(loaders.train), SkipRecorder(loaders.val)
    warned_skipped = False
    outputs: dict[str, Any] = {}  # the method's files (rank 0)
    for epoch in range(state.epoch, config.optim.max_epochs):
        start = time.perf_counter()
        loaders.set_epoch(epoch)
        try:
            train_metrics, state.step = train_one_epoch(
                trained, train_batches, list(optimizers.values()), list(schedulers.values()), scaler, state.step,
                context, options, callbacks, loss_fn=loss_fn, step_fn=step_fn, freeze_bn=config.bn.freeze_bn,
                description=f"epoch {epoch}",
            )  # fmt: skip
        except NonFiniteLossError as error:
            last = out_dir / LAST
            kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
            raise TrainingError(f"{error} (epoch {epoch}): stopping; {kept}") from None
        method.before_evaluation(model, loaders, options)
        val = evaluate(model, val_batches, context, options)
        row = _metrics_row(epoch, train_metrics, val, optimizers, model, time.perf_counter() - start)
        state.history.append(row)
        state.epoch = epoch + 1
        # best.pt only among epochs at the final compression (the last mask update, at s_f, is done)
        at_final_compression = pruner is None or state.step > pruner.schedule.last_update_step
        is_best = at_final_compression and val.top1 > state.best_top1
        if is_best:
            state.best_top1, state.best_epoch = val.top1, epoch
        if row["skipped_images"] and not warned_skipped:
            _warn_skipped(int(row["skipped_images"]), train_batches.paths | val_batches.paths, f"in epoch {epoch}")
            warned_skipped = True
        logger.info("epoch %d: train loss %.4f top-1 %.2f | val loss %.4f top-1 %.2f top-5 %.2f | sparsity %.4f",
                    epoch, train_metrics.loss, train_metrics.top1, val.loss, val.top1, val.top5, row["sparsity"])  # fmt: skip
        if context.is_main:
            payload = _checkpoint_payload(model, optimizers, schedulers, scaler, state, config, bit_policy, method)
            save_checkpoint(out_dir / LAST, payload)
            if is_best:
                save_checkpoint(out_dir / BEST, payload)
            write_csv(out_dir / METRICS_CSV, pd.DataFrame(state.history))
            outputs = method.write_epoch_outputs(model, out_dir)
            if writer is not None:
                for key, value in row.items():
                    if key != "epoch":
                        writer.add_scalar(key, value, epoch)
        barrier(context)
    if writer is not None:
        writer.close()
    summary = _summary(model, state, config) | outputs
    if context.is_main:
        write_json(out_dir / SUMMARY_JSON, summary)
        _log_outputs(out_dir, state)
    return summary


def _head_classes(checkpoint: dict[str, Any] | None, dataset_classes: int, config: TrainConfig) -> int | None:
    """The number of classes the model's head gets: the dataset's, or a resumed checkpoint's (None: unchanged head)."""
    if checkpoint is None:
        return dataset_classes
    saved = checkpoint.get("num_classes")
    if saved is not None and saved != dataset_classes:
        raise TrainingError(
            f"{config.runtime.resume} was trained on {saved} classes but {config.data.source} has {dataset_classes}"
        )
    return saved


def _describe_compression(config: TrainConfig) -> str:
    """One line: weight and activation bits, pruning schedule."""
    quant, prune = config.quant, config.pruning
    if quant.weight_quant:
        channel = "per channel" if quant.per_channel else "per tensor"
        weights = f"{quant.n_bits}-bit weights ({channel}, --quant-setup {quant.quant_setup})"
    else:
        weights = "float weights"
    activations = f"{quant.n_bits_act}-bit activations" if quant.act_quant else "float activations"
    if quant.bit_policy is not None:
        activations += f", per-layer bits of the layers named in --bit-policy {quant.bit_policy}"
    if prune.is_block:
        pattern = f"1x{prune.block_size} blocks" if prune.block_pattern == "1xn" else f"{prune.block_pattern} pattern"
        pruning = (f"block pruning ({pattern}{', rearranged filters' if prune.rearrange else ''}) at rate "
                   f"{prune.s_f:g}, masks fixed from the start")  # fmt: skip
    elif prune.enabled:
        last = min(prune.prune_last_epoch, config.optim.max_epochs - 1)
        pruning = (f"{prune.prune_method} pruning ({prune.prune_scope}) from sparsity {prune.s_i:g} in epoch "
                   f"{min(prune.prune_epoch_start, last)} to {prune.s_f:g} at the end of epoch {last}")  # fmt: skip
    else:
        pruning = "no pruning"
    psgd = config.psgd
    if psgd.enabled:
        target = f"the {psgd.psgd_bits}-bit grid" if psgd.grid_bits is not None else "zero"
        decay = "scaled" if psgd.psgd_scale_weight_decay else "unscaled"
        pruning += f", PSGD towards {target} (lambda {psgd.psgd_lambda:g}, {decay} weight decay)"
    return f"{weights}, {activations}, {pruning}"


def _log_header(
    config: TrainConfig, method: TrainingMethod, loaders: DataLoaders, context: DistributedContext, out_dir: Path
) -> None:
    start = "pretrained" if config.model.pretrained else "random init"
    if config.model.init_checkpoint is not None:
        start = f"weights of {config.model.init_checkpoint}"
    logger.info("%s: %s (%s) on %s: %d classes, %d training and %d validation images", config.command,
                config.model.architecture, start, config.data.source, loaders.num_classes,
                len(loaders.train.dataset), len(loaders.val.dataset))  # fmt: skip
    logger.info("%s", method.describe())
    processes = f", {context.world_size} processes" if context.is_distributed else ""
    logger.info("device %s%s, %d epochs, batch %d; checkpoints and metrics in %s",
                context.device, processes, config.optim.max_epochs, config.data.batch_size, out_dir)  # fmt: skip


def _log_outputs(out_dir: Path, state: RunState) -> None:
    if state.best_epoch is not None:
        best = f"best {out_dir / BEST} (epoch {state.best_epoch}, val top-1 {state.best_top1:.2f}%)"
    else:
        best = "no best.pt (no epoch ended at the final sparsity)"
    logger.info("wrote last %s, %s, %s and %s", out_dir / LAST, best, out_dir / METRICS_CSV, out_dir / SUMMARY_JSON)


def _warn_skipped(count: int, paths: Collection[str], when: str) -> None:
    shown = sorted(paths)[:SHOWN_SKIPPED_PATHS]
    more = ", ..." if count > len(shown) else ""
    logger.warning("%d unreadable images skipped %s (column skipped_images of metrics.csv): %s%s",
                   count, when, ", ".join(shown), more)  # fmt: skip


def _freeze_input_quantizers(model: nn.Module) -> None:
    for layer in compressed_layers(model).values():
        if layer.input_quantizer is not None:
            layer.input_quantizer.freeze_range()


def _load_resume_checkpoint(config: TrainConfig) -> dict[str, Any]:
    resume = config.runtime.resume
    checkpoint = load_checkpoint(Path(resume))
    try:
        command = saved_config(checkpoint["options"]).command
        differences = differing_options(checkpoint["options"], config)
    except ValueError as error:
        raise TrainingError(f"cannot resume from {resume}: {error}") from None
    if command != config.command:
        raise TrainingError(f"cannot resume from {resume}: it was written by {command}, not {config.command}")
    if differences:
        raise TrainingError(f"cannot resume from {resume}, options differ: " + "; ".join(differences))
    saved_policy = checkpoint.get("bit_policy")
    if saved_policy is not None and bit_policy_of(config).as_dict() != saved_policy:
        raise TrainingError(f"cannot resume from {resume}: --bit-policy {config.quant.bit_policy} has changed since")
    if checkpoint["epoch"] >= config.optim.max_epochs:
        raise TrainingError(f"{resume} has finished all {config.optim.max_epochs} epochs already")
    return checkpoint


def _checkpoint_payload(
    model, optimizers, schedulers, scaler, state: RunState, config: TrainConfig, bit_policy: BitPolicy | None,
    method: TrainingMethod,
) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizers": {name: optimizer.state_dict() for name, optimizer in optimizers.items()},
        "schedulers": {name: scheduler.state_dict() for name, scheduler in schedulers.items()},
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "epoch": state.epoch,
        "step": state.step,
        "best_top1": state.best_top1,
        "best_epoch": state.best_epoch,
        "history": state.history,
        "num_classes": state.num_classes,
        "options": config.as_dict(),
        "bit_policy": None if bit_policy is None else bit_policy.as_dict(),  # the bits trained, whatever the file holds later
        "method": method.state_dict(),
    }


def _restore(checkpoint: dict[str, Any], optimizers, schedulers, scaler, num_classes: int) -> RunState:
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(checkpoint["optimizers"][name])
    for name, scheduler in schedulers.items():
        scheduler.load_state_dict(checkpoint["schedulers"][name])
    if checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])
    if "best_epoch" in checkpoint:
        best_top1, best_epoch = checkpoint["best_top1"], checkpoint["best_epoch"]
    else:  # older checkpoints chose the best epoch at any sparsity
        best_top1, best_epoch = -math.inf, None
    history = list(checkpoint["history"])
    return RunState(checkpoint["epoch"], checkpoint["step"], best_top1, best_epoch, history, num_classes)


def _metrics_row(epoch: int, train_metrics: Metrics, val: Metrics, optimizers, model: nn.Module, seconds: float) -> dict:
    return {
        "epoch": epoch,
        "train_loss": train_metrics.loss,
        "train_top1": train_metrics.top1,
        "val_loss": val.loss,
        "val_top1": val.top1,
        "val_top5": val.top5,
        "lr": optimizers["model"].param_groups[0]["lr"],
        "sparsity": _mean_sparsity(model),
        "skipped_images": train_metrics.skipped + val.skipped,
        "epoch_seconds": seconds,
    }


def _tensorboard_writer(config: TrainConfig):
    if not config.runtime.tb_logging_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(config.runtime.tb_logging_dir)


def _summary(model: nn.Module, state: RunState, config: TrainConfig) -> dict[str, Any]:
    final = state.history[-1] if state.history else {}
    found = state.best_epoch is not None
    out_dir = Path(config.runtime.save_checkpoint_dir)
    return {
        "final": final,
        "best_val_top1": state.best_top1 if found else None,
        "best_epoch": state.best_epoch,
        "best_checkpoint": str(out_dir / BEST) if found else None,
        "last_checkpoint": str(out_dir / LAST),
        "metrics_csv": str(out_dir / METRICS_CSV),
        "epochs": state.epoch,
        "steps": state.step,
        "layers": layer_report(model),
        "options": config.as_dict(),
    }


# --------------------------------------------------------------------------- evaluation


def restore_model(checkpoint_path: Path) -> tuple[nn.Module, TrainConfig]:
    """The compressed model of a checkpoint (CPU, eval mode) and the options it was trained with."""
    checkpoint = load_checkpoint(checkpoint_path)
    try:
        config = saved_config(checkpoint["options"])
    except ValueError as error:
        raise TrainingError(f"{checkpoint_path}: {error}") from None
    if config.indicators.enabled:
        raise TrainingError(f"{checkpoint_path} was written by train-indicators: its result is indicators.json next to "
                            "it (evaluate scores train-compressed checkpoints)")  # fmt: skip
    saved_policy = checkpoint.get("bit_policy")  # the bits it was trained with (not the file, which may have moved)
    bit_policy = None if saved_policy is None else bit_policy_of(config, saved_policy)
    model = build_compressed_model(config, for_state_dict=True, num_classes=checkpoint.get("num_classes"),
                                   bit_policy=bit_policy)  # fmt: skip
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError:
        raise TrainingError(f"{checkpoint_path}: its weights do not fit the model its options describe") from None
    _freeze_input_quantizers(model)
    return model.eval(), config


def conflicting_options(given: Collection[str], config: TrainConfig, trained: TrainConfig) -> list[str]:
    """``--option VALUE (checkpoint: VALUE)`` for each given option outside :data:`EVALUATION_OPTIONS` that differs."""
    trained_options = trained.options()
    conflicts = []
    for key, now in config.options().items():  # in the options' order
        if key not in given or key in EVALUATION_OPTIONS:
            continue
        then = trained_options[key]
        if key == "architecture":
            same = config.model.base_architecture == trained.model.base_architecture
        else:
            same = now == then
        if not same:
            conflicts.append(f"{option_flag(key)} {now} (checkpoint: {then})")
    return conflicts


def evaluate_run(config: TrainConfig, checkpoint: Path | None, given: Collection[str] = ()) -> dict[str, Any]:
    """Top-1/top-5/loss, per-layer sparsity and bits on ``images_dir/val``.

    With ``checkpoint``: the trained model, compressed as its options say; only the options of
    :data:`EVALUATION_OPTIONS` come from ``config``, and an option named in ``given`` (set by the
    user) whose value differs from the checkpoint's raises :class:`OptionConflictError`.
    Without: the pretrained model compressed without training (weights quantized from their
    MSE/min-max ranges, activation ranges from ``num_est_batches`` training batches,
    magnitude-pruned once to ``s_f``, batch norms re-estimated on training batches) - the
    post-training starting point, scored with the model's own head (class folder ``i`` in
    sorted order is the model's class ``i``).
    """
    if checkpoint is None:
        check_architecture(config)
    context = init_distributed(torch.device(config.runtime.device))
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        configure_determinism(config.runtime.seed, config.runtime.deterministic, context.device)
        options = _step_options(config, context)
        if checkpoint is not None:
            model, trained_config = restore_model(checkpoint)
            conflicts = conflicting_options(given, config, trained_config)
            if conflicts:
                raise OptionConflictError(
                    f"--checkpoint {checkpoint} fixes every model and compression option (only "
                    f"{', '.join(option_flag(key) for key in EVALUATION_OPTIONS)} apply); "
                    f"drop {'; '.join(conflicts)}"
                )
            given_options = config.options()
            config = trained_config.with_options(**{key: given_options[key] for key in EVALUATION_OPTIONS})
            loaders = _loaders(config, context, TrainUse.NONE)
            _check_classes(model, config, loaders.num_classes)
            model.to(context.device)
        else:
            try:
                config.validate()
            except ValueError as error:
                raise TrainingError(str(error)) from None
            has_train = config.data.is_cifar or (Path(config.data.images_dir) / "train").is_dir()
            calibrating = config.quant.act_quant and parse_act_range(config.quant.act_range) is None
            estimating = has_train and (calibrating or config.bn.reestimate_bn_stats)
            loaders = _loaders(config, context, TrainUse.ESTIMATION if estimating else TrainUse.NONE)
            initial = config.model.init_checkpoint  # float weights to compress post hoc, with the dataset's head
            model = build_compressed_model(config, num_classes=loaders.num_classes if initial else None,
                                           init_checkpoint=initial)  # fmt: skip
            outputs = _check_classes(model, config, loaders.num_classes)
            if outputs != loaders.num_classes:
                logger.warning("the dataset has %d classes, %s predicts %d: class folder i (sorted) is scored as the "
                               "model's class i", loaders.num_classes, config.model.architecture, outputs)  # fmt: skip
            model.to(context.device)
            if config.pruning.is_gradual:  # (block masks are set by build_compressed_model)
                scope = PruningScope(config.pruning.prune_scope)
                set_magnitude_masks(compressed_layers(model), config.pruning.s_f, scope)
            n_sigma = parse_act_range(config.quant.act_range)
            if n_sigma is None:
                calibration = loaders.estimation if loaders.estimation is not None else loaders.val
                calibrate_input_quantizers(model, image_batches(calibration, config.quant.num_est_batches, options))
            else:
                try:
                    set_batch_norm_input_ranges(model, n_sigma)
                except BatchNormRangeError as error:
                    raise TrainingError(f"--act-range {config.quant.act_range}: {error}") from None
            if config.bn.reestimate_bn_stats and loaders.estimation is None:
                logger.warning("no training split: batch-norm statistics are not re-estimated")
            _reestimate_bn(model, loaders, config, options)
        if config.runtime.channels_last:
            model.to(memory_format=torch.channels_last)
        val_batches = SkipRecorder(loaders.val)
        metrics = evaluate(model, val_batches, context, options)
        if metrics.skipped:
            _warn_skipped(metrics.skipped, val_batches.paths, f"in {Path(config.data.images_dir) / 'val'}")
        return {
            "architecture": config.model.architecture,
            "checkpoint": str(checkpoint) if checkpoint is not None else None,
            "top1": metrics.top1,
            "top5": metrics.top5,
            "loss": metrics.loss,
            "images": metrics.count,
            "skipped_images": metrics.skipped,
            "sparsity": _mean_sparsity(model),
            "layers": layer_report(model),
            "options": config.as_dict(),
        }
    finally:
        torch.use_deterministic_algorithms(deterministic)
        shutdown_distributed(context)
