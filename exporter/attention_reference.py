"""The program's ``attention`` op in plain torch: its one reference implementation.

``paw::attention`` (exporter/capture.py) runs it when a captured model is called, and the
op parity tests (tests/interp/test_op_parity.py) hold the MLX implementation,
``interp/ops/attention.py``, to it. The semantics are the schema's (``interp/schema.py``).
"""

from __future__ import annotations

import math

import torch


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, window: int = 0,
                        softcap: float = 0.0, alibi_max_bias: float = 0.0,
                        sinks: torch.Tensor | None = None, chunk: int = 0,
                        keep: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of ``q`` [B, Hq, L, D] over ``k``, ``v`` [B, Hkv, T, D], aligned to the end.

    Query i sits at key position ``T - L + i``. Scores and softmax in float32; the result
    has ``v``'s dtype. ``sinks`` [Hq] joins each head's softmax as a column with no value
    (gpt-oss's ``eager_attention_forward``). ``chunk`` > 0: a query sees only the keys whose
    position ``// chunk`` equals its own (Llama 4's chunked attention). ``keep`` (bool [B, L, T]) limits each
    query to the keys it marks (an indexer's choice, ``index_topk``).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = (q.float() * scale) @ k.float().transpose(-1, -2)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    length, total = q.shape[2], k.shape[2]
    if alibi_max_bias > 0:
        scores = scores + alibi_slopes(q.shape[1], alibi_max_bias)[:, None, None] * torch.arange(total).float()
    rows = torch.arange(total - length, total)[:, None]
    cols = torch.arange(total)[None, :]
    allowed = cols <= rows
    if window > 0:
        allowed = allowed & (cols > rows - window)
    if chunk > 0:
        allowed = allowed & (cols // chunk == rows // chunk)
    if keep is not None:
        allowed = allowed & keep[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        column = sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        weights = torch.cat([scores, column], dim=-1).softmax(-1)[..., :-1]
    else:
        weights = scores.softmax(-1)
    return (weights.to(v.dtype) @ v).contiguous()


def alibi_slopes(heads: int, max_bias: float) -> torch.Tensor:
    """ALiBi's per-head slopes, float32 [heads] (``interp/ops/attention.py`` computes the same)."""
    closest = 2 ** math.floor(math.log2(heads))
    slopes = [(2.0 ** (-max_bias / closest)) ** i for i in range(1, closest + 1)]
    if closest != heads:
        extra = 2.0 ** (-max_bias / (2 * closest))
        slopes += [extra**i for i in range(1, 1 + 2 * min(closest, heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)
