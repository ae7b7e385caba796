"""Click options of ``main.py train-compressed``, ``evaluate`` and ``train-indicators`` (names as in the papers' code).

Each option is a field of :class:`training.config.TrainConfig` under the same name; the options
both training commands share (:func:`optimization_options`, :func:`output_options`) take the
command's defaults: train-compressed's (:data:`DEFAULTS`) or LIMPQ's recipe
(:data:`training.config.INDICATOR_RECIPE`).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Collection

import click

from models.bit_policy import MAX_BITS, MIN_BITS
from models.quantized import QuantSetup
from pruning.schedule import PruningScope
from quantization.bn_ranges import ACT_RANGE_BN_PREFIX, ACT_RANGE_CALIBRATE, parse_act_range
from training.config import (
    ACT_SCHEMES,
    AUGMENTATIONS,
    BLOCK_PATTERNS,
    CIFAR_IMAGE_SIZE,
    DATASETS,
    INDICATOR_RECIPE,
    OPTIMIZERS,
    PRUNE_METHODS,
    PRUNE_SCHEDULES,
    PSGD_GRID_METHOD,
    PSGD_MAX_BITS,
    PSGD_MIN_BITS,
    PSGD_TARGETS,
    QMETHODS,
    TrainConfig,
    indicator_training_config,
)
from training.lr_schedule import parse_lr_schedule
from utils.cli import DeviceType, IntListType, default_device

DEFAULTS = TrainConfig()
UNIT_INTERVAL = click.FloatRange(0.0, 1.0, max_open=True)  # sparsities, label smoothing: [0, 1)
POSITIVE = click.FloatRange(0.0, min_open=True)
NON_NEGATIVE = click.FloatRange(0.0)


class LrScheduleType(click.ParamType):
    """``cosine``, ``cosine:<eta_min>``, ``multistep:<e1>:<e2>...`` or ``constant`` (kept as the normalised string)."""

    name = "schedule"

    def convert(self, value, param, ctx) -> str:
        try:
            return str(parse_lr_schedule(str(value)))
        except ValueError as error:
            self.fail(str(error), param, ctx)


class ActRangeType(click.ParamType):
    """``calibrate`` or ``bn:N`` (:func:`quantization.bn_ranges.parse_act_range`; kept as the normalised string)."""

    name = "calibrate|bn:N"

    def convert(self, value, param, ctx) -> str:
        try:
            n_sigma = parse_act_range(str(value))
        except ValueError as error:
            self.fail(str(error), param, ctx)
        return ACT_RANGE_CALIBRATE if n_sigma is None else f"{ACT_RANGE_BN_PREFIX}{n_sigma:g}"


# LIMPQ's candidate bit-widths: distinct, largest first
CANDIDATE_BITS = IntListType(MIN_BITS, MAX_BITS, distinct=True, descending=True)


def _choice(values) -> click.Choice:
    return click.Choice(list(values), case_sensitive=False)


def _options(*decorators: Callable) -> Callable:
    def apply(function: Callable) -> Callable:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


model_data_options = _options(
    click.option("--architecture", default=DEFAULTS.model.architecture, show_default=True,
                 help="resnet18, resnet50, mobilenet_v2, efficientnet_lite0 (or the paper's <name>_quantized), "
                      "or any other classifier of `main.py list-models`."),
    click.option("--dataset", type=click.Choice(DATASETS), default=DEFAULTS.data.dataset, show_default=True,
                 help="folder: --images-dir; cifar10/cifar100: the CIFAR archive in --data-dir, 32x32 images "
                      "(--image-size 32, the default there), its TEST split as the validation split (used for "
                      "validation and best.pt, as the PSGD paper's code does: no separate held-out score)."),
    click.option("--images-dir", default=None, type=click.Path(file_okay=False, path_type=str),
                 help="Dataset root with train/ and val/, each holding one folder of images per class (ImageNet "
                      "layout); needed with --dataset folder."),
    click.option("--data-dir", default=DEFAULTS.data.data_dir, type=click.Path(file_okay=False, path_type=str),
                 help="--dataset cifar10/cifar100: the folder holding cifar-10-python.tar.gz / "
                      "cifar-100-python.tar.gz or their extracted folder (nothing is downloaded)."),
    click.option("--model-dir", type=click.Path(exists=True, file_okay=False, path_type=str), default=None,
                 help="Folder with the pretrained checkpoint under its torchvision file name (e.g. "
                      "resnet18-f37072fd.pth). Default: the torch hub cache / bundled weights."),
    click.option("--pretrained/--no-pretrained", default=DEFAULTS.model.pretrained, show_default=True,
                 help="Start from ImageNet weights (--no-pretrained: seeded random init)."),
    click.option("--init-checkpoint", type=click.Path(exists=True, path_type=str), default=None,
                 help="Start from the weights of a float train-compressed checkpoint (trained with --no-weight-quant, "
                      "no pruning; file or folder with last.pt) instead of the pretrained weights, e.g. PSGD from "
                      "epoch 82 of a plain run. evaluate without --checkpoint compresses these weights post hoc."),
    click.option("--image-size", type=click.IntRange(8, 1024), default=DEFAULTS.data.image_size, show_default=True,
                 help="Crop size (validation resizes to size*256/224 first)."),
    click.option("--augmentation", type=click.Choice(AUGMENTATIONS), default=DEFAULTS.data.augmentation,
                 show_default=True,
                 help="--dataset folder: the training transforms: resized-crop-flip (ImageNet: a random 8-100% of "
                      "the area resized to --image-size, random horizontal flip) or crop (a random --image-size crop "
                      "of the image resized as for validation: shifts only, for digits or characters, whose class a "
                      "flip or a zoomed-in part changes)."),
    click.option("--batch-size", type=click.IntRange(1), default=DEFAULTS.data.batch_size, show_default=True,
                 help="Global batch size (split over the processes of a torchrun run)."),
    click.option("--num-workers", type=click.IntRange(0), default=min(DEFAULTS.data.num_workers, os.cpu_count() or 1),
                 show_default=True, help="Data-loading worker processes per process."),
)  # fmt: skip

compression_options = _options(
    click.option("--weight-quant/--no-weight-quant", default=DEFAULTS.quant.weight_quant, show_default=True),
    click.option("--act-quant/--no-act-quant", default=DEFAULTS.quant.act_quant, show_default=True,
                 help="Fake-quantize every quantized layer's input (the paper keeps activations in float)."),
    click.option("--n-bits", type=click.IntRange(2, 16), default=DEFAULTS.quant.n_bits, show_default=True,
                 help="Weight bit-width (first/last layer: see --quant-setup)."),
    click.option("--n-bits-act", type=click.IntRange(2, 16), default=DEFAULTS.quant.n_bits_act, show_default=True),
    click.option("--weight-quant-method", type=_choice(["current_minmax", "running_minmax", "MSE", PSGD_GRID_METHOD]),
                 default=DEFAULTS.quant.weight_quant_method, show_default=True,
                 help=f"Weight range initialisation; {PSGD_GRID_METHOD} (evaluate --init-checkpoint of a --psgd-target "
                      "grid run, --n-bits = its --psgd-bits): each weight PSGD scaled on its grid, step from the "
                      "range PSGD tracked, the first/last layer at PSGD's bits for them."),
    click.option("--act-quant-method", type=_choice(["current_minmax", "running_minmax", "MSE"]),
                 default=DEFAULTS.quant.act_quant_method, show_default=True, help="Activation range estimation."),
    click.option("--per-channel/--no-per-channel", default=DEFAULTS.quant.per_channel, show_default=True,
                 help="One weight step size per output channel."),
    click.option("--qmethod", type=_choice(QMETHODS), default=DEFAULTS.quant.qmethod, show_default=True,
                 help="Weight grid."),
    click.option("--qmethod-act", type=_choice(QMETHODS), default=DEFAULTS.quant.qmethod_act, show_default=True,
                 help="Activation grid."),
    click.option("--quant-setup", type=click.Choice([s.value for s in QuantSetup]), default=DEFAULTS.quant.quant_setup,
                 show_default=True, help="all: every layer at --n-bits; LSQ_paper: first and last layer at 8 bits; "
                                         "FP_logits: last layer in float; FP_first_last: first and last in float; "
                                         "LIMPQ: first and last at 8 bits, the first layer's input in float."),
    click.option("--bit-policy", type=click.Path(exists=True, dir_okay=False, path_type=str), default=None,
                 help='Per-layer bit-widths, JSON {"layers": [...], "weight_bits": [...], "act_bits": [...]} '
                      "(null: float; bits 2..8): overrides --n-bits/--n-bits-act/--quant-setup for the layers it "
                      "names, the others keep them. Keep the file with the checkpoints: evaluating them reads it."),
    click.option("--num-est-batches", type=click.IntRange(1), default=DEFAULTS.quant.num_est_batches, show_default=True,
                 help="Training batches for the activation range estimation."),
    click.option("--grad-scaling/--no-grad-scaling", default=DEFAULTS.quant.grad_scaling, show_default=True,
                 help="LSQ gradient scaling of the step sizes (1/sqrt(numel * q_max))."),
    click.option("--learn-step-size/--no-learn-step-size", default=DEFAULTS.quant.learn_step_size, show_default=True),
    click.option("--fold-bn/--no-fold-bn", default=DEFAULTS.bn.fold_bn, show_default=True,
                 help="Fold batch norm into the convolutions before quantizing (deployment style); "
                      "default: keep it separate (the paper)."),
    click.option("--reestimate-bn-stats/--no-reestimate-bn-stats", default=DEFAULTS.bn.reestimate_bn_stats,
                 show_default=True, help="Re-estimate batch-norm statistics on training batches before evaluating."),
    click.option("--bn-est-batches", type=click.IntRange(1), default=DEFAULTS.bn.bn_est_batches, show_default=True,
                 help="Batches for the batch-norm re-estimation."),
    click.option("--prune-method", type=_choice(PRUNE_METHODS), default=DEFAULTS.pruning.prune_method, show_default=True,
                 help="zhu_gupta: gradual magnitude pruning with the cubic schedule; block: 1xN block masks at "
                      "rate --s-f, set once from the starting weights and fixed while training (Lin et al.), or "
                      "on the cubic schedule with --prune-schedule zhu_gupta."),
    click.option("--block-size", type=click.IntRange(1), default=DEFAULTS.pruning.block_size, show_default=True,
                 help="--prune-method block: N, the output channels of a 1xN block; layers with fewer output "
                      "channels (per group) are not pruned."),
    click.option("--block-pattern", type=_choice(list(BLOCK_PATTERNS)), default=DEFAULTS.pruning.block_pattern,
                 show_default=True, help="--prune-method block: 1xn (blocks of lowest L1 norm), random (random "
                                         "blocks), filter (whole filters of lowest L1 norm), weight (unstructured "
                                         "magnitude); the same rate --s-f in every pruned layer."),
    click.option("--prune-classifier/--no-prune-classifier", default=DEFAULTS.pruning.prune_classifier,
                 show_default=True, help="--prune-method block: prune the linear classifier too (the first and the "
                                         "depthwise convolutions never are)."),
    click.option("--rearrange/--no-rearrange", default=DEFAULTS.pruning.rearrange, show_default=True,
                 help="--prune-method block: sort every permutable layer's filters by L1 norm (permuting the float "
                      "network, its function unchanged) before the masks."),
    click.option("--s-i", type=UNIT_INTERVAL, default=DEFAULTS.pruning.s_i, show_default=True, help="Initial sparsity."),
    click.option("--s-f", type=UNIT_INTERVAL, default=DEFAULTS.pruning.s_f, show_default=True,
                 help="Final sparsity, in [0, 1) (the paper compares b bits with 1 - b/16)."),
    click.option("--prune-scope", type=_choice([s.value for s in PruningScope]), default=DEFAULTS.pruning.prune_scope,
                 show_default=True, help="layer: every layer at the same sparsity (the paper); channel: every output "
                                         "channel of every layer at that sparsity; global: one threshold over all "
                                         "layers."),
)  # fmt: skip

# evaluate only: how the input quantizers of a post-hoc compressed model get their ranges
act_range_option = click.option(
    "--act-range", type=ActRangeType(), default=DEFAULTS.quant.act_range, show_default=True,
    help="With --act-quant, without --checkpoint: calibrate (estimate the ranges on --num-est-batches training "
         "batches with --act-quant-method) or bn:N (data-free: each layer's input range from the batch norms before "
         "it, [beta - N|gamma|, beta + N|gamma|] per channel, summed over residual additions, clipped by ReLU; a "
         "layer with no batch norm before its input, e.g. the first, keeps a float input).",
)  # fmt: skip


def optimization_options(defaults: TrainConfig = DEFAULTS) -> Callable:
    """Epochs, optimizer, learning rate and its schedule, weight decay, label smoothing, with ``defaults``'s values."""
    optim = defaults.optim
    return _options(
        click.option("--max-epochs", type=click.IntRange(1), default=optim.max_epochs, show_default=True),
        click.option("--optimizer", type=_choice(OPTIMIZERS), default=optim.optimizer.lower(), show_default=True),
        click.option("--learning-rate", type=POSITIVE, default=optim.learning_rate, show_default=True),
        click.option("--momentum", type=click.FloatRange(0.0, 1.0, max_open=True), default=optim.momentum,
                     show_default=True, help="SGD momentum."),
        click.option("--weight-decay", type=NON_NEGATIVE, default=optim.weight_decay, show_default=True),
        click.option("--learning-rate-schedule", type=LrScheduleType(), default=optim.learning_rate_schedule,
                     show_default=True, help="cosine (to 0.01*LR), cosine:<eta_min>, multistep:<e1>:<e2>... or "
                                             "constant; stepped every iteration."),
        click.option("--warmup-epochs", type=click.IntRange(0), default=optim.warmup_epochs, show_default=True,
                     help="Linear warm-up of every learning rate over this many epochs (counted in steps, from "
                          "LR/steps up to LR), then the schedules over the remaining steps."),
        click.option("--label-smoothing", type=UNIT_INTERVAL, default=optim.label_smoothing, show_default=True,
                     help="Label smoothing of the training cross-entropy, in [0, 1) (the validation loss is plain)."),
    )  # fmt: skip


