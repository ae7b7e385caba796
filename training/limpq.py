"""LIMPQ's joint training of the layer importance indicators (Tang et al., ECCV 2022), for the training loop.

One optimizer step per batch (:class:`JointIndicatorStep`, a :data:`training.engine.StepFunction`):

1. for each candidate bit-width ``b``: every searchable layer at ``W = b``, ``A = b``; forward,
   loss, backward (the gradients accumulate);
2. one random mixed policy (each layer draws ``b`` uniformly from the candidates, the same ``b``
   for its weight and its input); forward, loss, backward;
3. every gradient element clipped to ``[-1, 1]`` (:class:`ClipGradientValues`, an
   ``after_backward`` callback: the loop unscales AMP gradients before it), one optimizer step.

The loss is the loop's cross-entropy with label smoothing 0.1 (``--label-smoothing``, the
recipe's default). The weights are trained together with the step sizes; the learned step sizes
are the indicators (:func:`quantization.multi_bit_lsq.indicators`). :func:`prepare_indicator_model`
converts a float model: multi-bit LSQ quantizers on the searchable layers - every convolution but
the first, the search space of ``search-bit-policy`` (:func:`studies.bit_policy_search.split_layers`)
- the other layers (the first conv with its batch norm, the classifier) kept in float, switchable
batch norm after the searchable layers.

:class:`IndicatorTraining` plugs all of it into the run of ``train-compressed``
(:mod:`training.run`): ``main.py train-indicators``.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.bit_policy import BitPolicy
from models.quantized import CompressionSpec, QuantSetup, compress_model
from models.switchable_bn import switch_batch_norms
from quantization.fake_quant import QuantizerConfig
from quantization.multi_bit_lsq import (
    LIMPQ_BITS,
    MIN_STEP_SIZE,
    MultiBitLSQ,
    multi_bit_lsq_factory,
    searchable_layers,
    set_layer_bits,
    set_uniform_bits,
)
from quantization.multi_bit_lsq import indicators as step_size_table
from quantization.quantizers import QuantScheme
from studies.bit_policy_search import split_layers
from studies.indicators import Indicators, write_indicators
from training.builders import ArchitectureError, build_float_model, image_size_check, load_base_model
from training.config import TrainConfig
from training.data import DataLoaders
from training.engine import StepInputs, StepOptions, StepOutput, TrainCallback

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO_SCHEME",
    "INDICATORS_JSON",
    "ClipGradientValues",
    "IndicatorTraining",
    "JointIndicatorStep",
    "NoSearchableLayersError",
    "check_searchable_layers",
    "input_schemes",
    "learned_indicators",
    "prepare_indicator_model",
    "signed_input_layers",
]

GRADIENT_CLIP = 1.0  # every gradient element is clipped to [-1, 1]
AUTO_SCHEME = "auto"  # each layer's input quantizer: signed if its input can be negative, else unsigned
INDICATORS_JSON = "indicators.json"
EXAMPLE_SEED = 0


class NoSearchableLayersError(ValueError):
    """A model without searchable layers (no convolution besides the first)."""


@torch.no_grad()
def signed_input_layers(model: nn.Module, layer_names: Iterable[str], example_input: torch.Tensor) -> list[str]:
    """The named layers whose input takes a negative value when ``model`` runs ``example_input`` (in eval mode).

    A layer reading a ReLU's output never does; one reading a residual sum without ReLU
    (MobileNet-V2's blocks) or a SiLU's output does on any generic input. The model's mode is kept.
    """
    names = list(layer_names)
    negative: set[str] = set()
    handles = []
    for name in names:
        def record(_module: nn.Module, args: tuple, name: str = name) -> None:
            if bool((args[0] < 0).any()):
                negative.add(name)

        handles.append(model.get_submodule(name).register_forward_pre_hook(record))
    was_training = model.training
    try:
        model.eval()(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [name for name in names if name in negative]


def _input_schemes(
    model: nn.Module, layers: list[str], example_input: torch.Tensor, act_scheme: QuantScheme | str | Mapping
) -> dict[str, QuantScheme]:
    """The input quantizer scheme of each searchable layer (see :func:`prepare_indicator_model`)."""
    if isinstance(act_scheme, Mapping):
        if set(act_scheme) != set(layers):
            raise ValueError("the input schemes name other layers than the searchable ones")
        return {name: QuantScheme(act_scheme[name]) for name in layers}
    if act_scheme == AUTO_SCHEME:
        signed = set(signed_input_layers(model, layers, example_input))
        return {name: QuantScheme.SYMMETRIC if name in signed else QuantScheme.UNSIGNED for name in layers}
    return dict.fromkeys(layers, QuantScheme(act_scheme))


def prepare_indicator_model(
    model: nn.Module,
    example_input: torch.Tensor,
    candidate_bits: Sequence[int] = LIMPQ_BITS,
    act_scheme: QuantScheme | str | Mapping[str, QuantScheme | str] = AUTO_SCHEME,
    min_step_size: float | None = MIN_STEP_SIZE,
    max_step_size: float | None = None,
) -> list[str]:
    """Convert a float ``model`` in place for indicator training; returns the searchable layers in module order.

    The searchable layers (every convolution but the first) get signed multi-bit LSQ weight
    quantizers and multi-bit LSQ input quantizers, initially at the largest candidate; every
    other weight layer (the first conv, the classifier, other linear layers) stays in float, and
    so does the first conv's batch norm. The batch norm after each searchable layer becomes
    switchable. ``example_input`` (one small batch; it runs in eval mode, no quantizer sees it)
    finds those batch norms and, with ``act_scheme="auto"``, the layers whose input can be
    negative (:func:`signed_input_layers`): their input quantizers are symmetric, the others
    unsigned (the paper's: every searchable layer of a ResNet reads a ReLU output). A scheme
    (``"unsigned"``, ``"symmetric"``) applies to every layer, a mapping gives each layer's.
    Build the optimizer afterwards: batch-norm parameters are replaced. Raises
    :class:`NoSearchableLayersError` for a model with no convolution besides the first.
    """
    searched, fixed = split_layers(model)
    if not searched:
        raise NoSearchableLayersError("no searchable layers: LIMPQ searches every convolution but the first, and "
                                      "the model has no other convolution")  # fmt: skip
    schemes = _input_schemes(model, searched, example_input, act_scheme)
    weight_quant = QuantizerConfig(n_bits=max(candidate_bits), scheme=QuantScheme.SYMMETRIC, grad_scaling=True)
    act_quant = dataclasses.replace(weight_quant, scheme=QuantScheme.UNSIGNED)
    factory = multi_bit_lsq_factory(candidate_bits, min_step_size, max_step_size)
    kept_float = BitPolicy(tuple(fixed), (None,) * len(fixed), (None,) * len(fixed))
    compress_model(model, CompressionSpec(weight_quant, act_quant, QuantSetup.ALL, bit_policy=kept_float,
                                          quantizer_factory=factory))  # fmt: skip
    for name, scheme in schemes.items():
        if scheme is not QuantScheme.UNSIGNED:
            model.get_submodule(name).input_quantizer = factory(dataclasses.replace(act_quant, scheme=scheme), None)
    switch_batch_norms(model, searched, example_input)
    signed = sum(scheme is not QuantScheme.UNSIGNED for scheme in schemes.values())
    logger.info("indicator training: %d searchable layers (%d with signed inputs), bit-widths %s", len(searched),
                signed, tuple(candidate_bits))  # fmt: skip
    return searched


def input_schemes(model: nn.Module) -> dict[str, str]:
    """The scheme of each searchable layer's input quantizer, by layer name (to rebuild the model from a checkpoint)."""
    return {name: layer.input_quantizer.scheme.value for name, layer in searchable_layers(model).items()
            if isinstance(layer.input_quantizer, MultiBitLSQ)}  # fmt: skip


def learned_indicators(model: nn.Module) -> Indicators:
    """The learned step sizes of the searchable layers as :class:`studies.indicators.Indicators` (module order)."""
    table = step_size_table(model)
    layers = table["layer_name"]
    bits = [int(b) for b in table["weight"][layers[0]]]
    values = {kind: np.array([[table[kind][name][str(b)] for b in bits] for name in layers]) for kind in ("weight", "act")}
    return Indicators(tuple(layers), tuple(bits), values["weight"], values["act"])


class JointIndicatorStep:
    """The training step of LIMPQ's joint indicator training (see the module doc); a ``StepFunction``.

    ``model`` is the unwrapped model (not its DistributedDataParallel wrapper): the bit-widths are
    set on its searchable layers, the passes run through ``inputs.model``. The random policies come
    from a ``torch.Generator`` seeded with ``seed`` and owned by the step: runs are reproducible,
    and :meth:`state_dict` / :meth:`load_state_dict` carry its state through a checkpoint (in a
    distributed run every process must use the same seed, so all draw the same policy).

    The step reports the mean loss of its ``|B| + 1`` passes and the logits of the last uniform
    pass (the last candidate: 2 bits for ``B = (6, 5, 4, 3, 2)``). It leaves the model at the
    random policy; :attr:`last_policy` holds it.
    """

    def __init__(self, model: nn.Module, candidate_bits: Sequence[int] = LIMPQ_BITS, seed: int = 0) -> None:
        self.model = model
        self.layers = list(searchable_layers(model))
        if not self.layers:
            raise ValueError("the model has no multi-bit quantized layers (see prepare_indicator_model)")
        self.candidate_bits = tuple(candidate_bits)
        self.generator = torch.Generator().manual_seed(seed)
        self.last_policy: dict[str, int] | None = None

    def draw_policy(self) -> dict[str, int]:
        """One mixed policy: each layer's bit-width drawn uniformly from the candidates."""
        choices = torch.randint(len(self.candidate_bits), (len(self.layers),), generator=self.generator)
        return {name: self.candidate_bits[choice] for name, choice in zip(self.layers, choices.tolist())}

    def __call__(self, inputs: StepInputs) -> StepOutput:
        losses = []
        for bits in self.candidate_bits:
            set_uniform_bits(self.model, bits)
            logits, loss = inputs.forward()
            inputs.backward(loss)
            losses.append(loss.detach())
        self.last_policy = policy = self.draw_policy()
        set_layer_bits(self.model, policy, policy)
        _, loss = inputs.forward()
        inputs.backward(loss)
        losses.append(loss.detach())
        return StepOutput(torch.stack(losses).mean(), logits)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The random-policy generator's state (a uint8 tensor), for a checkpoint."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


class ClipGradientValues(TrainCallback):
    """Clip every gradient element of ``parameters`` to ``[-limit, limit]`` after the backward passes.

    The training loop unscales AMP gradients before ``after_backward``, so the clip acts on the
    true gradients (on steps whose gradients overflowed the scaler still skips the update).
    """

    def __init__(self, parameters: Iterable[nn.Parameter], limit: float = GRADIENT_CLIP) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]
        self.limit = limit

    def after_backward(self, step: int) -> None:
        nn.utils.clip_grad_value_(self.parameters, self.limit)


def check_searchable_layers(config: TrainConfig) -> list[str]:
    """The searchable layers of ``--architecture`` (float model, random weights: cheap, before any data is read);
    :class:`training.builders.ArchitectureError` (a usage error) when it has none."""
    searched, _ = split_layers(load_base_model(config, pretrained=False))
    if not searched:
        raise ArchitectureError(f"{config.model.architecture} has no searchable layers: LIMPQ searches every "
                                "convolution but the first, and it has no other convolution")  # fmt: skip
    return searched


def example_images(image_size: int) -> torch.Tensor:
    """Two seeded standard-normal RGB images: the same on every process, negative like normalised images."""
    return torch.randn((2, 3, image_size, image_size), generator=torch.Generator().manual_seed(EXAMPLE_SEED))


class IndicatorTraining:
    """LIMPQ's joint indicator training as the method of a training run (:class:`training.run.TrainingMethod`).

    The model: the float classifier (pretrained, with a new head for another number of classes)
    prepared by :func:`prepare_indicator_model`; its input quantizers initialise themselves in the
    first passes (nothing to calibrate). Each step is :class:`JointIndicatorStep` followed by
    :class:`ClipGradientValues`; validation runs at the largest candidate bit-width with the
    batch-norm copies trained for it (a re-estimation would reset every copy). The checkpoints
    add the random-policy generator's state and the input schemes; after every epoch
    ``indicators.json`` (LIMPQ's layout, :func:`studies.indicators.write_indicators`) and
    ``indicators.png`` / ``.pdf`` (:func:`studies.bit_policy_plots.write_indicators_figure`) are
    written.
    """

    find_unused_parameters = True  # each pass uses one batch-norm copy per layer and one step size per quantizer

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.bits = config.indicators.bits
        self.step: JointIndicatorStep | None = None
        self.input_schemes: dict[str, str] | None = None  # set by build_model, or by a checkpoint
        self._step_state: dict[str, torch.Tensor] | None = None

    @property
    def validation_bits(self) -> int:
        return max(self.bits)

    def describe(self) -> str:
        scheme = self.config.indicators.act_scheme
        inputs = "signed or unsigned inputs by layer" if scheme == AUTO_SCHEME else f"{scheme} inputs"
        return (f"indicators: LIMPQ joint training at {','.join(map(str, self.bits))} bits of every conv but the first "
                f"({inputs}; the other layers in float), validation at {self.validation_bits} bits")  # fmt: skip

    def build_model(self, num_classes: int | None, for_state_dict: bool) -> nn.Module:
        config = self.config
        model = build_float_model(config, for_state_dict=for_state_dict, num_classes=num_classes)
        act_scheme = self.input_schemes if self.input_schemes is not None else config.indicators.act_scheme
        try:
            with image_size_check(config):
                prepare_indicator_model(model, example_images(config.data.image_size), self.bits, act_scheme)
        except NoSearchableLayersError as error:
            raise ArchitectureError(f"{config.model.architecture}: {error}") from None
        self.input_schemes = input_schemes(model)
        return model

    def start(self, model: nn.Module, loaders: DataLoaders, options: StepOptions) -> None:
        """Nothing: each step size is initialised by the first pass at its bit-width (on every process alike)."""

    def plugins(self, model: nn.Module) -> tuple[JointIndicatorStep, list[TrainCallback]]:
        self.step = JointIndicatorStep(model, self.bits, seed=self.config.runtime.seed)
        if self._step_state is not None:
            self.step.load_state_dict(self._step_state)
        return self.step, [ClipGradientValues(model.parameters())]

    def before_evaluation(self, model: nn.Module, loaders: DataLoaders, options: StepOptions) -> None:
        set_uniform_bits(model, self.validation_bits)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step.state_dict() if self.step is not None else None, "input_schemes": self.input_schemes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a checkpoint's state; call it before :meth:`build_model` and :meth:`plugins`."""
        self._step_state = state["step"]
        self.input_schemes = dict(state["input_schemes"])

    def write_epoch_outputs(self, model: nn.Module, out_dir: Path) -> dict[str, Any]:
        from studies.bit_policy_plots import write_indicators_figure  # matplotlib, on demand

        table = learned_indicators(model)
        path = out_dir / INDICATORS_JSON
        write_indicators(path, table)
        figures = write_indicators_figure(table, out_dir)
        return {"indicators": str(path), "indicators_figures": [str(figure) for figure in figures]}
