"""All options of ``main.py train-compressed`` / ``evaluate`` / ``train-indicators``: one small frozen dataclass per concern.

:class:`TrainConfig` holds the model, data, optimisation, quantization, batch-norm, pruning, PSGD,
indicator-training and runtime options (plain values only). Every leaf field is named after its command-line option
(``n_bits`` is ``--n-bits``) and no name occurs twice, so the flat options of the command line
map one to one onto their nested place (:meth:`TrainConfig.from_options`,
:meth:`TrainConfig.options`).

Every field has a working default (the paper's ResNet-18 INT4 QAT recipe on ImageNet, except
``images_dir``). The config is stored in every checkpoint in its nested layout
(:meth:`TrainConfig.as_dict`); checkpoints of earlier versions stored the flat options and are
read as well (:func:`saved_config`). :func:`differing_options` tells a resumed run which of the
options that shape the result changed.

The same run trains LIMPQ's importance indicators (``main.py train-indicators``) when
``indicators.bits`` names candidate bit-widths; :func:`indicator_training_config` gives that run
the recipe's defaults (:data:`INDICATOR_RECIPE`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from models.bit_policy import MAX_BITS, MIN_BITS
from models.quantized import QuantSetup
from pruning.schedule import PruningScope
from quantization.bn_ranges import ACT_RANGE_CALIBRATE, parse_act_range
from quantization.fake_quant import QuantizerConfig, RangeEstimator
from quantization.granularity import Granularity
from quantization.position_scaling import DEFAULT_LAMBDA, Target
from quantization.quantizers import QuantScheme
from training.data import FolderAugmentation
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
# evaluate --init-checkpoint of a PSGD grid run: the weight quantizers on PSGD's tracked grid (builders.set_psgd_grid)
PSGD_GRID_METHOD = "psgd_grid"
# --weight-quant-method -> the range the weight quantizers are built with; psgd_grid builds them over the current
# min-max range, then builders.set_psgd_grid replaces the step and the levels of each weight PSGD scaled by PSGD's grid
WEIGHT_RANGE_METHODS = {**RANGE_METHODS, PSGD_GRID_METHOD: RangeEstimator.CURRENT_MINMAX}
PRUNE_METHODS = ("none", "zhu_gupta", "block")  # block: 1xN block masks (pruning/block_masks.py)
PRUNE_SCHEDULES = ("one-shot", "zhu_gupta")  # --prune-method block: masks fixed from the start, or the cubic schedule
BLOCK_PATTERNS = {"1xn": "1xn", "random": "random_blocks", "filter": "filter", "weight": "weight"}  # -> PruneMethod
OPTIMIZERS = ("SGD", "Adam")
ACT_SCHEMES = ("auto", "unsigned", "symmetric")  # input quantizers of indicator training
DATASETS = ("folder", "cifar10", "cifar100")  # folder: --images-dir class folders; else training/cifar.py in --data-dir
CIFAR_IMAGE_SIZE = 32
AUGMENTATIONS = tuple(augmentation.value for augmentation in FolderAugmentation)  # --dataset folder
PSGD_TARGETS = tuple(target.value for target in Target)
PSGD_MIN_BITS, PSGD_MAX_BITS = 2, 8

# Options that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = frozenset(
    {"images_dir", "data_dir", "model_dir", "init_checkpoint", "num_workers", "save_checkpoint_dir", "resume", "tb_logging_dir", "progress_bar", "device"}
)


def option_flag(name: str) -> str:
    """The command-line flag of an option: ``n_bits`` -> ``--n-bits``."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str = "resnet18"
    model_dir: str | None = None
    pretrained: bool = True
    init_checkpoint: str | None = None  # start from a float train-compressed checkpoint's weights (not the pretrained)

    @property
    def base_architecture(self) -> str:
        """The registry name: the paper's ``<name>_quantized`` aliases map to ``<name>``."""
        name = self.architecture
        if name.endswith(QUANTIZED_SUFFIX) and name[: -len(QUANTIZED_SUFFIX)] in PAPER_ARCHITECTURES:
            return name[: -len(QUANTIZED_SUFFIX)]
        return name


