"""Fixtures shared by the tests: an empty torch hub cache and a machine without network."""

from __future__ import annotations

import urllib.error
from pathlib import Path
from typing import Any

import pytest
import torch


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
