"""LSQ with one learnable step size per candidate bit-width (LIMPQ, Tang et al., ECCV 2022).

A :class:`MultiBitLSQ` quantizes one tensor (a layer's weight or its input activation) per
tensor at the bit-width currently selected among its candidates ``B`` (e.g. 6, 5, 4, 3, 2),
with that bit-width's own step size ``s_b``:

    ``x_hat = s_b * round_ste(clip(x / s_b, Q_N, Q_P))``

signed ``[Q_N, Q_P] = [-2^(b-1), 2^(b-1) - 1]`` (weights) or unsigned ``[0, 2^b - 1]``
(post-ReLU activations). The step size's gradient is LSQ's (Esser et al. 2020):
``d x_hat / d s = round(x/s) - x/s`` inside the clip range, ``Q_N`` or ``Q_P`` outside,
multiplied by ``g = 1 / sqrt(Q_P * numel(x))`` (``numel`` of the whole tensor: the batch
included for an activation).

Initialisation (LIMPQ's):

* weights, every ``b`` at once: ``s_b = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1)`` with the
  mean ``mu`` and the (unbiased) standard deviation ``sigma`` of the weight tensor;
* activations, lazily, each ``b`` at the first forward pass that uses it:
  ``s_b = 2 mean|x| / sqrt(Q_P)``, ``mean|x|`` averaged over the processes of a distributed run
  (every process must then run that pass: LIMPQ's uniform passes do).

The learned step sizes are LIMPQ's layer importance indicators: :func:`indicators` collects
them in the layout of the official files.

Step-size clamp. The official forward clamps ``s`` to ``[1e-5, 1.0]``. The lower bound keeps the
division by ``s`` finite and is kept (``min_step_size``). The upper bound is a defect: a weight
of magnitude above ``2^(b-1)`` or an activation with ``2 mean|x| > sqrt(Q_P)`` (post-ReLU means
near 1 at 2 bits) starts clamped, and ``clamp`` passes no gradient there, so that indicator never
moves from 1.0. It is off by default; ``max_step_size=1.0`` reproduces the official code. (In the
published ResNet-50 indicators the largest step size is 0.44: the bound did not bind there.)
"""
from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from models.quantized import QuantizerFactory, compressed_layers
from quantization.fake_quant import QuantizerConfig, compute_dtype
from quantization.quantizers import QuantScheme, fake_quantize, integer_range

__all__ = [
    "LIMPQ_BITS",
    "MIN_STEP_SIZE",
    "MultiBitLSQ",
    "QuantizedTensor",
    "activation_step_size_init",
    "indicators",
    "multi_bit_lsq_factory",
    "searchable_layers",
    "set_layer_bits",
    "set_uniform_bits",
    "weight_step_size_init",
]

LIMPQ_BITS = (6, 5, 4, 3, 2)  # the paper's candidate bit-widths, in the official order
MIN_STEP_SIZE = 1e-5  # the official lower clamp of the step size


class QuantizedTensor(str, enum.Enum):
    """What a quantizer quantizes: it decides the initialisation rule."""

    WEIGHT = "weight"
    ACTIVATION = "activation"


def weight_step_size_init(weight: torch.Tensor, n_bits: int) -> torch.Tensor:
    """``max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(n_bits - 1)`` of ``weight`` (unbiased sigma), in float64."""
    weight = weight.detach().double()
    mu, sigma = weight.mean(), weight.std()
    return torch.maximum((mu - 3 * sigma).abs(), (mu + 3 * sigma).abs()) / 2 ** (n_bits - 1)


def activation_step_size_init(mean_abs: torch.Tensor, q_max: int) -> torch.Tensor:
    """``2 mean|x| / sqrt(Q_P)``."""
    return 2 * mean_abs / math.sqrt(q_max)


def _mean_abs_over_processes(x: torch.Tensor) -> torch.Tensor:
    """``mean|x|`` (accumulated in at least float32), averaged over the processes when torch.distributed is initialised."""
    mean_abs = x.detach().abs().mean(dtype=compute_dtype(x.dtype))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(mean_abs, op=dist.ReduceOp.SUM)
        mean_abs = mean_abs / dist.get_world_size()
    return mean_abs


