"""The search's layer geometry: computed from a model, and the bundled table (which must equal the computed one)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from models import load_model
from models.geometry import layer_geometry
from studies.search_geometry import (
    BUNDLED_ARCHITECTURES,
    BUNDLED_GEOMETRY,
    SearchGeometryError,
    bundled_geometry_document,
    model_search_geometry,
    read_bundled_geometry,
    split_layers,
    write_bundled_geometry,
)


class Small(nn.Module):
    """Stem conv, a strided conv, a depthwise conv, a pool and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 8, 3, stride=2, padding=1)  # 9 -> 5 (official 8/2 + 1 = 5: agrees)
        self.depthwise = nn.Conv2d(8, 8, 3, stride=2, groups=8)  # 5 -> 2 (official 2/2 + 1 = 2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.depthwise(self.down(self.stem(x))).mean((2, 3)))


def test_small_model_geometry_by_hand() -> None:
    geometry = model_search_geometry(Small(), "small", 9)
    assert (geometry.searched, geometry.fixed) == (("down", "depthwise"), ("stem", "fc"))
    assert dict(geometry.weight_counts) == {"down": 8 * 4 * 9, "depthwise": 8 * 9, "stem": 4 * 3 * 9, "fc": 24}
    assert dict(geometry.macs) == {"down": 8 * 4 * 9 * 25, "depthwise": 8 * 9 * 4}
    assert geometry.layer_macs("official") == dict(geometry.official_macs) == dict(geometry.macs)
    with pytest.raises(SearchGeometryError, match="small does not run on 2x2 images") as caught:
        model_search_geometry(Small(), "small", 2)  # the unpadded depthwise conv gets a 1x1 input
    assert caught.value.option == "--image-size"


def test_table_round_trip_and_misses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_bundled_geometry(tmp_path / "table.json", {})
    assert json.loads((tmp_path / "table.json").read_text()) == {"geometries": []}
    document = {"geometries": [{"architecture": "small", "image_size": 9,
                                "searched": [{"name": "down", "weight_count": 288, "macs": 7200, "official_macs": 7201}],
                                "fixed": [{"name": "stem", "weight_count": 108}]}]}  # fmt: skip
    (tmp_path / "table.json").write_text(json.dumps(document))
    geometry = read_bundled_geometry("small", 9, tmp_path / "table.json")
    assert geometry is not None and (geometry.searched, geometry.fixed) == (("down",), ("stem",))
    assert geometry.layer_macs("official") == {"down": 7201} and geometry.layer_macs("floored") == {"down": 7200}
    assert dict(geometry.weight_counts) == {"down": 288, "stem": 108}
    assert read_bundled_geometry("small", 10, tmp_path / "table.json") is None
    assert read_bundled_geometry("other", 9, tmp_path / "table.json") is None
    (tmp_path / "table.json").write_text('{"geometries": [{"architecture": "small"}]}')
    with caplog.at_level(logging.WARNING):
        assert read_bundled_geometry("small", 9, tmp_path / "table.json") is None
    assert "unreadable (KeyError" in caplog.text


@pytest.mark.slow
def test_bundled_table_equals_the_computed_geometry() -> None:
    """The shipped table holds what :func:`model_search_geometry` computes now (regenerate it if this fails)."""
    entries = json.loads(BUNDLED_GEOMETRY.read_text())["geometries"]
    assert {entry["architecture"]: entry["image_size"] for entry in entries} == BUNDLED_ARCHITECTURES
    for name, size in BUNDLED_ARCHITECTURES.items():
        assert read_bundled_geometry(name, size) == model_search_geometry(load_model(name, pretrained=False), name, size)


@pytest.mark.slow
def test_written_table_reads_back_as_the_model_geometry(tmp_path: Path) -> None:
    write_bundled_geometry(tmp_path / "table.json", {"resnet32_cifar": 32})
    model = load_model("resnet32_cifar", pretrained=False)
    fresh = model_search_geometry(model, "resnet32_cifar", 32)
    assert read_bundled_geometry("resnet32_cifar", 32, tmp_path / "table.json") == fresh
    assert len(fresh.searched) == 32 and fresh.fixed == ("conv1", "fc")  # stem + 30 block + 2 downsampling convs
    assert json.loads((tmp_path / "table.json").read_text()) == bundled_geometry_document({"resnet32_cifar": 32})


@pytest.mark.slow
def test_resnet50_entry_against_layer_geometry() -> None:
    """An independent check of the ResNet-50 entry: 52 searched convs, conv1 and fc fixed, MACs of layer_geometry."""
    model = load_model("resnet50", pretrained=False)
    bundled = read_bundled_geometry("resnet50", 224)
    assert bundled is not None and len(bundled.searched) == 52 and bundled.fixed == ("conv1", "fc")
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    assert list(bundled.searched) == convs[1:] and split_layers(model) == (convs[1:], ["conv1", "fc"])
    geometry = layer_geometry(model, 224)
    for name in bundled.searched:
        assert bundled.macs[name] == geometry[name].macs and bundled.official_macs[name] == geometry[name].official_macs
    assert bundled.official_macs["layer2.0.conv2"] == 128 * 128 * 9 * 812  # LIMPQ's 28.5^2 -> 812 positions
    assert bundled.weight_counts["fc"] == 2048 * 1000