def output_options(flag: str, defaults: TrainConfig, help_text: str) -> Callable:
    """The run's folder (``flag``, e.g. ``--save-checkpoint-dir``), ``--resume`` and ``--tb-logging-dir``."""
    return _options(
        click.option(flag, "save_checkpoint_dir", type=click.Path(file_okay=False, path_type=str),
                     default=defaults.runtime.save_checkpoint_dir, show_default=True, help=help_text),
        click.option("--resume", type=click.Path(exists=True, path_type=str), default=None,
                     help="Continue from a checkpoint file (or a folder holding last.pt)."),
        click.option("--tb-logging-dir", type=click.Path(file_okay=False, path_type=str), default=None,
                     help="Write TensorBoard scalars here (needs the tensorboard package)."),
    )  # fmt: skip


training_options = _options(
    optimization_options(DEFAULTS),
    click.option("--psgd-target", type=_choice(PSGD_TARGETS), default=DEFAULTS.psgd.psgd_target,
                 help="PSGD (position-based scaled gradient, Kim et al. 2020): scale each gradient by "
                      "--psgd-lambda * |w - T(w)|, T(w) the nearest point of the --psgd-bits grid (grid) or 0 (zero, "
                      "for magnitude pruning afterwards); trains the float weights: needs --no-weight-quant and no "
                      "--act-quant. Default: off."),
    click.option("--psgd-bits", type=click.IntRange(PSGD_MIN_BITS, PSGD_MAX_BITS), default=DEFAULTS.psgd.psgd_bits,
                 show_default=True, help="The PSGD grid's bit-width (restricted symmetric, per tensor; the first and "
                                         "last layer at 8 bits below 4)."),
    click.option("--psgd-lambda", type=POSITIVE, default=DEFAULTS.psgd.psgd_lambda, show_default=True,
                 help="PSGD's lambda_s."),
    click.option("--psgd-scale-weight-decay/--no-psgd-scale-weight-decay", default=DEFAULTS.psgd.psgd_scale_weight_decay,
                 show_default=True, help="Scale the weight decay of the PSGD tensors too (default: the optimizer "
                                         "decays them unscaled, as the official code does)."),
    click.option("--psgd-linear-biases/--no-psgd-linear-biases", default=DEFAULTS.psgd.psgd_linear_biases,
                 show_default=True, help="Also scale the linear layers' biases (the official code does)."),
    click.option("--sep-quant-optimizer/--no-sep-quant-optimizer", default=DEFAULTS.optim.sep_quant_optimizer,
                 show_default=True, help="Own optimizer for the quantizer step sizes."),
    click.option("--quant-optimizer", type=_choice(OPTIMIZERS), default=DEFAULTS.optim.quant_optimizer.lower(),
                 show_default=True),
    click.option("--quant-learning-rate", type=POSITIVE, default=DEFAULTS.optim.quant_learning_rate, show_default=True),
    click.option("--quant-weight-decay", type=NON_NEGATIVE, default=DEFAULTS.optim.quant_weight_decay,
                 show_default=True),
    click.option("--quant-learning-rate-schedule", type=LrScheduleType(),
                 default=DEFAULTS.optim.quant_learning_rate_schedule, show_default=True),
    click.option("--freeze-bn/--no-freeze-bn", default=DEFAULTS.bn.freeze_bn, show_default=True,
                 help="Keep batch norms in eval mode while training (running statistics)."),
    click.option("--sync-bn/--no-sync-bn", default=DEFAULTS.bn.sync_bn, show_default=True,
                 help="SyncBatchNorm across GPUs under torchrun (CUDA only)."),
    click.option("--prune-schedule", type=_choice(PRUNE_SCHEDULES), default=DEFAULTS.pruning.prune_schedule,
                 show_default=True, help="--prune-method block: one-shot: the masks at --s-f set before training and "
                                         "fixed (the paper); zhu_gupta: the block masks raised from --s-i to --s-f "
                                         "on the cubic schedule (--prune-epoch-start, --prune-last-epoch, --delta-t), "
                                         "recomputed from the current weights at every update."),
    click.option("--prune-epoch-start", type=click.IntRange(0), default=DEFAULTS.pruning.prune_epoch_start,
                 show_default=True, help="Pruning starts at the first step of this (0-based) epoch."),
    click.option("--prune-last-epoch", type=click.IntRange(0), default=DEFAULTS.pruning.prune_last_epoch,
                 show_default=True, help="s_f is reached at the last step of this (0-based) epoch; it must be below --max-epochs "
                      "(the default is moved to the last epoch of a shorter run, with a warning)."),
    click.option("--delta-t", type=click.IntRange(1), default=DEFAULTS.pruning.delta_t, show_default=True,
                 help="Steps between mask updates."),
    output_options("--save-checkpoint-dir", DEFAULTS,
                   "Checkpoints, metrics.csv and summary.json. last.pt: after every epoch; best.pt: the best "
                   "validation top-1 among the epochs at the final sparsity (from the end of --prune-last-epoch "
                   "on; every epoch without pruning), never an under-compressed model."),
)  # fmt: skip

