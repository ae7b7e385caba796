"""All options of ``main.py train-compressed`` / ``main.py evaluate`` as one dataclass (plain values only).

Every field has a working default (the paper's ResNet-18 INT4 QAT recipe on ImageNet, except
``images_dir``). The config is stored in every checkpoint; :func:`differing_options` tells a
resumed run which of the options that shape the result changed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from models.quantized import QuantSetup
from pruning.schedule import PruningScope
from quantization.fake_quant import QuantizerConfig, RangeEstimator
from quantization.granularity import Granularity
from quantization.quantizers import QuantScheme
from training.lr_schedule import parse_lr_schedule

# The paper's names for the architectures it quantized.
PAPER_ARCHITECTURES = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_lite0")
QUANTIZED_SUFFIX = "_quantized"

QMETHODS = {"symmetric_uniform": QuantScheme.SYMMETRIC, "asymmetric_uniform": QuantScheme.ASYMMETRIC}
RANGE_METHODS = {
    "current_minmax": RangeEstimator.CURRENT_MINMAX,
    "running_minmax": RangeEstimator.RUNNING_MINMAX,
    "mse": RangeEstimator.MSE,
}
PRUNE_METHODS = ("none", "zhu_gupta")
OPTIMIZERS = ("SGD", "Adam")

# Options that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = frozenset(
    {"images_dir", "model_dir", "num_workers", "save_checkpoint_dir", "resume", "tb_logging_dir", "progress_bar", "device"}
)


@dataclass(frozen=True)
class TrainConfig:
    # data and model
    architecture: str = "resnet18"
    images_dir: str = ""
    model_dir: str | None = None
    pretrained: bool = True
    image_size: int = 224
    batch_size: int = 256
    num_workers: int = 4
    # optimisation
    max_epochs: int = 20
    optimizer: str = "SGD"
    learning_rate: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 1e-4
    learning_rate_schedule: str = "cosine"
    # quantization
    weight_quant: bool = True
    act_quant: bool = False
    n_bits: int = 4
    n_bits_act: int = 8
    weight_quant_method: str = "mse"
    act_quant_method: str = "running_minmax"
    per_channel: bool = False
    qmethod: str = "symmetric_uniform"
    qmethod_act: str = "asymmetric_uniform"
    quant_setup: str = QuantSetup.LSQ_PAPER.value
    bit_policy: str | None = None  # per-layer bit-width file (models/bit_policy.py); overrides --quant-setup per layer
    num_est_batches: int = 1
    grad_scaling: bool = False
    learn_step_size: bool = True
    sep_quant_optimizer: bool = True
    quant_optimizer: str = "Adam"
    quant_learning_rate: float = 1e-5
    quant_weight_decay: float = 0.0
    quant_learning_rate_schedule: str = "cosine"
    # batch norm
    fold_bn: bool = False
    reestimate_bn_stats: bool = True
    bn_est_batches: int = 50
    freeze_bn: bool = False
    sync_bn: bool = False
    # pruning
    prune_method: str = "none"
    s_i: float = 0.0
    s_f: float = 0.75
    prune_epoch_start: int = 0
    prune_last_epoch: int = 15
    delta_t: int = 50
    prune_scope: str = PruningScope.LAYER.value
    # run
    seed: int = 0
    deterministic: bool = False
    save_checkpoint_dir: str = "runs/train_compressed"
    resume: str | None = None
    tb_logging_dir: str | None = None
    progress_bar: bool = True
    amp: bool = False
    channels_last: bool = False
    device: str = "cpu"

    @property
    def base_architecture(self) -> str:
        """The registry name: the paper's ``<name>_quantized`` aliases map to ``<name>``."""
        name = self.architecture
        if name.endswith(QUANTIZED_SUFFIX) and name[: -len(QUANTIZED_SUFFIX)] in PAPER_ARCHITECTURES:
            return name[: -len(QUANTIZED_SUFFIX)]
        return name

    @property
    def prune(self) -> bool:
        return self.prune_method != "none"

    def weight_quantizer(self) -> QuantizerConfig | None:
        if not self.weight_quant:
            return None
        return QuantizerConfig(
            n_bits=self.n_bits, scheme=QMETHODS[self.qmethod],
            granularity=Granularity.per_channel(0) if self.per_channel else Granularity.per_tensor(),
            range_estimator=RANGE_METHODS[self.weight_quant_method], learn_step_size=self.learn_step_size,
            grad_scaling=self.grad_scaling,
        )  # fmt: skip

    def act_quantizer(self) -> QuantizerConfig | None:
        if not self.act_quant:
            return None
        return QuantizerConfig(
            n_bits=self.n_bits_act, scheme=QMETHODS[self.qmethod_act], range_estimator=RANGE_METHODS[self.act_quant_method],
            learn_step_size=self.learn_step_size, grad_scaling=self.grad_scaling,
        )  # fmt: skip

    def validate(self) -> None:
        """Raise ``ValueError`` (one line) for inconsistent options (single options are checked by the CLI)."""
        parse_lr_schedule(self.learning_rate_schedule)
        parse_lr_schedule(self.quant_learning_rate_schedule)
        if self.prune and not 0.0 <= self.s_i <= self.s_f < 1.0:
            raise ValueError(f"--s-i {self.s_i} must be in [0, --s-f {self.s_f}]")
        if self.prune and self.prune_epoch_start > self.prune_last_epoch:
            raise ValueError(f"--prune-epoch-start {self.prune_epoch_start} is after --prune-last-epoch {self.prune_last_epoch}")
        if self.fold_bn and self.sync_bn:
            raise ValueError("--fold-bn removes the batch norms; --sync-bn has nothing to synchronise")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def saved_options(saved: dict[str, Any]) -> dict[str, Any]:
    """The options stored in a checkpoint, as today's fields.

    An option added after the checkpoint was written takes its default (the behaviour the run
    had then). Raises ``ValueError`` (one line) naming the options this version does not know
    (a checkpoint of a newer version, or an option renamed since).
    """
    fields = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    options = dict(fields)
    unknown = []
    for key, value in saved.items():
        if key in fields:
            options[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown options {', '.join(sorted(unknown))} (written by another train-compressed)")
    return options


def differing_options(saved: dict[str, Any], current: TrainConfig) -> list[str]:
    """``--option: checkpoint value -> current value`` for every result-shaping option that differs.

    Options missing from the checkpoint count with their defaults (see :func:`saved_options`).
    """
    saved = saved_options(saved)
    differences = []
    for key, value in current.as_dict().items():
        if key in RESUMABLE_CHANGES:
            continue
        if saved[key] != value:
            differences.append(f"--{key.replace('_', '-')}: {saved[key]} (checkpoint) vs {value} (now)")
    return differences
