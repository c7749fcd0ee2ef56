"""The request models of ``paw serve`` (apps/serve/schemas.py), without a server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from apps.serve.schemas import ChatCompletionRequest, CompletionRequest

MANY = 20_000
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("model, body", [
    (CompletionRequest, {"model": "tiny", "prompt": ["a", 1] * MANY}),
    (CompletionRequest, {"model": "tiny", "prompt": [[1, "a"]] * MANY}),
    (ChatCompletionRequest, {"model": "tiny", "messages": [{"role": "x", "content": 5}] * MANY}),
    (ChatCompletionRequest, {"model": "tiny", "messages": [{"role": "user", "content": [5] * MANY}]}),
    (ChatCompletionRequest, {**CHAT, "logit_bias": {str(i): "x" for i in range(MANY)}}),
    (ChatCompletionRequest, {**CHAT, "stop": [1] * MANY}),
    (ChatCompletionRequest, {**CHAT, "modalities": [1] * MANY}),
    (ChatCompletionRequest, {**CHAT, "tools": [{"type": "x"}] * 100}),
    (ChatCompletionRequest, {"model": "tiny", "messages": [{"role": "assistant", "tool_calls": [{"id": 1}] * MANY}]}),
], ids=["mixed prompt", "mixed id lists", "messages", "content parts", "logit_bias", "stop", "modalities", "tools",
        "tool_calls"])
def test_a_long_list_of_bad_items_stops_at_the_first(model, body):
    """Pydantic built one error per bad item (per form of a union): a 3.6 MB prompt of a million
    mixed items took 42 s to refuse while the event loop, which validates bodies, stood still."""
    with pytest.raises(ValidationError) as refused:
        model.model_validate(body)
    assert refused.value.error_count() <= 8