indicator_options = _options(
    click.option("--bits", type=CANDIDATE_BITS, default=",".join(map(str, INDICATOR_RECIPE.indicators.bits)),
                 show_default=True, help=f"Candidate bit-widths (distinct, {MIN_BITS}..{MAX_BITS}; a list or a range "
                                         "like 2-6): one step size per bit-width in every quantizer."),
    click.option("--act-scheme", type=click.Choice(ACT_SCHEMES), default=INDICATOR_RECIPE.indicators.act_scheme,
                 show_default=True, help="Input quantizers: auto: signed for the layers whose input can be negative "
                                         "(found on a random image: MobileNet-V2's blocks), unsigned for the others "
                                         "(post-ReLU inputs: every layer of a ResNet); or one scheme for all."),
    optimization_options(INDICATOR_RECIPE),
    output_options("--output-dir", INDICATOR_RECIPE,
                   "indicators.json and indicators.png/.pdf (after every epoch), last.pt, best.pt (best validation "
                   "top-1 at the largest bit-width), metrics.csv and summary.json."),
)  # fmt: skip

runtime_options = _options(
    click.option("--seed", type=int, default=DEFAULTS.runtime.seed, show_default=True),
    click.option("--deterministic/--no-deterministic", default=DEFAULTS.runtime.deterministic, show_default=True,
                 help="Deterministic kernels (bitwise reproducible runs and resumptions)."),
    click.option("--progress-bar/--no-progress-bar", default=DEFAULTS.runtime.progress_bar, show_default=True),
    click.option("--amp/--no-amp", default=DEFAULTS.runtime.amp, show_default=True,
                 help="Mixed precision (float16 on CUDA, bfloat16 on CPU)."),
    click.option("--channels-last/--no-channels-last", default=DEFAULTS.runtime.channels_last, show_default=True),
    click.option("--device", type=DeviceType(), default=default_device(), show_default=True),
)  # fmt: skip