@dataclass(frozen=True)
class DataConfig:
    dataset: str = DATASETS[0]
    images_dir: str = ""  # --dataset folder
    data_dir: str | None = None  # --dataset cifar10/cifar100: the folder of the archive
    image_size: int = 224
    batch_size: int = 256
    num_workers: int = 4
    augmentation: str = FolderAugmentation.RESIZED_CROP_FLIP.value  # --dataset folder's training transforms

    @property
    def is_cifar(self) -> bool:
        return self.dataset != "folder"

    @property
    def source(self) -> str:
        """Where the images come from, for logs and messages."""
        return f"{self.dataset} in {self.data_dir}" if self.is_cifar else self.images_dir

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset {self.dataset} is not one of {', '.join(DATASETS)}")
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"--augmentation {self.augmentation} is not one of {', '.join(AUGMENTATIONS)}")
        if self.is_cifar and self.augmentation != DataConfig.augmentation:
            raise ValueError(f"--augmentation only acts with --dataset folder ({self.dataset}: the recipe's "
                             "reflect-pad, crop and flip)")  # fmt: skip
        if self.is_cifar:
            if not self.data_dir:
                raise ValueError(f"--dataset {self.dataset} needs --data-dir (the folder of the CIFAR archive)")
            if self.image_size != CIFAR_IMAGE_SIZE:
                raise ValueError(f"--dataset {self.dataset} has {CIFAR_IMAGE_SIZE}x{CIFAR_IMAGE_SIZE} images: "
                                 f"--image-size {self.image_size} is not {CIFAR_IMAGE_SIZE}")  # fmt: skip


@dataclass(frozen=True)
class OptimConfig:
    """The training loss, the optimizers and their learning-rate schedules."""

    max_epochs: int = 20
    optimizer: str = "SGD"
    learning_rate: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 1e-4
    learning_rate_schedule: str = "cosine"
    warmup_epochs: int = 0  # linear warm-up of every learning rate (training/lr_schedule.py)
    label_smoothing: float = 0.0  # of the training loss only
    sep_quant_optimizer: bool = True
    quant_optimizer: str = "Adam"
    quant_learning_rate: float = 1e-5
    quant_weight_decay: float = 0.0
    quant_learning_rate_schedule: str = "cosine"

    def validate(self) -> None:
        parse_lr_schedule(self.learning_rate_schedule)
        parse_lr_schedule(self.quant_learning_rate_schedule)
        if self.warmup_epochs and self.warmup_epochs >= self.max_epochs:
            raise ValueError(f"--warmup-epochs {self.warmup_epochs} leaves no epoch of --max-epochs {self.max_epochs} "
                             "for the learning-rate schedule")  # fmt: skip


@dataclass(frozen=True)
class QuantConfig:
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
    act_range: str = ACT_RANGE_CALIBRATE  # evaluate: calibrate on training batches, or bn:N (quantization/bn_ranges.py)

    def weight_quantizer(self) -> QuantizerConfig | None:
        if not self.weight_quant:
            return None
        return QuantizerConfig(
            n_bits=self.n_bits, scheme=QMETHODS[self.qmethod],
            granularity=Granularity.per_channel(0) if self.per_channel else Granularity.per_tensor(),
            range_estimator=WEIGHT_RANGE_METHODS[self.weight_quant_method],
            learn_step_size=self.learn_step_size, grad_scaling=self.grad_scaling,
        )  # fmt: skip

    def act_quantizer(self) -> QuantizerConfig | None:
        if not self.act_quant:
            return None
        return QuantizerConfig(
            n_bits=self.n_bits_act, scheme=QMETHODS[self.qmethod_act], range_estimator=RANGE_METHODS[self.act_quant_method],
            learn_step_size=self.learn_step_size, grad_scaling=self.grad_scaling,
        )  # fmt: skip


@dataclass(frozen=True)
class BatchNormConfig:
    fold_bn: bool = False
    reestimate_bn_stats: bool = True
    bn_est_batches: int = 50
    freeze_bn: bool = False
    sync_bn: bool = False

    def validate(self) -> None:
        if self.fold_bn and self.sync_bn:
            raise ValueError("--fold-bn removes the batch norms; --sync-bn has nothing to synchronise")


