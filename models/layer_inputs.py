"""The exact input matrices of Conv/Linear layers, for post-training bounds (paper Sec. 4).

For a layer with weight ``W`` and ``G`` groups, output channel ``c`` belongs to group
``g = c // (out_channels / G)`` and its weights flatten to ``w_c = W[c].reshape(-1)`` of length
``fan_in = (in_channels / G) * prod(kernel_size)`` (in-channel within the group major, then the
kernel offsets in row-major order). :func:`patch_matrix` builds ``A`` of shape
``(G, positions, fan_in)`` such that, at every output position ``p``,

    output[p, c] = A[g, p] @ w_c + bias[c].

Positions are ordered like ``output.movedim(1, -1).reshape(-1, out_channels)``: batch first, then
the output's spatial positions in row-major order. For Linear layers ``G = 1`` and the positions
are all leading entries of the input (``input.reshape(-1, in_features)``).

The geometry is the layer's own: stride, dilation, groups and padding (integer, ``'same'`` or
``'valid'``, with the layer's ``padding_mode``: zeros, reflect, replicate or circular). The
paper's code built ``A`` ignoring stride and padding; :func:`check_patches` guards against that
kind of error by comparing ``A @ w`` with the layer's own output.

:func:`capture_layer_inputs` records the inputs that layers of a model see on a batch of images,
:func:`gram_matrices` gives ``A_g^T A_g`` in float64.
"""
from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .layers import weight_layers

__all__ = [
    "SUPPORTED_LAYERS",
    "PatchMismatchError",
    "capture_layer_inputs",
    "check_patches",
    "gram_matrices",
    "layer_output_from_patches",
    "padding_amounts",
    "patch_matrix",
    "resolve_layers",
]

logger = logging.getLogger(__name__)

SUPPORTED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_F_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}

# Default relative tolerance of check_patches, relative to the largest |output| (see there).
_DEFAULT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
_LOW_PRECISION_RTOL = 2e-2  # float16 / bfloat16


class PatchMismatchError(RuntimeError):
    """Raised by :func:`check_patches` when ``A @ w`` differs from the layer's own output."""


# --------------------------------------------------------------------------- capture


def _supported_names(model: nn.Module) -> list[str]:
    return [name for name, module in weight_layers(model) if isinstance(module, SUPPORTED_LAYERS)]


def resolve_layers(model: nn.Module, layer_names: Sequence[str]) -> dict[str, nn.Module]:
    """Map each requested name to its module, with one-line errors for unknown or unsupported ones."""
    modules = dict(model.named_modules())
    resolved: dict[str, nn.Module] = {}
    for name in dict.fromkeys(layer_names):
        module = modules.get(name)
        if module is None:
            valid = _supported_names(model)
            close = difflib.get_close_matches(name, valid, n=5, cutoff=0.6)
            hint = f"closest: {', '.join(close)}" if close else f"valid names include {', '.join(valid[:5])}, ..."
            raise ValueError(f"unknown layer {name!r} ({len(valid)} Conv/Linear layers in the model; {hint})")
        if not isinstance(module, SUPPORTED_LAYERS):  # a bad --layer-name: a user error like the one above
            raise ValueError(  # noqa: TRY004
                f"layer {name!r} is a {type(module).__name__}; only Conv1d, Conv2d, Conv3d and Linear are supported"
            )
        resolved[name] = module
    if not resolved:
        raise ValueError("no layer names given")
    return resolved


def capture_layer_inputs(
    model: nn.Module, layer_names: Sequence[str], images: torch.Tensor, batch_size: int = 32
) -> dict[str, torch.Tensor]:
    """Inputs that the named layers receive when ``model`` runs on ``images``.

    The model runs in eval mode (its modules' training flags are restored afterwards) under
    ``torch.inference_mode()``, on ``images`` split into batches of ``batch_size`` along the first
    axis, each moved to the device and dtype of the model's first parameter. A forward pre-hook
    on every named layer records its input; the hooks are removed afterwards, also when the
    forward pass raises.

    Classification-style input is assumed: ``model(batch)`` with a tensor whose first axis
    indexes samples, e.g. ``(N, 3, H, W)`` images (``(N, 3, T, H, W)`` clips for video models).
    Detection/segmentation models that need other inputs are not handled specially.

    Returns:
        ``{name: input}``, the recorded inputs concatenated along the first axis in batch order,
        on the CPU (a layer called several times per forward pass gets all its calls' inputs, in
        call order). Plain tensors (not inference tensors), detached.

    Raises:
        ValueError: an unknown name (the message names the closest Conv/Linear layers), a layer
            type other than Conv1d/2d/3d or Linear, a layer that the forward pass never calls
            (e.g. ``nn.MultiheadAttention.out_proj``, whose weight is used functionally), or
            calls with inputs whose shapes cannot be concatenated.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images.dim() < 1 or images.shape[0] < 1:
        raise ValueError(f"images must be a non-empty batch, got shape {tuple(images.shape)}")
    layers = resolve_layers(model, layer_names)
    parameter = next(model.parameters())
    recorded: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def recorder(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            recorded[name].append(args[0].detach().to("cpu", copy=True))

        return hook

    training = {module: module.training for module in model.modules()}
    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in layers.items()]
    try:
        model.eval()
        with torch.inference_mode():
            for batch in images.split(batch_size):
                model(batch.to(device=parameter.device, dtype=parameter.dtype))
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in training.items():
            module.training = mode
    return {name: _concatenate(name, inputs) for name, inputs in recorded.items()}


def _concatenate(name: str, inputs: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` of one layer's recorded inputs (outside inference mode: a plain tensor)."""
    if not inputs:
        raise ValueError(
            f"layer {name!r} was not called by the forward pass (is its weight used functionally by its parent?)"
        )
    shapes = {tuple(x.shape[1:]) for x in inputs}
    if len(shapes) > 1:
        raise ValueError(f"layer {name!r} was called on inputs of different shapes {sorted(shapes)}")
    return torch.cat(inputs)


