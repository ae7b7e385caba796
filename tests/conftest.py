"""Fixtures shared by the tests: an empty torch hub cache, a machine without network, one thread, digit batches."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path
from typing import Any

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n 2``: one worker per core) each worker runs torch on one thread."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point TORCH_HOME at an empty tmp dir (and clear any torch.hub.set_dir override)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    assert Path(torch.hub.get_dir()) == tmp_path / "torch_home" / "hub"
    return tmp_path / "torch_home"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every download attempt fail like an offline machine; return the URLs tried."""
    attempts: list[str] = []

    def offline(url: str, dst: str, *args: Any, **kwargs: Any) -> None:
        attempts.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return attempts


@pytest.fixture
def one_thread():
    """One torch thread during a test: tiny tensors on a busy 2-core machine run faster and reproducibly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digit_batches() -> list:
    """Three batches of 16 of scikit-learn's 8x8 digits (float64, one channel, in [0, 1]) as the training loop gets them."""
    from sklearn.datasets import load_digits

    from training.data import Batch

    digits = load_digits()
    images = torch.from_numpy(digits.images[:48] / 16.0).unsqueeze(1)
    targets = torch.from_numpy(digits.target[:48]).long()
    return [Batch(images[i : i + 16], targets[i : i + 16], 0) for i in range(0, 48, 16)]
