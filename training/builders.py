"""From a :class:`training.config.TrainConfig` to the objects of a run: model, optimizers, schedulers, pruner."""
from __future__ import annotations

import copy
import logging
import os
import random
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn

from models import UnknownModelError, check_model_name, load_model, model_weights
from models.bit_policy import BitPolicy, BitPolicyError, check_policy_layers, parse_bit_policy, read_bit_policy
from models.heads import HeadError, replace_classifier_head
from models.quantized import CompressionSpec, QuantSetup, compress_model, compressed_layers, compressible_layers
from pruning.block_masks import BlockMaskRule, PruneMethod, model_masks, prunable_layers
from pruning.rearrange import rearrange_filters
from pruning.schedule import GradualMagnitudePruner, PruningSchedule, magnitude_rule
from quantization.position_scaling import (
    SymmetricRangeTracker,
    restricted_level_max,
    scaled_tensor_bits,
    weight_decay_groups,
)
from training.callbacks import PositionScaledGradientCallback
from training.checkpoint import CheckpointError, load_checkpoint, read_torch_file
from training.config import BLOCK_PATTERNS, PAPER_ARCHITECTURES, PSGD_GRID_METHOD, TrainConfig, saved_config
from training.lr_schedule import lr_factor, parse_lr_schedule

logger = logging.getLogger(__name__)


class SetupError(ValueError):
    """Options that cannot be turned into a run (one-line message)."""


def configure_determinism(seed: int, deterministic: bool, device: torch.device) -> None:
    """Seed python, numpy and torch; with ``deterministic`` also force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


@contextmanager
def image_size_check(config: TrainConfig) -> Iterator[None]:
    """Turn a forward pass that fails on ``--image-size`` images (too small for the model) into a one-line
    :class:`SetupError`."""
    try:
        yield
    except RuntimeError as error:
        first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        size = config.data.image_size
        raise SetupError(f"{config.model.architecture} does not run on {size}x{size} images (--image-size): "
                         f"{first_line}") from None  # fmt: skip


class ArchitectureError(SetupError):
    """``--architecture`` cannot be used for the run (a usage error: the CLI exits with code 2)."""


class UnknownArchitectureError(ArchitectureError):
    """``--architecture`` is not a classifier of the model zoo."""


def check_architecture(config: TrainConfig) -> None:
    """Raise :class:`UnknownArchitectureError` unless ``--architecture`` names a classifier of the model zoo."""
    try:
        check_model_name(config.model.base_architecture, "classification")
    except UnknownModelError as error:
        paper = ", ".join(f"{name}[_quantized]" for name in PAPER_ARCHITECTURES)
        architecture = config.model.architecture
        what = (f"--architecture '{architecture}' is {error.known_as}, not a classifier" if error.known_as
                else f"unknown --architecture '{architecture}'")  # fmt: skip
        raise UnknownArchitectureError(f"{what}; use {paper} or another "
                                       "classifier of `main.py list-models --task classification`") from None  # fmt: skip


def load_base_model(config: TrainConfig, pretrained: bool | None = None) -> nn.Module:
    """The float classifier, pretrained from the torch hub cache / bundled weights, or from ``--model-dir``."""
    check_architecture(config)
    name = config.model.base_architecture
    pretrained = config.model.pretrained if pretrained is None else pretrained
    if not pretrained or config.model.model_dir is None:
        return load_model(name, pretrained=pretrained)
    weights = model_weights(name)
    file_name = os.path.basename(urlparse(weights.url).path) if weights is not None else f"{name}.pth"
    path = Path(config.model.model_dir) / file_name
    if not path.is_file():
        raise SetupError(f"--model-dir {config.model.model_dir} has no {file_name} (the pretrained weights of {name})")
    model = load_model(name, pretrained=False)
    state = read_torch_file(path, "pretrained weights")
    try:
        model.load_state_dict(state)
    except Exception as error:  # noqa: BLE001 - any mismatching file is one message
        first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise SetupError(f"cannot load {path} into {name}: {first_line}") from None
    return model


def bit_policy_of(config: TrainConfig, saved: dict | None = None) -> BitPolicy | None:
    """The run's per-layer bit policy: ``saved`` (the policy a checkpoint stores) or else the
    ``--bit-policy`` file, read and validated (:class:`SetupError`); ``None`` without one."""
    if config.quant.bit_policy is None:
        return None
    try:
        return parse_bit_policy(saved) if saved is not None else read_bit_policy(config.quant.bit_policy)
    except BitPolicyError as error:
        raise SetupError(f"--bit-policy: {error}") from None


def compression_spec(config: TrainConfig, bit_policy: BitPolicy | None = None) -> CompressionSpec:
    """The :class:`CompressionSpec` of the options; the bit policy is ``bit_policy`` if given, else
    the ``--bit-policy`` file's (:func:`bit_policy_of`)."""
    policy = bit_policy if bit_policy is not None else bit_policy_of(config)
    return CompressionSpec(
        weight_quant=config.quant.weight_quantizer(),
        act_quant=config.quant.act_quantizer(),
        quant_setup=QuantSetup(config.quant.quant_setup),
        prune=config.pruning.enabled,
        fold_bn=config.bn.fold_bn,
        bit_policy=policy,
    )


