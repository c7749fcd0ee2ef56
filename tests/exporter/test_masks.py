"""exporter/masks.py reads transformers' mask functions into what the attention op expresses."""

from __future__ import annotations

import pytest
import torch
from transformers import masking_utils as mu

from exporter.masks import AttentionPattern, pattern_of
from interp.errors import ExportError

NO_PADDING = torch.zeros(2, dtype=torch.long)


@pytest.mark.parametrize(("mask_function", "window", "chunk"), [
    (mu.causal_mask_function, 0, 0),
    (mu.sliding_window_causal_mask_function(5), 5, 0),
    (mu.chunked_causal_mask_function(4, NO_PADDING), 0, 4),
    # a packed-sequence wrapper changes nothing for a program
    (mu.packed_sequence_compatibility_function(mu.chunked_causal_mask_function(8, NO_PADDING),
                                               torch.arange(6)[None].expand(2, 6), torch.zeros(2, 6)), 0, 8),
])
def test_causal_windowed_and_chunked_masks_are_read(mask_function, window, chunk):
    assert pattern_of(mask_function, "M") == AttentionPattern(window=window, chunk=chunk, model="M")


@pytest.mark.parametrize("mask_function", [
    mu.bidirectional_mask_function,
    mu.and_masks(mu.chunked_causal_mask_function(4, NO_PADDING), mu.sliding_window_overlay(3)),
    mu.or_masks(mu.causal_mask_function, mu.bidirectional_mask_function),
])
def test_a_mask_the_op_cannot_express_is_refused_by_name(mask_function):
    with pytest.raises(ExportError, match=r"cannot export: the model's attention mask \(.+\) is not causal"):
        pattern_of(mask_function)
