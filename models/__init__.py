"""Models for the weight study: the model-zoo registry and our own model definitions."""

from .registry import (  # noqa: F401  (the package's public API)
    TASKS,
    UnknownModelError,
    UnsafeCheckpointError,
    WeightsUnavailableError,
    check_model_name,
    eval_transform,
    is_weights_available,
    list_models,
    load_model,
    model_task,
    model_weights,
    register_model,
    weights_status,
)
