"""MLX implementations of the schema's ops, one small function per op.

Importing this package fills ``REGISTRY`` (op name -> handler). A handler takes the
node's inputs positionally (tensors as ``mx.array``, literals as Python numbers) and its
attributes as keywords. Handlers that need the run's context (the KV cache) are marked
with ``needs_context`` and take it as their first argument.
"""

from __future__ import annotations

from interp.ops import (  # noqa: E402,F401  (fill the registry)
    attention,
    conv,
    delta_rule,
    distributed,
    elementwise,
    experts,
    fused,
    indexer,
    lru,
    nn,
    reduction,
    shape,
    ssm,
    symbolic,
    ternary,
)
from interp.ops.registry import REGISTRY, Handler, implementation

__all__ = ["REGISTRY", "Handler", "implementation"]