class MultiBitLSQ(nn.Module):
    """Per-tensor LSQ fake quantizer with one step size per candidate bit-width (see the module doc).

    ``step_sizes[i]`` is the step size of ``candidate_bits[i]``; the active bit-width is chosen with
    :meth:`set_bits` (initially the first candidate). ``initialized[i]`` records whether
    ``step_sizes[i]`` has been set from data (a buffer: it is saved with the model).

    It satisfies :class:`models.quantized.LayerQuantizer`: :meth:`estimate_range` sets the step
    sizes from a tensor (a weight: every bit-width; an activation: the active one), and between
    :meth:`start_estimating` and :meth:`freeze_range` every forward pass re-estimates the active
    step size (otherwise only the first pass at each bit-width does). Half-precision inputs are
    quantized in float32 and cast back, as in :class:`quantization.fake_quant.FakeQuantizer`.
    """

    def __init__(
        self,
        candidate_bits: Sequence[int] = LIMPQ_BITS,
        scheme: QuantScheme | str = QuantScheme.SYMMETRIC,
        tensor: QuantizedTensor | str = QuantizedTensor.WEIGHT,
        learn_step_size: bool = True,
        grad_scaling: bool = True,
        min_step_size: float | None = MIN_STEP_SIZE,
        max_step_size: float | None = None,
    ) -> None:
        super().__init__()
        bits = tuple(int(b) for b in candidate_bits)
        if not bits or len(set(bits)) != len(bits):
            raise ValueError(f"the candidate bit-widths must be distinct and at least one, got {candidate_bits}")
        self.scheme = QuantScheme(scheme)
        if self.scheme is QuantScheme.ASYMMETRIC:
            raise ValueError("MultiBitLSQ has no zero point: use the symmetric or the unsigned scheme")
        self.integer_ranges = {b: integer_range(b, self.scheme) for b in bits}
        self.candidate_bits = bits
        self.tensor = QuantizedTensor(tensor)
        self.grad_scaling = grad_scaling
        self.min_step_size, self.max_step_size = min_step_size, max_step_size
        self.step_sizes = nn.Parameter(torch.ones(len(bits)), requires_grad=learn_step_size)
        self.register_buffer("initialized", torch.zeros(len(bits), dtype=torch.bool))
        # a host-side copy of ``initialized``: reading the buffer in every forward would synchronise with the GPU
        self._initialized = [False] * len(bits)
        self.register_load_state_dict_post_hook(_sync_initialized)
        self._index = 0
        self.estimating = False

    @property
    def n_bits(self) -> int:
        """The bit-width the quantizer currently quantizes to."""
        return self.candidate_bits[self._index]

    def set_bits(self, n_bits: int) -> None:
        """Quantize to ``n_bits`` (one of the candidates) from now on."""
        if n_bits not in self.candidate_bits:
            raise ValueError(f"{n_bits} bits is not a candidate bit-width {self.candidate_bits}")
        self._index = self.candidate_bits.index(n_bits)

    def step_size_of(self, n_bits: int) -> float:
        """The learned step size of ``n_bits`` (the parameter, before the forward's clamp)."""
        return float(self.step_sizes.detach()[self.candidate_bits.index(n_bits)])

    @torch.no_grad()
    def estimate_range(self, x: torch.Tensor) -> None:
        """Initialise step sizes from ``x``: a weight's for every candidate, an activation's for the active bit-width."""
        if self.tensor is QuantizedTensor.WEIGHT:
            for index, bits in enumerate(self.candidate_bits):
                self._set_step_size(index, weight_step_size_init(x, bits))
        else:
            _, q_max = self.integer_ranges[self.n_bits]
            self._set_step_size(self._index, activation_step_size_init(_mean_abs_over_processes(x), q_max))

    def _set_step_size(self, index: int, value: torch.Tensor) -> None:
        self.step_sizes[index] = value.to(self.step_sizes.dtype)
        self.initialized[index] = True
        self._initialized[index] = True

    def start_estimating(self) -> None:
        """Re-estimate the active step size in every forward pass until :meth:`freeze_range`."""
        self.estimating = True

    def freeze_range(self) -> None:
        """Stop re-estimating; step sizes not yet initialised still are at their first use."""
        self.estimating = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = self._index
        if self.estimating or not self._initialized[index]:
            self.estimate_range(x)
        q_min, q_max = self.integer_ranges[self.n_bits]
        step_size = self.step_sizes[index]
        if self.min_step_size is not None or self.max_step_size is not None:
            step_size = step_size.clamp(self.min_step_size, self.max_step_size)
        grad_scale = 1.0 / math.sqrt(q_max * x.numel()) if self.grad_scaling else 1.0
        dtype = torch.promote_types(compute_dtype(x.dtype), step_size.dtype)
        zero_point = torch.zeros((), dtype=dtype, device=x.device)
        out = fake_quantize(x.to(dtype), step_size.to(dtype), zero_point, q_min, q_max, grad_scale)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        clamp = f"[{self.min_step_size}, {self.max_step_size}]"
        return f"{self.tensor.value}, bits={self.n_bits} of {self.candidate_bits}, scheme={self.scheme.value}, clamp={clamp}"


