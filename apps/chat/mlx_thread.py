"""One long-lived thread for all MLX work of the app: loading programs and generating.

MLX streams belong to the thread that made them: an array built lazily on one thread
(``mx.load`` of the weights, the KV cache of the last turn) cannot be evaluated on
another ("There is no Stream(cpu, 0) in current thread"). Textual's thread workers each
run on a new thread, so the app sends every MLX call to this single thread instead and
awaits it, which keeps the event loop (and the screen) free while the model works.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from paw_mlx.runtime import LoadedProgram, load

T = TypeVar("T")


class MLXThread:
    """Runs callables one at a time on the same thread."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="paw-mlx")

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the MLX thread and wait for its result (from a non-async caller)."""
        return self._executor.submit(fn, *args).result()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the MLX thread without blocking the event loop."""
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    def load(self, path: str | Path) -> LoadedProgram:
        """Load a program on the MLX thread (from a caller outside the event loop)."""
        return self.call(load, path)

    @staticmethod
    def load_here(path: str | Path) -> LoadedProgram:
        """``paw_mlx.load``, for ``run(load_here, path)`` from async code."""
        return load(path)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
