"""Shared fixtures: small, fast, real files in tmp_path."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _isolate_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """No test reads the developer's keystore, passphrase or torch cache."""
    monkeypatch.delenv("RADMARK_PASSPHRASE", raising=False)
    monkeypatch.setenv("RADMARK_KEYSTORE", str(tmp_path / "default-keystore"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e is slow (``make test-fast`` skips it; CI runs it)."""
    for item in items:
        if f"{os.sep}e2e{os.sep}" in str(item.fspath):
            item.add_marker(pytest.mark.slow)
