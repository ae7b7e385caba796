"""Checkpoints that hold everything a run needs to continue, read back with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and plain containers only (no pickled objects): the model's
state dict (weights, batch-norm statistics, quantizer step sizes and zero points, pruning
masks), the state dicts of all optimizers, schedulers and the AMP grad scaler, the RNG states
of python, numpy and torch (CPU and CUDA), the epoch and step reached, the metrics history and
the run's options. Files are written atomically: a killed run leaves the previous file intact.
"""
from __future__ import annotations

import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.io import write_bytes_atomic

LAST = "last.pt"
BEST = "best.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (one-line message)."""


def rng_state() -> dict[str, Any]:
    """The RNG states of python, numpy and torch as tensors and plain containers."""
    version, python_state, gauss = random.getstate()
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(python_state), gauss],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by :func:`rng_state`."""
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically with ``torch.save``."""
    write_bytes_atomic(path, lambda handle: torch.save(state, handle))


_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def read_torch_file(path: Path, what: str = "file") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; raises :class:`CheckpointError` with a one-line reason.

    The message (``cannot read <what> <path>: <reason>``) never relays torch's advice to retry
    with ``weights_only=False``: a file that needs it holds pickled Python objects, and those
    are not loaded, whatever its source.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - garbage makes the unpickler raise arbitrary errors
        if isinstance(error, OSError):
            reason = error.strerror or type(error).__name__
        elif not zipfile.is_zipfile(path):
            reason = "not a torch file"
        elif (unsafe := _UNSAFE_GLOBAL.search(str(error))) is not None:
            reason = f"it holds pickled Python objects ({unsafe.group(1)}), which are never loaded"
        else:
            reason = "a damaged torch file, or one that holds more than tensors and plain containers"
        raise CheckpointError(f"cannot read {what} {path}: {reason}") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; raises :class:`CheckpointError` with a one-line reason."""
    path = Path(path)
    if path.is_dir():
        path = path / LAST
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    state = read_torch_file(path, "checkpoint")
    if not isinstance(state, dict) or not {"model", "options", "epoch"} <= state.keys():
        raise CheckpointError(f"{path} is not a checkpoint written by train-compressed")
    return state
