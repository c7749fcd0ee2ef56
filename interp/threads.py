"""Let a thread that ran MLX end without taking the process down.

MLX keeps per-thread state in C++ ``thread_local`` storage: the thread's streams and its
``mx.compile`` cache, whose entries hold Python objects. C++ destroys that storage after
the thread's Python state is gone; freeing the Python objects then needs the GIL. If the
interpreter is shutting down meanwhile (the main thread returned right after joining the
worker), taking the GIL ends the OS thread with a forced unwind through a ``noexcept``
destructor, and the C++ runtime aborts the process: "terminate called without an active
exception" (MLX 0.32, worker threads that ran a compiled decode step).

``release_on_thread_exit`` registers, once per thread, a finalizer on a
``threading.local`` slot. CPython clears a thread's locals on that thread while it still
holds the GIL (``PyThreadState_Clear``, before ``join`` returns), so the finalizer can
empty MLX's per-thread state in time (``mx.clear_streams``: the compile cache and the
thread's streams), and nothing Python-owned is left for the C++ destructors.
"""

from __future__ import annotations

import threading

import mlx.core as mx

_slot = threading.local()


class _Release:
    __slots__ = ()

    def __del__(self) -> None:
        try:
            mx.synchronize()
            mx.clear_streams()
        except Exception:  # noqa: S110 - a thread on its way out has no one to report to
            pass


def release_on_thread_exit() -> None:
    """Empty MLX's state of the calling thread when it ends (a no-op on the main thread)."""
    if getattr(_slot, "release", None) is None:
        _slot.release = False if threading.current_thread() is threading.main_thread() else _Release()
