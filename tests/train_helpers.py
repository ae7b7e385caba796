"""Shared helpers of the train-compressed tests: scikit-learn's digits as a class-folder image dataset."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn


def write_digits_dataset(root: Path, per_class_train: int | None = None, per_class_val: int | None = None,
                         image_size: int = 32) -> Path:  # fmt: skip
    """Write the 1797 8x8 digits as RGB PNGs (upsampled to ``image_size``) into ``root/{train,val}/<digit>/``.

    A seeded quarter of the images is the validation split; ``per_class_*`` keep only the first
    images of each class (smaller, faster datasets).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    counts: dict[tuple[str, int], int] = {}
    for rank, index in enumerate(order):
        split = "val" if rank % 4 == 0 else "train"
        label = int(digits.target[index])
        limit = per_class_val if split == "val" else per_class_train
        if limit is not None and counts.get((split, label), 0) >= limit:
            continue
        counts[(split, label)] = counts.get((split, label), 0) + 1
        pixels = (digits.images[index] / 16.0 * 255.0).round().astype(np.uint8)
        image = Image.fromarray(pixels, mode="L").resize((image_size, image_size), Image.BILINEAR).convert("RGB")
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:04d}.png")
    return root


@contextlib.contextmanager
def private_registry(builders: Mapping[str, Callable[[bool], nn.Module]]) -> Iterator[None]:
    """Test classifiers registered in a private copy of the model registry, with one torch thread, while open."""
    from models import registry

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
            for name, builder in builders.items():
                registry.register_model(name, task="classification")(builder)
            yield
    finally:
        torch.set_num_threads(threads)


def interrupt_at_call(function: Callable, call: int) -> Callable:
    """``function``, except that its ``call``-th call (1-based) raises ``KeyboardInterrupt``: a run killed there."""
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == call:
            raise KeyboardInterrupt
        return function(*args, **kwargs)

    return wrapper


def invoke_cli(args: list[str]) -> str:
    """Run ``main.py`` with ``args`` in-process; it must succeed. Returns its output."""
    from click.testing import CliRunner

    from main import cli

    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result.output


def one_line_cli_error(args: list[str]) -> str:
    """Run ``main.py`` with ``args``; it must fail with a click error of one line (no traceback). Returns that line."""
    from click.testing import CliRunner

    from main import cli

    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)  # a click error, not a crash
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    return lines[0]