def build_compressed_model(
    config: TrainConfig,
    pretrained: bool | None = None,
    for_state_dict: bool = False,
    num_classes: int | None = None,
    bit_policy: BitPolicy | None = None,
    init_checkpoint: str | Path | None = None,
) -> nn.Module:
    """The base model with its Conv2d/Linear layers replaced by compressed ones (on CPU, eval mode).

    ``for_state_dict``: the model only receives a saved state next (resume, evaluation of a
    checkpoint), so the weights are random and the weight ranges are initialised by cheap
    min/max instead of the configured (possibly MSE) search. ``num_classes``: when the base
    model predicts another number of classes (e.g. 1000 ImageNet classes for a 10-class
    dataset), its classifier head is replaced by a new one, initialised from ``--seed``.
    ``bit_policy``: the per-layer bits (default: the ``--bit-policy`` file's, if any).
    ``init_checkpoint``: start from the weights of this float train-compressed checkpoint
    (:func:`load_float_weights`) instead of the pretrained ones; the compression starts from them.
    """
    if for_state_dict:
        config = config.with_options(weight_quant_method="current_minmax")
    from_file = init_checkpoint is not None
    model = build_float_model(config, False if from_file else pretrained, for_state_dict or from_file, num_classes)
    start = load_float_weights(model, init_checkpoint, config) if from_file else None
    # (a saved state holds the rearranged weights and the masks already)
    if config.pruning.rearrange and not for_state_dict:
        rearrange_for_blocks(model)
    masks = {} if for_state_dict or not config.pruning.is_block else block_pruning_masks(model, config)
    example = torch.zeros(2, 3, config.data.image_size, config.data.image_size)
    try:
        layers = compress_model(model, compression_spec(config, bit_policy), example)
    except BitPolicyError as error:
        raise SetupError(f"--bit-policy {config.quant.bit_policy}: {error}") from None
    for name, mask in masks.items():
        layers[name].weight_mask.copy_(mask)
    if start is not None and config.quant.weight_quant and config.quant.weight_quant_method == PSGD_GRID_METHOD:
        set_psgd_grid(model, start, init_checkpoint, config)
    return model