@dataclass(frozen=True)
class PruningConfig:
    prune_method: str = "none"
    s_i: float = 0.0
    s_f: float = 0.75
    prune_epoch_start: int = 0
    prune_last_epoch: int = 15
    delta_t: int = 50
    prune_scope: str = PruningScope.LAYER.value
    # --prune-method block (Lin et al., 1xN pruning): masks at rate --s-f, set once before training (one-shot, the
    # paper) or raised to it on the cubic schedule above (zhu_gupta, on block scores)
    block_size: int = 4  # N: consecutive output channels per block
    block_pattern: str = "1xn"  # 1xn (L1 norm), random (blocks), filter (L1 norm), weight (magnitude)
    prune_classifier: bool = False
    rearrange: bool = False  # sort the filters by L1 norm (permuting the float network) before the masks
    prune_schedule: str = "one-shot"  # PRUNE_SCHEDULES

    @property
    def enabled(self) -> bool:
        return self.prune_method != "none"

    @property
    def is_block_pattern(self) -> bool:
        """Masks of a block pattern on the paper's layers (``--prune-method block``), one-shot or on a schedule."""
        return self.prune_method == "block"

    @property
    def is_block(self) -> bool:
        """One-shot block masks fixed during training (``--prune-method block``), not a schedule."""
        return self.is_block_pattern and self.prune_schedule == "one-shot"

    @property
    def is_gradual(self) -> bool:
        """A Zhu-Gupta schedule of mask updates: magnitude (``zhu_gupta``) or block (``block --prune-schedule zhu_gupta``)."""
        return self.prune_method == "zhu_gupta" or (self.is_block_pattern and self.prune_schedule == "zhu_gupta")

    def validate(self) -> None:
        block_fields = ("block_size", "block_pattern", "prune_classifier", "rearrange", "prune_schedule")
        if not self.is_block_pattern:
            given = [option_flag(name) for name in block_fields if getattr(self, name) != getattr(PruningConfig, name)]
            if given:
                raise ValueError(f"{', '.join(given)} only act{'s' if len(given) == 1 else ''} with --prune-method block")
        else:
            if self.prune_schedule not in PRUNE_SCHEDULES:
                raise ValueError(f"--prune-schedule {self.prune_schedule} is not one of {', '.join(PRUNE_SCHEDULES)}")
            if self.prune_scope != PruningConfig.prune_scope:
                raise ValueError("--prune-scope only acts with --prune-method zhu_gupta (block masks are per layer)")
            schedule_fields = ("s_i", "prune_epoch_start", "prune_last_epoch", "delta_t")
            given = [option_flag(name) for name in schedule_fields if getattr(self, name) != getattr(PruningConfig, name)]
            if self.is_block and given:
                raise ValueError(f"{', '.join(given)} only act{'s' if len(given) == 1 else ''} with a pruning schedule "
                                 "(add --prune-schedule zhu_gupta; one-shot masks are set at --s-f before training)")
            if self.block_size < 1:
                raise ValueError(f"--block-size {self.block_size} must be at least 1")
            if self.block_pattern not in BLOCK_PATTERNS:
                raise ValueError(f"--block-pattern {self.block_pattern} is not one of {', '.join(BLOCK_PATTERNS)}")
        if not self.enabled:
            return
        if not 0.0 <= self.s_i <= self.s_f < 1.0:
            raise ValueError(f"--s-i {self.s_i} must be in [0, --s-f {self.s_f}]")
        if self.prune_epoch_start > self.prune_last_epoch:
            raise ValueError(
                f"--prune-epoch-start {self.prune_epoch_start} is after --prune-last-epoch {self.prune_last_epoch}"
            )