def config_from_options(**options) -> TrainConfig:
    """A :class:`TrainConfig` from the parsed flat options (range methods lower-case, device as a string)."""
    return TrainConfig.from_options(**_normalised(options))


def indicator_config_from_options(**options) -> TrainConfig:
    """The config of ``train-indicators`` from its parsed flat options (:func:`training.config.indicator_training_config`)."""
    return indicator_training_config(**_normalised(options))


def _normalised(options: dict) -> dict:
    for key in ("weight_quant_method", "act_quant_method"):
        if key in options:
            options[key] = options[key].lower()
    options["device"] = str(options["device"])
    return options


def resolve_data_options(options: dict, given: Collection[str]) -> dict:
    """The data options completed: ``--images-dir`` required for ``--dataset folder`` (unless ``--data-dir`` names
    the data of a checkpoint to evaluate), ``--image-size`` 32 for CIFAR unless given. Raises ``click.UsageError``."""
    if options["dataset"] == "folder" and options["images_dir"] is None and options.get("data_dir") is None:
        raise click.UsageError("Missing option '--images-dir' (the class folders of --dataset folder)")
    if options["dataset"] != "folder" and "image_size" not in given:
        options["image_size"] = CIFAR_IMAGE_SIZE
    if options["images_dir"] is None:
        options["images_dir"] = DEFAULTS.data.images_dir
    return options
