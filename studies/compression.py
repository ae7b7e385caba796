"""The comparison's shared conventions (no torch): equal compression and SQNR in decibels."""
from __future__ import annotations

import math
from typing import TypeVar

Bits = TypeVar("Bits")  # an int, or a numpy array / pandas series of them


def pruning_sparsity(n_bits: Bits) -> Bits:
    """Sparsity with the same compression as INT-b against 16-bit floats: ``1 - b/16``.

    A b-bit integer instead of a 16-bit float stores as many bits as keeping a ``b/16`` share
    of 16-bit values. Works element-wise on numpy arrays and pandas series.
    """
    return 1.0 - n_bits / 16.0


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """``10 log10(signal / noise)``; +inf for a zero error."""
    return math.inf if noise_power <= 0.0 else 10.0 * math.log10(signal_power / noise_power)