def _sync_initialized(module: MultiBitLSQ, _incompatible_keys) -> None:
    module._initialized = [bool(flag) for flag in module.initialized.tolist()]


def multi_bit_lsq_factory(
    candidate_bits: Sequence[int] = LIMPQ_BITS,
    min_step_size: float | None = MIN_STEP_SIZE,
    max_step_size: float | None = None,
) -> QuantizerFactory:
    """A ``CompressionSpec.quantizer_factory`` making :class:`MultiBitLSQ` quantizers.

    From the :class:`QuantizerConfig` it takes the scheme, the initially active bit-width
    (``n_bits``, one of ``candidate_bits``), ``learn_step_size`` and ``grad_scaling`` (set it for
    LSQ's gradient scale); the range estimator is replaced by LIMPQ's initialisation. Only per-tensor
    granularity. A quantizer made with a shape quantizes a weight, one without an input activation.
    """
    bits = tuple(candidate_bits)

    def make(config: QuantizerConfig, shape: Sequence[int] | None) -> MultiBitLSQ:
        if not config.granularity.is_per_tensor:
            raise ValueError(f"MultiBitLSQ is per tensor, not {config.granularity.describe()}")
        tensor = QuantizedTensor.WEIGHT if shape is not None else QuantizedTensor.ACTIVATION
        quantizer = MultiBitLSQ(bits, config.scheme, tensor, config.learn_step_size, config.grad_scaling,
                                min_step_size, max_step_size)  # fmt: skip
        quantizer.set_bits(config.n_bits)
        return quantizer

    return make


def searchable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The compressed layers with a :class:`MultiBitLSQ` quantizer (weight or input), by name, in module order."""
    return {name: layer for name, layer in compressed_layers(model).items()
            if isinstance(layer.weight_quantizer, MultiBitLSQ) or isinstance(layer.input_quantizer, MultiBitLSQ)}  # fmt: skip


def set_layer_bits(model: nn.Module, weight_bits: Mapping[str, int], act_bits: Mapping[str, int]) -> None:
    """Select the weight and input bit-width of the named searchable layers (the others are left as they are)."""
    layers = searchable_layers(model)
    for kind, bits_of, attribute in (("weight", weight_bits, "weight_quantizer"), ("input", act_bits, "input_quantizer")):
        for name, bits in bits_of.items():
            quantizer = getattr(layers[name], attribute, None) if name in layers else None
            if not isinstance(quantizer, MultiBitLSQ):
                raise KeyError(f"{name!r} is not a layer with a multi-bit {kind} quantizer")
            quantizer.set_bits(bits)


def set_uniform_bits(model: nn.Module, n_bits: int) -> None:
    """Every multi-bit quantizer of ``model`` (weights and inputs) at ``n_bits``."""
    for module in model.modules():
        if isinstance(module, MultiBitLSQ):
            module.set_bits(n_bits)


def indicators(model: nn.Module) -> dict:
    """The learned step sizes per layer and bit-width, LIMPQ's importance indicators.

    The official file layout: ``{"weight": {layer: {"6": s, ...}}, "act": {layer: {...}},
    "layer_name": [layer, ...]}`` (searchable layers in module order; bit-widths as strings in
    candidate order; the step-size parameters, before the forward's clamp).
    """
    weight: dict[str, dict[str, float]] = {}
    act: dict[str, dict[str, float]] = {}
    layers = searchable_layers(model)
    for name, layer in layers.items():
        for table, quantizer in ((weight, layer.weight_quantizer), (act, layer.input_quantizer)):
            if isinstance(quantizer, MultiBitLSQ):
                table[name] = {str(b): quantizer.step_size_of(b) for b in quantizer.candidate_bits}
    return {"weight": weight, "act": act, "layer_name": list(layers)}
