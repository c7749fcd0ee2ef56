"""The RecurrentGemma replacements (exporter/rg_lru.py) compute what transformers' own code does.

The recipe swaps the recurrent block's forward (its convolution as ``paw::causal_conv1d``) and the
RG-LRU's ``_rnn_scan`` (as ``paw::lru_scan``); on whole sequences from no state they must give
transformers' results, resets and all.
"""

from __future__ import annotations

import torch
from transformers.models.recurrent_gemma import modeling_recurrent_gemma as modeling

from exporter import rg_lru
from tests.archs import arch_config

B, L, D = 2, 9, 64


def _block() -> modeling.RecurrentGemmaRecurrentBlock:
    """The tiny RecurrentGemma's first recurrent block, with random (non-zero) biases."""
    torch.manual_seed(0)
    block = modeling.RecurrentGemmaRecurrentBlock(arch_config("recurrent_gemma"), 0).eval()
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_(0, 0.3)
    return block


def test_the_scan_gives_transformers_results_with_a_reset_inside():
    """A sequence restarting at position 4 (position id 0 there): transformers zeroes the decay there."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, D, generator=gen)
    gate = torch.rand(B, L, D, generator=gen)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4], list(range(L))])
    reset = positions[:, :, None] == 0
    rglru = _block().rg_lru
    want, _ = rglru._rnn_scan(x, gate, reset, None)
    got, state = rg_lru.rnn_scan(rglru, x, gate, reset)
    assert state is None and got.dtype == x.dtype
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[0, 4], x[0, 4])  # the restart forgot the state


def test_the_block_gives_transformers_results():
    """The whole block (convolution, gates, normalisation, recurrence, gated output) without a cache."""
    block = _block()
    hidden = torch.randn(B, L, 64, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(L).expand(B, L)
    with torch.no_grad():
        want, _ = block(hidden, positions, None, use_cache=False)
        got, _ = rg_lru.recurrent_block_forward(block, hidden, positions, None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_recipe_replaces_what_the_model_defines():
    """Each replaced class and method exists in transformers' module (a rename would leave transformers'
    own code, which keeps state on the modules, in the capture)."""
    for key in rg_lru.FORWARDS:
        owner, _, method = key.partition(".")
        assert hasattr(getattr(modeling, owner), method or "forward"), key
