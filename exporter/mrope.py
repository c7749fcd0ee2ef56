"""Text models with multimodal rotary embeddings (M-RoPE), exported as the plain causal LM of their family.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense and MoE) give their text model no causal LM of its
own: it rotates queries and keys with M-RoPE, three position rows (time, height, width), each
owning some of the rotary frequencies (``mrope_section``: in consecutive sections for Qwen2-VL,
interleaved for Qwen3-VL). A text token has the same position in all three rows, so each
frequency turns by the same position whichever row owns it: on text alone M-RoPE is plain RoPE,
and the text model is its family's causal LM (Qwen2, Qwen3, Qwen3-MoE) with the same weights.
``tests/exporter/test_composite.py`` proves it per family: the plain causal LM's program gives
the composite's own text-only logits at 1e-4.

The table is a fact about these families that their classes do not state. Only the
variants tested are taken: default rotary frequencies and sections covering every frequency;
anything else (a scaled rope_type, a family not listed) is refused rather than guessed.
"""

from __future__ import annotations

from interp.errors import SourceError

#: text model_type -> (the plain family's model_type, what its config must be told that the
#: text model does unconditionally). Qwen3-VL-MoE's router always renormalises its top-k weights.
MROPE_TEXT_MODELS: dict[str, tuple[str, dict]] = {
    "qwen2_vl_text": ("qwen2", {}),
    "qwen2_5_vl_text": ("qwen2", {}),
    "qwen3_vl_text": ("qwen3", {}),
    "qwen3_vl_moe_text": ("qwen3_moe", dict(norm_topk_prob=True)),
}

#: M-RoPE keys of ``rope_parameters`` that plain RoPE does not have
_MROPE_KEYS = ("mrope_section", "mrope_interleaved")


def plain_text_config(kind: str, text_config):
    """The plain family config equivalent on text to an M-RoPE ``text_config``, or None when it has no M-RoPE.

    SourceError when the equivalence was not established for this config's rotary variant.
    """
    from transformers import AutoConfig

    found = MROPE_TEXT_MODELS.get(text_config.model_type)
    if found is None:
        return None
    family, fixed = found
    rope = dict(getattr(text_config, "rope_parameters", None) or {})
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    section = rope.get("mrope_section")
    if rope.get("rope_type", "default") != "default" or (section is not None and sum(section) != head_dim // 2):
        raise SourceError(f"multimodal checkpoint ({kind}): its text model {text_config.model_type} uses M-RoPE "
                          f"with rope_type {rope.get('rope_type')!r} and sections {section} over {head_dim // 2} "
                          "frequencies; paw exports it as plain RoPE only with default frequencies and sections "
                          "covering them all")
    params = {key: value for key, value in text_config.to_dict().items()
              if key not in ("model_type", "architectures", "transformers_version", "base_config_key")}
    params["rope_parameters"] = {key: value for key, value in rope.items() if key not in _MROPE_KEYS}
    config = AutoConfig.for_model(family, **{**params, **fixed})
    config._commit_hash = getattr(text_config, "_commit_hash", None)
    return config


def text_rotary_forward(self, x, position_ids):
    """Qwen3.5's text rotary embedding (M-RoPE over positions broadcast to three rows) as the plain RoPE it
    is on text: cos, sin [B, L, 2 * len(inv_freq)] of ``position_ids`` [B, L].

    Its forward recomposes the frequencies from the three rows with strided slice writes (which
    no program op expresses); a text token has one position in every row, so each frequency
    turns by that position whichever row owns it, and the result is cat(freqs, freqs).
    """
    import torch

    if position_ids.dim() == 3:  # the rows of a text-only call are equal
        position_ids = position_ids[0]
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)
