"""LIMPQ's mixed-precision search for a model (``main.py search-bit-policy``): indicators + geometry -> a policy file.

Searched layers: every convolution but the first, in module order (ResNet-50: 52). The other
layers of the model's compressed set (the first conv, the classifier) stay at
:data:`~quantization.bit_allocation.FIXED_LAYER_BITS` bits and count in the model size. The
indicators name the searched layers (``module.`` prefixes removed), each exactly once; their
order is the order of the policy. MACs come from :func:`models.geometry.layer_geometry` at
``image_size``: the real, floored output sizes (``geometry="floored"``, the default) or LIMPQ's
true-division count (``"official"``, which the published policy was searched with). For an
indicator file and a model of :data:`studies.search_geometry.BUNDLED_ARCHITECTURES` at its size
(ResNet-50 at 224 px among them) the layers and their geometry are read from the bundled table,
so the search neither builds the model nor imports torch (:mod:`studies.search_geometry`).

The policy file is a valid ``--bit-policy`` file (:mod:`models.bit_policy`): ``layers``,
``weight_bits``, ``act_bits``, plus ``status``, ``objective``, ``bitops`` and ``bitops_target``
(searched layers), ``size_bits``, ``size_budget_bits`` and ``compression_ratio`` (whole model),
``fixed_layers``, ``solve_seconds``, ``solver`` and the ``settings``. A setting no policy meets is an error
and nothing is written.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.bit_policy import BitPolicy, BitPolicyError, parse_bit_policy, read_bit_policy
from quantization.bit_allocation import FIXED_LAYER_BITS, BitAllocation, allocate_bits
from studies.indicators import Indicators, IndicatorsError, read_indicators
from studies.search_geometry import (
    SearchGeometry,
    SearchGeometryError,
    model_search_geometry,
    read_bundled_geometry,
    split_layers,
)
from utils.io import write_json

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "BUNDLED_INDICATORS",
    "DATA_FREE_KINDS",
    "GEOMETRIES",
    "BitPolicySearchError",
    "SearchProblem",
    "SearchSettings",
    "check_settings",
    "geometry_problem",
    "policy_document",
    "run_bit_policy_search",
    "search_problem",
    "solve_search_problem",
    "split_layers",
]

BUNDLED_INDICATORS = Path(__file__).resolve().parents[1] / "data" / "limpq" / "resnet50_indicators.json"
DATA_FREE_KINDS = ("weight-mse", "output-mse")  # --indicators values computed from the pretrained model
GEOMETRIES = ("floored", "official")


class BitPolicySearchError(ValueError):
    """A search that cannot run or has no solution (one line); ``option``: the command-line option at fault, if any."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class SearchSettings:
    """The search's options (those of ``main.py search-bit-policy``)."""

    architecture: str = "resnet50"
    indicators: str = str(BUNDLED_INDICATORS)  # an indicator file, or one of DATA_FREE_KINDS
    bits: tuple[int, ...] = (6, 5, 4, 3, 2)
    wb: int = 3  # the BitOPs budget: every searched layer at wb-bit weights and ab-bit inputs
    ab: int = 4
    compression_ratio: float = 12.2  # 0: no size constraint
    bitops: bool = True
    alpha: float = 2.0
    geometry: str = "floored"
    image_size: int = 224


@dataclass(frozen=True)
class SearchProblem:
    """The ILP's data, row ``l`` for ``indicators.layers[l]``."""

    indicators: Indicators
    macs: tuple[int, ...]
    weight_counts: tuple[int, ...]
    fixed_layers: tuple[str, ...]
    fixed_weight_count: int


def search_problem(model: nn.Module, indicators: Indicators, settings: SearchSettings) -> SearchProblem:
    """Match the indicators to the model's searched layers and attach their MACs and weight counts."""
    check_settings(settings)
    return geometry_problem(_model_geometry(model, settings), indicators, settings)


def geometry_problem(geometry: SearchGeometry, indicators: Indicators, settings: SearchSettings) -> SearchProblem:
    """:func:`search_problem` from the model's layer geometry (computed, or the bundled table's)."""
    check_settings(settings)
    _check_layers(indicators.layers, list(geometry.searched), list(geometry.fixed), settings.architecture)
    macs = geometry.layer_macs(settings.geometry)
    return SearchProblem(indicators, tuple(macs[name] for name in indicators.layers),
                         tuple(geometry.weight_counts[name] for name in indicators.layers), geometry.fixed,
                         sum(geometry.weight_counts[name] for name in geometry.fixed))  # fmt: skip