def set_psgd_grid(model: nn.Module, checkpoint: dict[str, Any], path: str | Path, config: TrainConfig) -> None:
    """Put the weight quantizer of each weight PSGD scaled in the run ``checkpoint`` (read from ``path`` by
    :func:`load_float_weights`) on PSGD's grid (compressed ``model``).

    The quantizer then computes ``delta * clamp(round(w / delta), -(2^(b-1) - 1), 2^(b-1) - 1)``
    (:func:`quantization.position_scaling.nearest_grid_point`): PSGD's tracked step ``delta``
    (:meth:`SymmetricRangeTracker.step_size`), its restricted levels and its bits ``b`` (:func:`psgd_tensor_bits`);
    the linear biases PSGD may have scaled stay float, as the quantizers leave biases. Raises :class:`SetupError`
    (one line) unless ``path`` is a ``--psgd-target grid`` run with ``--psgd-bits`` equal to ``--n-bits`` and each
    such layer's weight bits are PSGD's.
    """
    option = f"--weight-quant-method {PSGD_GRID_METHOD}"
    trained = saved_config(checkpoint["options"])
    if trained.psgd.grid_bits is None:
        raise SetupError(f"{option}: --init-checkpoint {path} was not trained with --psgd-target grid")
    if trained.psgd.grid_bits != config.quant.n_bits:
        raise SetupError(f"{option}: --init-checkpoint {path} was trained for the {trained.psgd.grid_bits}-bit grid, "
                         f"not --n-bits {config.quant.n_bits}")  # fmt: skip
    states = checkpoint.get("method", {}).get("psgd", {})
    layers = compressed_layers(model)
    for name, bits in psgd_tensor_bits(model, trained).items():
        layer_name = name.removesuffix(".weight")
        if layer_name == name:  # a linear bias
            continue
        tracker = SymmetricRangeTracker()
        try:
            tracker.load_state_dict(states[name])
            step = tracker.step_size(bits)
        except (KeyError, RuntimeError):
            raise SetupError(f"{option}: --init-checkpoint {path} has no PSGD range for {name}") from None
        quantizer = layers[layer_name].weight_quantizer
        layer_bits = None if quantizer is None else quantizer.n_bits
        if layer_bits != bits:
            raise SetupError(f"{option}: {layer_name} has {layer_bits} weight bits, PSGD trained it for {bits} "
                             "(--quant-setup all from 4 bits, LSQ_paper below)")  # fmt: skip
        level_max = restricted_level_max(bits)
        quantizer.q_min, quantizer.q_max = -level_max, level_max
        with torch.no_grad():
            quantizer.step_size.copy_(step)
            quantizer.zero_point.zero_()


def rearrange_for_blocks(model: nn.Module) -> None:
    """``--rearrange``: sort the filters of every permutable layer of the float ``model`` by L1 norm
    (:func:`pruning.rearrange.rearrange_filters`, the network's function unchanged); :class:`SetupError` if none can be."""
    try:
        rearranged = rearrange_filters(model)
    except ValueError as error:
        raise SetupError(f"--rearrange: {error}") from None
    logger.info("--rearrange: sorted the filters of %d layers by L1 norm: %s", len(rearranged),
                ", ".join(r.space.lead for r in rearranged))  # fmt: skip