@dataclass(frozen=True)
class PsgdConfig:
    """Position-based scaled gradient (Kim et al., NeurIPS 2020; quantization/position_scaling.py); no target: off."""

    psgd_target: str | None = None  # grid (quantization) or zero (pruning)
    psgd_bits: int = 4  # the grid's bit-width (the first and last layer at 8 below 4 bits)
    psgd_lambda: float = DEFAULT_LAMBDA
    psgd_scale_weight_decay: bool = False  # scale the weight decay too (the optimizer then skips those tensors)
    psgd_linear_biases: bool = False  # also scale the linear layers' biases (the official code does)

    @property
    def enabled(self) -> bool:
        return self.psgd_target is not None

    @property
    def grid_bits(self) -> int | None:
        """The grid's bit-width; ``None`` for the zero target."""
        return self.psgd_bits if self.psgd_target == Target.GRID.value else None

    def validate(self) -> None:
        if not self.enabled:
            given = [option_flag(f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default]
            if given:
                raise ValueError(f"{', '.join(given)} only act{'s' if len(given) == 1 else ''} with --psgd-target grid|zero")
            return
        if self.psgd_target not in PSGD_TARGETS:
            raise ValueError(f"--psgd-target {self.psgd_target} is not one of {', '.join(PSGD_TARGETS)}")
        if not PSGD_MIN_BITS <= self.psgd_bits <= PSGD_MAX_BITS:
            raise ValueError(f"--psgd-bits {self.psgd_bits} is not in {PSGD_MIN_BITS}..{PSGD_MAX_BITS}")
        if self.psgd_lambda <= 0:
            raise ValueError(f"--psgd-lambda {self.psgd_lambda} must be positive")


@dataclass(frozen=True)
class IndicatorConfig:
    """LIMPQ's joint training of importance indicators (``train-indicators``); no ``bits``: a train-compressed run."""

    bits: tuple[int, ...] = ()  # candidate bit-widths, largest first
    act_scheme: str = ACT_SCHEMES[0]  # input quantizers: auto (signed where a layer's input can be negative) or one scheme

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))  # a list read back from a file compares equal

    @property
    def enabled(self) -> bool:
        return bool(self.bits)

    def validate(self) -> None:
        if not self.enabled:
            return
        if len(set(self.bits)) != len(self.bits) or not all(MIN_BITS <= b <= MAX_BITS for b in self.bits):
            raise ValueError(f"--bits {','.join(map(str, self.bits))}: distinct bit-widths in {MIN_BITS}..{MAX_BITS} needed")
        if self.act_scheme not in ACT_SCHEMES:
            raise ValueError(f"--act-scheme {self.act_scheme} is not one of {', '.join(ACT_SCHEMES)}")


