"""Per-layer bit-width policies: the ``--bit-policy`` file, its validation and its application.

The file is JSON (the layout LIMPQ's search writes)::

    {"layers": ["conv1", "layer1.0.conv1", ...],
     "weight_bits": [8, 4, ...],
     "act_bits": [null, 4, ...]}

``null`` keeps that tensor in floating point (weights of that layer, or its input). Other keys
(``"status"``, ``"objective"``, ...) are allowed and ignored. Bit-widths are integers in
``2..8``; the three lists have one entry per layer; layer names are module names of the
model's compressed layers (:func:`models.quantized.compressible_layers`), each at most once.
Layers the policy omits keep the bit-widths of ``--n-bits`` / ``--n-bits-act`` and
``--quant-setup``.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "BitPolicy",
    "BitPolicyError",
    "apply_bit_policy",
    "check_policy_layers",
    "parse_bit_policy",
    "read_bit_policy",
]

MIN_BITS, MAX_BITS = 2, 8


class BitPolicyError(ValueError):
    """A policy file that cannot be used (one-line message)."""


@dataclass(frozen=True)
class BitPolicy:
    """Weight and input bit-width of each named layer (``None``: floating point)."""

    layers: tuple[str, ...]
    weight_bits: tuple[int | None, ...]
    act_bits: tuple[int | None, ...]

    def as_dict(self) -> dict[str, list]:
        return {"layers": list(self.layers), "weight_bits": list(self.weight_bits), "act_bits": list(self.act_bits)}


def _bits_list(data: Mapping, key: str, count: int) -> tuple[int | None, ...]:
    values = data.get(key)
    if not isinstance(values, list):
        raise BitPolicyError(f'"{key}" must be a list of bit-widths (or null), one per layer')
    if len(values) != count:
        raise BitPolicyError(f'"{key}" has {len(values)} entries for {count} layers')
    for index, value in enumerate(values):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
            raise BitPolicyError(f'"{key}"[{index}] ({data["layers"][index]}): {value!r} is not a bit-width in '
                                 f"{MIN_BITS}..{MAX_BITS} or null")  # fmt: skip
    return tuple(values)


def parse_bit_policy(data: object) -> BitPolicy:
    """Validate the parsed JSON of a policy file (see the module doc); :class:`BitPolicyError` on any defect."""
    if not isinstance(data, dict):
        raise BitPolicyError('a bit policy is a JSON object with "layers", "weight_bits" and "act_bits"')
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(name, str) for name in layers):
        raise BitPolicyError('"layers" must be a non-empty list of layer names')
    repeated = sorted({name for name in layers if layers.count(name) > 1})
    if repeated:
        raise BitPolicyError(f"layers named more than once: {', '.join(repeated)}")
    weight_bits = _bits_list(data, "weight_bits", len(layers))
    act_bits = _bits_list(data, "act_bits", len(layers))
    return BitPolicy(tuple(layers), weight_bits, act_bits)


def read_bit_policy(path: str | Path) -> BitPolicy:
    """Read and validate a policy file; :class:`BitPolicyError` names the file and the defect."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise BitPolicyError(f"cannot read bit policy {path}: {error}") from None
    except json.JSONDecodeError as error:
        raise BitPolicyError(f"{path} is not JSON: {error}") from None
    try:
        return parse_bit_policy(data)
    except BitPolicyError as error:
        raise BitPolicyError(f"{path}: {error}") from None


def check_policy_layers(
    policy: BitPolicy,
    layer_names: Sequence[str],
    uncompressed: Mapping[str, str] | None = None,
    weight_quant: bool = True,
    act_quant: bool = True,
) -> None:
    """Raise :class:`BitPolicyError` unless ``policy`` fits a model whose compressed layers are ``layer_names``.

    ``uncompressed``: weight layers left in float (name -> type), named as such when the policy
    gives them bits; ``weight_quant`` / ``act_quant``: whether the run quantizes weights /
    activations at all (a policy giving bits to a disabled kind is refused, not ignored).
    """
    known = set(layer_names)
    uncompressed = uncompressed or {}
    kept_float = [f"{name} ({uncompressed[name]})" for name in policy.layers if name in uncompressed]
    if kept_float:
        raise BitPolicyError(f"the bit policy names layers that are not compressed: {', '.join(kept_float)}")
    unknown = [name for name in policy.layers if name not in known]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise BitPolicyError(f"the bit policy names {len(unknown)} layers the model does not have: {shown} "
                             f"(its layers: {', '.join(list(layer_names)[:3])}, ...)")  # fmt: skip
    if not weight_quant and any(bits is not None for bits in policy.weight_bits):
        raise BitPolicyError("the bit policy gives weight bit-widths, but weights are not quantized (--no-weight-quant)")
    if not act_quant and any(bits is not None for bits in policy.act_bits):
        raise BitPolicyError("the bit policy gives activation bit-widths, but activations are not quantized (add --act-quant)")


def apply_bit_policy(
    policy: BitPolicy, weight_bits: Mapping[str, int | None], act_bits: Mapping[str, int | None]
) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """The default per-layer bit-widths with the policy's layers replaced (omitted layers keep their default)."""
    weights, acts = dict(weight_bits), dict(act_bits)
    for name, w_bits, a_bits in zip(policy.layers, policy.weight_bits, policy.act_bits):
        weights[name], acts[name] = w_bits, a_bits
    return weights, acts