def block_pruned_layers(model: nn.Module, config: TrainConfig, candidates: Collection[str]) -> dict[str, nn.Module]:
    """``--prune-method block``: ``{name: layer}`` of the layers it prunes, in module order.

    They are :func:`pruning.block_masks.prunable_layers` (not the first or a depthwise convolution; the classifier
    with ``--prune-classifier``) among ``candidates`` (the layers the compression replaces); a layer with fewer output
    channels (per group) than ``--block-size`` is left dense, named in one log line. :class:`SetupError` if none is
    left.
    """
    pruning = config.pruning
    layers = {name: layer for name, layer in prunable_layers(model, pruning.prune_classifier).items()
              if name in candidates}  # fmt: skip
    blockwise = block_mask_rule(config).method in (PruneMethod.ONE_BY_N, PruneMethod.RANDOM_BLOCKS)
    narrow = [name for name, layer in layers.items()
              if blockwise and layer.weight.shape[0] // getattr(layer, "groups", 1) < pruning.block_size]  # fmt: skip
    if narrow:
        logger.info("--block-size %d: not pruned (fewer output channels per group than N): %s",
                    pruning.block_size, ", ".join(narrow))  # fmt: skip
    if len(narrow) == len(layers):
        raise SetupError(f"--prune-method block: {config.model.architecture} has no layer to prune with "
                         f"--block-size {pruning.block_size}")  # fmt: skip
    return {name: layer for name, layer in layers.items() if name not in narrow}


def block_mask_rule(config: TrainConfig) -> BlockMaskRule:
    """The ``--block-pattern`` masks of ``--block-size`` blocks, random ones drawn from ``--seed``."""
    pruning = config.pruning
    return BlockMaskRule(PruneMethod(BLOCK_PATTERNS[pruning.block_pattern]), pruning.block_size, config.runtime.seed)


@torch.no_grad()
def block_pruning_masks(model: nn.Module, config: TrainConfig) -> dict[str, torch.Tensor]:
    """``--prune-method block`` (one-shot): the keep-masks of the float ``model`` (rearranged already with ``--rearrange``).

    Every layer of :func:`block_pruned_layers` loses ``floor(--s-f * blocks)`` blocks (:func:`block_mask_rule`); the
    pruned weights are zeroed here, so that the weight quantizers' ranges are estimated on the pruned weights.
    """
    pruning = config.pruning
    compressible, _ = compressible_layers(model)
    names = list(block_pruned_layers(model, config, compressible))
    rule = block_mask_rule(config)
    masks = model_masks(model, rule.method, pruning.s_f, rule.block_size, names,
                        generator=torch.Generator().manual_seed(rule.seed))  # fmt: skip
    for name, mask in masks.items():
        model.get_submodule(name).weight.mul_(mask)
    return masks


def build_float_model(
    config: TrainConfig, pretrained: bool | None = None, for_state_dict: bool = False, num_classes: int | None = None
) -> nn.Module:
    """The base model (random weights when ``for_state_dict``), with a new ``num_classes``-way head if it predicts
    another number of classes (see :func:`build_compressed_model`)."""
    model = load_base_model(config, False if for_state_dict else pretrained)
    if num_classes is not None:
        with image_size_check(config):
            replaced = replace_head(model, num_classes, config)
        if replaced is not None and not for_state_dict:  # (a saved state overwrites the new head next)
            head, outputs = replaced
            logger.info("%s: the dataset has %d classes: replaced the %d-way classifier head '%s' by a new %d-way one "
                        "(random init, --seed %d)", config.model.architecture, num_classes, outputs, head, num_classes,
                        config.runtime.seed)  # fmt: skip
    return model


def load_float_weights(model: nn.Module, path: str | Path, config: TrainConfig) -> dict[str, Any]:
    """Load the weights of the float train-compressed checkpoint ``path`` (``weights_only``) into the float ``model``.

    Returns the checkpoint.

    The checkpoint must be of the same architecture and hold a float model (no fake quantizers, no pruning
    masks, batch norm not folded): its state dict has then exactly the keys of the float model. Raises
    :class:`SetupError` (one line) otherwise.
    """
    option = f"--init-checkpoint {path}"
    try:
        checkpoint = load_checkpoint(Path(path))
        trained = saved_config(checkpoint["options"])
    except (CheckpointError, ValueError) as error:
        raise SetupError(f"{option}: {error}") from None
    if trained.model.base_architecture != config.model.base_architecture:
        raise SetupError(f"{option} holds a {trained.model.architecture}, not a {config.model.architecture}")
    if trained.indicators.enabled or trained.quant.weight_quant or trained.quant.act_quant or trained.bn.fold_bn \
            or trained.pruning.enabled:  # fmt: skip
        raise SetupError(f"{option} is not a float model (it was trained with fake quantization, pruning or folded "
                         "batch norm); start from a run with --no-weight-quant and no pruning")  # fmt: skip
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        first_line = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), type(error).__name__)
        raise SetupError(f"{option}: its weights do not fit the model: {first_line}") from None
    logger.info("starting from the weights of %s (epoch %d of its run)", path, checkpoint["epoch"])
    return checkpoint