@dataclass(frozen=True)
class RuntimeConfig:
    """Seeding, devices and speed-ups, progress display, and where the run reads and writes its files."""

    seed: int = 0
    deterministic: bool = False
    save_checkpoint_dir: str = "runs/train_compressed"
    resume: str | None = None
    tb_logging_dir: str | None = None
    progress_bar: bool = True
    amp: bool = False
    channels_last: bool = False
    device: str = "cpu"


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    bn: BatchNormConfig = field(default_factory=BatchNormConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    psgd: PsgdConfig = field(default_factory=PsgdConfig)
    indicators: IndicatorConfig = field(default_factory=IndicatorConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @classmethod
    def from_options(cls, **options: Any) -> TrainConfig:
        """The config of the flat options given (the others at their defaults); see :meth:`with_options`."""
        return cls().with_options(**options)

    def with_options(self, **options: Any) -> TrainConfig:
        """A copy with the flat options replaced in their groups; ``ValueError`` (one line) naming unknown options."""
        unknown = sorted(name for name in options if name not in OPTION_GROUPS)
        if unknown:
            raise ValueError(f"unknown options {', '.join(unknown)}")
        changes: dict[str, dict[str, Any]] = {}
        for name, value in options.items():
            changes.setdefault(OPTION_GROUPS[name], {})[name] = value
        return dataclasses.replace(
            self, **{group: dataclasses.replace(getattr(self, group), **values) for group, values in changes.items()}
        )

    def options(self) -> dict[str, Any]:
        """The flat ``{option name: value}`` of every option, group by group."""
        return {name: getattr(getattr(self, group), name) for name, group in OPTION_GROUPS.items()}

    def as_dict(self) -> dict[str, Any]:
        """The nested layout ``{group: {option name: value}}`` (stored in checkpoints and summaries)."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ``ValueError`` (one line) for inconsistent options (single options are checked by the CLI)."""
        self.data.validate()
        self.optim.validate()
        self.pruning.validate()
        self.psgd.validate()
        self.bn.validate()
        self.indicators.validate()
        if self.quant.act_range != ACT_RANGE_CALIBRATE:
            parse_act_range(self.quant.act_range)
            if not self.quant.act_quant:
                raise ValueError(f"--act-range {self.quant.act_range} only acts with --act-quant")
        if self.quant.weight_quant_method == PSGD_GRID_METHOD:
            if self.model.init_checkpoint is None:
                raise ValueError(f"--weight-quant-method {PSGD_GRID_METHOD} needs --init-checkpoint of a --psgd-target grid run")
            if self.quant.per_channel or self.quant.qmethod != "symmetric_uniform":
                raise ValueError(f"--weight-quant-method {PSGD_GRID_METHOD} is per tensor and symmetric: drop --per-channel "
                                 "and --qmethod asymmetric_uniform")  # fmt: skip
        if self.indicators.enabled and self.pruning.enabled:
            raise ValueError("indicator training does not prune (--prune-method none)")
        if self.indicators.enabled and self.model.init_checkpoint is not None:
            raise ValueError("indicator training starts from the pretrained weights, not --init-checkpoint")
        if self.psgd.enabled:
            if self.indicators.enabled:
                raise ValueError("indicator training does not take --psgd-target")
            if self.quant.weight_quant or self.quant.act_quant:
                raise ValueError("PSGD trains the float weights (quantize them afterwards): add --no-weight-quant "
                                 "and leave --act-quant off")  # fmt: skip

    @property
    def command(self) -> str:
        """The command that runs this config: ``train-indicators`` or ``train-compressed``."""
        return "train-indicators" if self.indicators.enabled else "train-compressed"


def _option_groups() -> dict[str, str]:
    """``{option name: group name}`` over the groups of :class:`TrainConfig`, in field order."""
    defaults = TrainConfig()
    groups: dict[str, str] = {}
    for group in dataclasses.fields(defaults):
        for option in dataclasses.fields(getattr(defaults, group.name)):
            if option.name in groups:
                raise TypeError(f"option {option.name} is in both {groups[option.name]} and {group.name}")
            groups[option.name] = group.name
    return groups


OPTION_GROUPS = _option_groups()
GROUPS = frozenset(OPTION_GROUPS.values())

# LIMPQ's indicator training (Tang et al., ECCV 2022; the official recipe): 3 epochs of SGD (momentum 0.9) at
# 0.01 with a per-step cosine to 1e-5, weight decay 2.5e-5, label smoothing 0.1, candidates 6..2 bits. Validation
# runs at the largest candidate with the batch-norm copies trained for it (no re-estimation).
INDICATOR_RECIPE = TrainConfig(
    optim=OptimConfig(max_epochs=3, learning_rate=1e-2, momentum=0.9, weight_decay=2.5e-5,
                      learning_rate_schedule="cosine:1e-05", label_smoothing=0.1),
    bn=BatchNormConfig(reestimate_bn_stats=False),
    indicators=IndicatorConfig(bits=(6, 5, 4, 3, 2)),
    runtime=RuntimeConfig(save_checkpoint_dir="runs/train_indicators"),
)  # fmt: skip


def indicator_training_config(**options: Any) -> TrainConfig:
    """The config of a ``train-indicators`` run: :data:`INDICATOR_RECIPE` with the flat options replaced.

    Weights and step sizes share one optimizer, its learning rate, weight decay and schedule
    (LIMPQ trains ``model.parameters()`` with one SGD): the quantizer options follow the model's.
    """
    config = INDICATOR_RECIPE.with_options(**options)
    optim = config.optim
    return config.with_options(sep_quant_optimizer=False, quant_optimizer=optim.optimizer,
                               quant_learning_rate=optim.learning_rate, quant_weight_decay=optim.weight_decay,
                               quant_learning_rate_schedule=optim.learning_rate_schedule)  # fmt: skip


def saved_config(saved: Mapping[str, Any]) -> TrainConfig:
    """The config of the options stored in a checkpoint, nested (today) or flat (earlier versions).

    An option the checkpoint lacks (added after it was written) takes its default, the
    behaviour the run had then. Raises ``ValueError`` (one line) naming the options this version
    does not know (a checkpoint of a newer version, or an option renamed since).
    """
    flat: dict[str, Any] = {}
    for key, value in saved.items():
        if key in GROUPS and isinstance(value, Mapping):
            flat.update(value)
        else:  # the flat layout
            flat[key] = value
    try:
        return TrainConfig.from_options(**flat)
    except ValueError as error:
        raise ValueError(f"{error} (written by another train-compressed)") from None


def differing_options(saved: Mapping[str, Any], current: TrainConfig) -> list[str]:
    """``--option: checkpoint value (checkpoint) vs current value (now)`` for every result-shaping option that differs.

    ``saved``: the options a checkpoint stores, read by :func:`saved_config` (missing ones count
    with their defaults).
    """
    then = saved_config(saved).options()
    return [
        f"{option_flag(name)}: {then[name]} (checkpoint) vs {value} (now)"
        for name, value in current.options().items()
        if name not in RESUMABLE_CHANGES and then[name] != value
    ]