# --------------------------------------------------------------------------- patches


def padding_amounts(module: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> tuple[tuple[int, int], ...]:
    """``(before, after)`` padding of every spatial axis of a convolution, first axis first.

    Integer padding ``p`` gives ``(p, p)``; ``'valid'`` gives ``(0, 0)``; ``'same'`` (stride 1)
    pads ``total = dilation * (kernel_size - 1)`` with ``total // 2`` before and the rest after,
    as PyTorch does.
    """
    if module.padding == "valid":
        return tuple((0, 0) for _ in module.kernel_size)
    if module.padding == "same":
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        return tuple((total // 2, total - total // 2) for total in totals)
    return tuple((p, p) for p in module.padding)


def _pad(module: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, *spatial) padded as the layer pads it, with its ``padding_mode``."""
    pads = [amount for before_after in reversed(padding_amounts(module)) for amount in before_after]
    if not any(pads):
        return x
    return nn.functional.pad(x, pads, mode=_F_PAD_MODE[module.padding_mode])


def _conv_patches(module: nn.Conv1d | nn.Conv2d | nn.Conv3d, layer_input: torch.Tensor) -> torch.Tensor:
    """Patch matrix of a convolution, see :func:`patch_matrix`."""
    n_spatial = len(module.kernel_size)
    x = layer_input if layer_input.dim() == n_spatial + 2 else layer_input.unsqueeze(0)  # unbatched input
    if x.dim() != n_spatial + 2 or x.shape[1] != module.in_channels:
        raise ValueError(
            f"{type(module).__name__} with {module.in_channels} input channels cannot take an input "
            f"of shape {tuple(layer_input.shape)}"
        )
    x = _pad(module, x)
    # Window of axis i: dilation * (kernel - 1) + 1 samples every `stride`, keeping every `dilation`-th one.
    # After the loop: (N, C, *out_spatial, *kernel_size), the kernel axes appended in order.
    for axis, (k, s, d) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + axis, d * (k - 1) + 1, s)[..., ::d]
    positions = x.shape[0] * math.prod(x.shape[2 : 2 + n_spatial])
    # (N, G, C/G, *out_spatial, *kernel) -> (G, N, *out_spatial, C/G, *kernel) -> (G, positions, fan_in)
    x = x.unflatten(1, (module.groups, -1))
    x = x.permute(1, 0, *range(3, 3 + n_spatial), 2, *range(3 + n_spatial, 3 + 2 * n_spatial))
    return x.reshape(module.groups, positions, -1)


def patch_matrix(module: nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
    """The matrix ``A`` of shape ``(groups, positions, fan_in)`` with ``output[p, c] = A[g, p] @ w_c (+ bias)``.

    Args:
        module: a Conv1d, Conv2d, Conv3d or Linear layer (the layer that ``layer_input`` feeds).
        layer_input: what the layer receives: ``(N, C, *spatial)`` or unbatched ``(C, *spatial)``
            for convolutions (before the layer's own padding; e.g. after a separate
            ``SamePad2d`` module), ``(..., in_features)`` for Linear.

    Returns:
        ``A`` in ``layer_input``'s dtype and device, ``fan_in = (in_channels / groups) *
        prod(kernel_size)`` (``in_features`` for Linear, with ``groups = 1``); column ``j`` of
        ``A[g]`` multiplies ``weight[c].reshape(-1)[j]``. Positions run over the batch, then the
        output's spatial positions row-major (for Linear: ``layer_input.reshape(-1, in_features)``).
    """
    if isinstance(module, _CONVS):
        return _conv_patches(module, layer_input)
    if isinstance(module, nn.Linear):
        if layer_input.dim() < 1 or layer_input.shape[-1] != module.in_features:
            raise ValueError(f"Linear with {module.in_features} inputs cannot take shape {tuple(layer_input.shape)}")
        return layer_input.reshape(1, -1, module.in_features)
    raise ValueError(f"{type(module).__name__} is not supported; only Conv1d, Conv2d, Conv3d and Linear are")


def _groups(module: nn.Module) -> int:
    return module.groups if isinstance(module, _CONVS) else 1


def _out_channels(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, _CONVS) else module.out_features


def layer_output_from_patches(module: nn.Module, patches: torch.Tensor) -> torch.Tensor:
    """``(positions, out_channels)`` outputs ``A[g] @ w_c + bias[c]`` for every channel ``c``.

    Computed in ``patches``' dtype (the weight and bias are cast to it). Rows are in the order of
    :func:`patch_matrix`'s positions, so for convolutions the result equals
    ``module(x).movedim(1, -1).reshape(-1, out_channels)`` (up to rounding).
    """
    groups, out_channels = _groups(module), _out_channels(module)
    weight = module.weight.detach().to(patches.dtype).reshape(groups, out_channels // groups, -1)
    if patches.shape[0] != groups or patches.shape[2] != weight.shape[2]:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not fit {type(module).__name__} weights "
            f"{tuple(module.weight.shape)} with {groups} groups"
        )
    output = torch.bmm(patches, weight.transpose(1, 2))  # (G, positions, out_channels / G)
    output = output.transpose(0, 1).reshape(patches.shape[1], out_channels)
    if module.bias is not None:
        output = output + module.bias.detach().to(patches.dtype)
    return output


def gram_matrices(patches: torch.Tensor, chunk_elements: int = 2**24) -> torch.Tensor:
    """``A[g]^T A[g]`` for every group: ``(groups, fan_in, fan_in)`` in float64.

    Positions are taken in chunks of about ``chunk_elements`` patch entries, each converted to
    float64 before the product, so the sums are float64 for any input dtype and the extra memory
    is bounded by one float64 chunk.
    """
    if patches.dim() != 3:
        raise ValueError(f"patches must have shape (groups, positions, fan_in), got {tuple(patches.shape)}")
    groups, positions, fan_in = patches.shape
    chunk = max(1, chunk_elements // max(1, groups * fan_in))
    gram = torch.zeros(groups, fan_in, fan_in, dtype=torch.float64, device=patches.device)
    for start in range(0, positions, chunk):
        block = patches[:, start : start + chunk].to(torch.float64)
        gram.baddbmm_(block.transpose(1, 2), block)
    return gram


def _reference_output(module: nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
    """The layer's own output as ``(positions, out_channels)``."""
    with torch.no_grad():
        output = module(layer_input)
    if isinstance(module, _CONVS):
        channel_axis = 1 if layer_input.dim() == len(module.kernel_size) + 2 else 0
        output = output.movedim(channel_axis, -1)
    return output.reshape(-1, _out_channels(module))


def check_patches(
    module: nn.Module,
    layer_input: torch.Tensor,
    patches: torch.Tensor,
    atol: float | None = None,
    rtol: float | None = None,
) -> None:
    """Check ``layer_output_from_patches(module, patches)`` against ``module(layer_input)``.

    Elementwise ``|from_patches - module_output| <= atol + rtol * |module_output|`` must hold.
    Defaults: ``rtol`` 1e-10 for float64, 1e-4 for float32, 2e-2 for 16-bit floats (by the
    dtype of ``patches``); ``atol = rtol * max|module_output|`` (dot products of different
    summation order differ by rounding relative to the output's scale, not to each entry).
    ``module`` and ``layer_input`` must share dtype and device with ``patches``.

    Raises:
        PatchMismatchError: the outputs differ (shape or values); the message gives the worst
            position and channel.
    """
    expected = _reference_output(module, layer_input)
    actual = layer_output_from_patches(module, patches)
    name = type(module).__name__
    if actual.shape != expected.shape:
        raise PatchMismatchError(
            f"{name}: patches give outputs of shape {tuple(actual.shape)}, the layer {tuple(expected.shape)}"
        )
    if expected.numel() == 0:
        return
    if rtol is None:
        rtol = _DEFAULT_RTOL.get(patches.dtype, _LOW_PRECISION_RTOL)
    if atol is None:
        atol = rtol * expected.abs().max().item()
    # NaN (from a NaN or infinite output on either side) counts as the worst mismatch.
    excess = ((actual - expected).abs() - rtol * expected.abs()).nan_to_num(nan=math.inf)
    worst = int(excess.argmax())
    position, channel = divmod(worst, expected.shape[1])
    if excess[position, channel] > atol:
        raise PatchMismatchError(
            f"{name}: patch products differ from the layer output at position {position}, channel {channel}: "
            f"{actual[position, channel].item():.6g} vs {expected[position, channel].item():.6g} "
            f"(atol {atol:.3g}, rtol {rtol:.3g})"
        )
