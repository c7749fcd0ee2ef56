"""Parity of the ops added for architecture coverage: MLX handler vs the torch equivalent.

(The lead folds these into tests/interp/test_op_parity.py's CASES table.)
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch

from interp.graph import RunContext
from interp.ops import REGISTRY

TOL = 1e-5


def _run(op: str, *inputs, **attrs):
    handler = REGISTRY[op]
    args = [mx.array(x.numpy()) if isinstance(x, torch.Tensor) else x for x in inputs]
    if handler.needs_context:
        return handler.fn(RunContext(cache=None), *args, **attrs)
    return handler.fn(*args, **attrs)


def _close(got: mx.array, want: torch.Tensor, tol: float = TOL) -> None:
    got_np = np.array(got)
    assert got_np.shape == tuple(want.shape)
    np.testing.assert_allclose(got_np, want.numpy(), atol=tol, rtol=0)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_repeat_interleave(dim):
    x = torch.randn(3, 4, 5)
    _close(_run("repeat_interleave", x, repeats=2, dim=dim), x.repeat_interleave(2, dim=dim))


@pytest.mark.parametrize("reps", [[2, 1, 3], [2, 1, 1, 2]])
def test_tile(reps):
    x = torch.randn(3, 4, 5)
    _close(_run("tile", x, reps=reps), x.repeat(*reps))


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("dim", [-1, 0])
def test_topk(largest, dim):
    x = torch.randn(6, 8)
    values, indices = _run("topk", x, k=3, dim=dim, largest=largest)
    want_values, want_indices = torch.topk(x, 3, dim=dim, largest=largest)
    _close(values, want_values)
    assert indices.dtype == mx.int64
    np.testing.assert_array_equal(np.array(indices), want_indices.numpy())


def _bloom_slopes(heads: int) -> torch.Tensor:
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    return _get_alibi_slopes(heads, torch.device("cpu"))


@pytest.mark.parametrize("heads", [4, 6])
def test_attention_alibi_matches_bloom(heads):
    """ALiBi with max bias 8 reproduces BLOOM's slopes, power-of-two head count or not."""
    torch.manual_seed(0)
    length, dim = 7, 8
    q, k, v = (torch.randn(2, heads, length, dim) for _ in range(3))
    scale = 1 / math.sqrt(dim)
    alibi = _bloom_slopes(heads)[:, None, None] * torch.arange(length).float()
    scores = q @ k.transpose(-1, -2) * scale + alibi
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    want = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
    got = _run("attention", q, k, v, layer=0, scale=scale, alibi_max_bias=8.0)
    _close(got, want)


def test_attention_alibi_with_window_and_cache_alignment():
    """Fewer queries than keys (decoding): the bias follows key positions, the mask is end-aligned."""
    from interp.cache import KVCache

    torch.manual_seed(1)
    heads, total, new, dim = 4, 9, 2, 8
    q = torch.randn(1, heads, new, dim)
    k, v = torch.randn(1, heads, total, dim), torch.randn(1, heads, total, dim)
    cache = KVCache()
    cache.update_and_fetch(mx.array(k[:, :, : total - new].numpy()), mx.array(v[:, :, : total - new].numpy()))
    handler = REGISTRY["attention"]
    got = handler.fn(RunContext(cache=[cache]), mx.array(q.numpy()), mx.array(k[:, :, total - new :].numpy()),
                     mx.array(v[:, :, total - new :].numpy()), layer=0, scale=0.3, window=4, alibi_max_bias=8.0)
    rows = torch.arange(total - new, total)[:, None]
    cols = torch.arange(total)[None, :]
    allowed = (cols <= rows) & (cols > rows - 4)
    scores = q @ k.transpose(-1, -2) * 0.3 + _bloom_slopes(heads)[:, None, None] * cols.float()
    want = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    _close(got, want)