def _model_geometry(model: nn.Module, settings: SearchSettings) -> SearchGeometry:
    try:
        return model_search_geometry(model, settings.architecture, settings.image_size)
    except SearchGeometryError as error:
        raise BitPolicySearchError(str(error), error.option) from None


def _check_layers(names: tuple[str, ...], searched: list[str], fixed: list[str], architecture: str) -> None:
    known = set(searched) | set(fixed)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise BitPolicySearchError(f"the indicators name {len(unknown)} layers {architecture} does not have: "
                                   f"{_some(unknown)} (its searched layers: {_some(searched, 3)})",
                                   "--indicators")  # fmt: skip
    outside = [name for name in names if name in fixed]
    if outside:
        raise BitPolicySearchError(f"the indicators name layers kept at {FIXED_LAYER_BITS} bits outside the search "
                                   f"(the first conv and non-conv layers): {_some(outside)}",
                                   "--indicators")  # fmt: skip
    missing = [name for name in searched if name not in set(names)]
    if missing:
        raise BitPolicySearchError(f"the indicators lack {len(missing)} of the {len(searched)} searched layers of "
                                   f"{architecture}: {_some(missing)}", "--indicators")  # fmt: skip


def _some(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_settings(settings: SearchSettings) -> None:
    """:class:`BitPolicySearchError` for settings no search can use (before any work)."""
    if not settings.bitops and settings.compression_ratio <= 0:
        raise BitPolicySearchError("nothing to constrain: --no-bitops needs --compression-ratio above 0",
                                   "--compression-ratio")  # fmt: skip
    if settings.geometry not in GEOMETRIES:
        raise BitPolicySearchError(f"unknown geometry {settings.geometry!r}; use one of {', '.join(GEOMETRIES)}",
                                   "--bitops-geometry")  # fmt: skip


def solve_search_problem(problem: SearchProblem, settings: SearchSettings) -> BitAllocation:
    """:func:`quantization.bit_allocation.allocate_bits` on the problem with the settings' constraints."""
    check_settings(settings)
    indicators = problem.indicators
    return allocate_bits(
        indicators.weight, indicators.act, indicators.bits, np.array(problem.macs), np.array(problem.weight_counts),
        alpha=settings.alpha, bitops_bits=(settings.wb, settings.ab) if settings.bitops else None,
        compression_ratio=settings.compression_ratio if settings.compression_ratio > 0 else None,
        fixed_weight_count=problem.fixed_weight_count,
    )  # fmt: skip


def policy_document(problem: SearchProblem, allocation: BitAllocation, settings: SearchSettings) -> dict:
    """The policy file's content (module doc); :class:`BitPolicySearchError` if the setting is infeasible."""
    if allocation.status != "optimal":
        constraints = []
        if settings.bitops:
            constraints.append(f"BitOPs of W{settings.wb}A{settings.ab}")
        if settings.compression_ratio > 0:
            constraints.append(f"compression ratio {settings.compression_ratio:g}")
        raise BitPolicySearchError(f"no bit policy meets {' and '.join(constraints)} with bits "
                                   f"{','.join(map(str, settings.bits))}: {allocation.reason}")  # fmt: skip
    document = {
        "layers": list(problem.indicators.layers),
        "weight_bits": list(allocation.weight_bits),
        "act_bits": list(allocation.act_bits),
        "status": allocation.status,
        "objective": allocation.objective,
        "bitops": allocation.bitops,
        "bitops_target": allocation.bitops_target,
        "size_bits": allocation.size_bits,
        "size_budget_bits": allocation.size_budget_bits,
        "compression_ratio": allocation.compression_ratio,
        "fixed_layers": {name: FIXED_LAYER_BITS for name in problem.fixed_layers},
        "solve_seconds": allocation.solve_seconds,
        "solver": allocation.solver,
        "settings": {**dataclasses.asdict(settings), "bits": list(settings.bits)},
    }
    try:
        parse_bit_policy(document)
    except BitPolicyError as error:
        raise BitPolicySearchError(f"the policy is not a valid --bit-policy file: {error}", "--bits") from None
    return document


def run_bit_policy_search(settings: SearchSettings, output: str | Path, compare_with: str | Path | None = None,
                          figure: bool = True) -> dict:
    """Read the indicators, get the layer geometry, search, write the policy to ``output``; return the policy.

    The geometry is the bundled table's where it has the architecture at the image size (module
    doc), else the model's (built with random weights; with data-free indicators, the pretrained one).

    With ``figure``, a figure of the policy (bits per layer) is written beside it, ``<output stem>.png/.pdf``
    (matplotlib is imported only then); with ``compare_with`` (another policy file of the same layers)
    drawn below it, the differing layers marked.
    """
    check_settings(settings)
    if compare_with is not None and not figure:
        raise BitPolicySearchError("--compare-with draws into the figure, which --no-figure turns off",
                                   "--compare-with")  # fmt: skip
    other = _read_other_policy(compare_with)
    if settings.indicators in DATA_FREE_KINDS:
        compute = _data_free_function(settings)  # a missing module fails before the model is built
        model = _load_model(settings.architecture, pretrained=True)
        geometry = _model_geometry(model, settings)
        try:
            indicators = compute(model, list(geometry.searched), settings.bits, settings.indicators)
        except ValueError as error:
            raise BitPolicySearchError(str(error), "--indicators") from None
    else:
        indicators = _read_indicators(settings)
        geometry = read_bundled_geometry(settings.architecture, settings.image_size) or _model_geometry(
            _load_model(settings.architecture, pretrained=False), settings)  # only its geometry is needed
    problem = geometry_problem(geometry, indicators, settings)
    logger.info("searching %d layers of %s: bits %s, %s, %s geometry at %d px", len(problem.macs),
                settings.architecture, ",".join(map(str, settings.bits)), _constraints_text(settings),
                settings.geometry, settings.image_size)  # fmt: skip
    document = policy_document(problem, solve_search_problem(problem, settings), settings)
    policy = parse_bit_policy(document)
    if other is not None and other.layers != policy.layers:
        raise BitPolicySearchError(f"{compare_with} is a policy of other layers than the search's", "--compare-with")
    write_json(output, document)
    if figure:
        from studies.bit_policy_plots import write_bit_policy_figure  # matplotlib: a second or more to import

        output = Path(output)
        labels = (output.stem, Path(compare_with).stem if compare_with is not None else "")
        write_bit_policy_figure(policy, output.parent, other, labels, stem=output.stem)
    return document


def _read_other_policy(path: str | Path | None) -> BitPolicy | None:
    if path is None:
        return None
    try:
        return read_bit_policy(path)
    except BitPolicyError as error:
        raise BitPolicySearchError(str(error), "--compare-with") from None


def _constraints_text(settings: SearchSettings) -> str:
    parts = [f"BitOPs <= W{settings.wb}A{settings.ab}"] if settings.bitops else []
    if settings.compression_ratio > 0:
        parts.append(f"compression ratio >= {settings.compression_ratio:g}")
    return " and ".join(parts) or "no constraint"


def _read_indicators(settings: SearchSettings) -> Indicators:
    try:
        indicators = read_indicators(settings.indicators)
    except IndicatorsError as error:
        raise BitPolicySearchError(str(error), "--indicators") from None
    try:
        return indicators.select_bits(settings.bits)
    except IndicatorsError as error:
        raise BitPolicySearchError(str(error), "--bits") from None


def _load_model(architecture: str, pretrained: bool) -> nn.Module:
    from models import UnknownModelError, WeightsUnavailableError, check_model_name, load_model

    try:
        check_model_name(architecture, "classification")
    except UnknownModelError as error:
        raise BitPolicySearchError(str(error), "--architecture") from None
    try:
        return load_model(architecture, pretrained=pretrained)
    except WeightsUnavailableError as error:
        raise BitPolicySearchError(str(error)) from None


def _data_free_function(settings: SearchSettings) -> Callable[..., Indicators]:
    """``studies.data_free_indicators.data_free_indicators(model, layers, bits, kind)``, imported on demand."""
    try:
        from studies.data_free_indicators import data_free_indicators
    except ModuleNotFoundError as error:
        if error.name != "studies.data_free_indicators":
            raise
        raise BitPolicySearchError(f"--indicators {settings.indicators} needs studies/data_free_indicators.py, "
                                   "which this checkout lacks", "--indicators") from None  # fmt: skip
    return data_free_indicators
