"""What every figure of the studies shares: the output formats and resolution, the colours of the bit-widths,
and writing a figure as PNG and PDF atomically. Needs matplotlib and numpy only (no pandas), so a command that
draws one figure imports no more than that."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from utils.io import write_bytes_atomic

__all__ = ["DPI", "FIGURE_FORMATS", "bit_colors", "save_figure"]

FIGURE_FORMATS = ("png", "pdf")
DPI = 200


def bit_colors(bits: Sequence[int]) -> dict[int, tuple[float, float, float, float]]:
    """A colour per bit-width, low bits dark and high bits light (viridis, without its pale yellow end)."""
    bits = sorted(set(bits))
    cmap = colormaps["viridis"]
    positions = np.linspace(0.0, 0.88, len(bits)) if len(bits) > 1 else [0.0]
    return {n_bits: cmap(position) for n_bits, position in zip(bits, positions)}


def save_figure(fig: Figure, output_dir: Path, stem: str) -> list[Path]:
    """Write ``fig`` as ``<stem>.png`` and ``<stem>.pdf`` in ``output_dir``, each atomically."""
    paths = []
    for fmt in FIGURE_FORMATS:
        path = output_dir / f"{stem}.{fmt}"
        write_bytes_atomic(path, lambda handle, fmt=fmt: fig.savefig(handle, format=fmt, dpi=DPI))
        paths.append(path)
    return paths