def check_bit_policy(config: TrainConfig) -> None:
    """Raise :class:`SetupError` unless ``--bit-policy`` (if any) fits the architecture's compressed layers.

    Cheap (the float model with random weights, nothing compressed): run before any data is read.
    """
    spec = compression_spec(config)
    if spec.bit_policy is None:
        return
    layers, skipped = compressible_layers(load_base_model(config, pretrained=False))
    try:
        check_policy_layers(spec.bit_policy, list(layers), skipped, spec.weight_quant is not None, spec.act_quant is not None)
    except BitPolicyError as error:
        raise SetupError(f"--bit-policy {config.quant.bit_policy}: {error}") from None


def replace_head(model: nn.Module, num_classes: int, config: TrainConfig) -> tuple[str, int] | None:
    """:func:`models.heads.replace_classifier_head` seeded by ``--seed``; ``(name, old outputs)`` or ``None``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.runtime.seed)
        try:
            return replace_classifier_head(model, num_classes, config.data.image_size)
        except HeadError as error:
            raise SetupError(f"{config.model.architecture}: {error}") from None


def output_classes(model: nn.Module, image_size: int) -> int:
    """Number of logits the classifier produces (found on a copy: no quantizer or batch norm of ``model`` sees the
    blank image, and its mode is kept)."""
    with torch.no_grad():
        return copy.deepcopy(model).eval()(torch.zeros(1, 3, image_size, image_size)).shape[1]


def step_size_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable step sizes of all fake quantizers: every quantizer parameter that requires a gradient."""
    params = []
    for layer in compressed_layers(model).values():
        for quantizer in (layer.weight_quantizer, layer.input_quantizer):
            if quantizer is not None:
                params.extend(p for p in quantizer.parameters() if p.requires_grad)
    return params


def _optimizer(name: str, groups: list[dict], lr: float, momentum: float) -> torch.optim.Optimizer:
    if name == "SGD":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return torch.optim.Adam(groups, lr=lr)


def build_optimizers(model: nn.Module, config: TrainConfig) -> dict[str, torch.optim.Optimizer]:
    """``{"model": ...}`` and, with ``--sep-quant-optimizer``, ``{"quant": ...}`` for the step sizes.

    Without a separate optimizer the step sizes join the model optimizer in their own group
    (``--quant-learning-rate``, ``--quant-weight-decay``). With ``--psgd-scale-weight-decay`` the
    tensors PSGD scales form their own group without weight decay (the PSGD callback decays them,
    scaled: :func:`quantization.position_scaling.weight_decay_groups`).
    """
    step_sizes = step_size_parameters(model)
    step_ids = {id(p) for p in step_sizes}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in step_ids]
    optim = config.optim
    model_groups = [{"params": weights, "weight_decay": optim.weight_decay}]
    if config.psgd.enabled and config.psgd.psgd_scale_weight_decay:
        # the scaled tensors are decayed by the PSGD callback (scaled); the optimizer must not decay them again
        groups = weight_decay_groups(model, psgd_tensor_bits(model, config), optim.weight_decay)
        kept = {id(p) for p in weights}
        model_groups = [group | {"params": [p for p in group["params"] if id(p) in kept]} for group in groups]
    optimizers = {}
    if step_sizes and not optim.sep_quant_optimizer:
        model_groups.append({"params": step_sizes, "weight_decay": optim.quant_weight_decay, "lr": optim.quant_learning_rate})
    optimizers["model"] = _optimizer(optim.optimizer, model_groups, optim.learning_rate, optim.momentum)
    if step_sizes and optim.sep_quant_optimizer:
        quant_groups = [{"params": step_sizes, "weight_decay": optim.quant_weight_decay}]
        optimizers["quant"] = _optimizer(optim.quant_optimizer, quant_groups, optim.quant_learning_rate, optim.momentum)
    return optimizers


