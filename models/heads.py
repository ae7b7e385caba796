"""A classifier's head: the layer that produces the logits, found by running the model, and its replacement.

The head is the last Linear (or 1x1-style Conv2d, as in SqueezeNet) layer that a forward pass
executes, provided its number of outputs equals the number of logits. This finds ``fc`` of the
torchvision ResNets, ``classifier.1`` of MobileNet-V2, ``_fc`` of our EfficientNet-Lite and the
head of any other classifier of the zoo without a per-architecture table.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

_HEAD_TYPES = (nn.Linear, nn.Conv2d)


class HeadError(ValueError):
    """A model whose classifier head cannot be found or replaced (one-line message)."""


def _outputs(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


@torch.no_grad()
def classifier_head(model: nn.Module, image_size: int) -> tuple[str, nn.Module, int]:
    """``(name, layer, number of logits)`` of the layer that produces ``model``'s logits.

    Runs one forward pass on a zero image of ``image_size`` pixels (in eval mode; the mode is
    restored afterwards).

    Raises:
        HeadError: the last executed Linear/Conv2d layer does not produce the logits.
    """
    names = {id(module): name for name, module in model.named_modules()}
    executed: list[nn.Module] = []
    handles = [
        module.register_forward_hook(lambda layer, _inputs, _output: executed.append(layer))
        for module in model.modules()
        if isinstance(module, _HEAD_TYPES)
    ]
    training = model.training
    try:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        logits = model.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise HeadError(f"{type(model).__name__} does not return one row of logits per image")
    num_logits = logits.shape[1]
    if not executed or _outputs(executed[-1]) != num_logits:
        raise HeadError(f"cannot find the classifier layer of {type(model).__name__} (no last Linear/Conv2d "
                        f"with {num_logits} outputs)")  # fmt: skip
    head = executed[-1]
    if head is model:
        raise HeadError(f"{type(model).__name__} is a single layer, not a classifier with a head")
    return names[id(head)], head, num_logits


def _new_head(old: nn.Module, num_classes: int) -> nn.Module:
    """A freshly initialised layer like ``old`` with ``num_classes`` outputs (torch's default init)."""
    factory = {"device": old.weight.device, "dtype": old.weight.dtype}
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, num_classes, bias=old.bias is not None, **factory)
    if old.groups != 1:
        raise HeadError("the classifier layer is a grouped convolution; cannot resize it")
    return nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding, old.dilation,
                     bias=old.bias is not None, padding_mode=old.padding_mode, **factory)  # fmt: skip


def replace_classifier_head(model: nn.Module, num_classes: int, image_size: int) -> tuple[str, int] | None:
    """Give ``model`` a new, randomly initialised head with ``num_classes`` outputs, in place.

    Nothing changes when the model already predicts ``num_classes`` classes. The new layer is
    initialised from torch's global RNG (seed it for reproducible runs).

    Returns:
        ``(head name, previous number of outputs)`` when the head was replaced, else ``None``.

    Raises:
        HeadError: the head cannot be found, or the model does not predict ``num_classes``
            classes after the replacement.
    """
    if num_classes < 1:
        raise HeadError(f"need at least one class, got {num_classes}")
    name, head, outputs = classifier_head(model, image_size)
    if outputs == num_classes:
        return None
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, _new_head(head, num_classes))
    _, _, new_outputs = classifier_head(model, image_size)
    if new_outputs != num_classes:
        raise HeadError(f"replacing '{name}' gave {new_outputs} logits instead of {num_classes}")
    logger.debug("replaced the %d-way classifier head '%s' by a %d-way one", outputs, name, num_classes)
    return name, outputs
