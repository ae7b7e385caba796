"""Models for the weight study: the model-zoo registry and our own model definitions.

The registry's names are loaded on first use (PEP 562), so that importing a torch-free module of
this package (``models.bit_policy``) does not import torchvision.
"""
from __future__ import annotations

import importlib
from typing import Any

_REGISTRY_NAMES = (  # the package's public API, from .registry
    "TASKS",
    "UnknownModelError",
    "UnsafeCheckpointError",
    "WeightsUnavailableError",
    "check_model_name",
    "eval_transform",
    "is_weights_available",
    "list_models",
    "load_model",
    "model_task",
    "model_weights",
    "register_model",
    "weights_status",
)
__all__ = list(_REGISTRY_NAMES)


def __getattr__(name: str) -> Any:
    if name in _REGISTRY_NAMES:
        return getattr(importlib.import_module(".registry", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
