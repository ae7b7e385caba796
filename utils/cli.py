"""Click parameter types and helpers shared by the command-line scripts."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    import torch


class IntListType(click.ParamType):
    """A comma-separated list of integers within ``[low, high]``, e.g. ``2,3,4`` or ``2-8``.

    By default repeats are merged and the list sorted ascending; ``distinct`` refuses a value given
    twice, ``descending`` sorts largest first (LIMPQ's order of candidate bit-widths).
    """

    name = "int-list"

    def __init__(self, low: int, high: int, distinct: bool = False, descending: bool = False) -> None:
        self.low, self.high = low, high
        self.distinct, self.descending = distinct, descending

    def convert(self, value, param, ctx) -> list[int]:
        if isinstance(value, (list, tuple)):
            return list(value)
        numbers: list[int] = []
        for part in str(value).split(","):
            start, _, stop = part.strip().partition("-")
            try:
                first, last = int(start), int(stop or start)
            except ValueError:
                self.fail(f"'{value}' is not a comma-separated list of integers (or ranges like 2-8)", param, ctx)
            if last < first:
                self.fail(f"the range '{part.strip()}' must be ascending: use {last}-{first}", param, ctx)
            numbers.extend(range(first, last + 1))
        if not numbers:
            self.fail("the list is empty", param, ctx)
        bad = [n for n in numbers if not self.low <= n <= self.high]
        if bad:
            self.fail(f"{bad[0]} is outside {self.low}..{self.high}", param, ctx)
        repeated = sorted({n for n in numbers if numbers.count(n) > 1})
        if self.distinct and repeated:
            self.fail(f"{', '.join(map(str, repeated))} given more than once: each value once", param, ctx)
        return sorted(set(numbers), reverse=self.descending)


class NameListType(click.ParamType):
    """A comma-separated list of non-empty names."""

    name = "name-list"

    def convert(self, value, param, ctx) -> list[str]:
        if isinstance(value, list):
            return value
        names = [part.strip() for part in str(value).split(",")]
        if not names or any(not name for name in names):
            self.fail(f"'{value}' is not a comma-separated list of names", param, ctx)
        return list(dict.fromkeys(names))


class DeviceType(click.ParamType):
    """A torch device string that exists on this machine (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""

    name = "device"

    def convert(self, value, param, ctx) -> torch.device:
        import torch  # here, so that CLIs without torch work start fast

        if isinstance(value, torch.device):
            return value
        try:
            device = torch.device(value)
        except RuntimeError:
            self.fail(f"'{value}' is not a torch device (try cpu or cuda)", param, ctx)
        if device.type == "cuda" and not torch.cuda.is_available():
            self.fail("CUDA is not available on this machine; use --device cpu", param, ctx)
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            self.fail(f"there is no {device}; this machine has {torch.cuda.device_count()} GPU(s)", param, ctx)
        if device.type == "mps" and not torch.backends.mps.is_available():
            self.fail("MPS is not available on this machine; use --device cpu", param, ctx)
        return device


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def setup_logging(verbose: bool = False) -> None:
    """Plain one-line log records on stderr."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s: %(message)s")
