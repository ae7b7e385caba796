"""Layer-wise importance indicators of LIMPQ (Tang et al., ECCV 2022): one value per layer and bit-width.

The indicator of layer ``l`` at bit-width ``b`` is, in LIMPQ, the step size its quantizer learned
for ``b`` bits during the joint training, for the weights and for the input activations. The
search (:mod:`quantization.bit_allocation`) minimises their sum over the chosen bit-widths.

File layout (the official one, JSON or the published pickle)::

    {"weight": {layer: {"6": s, "5": s, ...}, ...},
     "act": {layer: {"6": s, ...}, ...},
     "layer_name": [layer, ...]}        # the search order

Layer names are module names; the ``module.`` prefix of a DistributedDataParallel model (the
published file has it) is removed when reading. A pickle is read with an unpickler that refuses
every global, so no code runs: the published file holds only dicts, lists, strings and floats.
"""
from __future__ import annotations

import io
import json
import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.io import write_json

__all__ = ["Indicators", "IndicatorsError", "read_indicators", "write_indicators"]

_PICKLE_PROTOCOL_2_OR_LATER = b"\x80"
_PREFIX = "module."


class IndicatorsError(ValueError):
    """An indicator file or table that cannot be used (one-line message)."""


@dataclass(frozen=True)
class Indicators:
    """Weight and activation indicators: ``weight[l, k]`` and ``act[l, k]`` of layer ``layers[l]`` at ``bits[k]``."""

    layers: tuple[str, ...]  # model module names (no "module." prefix), in search order
    bits: tuple[int, ...]  # candidate bit-widths, e.g. (6, 5, 4, 3, 2)
    weight: np.ndarray  # float64 [len(layers), len(bits)]
    act: np.ndarray  # float64 [len(layers), len(bits)]

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise IndicatorsError("indicators need at least one layer, each named once")
        if not self.bits or len(set(self.bits)) != len(self.bits) or min(self.bits) < 1:
            raise IndicatorsError(f"indicator bit-widths must be distinct positive integers, got {list(self.bits)}")
        for kind in ("weight", "act"):
            values = np.array(getattr(self, kind), dtype=np.float64)
            if values.shape != (len(self.layers), len(self.bits)):
                raise IndicatorsError(f"{kind} indicators have shape {values.shape}, expected "
                                      f"{(len(self.layers), len(self.bits))} (layers, bits)")  # fmt: skip
            if not np.isfinite(values).all():
                row, column = np.argwhere(~np.isfinite(values))[0]
                raise IndicatorsError(f"{kind} indicator of {self.layers[row]} at {self.bits[column]} bits is "
                                      f"{values[row, column]}")  # fmt: skip
            values.flags.writeable = False
            object.__setattr__(self, kind, values)

    def select_bits(self, bits: Sequence[int]) -> Indicators:
        """The indicators of the candidate bit-widths ``bits`` only (in that order)."""
        missing = [b for b in bits if b not in self.bits]
        if missing:
            raise IndicatorsError(f"the indicators have no values for {', '.join(map(str, missing))} bits "
                                  f"(they have {', '.join(map(str, self.bits))})")  # fmt: skip
        columns = [self.bits.index(b) for b in bits]
        return Indicators(self.layers, tuple(bits), self.weight[:, columns], self.act[:, columns])


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Plain data only: any class, function or other global is refused, so unpickling runs no code."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing the global {module}.{name} (an indicator file holds plain data only)")


def read_indicators(path: str | Path) -> Indicators:
    """Read an indicator file, JSON or pickle (module doc); :class:`IndicatorsError` names the file and the defect."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise IndicatorsError(f"cannot read indicators {path}: {error.strerror or error}") from None
    try:
        if raw.startswith(_PICKLE_PROTOCOL_2_OR_LATER):
            data = _NoGlobalsUnpickler(io.BytesIO(raw)).load()
        else:
            data = json.loads(raw.decode("utf-8"))
    except (pickle.UnpicklingError, EOFError, ValueError, UnicodeDecodeError) as error:
        kind = "pickle" if raw.startswith(_PICKLE_PROTOCOL_2_OR_LATER) else "JSON"
        raise IndicatorsError(f"{path} is not a readable {kind} indicator file: {error}") from None
    try:
        return _parse(data)
    except IndicatorsError as error:
        raise IndicatorsError(f"{path}: {error}") from None


def _parse(data: object) -> Indicators:
    if not isinstance(data, dict) or not {"weight", "act", "layer_name"} <= set(data):
        raise IndicatorsError('expected an object with "weight", "act" and "layer_name"')
    names = data["layer_name"]
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise IndicatorsError('"layer_name" must be a list of layer names')
    if not names:
        raise IndicatorsError('"layer_name" is empty')
    layers = [name.removeprefix(_PREFIX) for name in names]
    bits: list[int] | None = None
    tables = {}
    for kind in ("weight", "act"):
        table = data[kind]
        if not isinstance(table, dict) or set(table) != set(names):
            extra, missing = sorted(set(table) - set(names)), sorted(set(names) - set(table))
            raise IndicatorsError(f'"{kind}" must have one entry per layer of "layer_name" '
                                  f"(missing: {missing[:3]}, extra: {extra[:3]})")  # fmt: skip
        rows = []
        for name in names:
            row = table[name]
            if not isinstance(row, dict) or not row:
                raise IndicatorsError(f'"{kind}"["{name}"] must map bit-widths to values')
            if bits is None:
                bits = sorted((_bit_width(key) for key in row), reverse=True)
            if sorted(_bit_width(key) for key in row) != sorted(bits):
                raise IndicatorsError(f'"{kind}"["{name}"] has bit-widths {sorted(row)}, the first layer '
                                      f"{[str(b) for b in sorted(bits)]}")  # fmt: skip
            rows.append([_value(row[str(b)], kind, name, b) for b in bits])
        tables[kind] = rows
    return Indicators(tuple(layers), tuple(bits), np.array(tables["weight"]), np.array(tables["act"]))


def _bit_width(key: object) -> int:
    if isinstance(key, str) and key.isdigit() and str(int(key)) == key:
        return int(key)
    raise IndicatorsError(f"bit-width keys are decimal strings like \"4\", got {key!r}")


def _value(value: object, kind: str, layer: str, bits: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise IndicatorsError(f'"{kind}"["{layer}"]["{bits}"] is {value!r}, not a finite number')
    return float(value)


def write_indicators(path: str | Path, indicators: Indicators) -> None:
    """Write JSON in the official layout (module doc), atomically; floats round-trip exactly."""
    data = {
        kind: {layer: {str(b): float(value) for b, value in zip(indicators.bits, row)}
               for layer, row in zip(indicators.layers, getattr(indicators, kind))}
        for kind in ("weight", "act")
    }  # fmt: skip
    data["layer_name"] = list(indicators.layers)
    write_json(path, data)
