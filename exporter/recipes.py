"""The one table of per-family capture recipes.

paw captures a model's own forward with torch.export, so nearly every decoder-only
architecture needs nothing here: its attention goes through transformers' attention
interface (-> ``paw::attention``) and its expert blocks through the experts interface
(-> ``exporter.experts``). A family appears in ``RECIPES`` only when its code bypasses
those interfaces; the recipe then swaps the bypassing module's forward for one that
calls the paw op, for the duration of the capture only.

| model_type | why | what the recipe does |
| --- | --- | --- |
| bloom | hand-written ALiBi attention (``baddbmm``) | its forward calls ``paw::attention``, ``alibi_max_bias=8`` |
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Recipe:
    """How to capture one family: module class name -> replacement forward, config tweaks."""

    why: str
    forwards: dict[str, Callable] = field(default_factory=dict)
    config: dict = field(default_factory=dict)


def _bloom_attention_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None,
                             use_cache=False, output_attentions=False, **kwargs):
    """BloomAttention with the paw attention op; ALiBi's slopes are BLOOM's (max bias 8)."""
    batch, length, _ = hidden_states.shape
    fused = self.query_key_value(hidden_states).view(batch, length, self.num_heads, 3, self.head_dim)
    q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))
    out = torch.ops.paw.attention(q, k, v, int(self.layer_idx), float(self.inv_norm_factor), 0, 0.0, 8.0)
    out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
    out = residual + F.dropout(self.dense(out), p=self.hidden_dropout, training=self.training)
    return out, None


RECIPES: dict[str, Recipe] = {
    "bloom": Recipe(why="hand-written ALiBi attention", forwards={"BloomAttention": _bloom_attention_forward}),
}


@contextlib.contextmanager
def applied(model: torch.nn.Module) -> Iterator[None]:
    """Apply the model family's recipe (if any) while the block runs, then undo it."""
    recipe = RECIPES.get(getattr(model.config, "model_type", ""))
    if recipe is None:
        yield
        return
    saved_config = {key: getattr(model.config, key, None) for key in recipe.config}
    classes = {type(m) for m in model.modules() if type(m).__name__ in recipe.forwards}
    saved_forwards = {cls: cls.forward for cls in classes}
    try:
        for key, value in recipe.config.items():
            setattr(model.config, key, value)
        for cls in classes:
            cls.forward = recipe.forwards[cls.__name__]
        yield
    finally:
        for cls, forward in saved_forwards.items():
            cls.forward = forward
        for key, value in saved_config.items():
            setattr(model.config, key, value)
