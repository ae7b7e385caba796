"""LIMPQ's joint training of the layer importance indicators (Tang et al., ECCV 2022), for the training loop.

One optimizer step per batch (:class:`JointIndicatorStep`, a :data:`training.engine.StepFunction`):

1. for each candidate bit-width ``b``: every searchable layer at ``W = b``, ``A = b``; forward,
   loss, backward (the gradients accumulate);
2. one random mixed policy (each layer draws ``b`` uniformly from the candidates, the same ``b``
   for its weight and its input); forward, loss, backward;
3. every gradient element clipped to ``[-1, 1]`` (:class:`ClipGradientValues`, an
   ``after_backward`` callback: the loop unscales AMP gradients before it), one optimizer step.

The weights are trained together with the step sizes; the learned step sizes are the indicators
(:func:`quantization.multi_bit_lsq.indicators`). :func:`prepare_indicator_model` converts a float
model: multi-bit LSQ quantizers on every layer but the first conv and the classifier (kept in float,
with the first conv's batch norm), switchable batch norm after the searchable layers.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.quantized import CompressionSpec, QuantSetup, compress_model
from models.switchable_bn import switch_batch_norms
from quantization.fake_quant import QuantizerConfig
from quantization.multi_bit_lsq import (
    LIMPQ_BITS,
    MIN_STEP_SIZE,
    multi_bit_lsq_factory,
    searchable_layers,
    set_layer_bits,
    set_uniform_bits,
)
from quantization.quantizers import QuantScheme
from training.engine import StepInputs, StepOutput, TrainCallback

logger = logging.getLogger(__name__)

__all__ = [
    "LABEL_SMOOTHING",
    "ClipGradientValues",
    "JointIndicatorStep",
    "indicator_loss",
    "prepare_indicator_model",
]

LABEL_SMOOTHING = 0.1  # the official recipe's cross-entropy
GRADIENT_CLIP = 1.0  # every gradient element is clipped to [-1, 1]


def indicator_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with label smoothing 0.1 (the official recipe)."""
    return F.cross_entropy(logits, targets, label_smoothing=LABEL_SMOOTHING)


def prepare_indicator_model(
    model: nn.Module,
    example_input: torch.Tensor,
    candidate_bits: Sequence[int] = LIMPQ_BITS,
    act_scheme: QuantScheme | str = QuantScheme.UNSIGNED,
    min_step_size: float | None = MIN_STEP_SIZE,
    max_step_size: float | None = None,
) -> list[str]:
    """Convert a float ``model`` in place for indicator training; returns the searchable layers in module order.

    Every weight layer of :func:`models.quantized.compress_model` except the first and the last
    (``QuantSetup.FP_FIRST_LAST``: the first conv and the classifier stay in float, and so does
    the first conv's batch norm) gets signed multi-bit LSQ weight and ``act_scheme`` input
    quantizers, initially at the largest candidate; the batch norm after each of them becomes
    switchable (``example_input``, one small batch, finds them). Unsigned inputs are the paper's
    (every searchable layer of a ResNet reads a ReLU output); a model whose searchable layers read
    signed inputs (MobileNet-V2's blocks) needs ``QuantScheme.SYMMETRIC``. Build the optimizer
    afterwards: batch-norm parameters are replaced.
    """
    top = max(candidate_bits)
    weight_quant = QuantizerConfig(n_bits=top, scheme=QuantScheme.SYMMETRIC, grad_scaling=True)
    spec = CompressionSpec(
        weight_quant=weight_quant,
        act_quant=dataclasses.replace(weight_quant, scheme=QuantScheme(act_scheme)),
        quant_setup=QuantSetup.FP_FIRST_LAST,
        quantizer_factory=multi_bit_lsq_factory(candidate_bits, min_step_size, max_step_size),
    )
    compress_model(model, spec)
    names = list(searchable_layers(model))
    switch_batch_norms(model, names, example_input)
    logger.info("indicator training: %d searchable layers, bit-widths %s", len(names), tuple(candidate_bits))
    return names


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
