"""Fixtures shared by the app tests."""

from __future__ import annotations

import pytest

from apps.chat.mlx_thread import MLXThread


@pytest.fixture(scope="module")
def mlx_thread():
    """The chat app's MLX thread, one per test module (programs are loaded on it)."""
    thread = MLXThread()
    yield thread
    thread.shutdown()
