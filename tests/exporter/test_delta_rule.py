"""The Gated DeltaNet replacements (exporter/delta_rule.py) compute what transformers' own functions do.

The recipe swaps ``causal_conv1d_fn`` and ``torch_chunk_gated_delta_rule`` (Kimi Linear's
``chunk_kimi_delta_attention``) in the modeling modules for calls to the paw ops; on whole
sequences from no state they must give transformers' results: its chunked rule (what its
forward runs) and its recurrent rule (the op's reference).
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.kimi_linear import modeling_kimi_linear
from transformers.models.olmo_hybrid import modeling_olmo_hybrid
from transformers.models.qwen3_5 import modeling_qwen3_5

from exporter import delta_rule
from interp.errors import ExportError

B, L, KEY_HEADS, HEADS, DK, DV = 2, 9, 2, 4, 8, 6


def _inputs():
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, L, KEY_HEADS, DK, generator=gen) for _ in range(2))
    v = torch.randn(B, L, HEADS, DV, generator=gen)
    g = -torch.rand(B, L, HEADS, generator=gen) * 2
    beta = torch.rand(B, L, HEADS, generator=gen)
    return q, k, v, g, beta


@pytest.mark.parametrize("theirs", [modeling_qwen3_5.torch_chunk_gated_delta_rule,
                                    modeling_qwen3_5.torch_recurrent_gated_delta_rule,
                                    modeling_olmo_hybrid.torch_chunk_gated_delta_rule])
def test_the_rule_gives_transformers_results(theirs):
    q, k, v, g, beta = _inputs()
    want, _ = theirs(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
    got, state = delta_rule.chunk_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
    assert state is None and got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("theirs", [modeling_kimi_linear.chunk_kimi_delta_attention,
                                    modeling_kimi_linear.recurrent_kimi_delta_attention])
def test_the_rule_with_a_decay_per_key_channel_gives_kimi_deltas_results(theirs):
    """Kimi Delta Attention: one head per key head, g [B, L, H, Dk]."""
    q, k, _, _, beta = _inputs()
    v = torch.randn(B, L, KEY_HEADS, DV, generator=torch.Generator().manual_seed(2))
    g = -torch.rand(B, L, KEY_HEADS, DK, generator=torch.Generator().manual_seed(3)) * 2
    beta = beta[:, :, :KEY_HEADS]
    want, _ = theirs(q, k, v, g=g, beta=beta, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=True)
    got, _ = delta_rule.chunk_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_convolution_gives_transformers_results():
    gen = torch.Generator().manual_seed(1)
    x, weight = torch.randn(B, 10, L, generator=gen), torch.randn(10, 4, generator=gen)
    for activation in (None, "silu"):
        want = modeling_qwen3_5.causal_conv1d_fn(x, weight, None, activation=activation)
        torch.testing.assert_close(delta_rule.causal_conv1d_fn(x, weight, None, activation=activation), want)


def test_a_rule_from_a_state_or_another_activation_is_refused():
    q, k, v, g, beta = _inputs()
    state = torch.zeros(B, HEADS, DK, DV)
    with pytest.raises(ExportError, match="called with a state"):
        delta_rule.chunk_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=state)
    with pytest.raises(ExportError, match="followed by 'gelu'"):
        delta_rule.causal_conv1d_fn(torch.zeros(1, 2, 3), torch.zeros(2, 4), activation="gelu")
