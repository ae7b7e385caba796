"""The layers LIMPQ's search covers in a model, with their weight counts and MACs: from the model or a bundled table.

Searched layers: every convolution but the first, in module order (ResNet-50: 52); fixed layers:
the model's other compressed layers (the first conv, the classifier), which stay at a fixed
bit-width and count in the model size. Per searched layer the geometry holds ``P_l`` (weights) and
its MACs at ``image_size`` both ways of :mod:`models.geometry` (floored, and LIMPQ's true-division
``official`` count); per fixed layer its ``P_l``.

Computing it builds the model and runs one shape-only forward pass (:func:`model_search_geometry`,
which imports torch and the model zoo: seconds). The common cases ship in
``data/limpq/search_geometry.json`` (:data:`BUNDLED_ARCHITECTURES`, each at its usual input size,
the models' own classifiers), read without torch by :func:`read_bundled_geometry`. Regenerate it
with :func:`write_bundled_geometry` (``data/limpq/README.md``); ``tests/test_search_geometry.py``
checks that it equals the freshly computed geometry.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from utils.io import write_json

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "BUNDLED_ARCHITECTURES",
    "BUNDLED_GEOMETRY",
    "SearchGeometry",
    "SearchGeometryError",
    "bundled_geometry_document",
    "model_search_geometry",
    "read_bundled_geometry",
    "split_layers",
    "write_bundled_geometry",
]

BUNDLED_GEOMETRY = Path(__file__).resolve().parents[1] / "data" / "limpq" / "search_geometry.json"
BUNDLED_ARCHITECTURES = {"resnet18": 224, "resnet50": 224, "mobilenet_v1": 224, "resnet32_cifar": 32}  # name -> px


class SearchGeometryError(ValueError):
    """A model whose geometry cannot be computed (one line); ``option``: the command-line option at fault."""

    def __init__(self, message: str, option: str) -> None:
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class SearchGeometry:
    """A model's searched and fixed layers (module order), weight counts (all of them) and MACs (searched ones)."""

    architecture: str
    image_size: int
    searched: tuple[str, ...]
    fixed: tuple[str, ...]
    weight_counts: Mapping[str, int]
    macs: Mapping[str, int]  # floored output sizes
    official_macs: Mapping[str, int]  # LIMPQ's true-division count

    def layer_macs(self, geometry: str) -> dict[str, int]:
        """The searched layers' MACs of ``geometry`` (``floored`` or ``official``)."""
        return dict(self.official_macs if geometry == "official" else self.macs)


def split_layers(model: nn.Module) -> tuple[list[str], list[str]]:
    """(searched, fixed) names of the model's compressed layers: every conv but the first; the others."""
    from torch import nn

    from models.quantized import compressible_layers

    layers, _ = compressible_layers(model)
    convs = [name for name, module in layers.items() if isinstance(module, nn.modules.conv._ConvNd)]
    searched = convs[1:]
    return searched, [name for name in layers if name not in searched]


def model_search_geometry(model: nn.Module, architecture: str, image_size: int) -> SearchGeometry:
    """The geometry of ``model`` (named ``architecture`` in messages) at ``image_size`` x ``image_size`` inputs."""
    from models.geometry import layer_geometry

    searched, fixed = split_layers(model)
    try:
        geometry = layer_geometry(model, image_size)
    except RuntimeError as error:
        first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise SearchGeometryError(f"{architecture} does not run on {image_size}x{image_size} images: {first_line}",
                                  "--image-size") from None  # fmt: skip
    not_run = [name for name in (*searched, *fixed) if name not in geometry]
    if not_run:
        raise SearchGeometryError(f"layers that do not run in {architecture}'s forward pass: {', '.join(not_run[:5])}",
                                  "--architecture")  # fmt: skip
    return SearchGeometry(
        architecture, image_size, tuple(searched), tuple(fixed),
        {name: geometry[name].weight_count for name in (*searched, *fixed)},
        {name: geometry[name].macs for name in searched}, {name: geometry[name].official_macs for name in searched},
    )  # fmt: skip


def _document_entry(geometry: SearchGeometry) -> dict:
    searched = [{"name": name, "weight_count": geometry.weight_counts[name], "macs": geometry.macs[name],
                 "official_macs": geometry.official_macs[name]} for name in geometry.searched]  # fmt: skip
    fixed = [{"name": name, "weight_count": geometry.weight_counts[name]} for name in geometry.fixed]
    return {"architecture": geometry.architecture, "image_size": geometry.image_size, "searched": searched,
            "fixed": fixed}  # fmt: skip


def _from_entry(entry: dict) -> SearchGeometry:
    searched, fixed = entry["searched"], entry["fixed"]
    return SearchGeometry(
        entry["architecture"], entry["image_size"], tuple(row["name"] for row in searched),
        tuple(row["name"] for row in fixed), {row["name"]: row["weight_count"] for row in (*searched, *fixed)},
        {row["name"]: row["macs"] for row in searched}, {row["name"]: row["official_macs"] for row in searched},
    )  # fmt: skip


def bundled_geometry_document(architectures: Mapping[str, int] = BUNDLED_ARCHITECTURES) -> dict:
    """The bundled table's content: the geometry of each architecture (random weights) at its input size."""
    from models import load_model

    return {"geometries": [_document_entry(model_search_geometry(load_model(name, pretrained=False), name, size))
                           for name, size in architectures.items()]}  # fmt: skip


def write_bundled_geometry(path: str | Path = BUNDLED_GEOMETRY,
                           architectures: Mapping[str, int] = BUNDLED_ARCHITECTURES) -> None:  # fmt: skip
    """Write :func:`bundled_geometry_document` to ``path`` (atomically)."""
    write_json(path, bundled_geometry_document(architectures))


def read_bundled_geometry(architecture: str, image_size: int, path: str | Path = BUNDLED_GEOMETRY) -> SearchGeometry | None:
    """The bundled geometry of ``architecture`` at ``image_size``, or None when the table lacks it (or is unreadable)."""
    try:
        entries: Sequence[dict] = json.loads(Path(path).read_text(encoding="utf-8"))["geometries"]
        for entry in entries:
            if entry["architecture"] == architecture and entry["image_size"] == image_size:
                return _from_entry(entry)
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("the bundled layer geometry %s is unreadable (%s: %s); computing it", path,
                       type(error).__name__, error)  # fmt: skip
    return None