def build_schedulers(
    optimizers: dict[str, torch.optim.Optimizer], config: TrainConfig, steps_per_epoch: int
) -> dict[str, torch.optim.lr_scheduler.LambdaLR]:
    """One per-step scheduler per optimizer (the quantizer optimizer follows ``--quant-learning-rate-schedule``),
    each after the ``--warmup-epochs`` warm-up (:func:`training.lr_schedule.lr_factor`)."""
    optim = config.optim
    total = steps_per_epoch * optim.max_epochs
    warmup = steps_per_epoch * optim.warmup_epochs
    schedulers = {}
    for name, optimizer in optimizers.items():
        text = optim.quant_learning_rate_schedule if name == "quant" else optim.learning_rate_schedule
        schedule = parse_lr_schedule(text)
        factors = []
        for group in optimizer.param_groups:
            base_lr = group["lr"]
            factors.append(lambda step, s=schedule, lr=base_lr: lr_factor(s, step, total, steps_per_epoch, lr, warmup))
        schedulers[name] = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    return schedulers


def build_pruner(model: nn.Module, config: TrainConfig, steps_per_epoch: int) -> GradualMagnitudePruner | None:
    """The Zhu-Gupta pruner of a gradual run (``None`` otherwise: no pruning, or one-shot block masks, fixed).

    ``--prune-method zhu_gupta``: every compressed layer, magnitude masks within ``--prune-scope``;
    ``--prune-method block --prune-schedule zhu_gupta``: the layers of :func:`block_pruned_layers`, the
    ``--block-pattern`` masks (:func:`block_mask_rule`), each layer at the schedule's sparsity.
    """
    pruning = config.pruning
    if not pruning.is_gradual:
        return None
    schedule = PruningSchedule.from_epochs(
        pruning.s_i, pruning.s_f, pruning.prune_epoch_start, pruning.prune_last_epoch, pruning.delta_t, steps_per_epoch,
        config.optim.max_epochs,
    )  # fmt: skip
    if pruning.is_block_pattern:
        layers = block_pruned_layers(model, config, compressed_layers(model))
        rule, what = block_mask_rule(config), f"{pruning.block_pattern} pattern, --block-size {pruning.block_size}"
    else:
        layers, rule, what = compressed_layers(model), magnitude_rule(pruning.prune_scope), pruning.prune_scope
    logger.info("pruning: %s, %d mask updates every %d steps from step %d to %d",
                what, schedule.n + 1, schedule.delta_t, schedule.t0, schedule.last_update_step)  # fmt: skip
    return GradualMagnitudePruner(layers, schedule, rule)


def psgd_tensor_bits(model: nn.Module, config: TrainConfig) -> dict[str, int | None]:
    """The tensors PSGD scales and their grid bits (:func:`quantization.position_scaling.scaled_tensor_bits`)."""
    return scaled_tensor_bits(model, config.psgd.grid_bits, linear_biases=config.psgd.psgd_linear_biases)


def build_psgd_callback(model: nn.Module, config: TrainConfig) -> PositionScaledGradientCallback | None:
    """The PSGD callback of ``--psgd-target`` for the (unwrapped) ``model``; ``None`` without. It scales the
    weight decay too with ``--psgd-scale-weight-decay`` (then :func:`build_optimizers` leaves those tensors undecayed)."""
    psgd = config.psgd
    if not psgd.enabled:
        return None
    tensor_bits = psgd_tensor_bits(model, config)
    weight_decay = config.optim.weight_decay if psgd.psgd_scale_weight_decay else 0.0
    edges = sorted({bits for bits in tensor_bits.values() if bits is not None and bits != psgd.grid_bits})
    logger.info("PSGD: %d tensors scaled towards %s%s, lambda %g", len(tensor_bits),
                f"the {psgd.psgd_bits}-bit grid" if psgd.grid_bits is not None else "zero",
                f" (first and last layer at {edges[0]} bits)" if edges else "", psgd.psgd_lambda)  # fmt: skip
    return PositionScaledGradientCallback(model, tensor_bits, psgd.psgd_lambda, weight_decay)
