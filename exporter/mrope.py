"""Text models with multimodal rotary embeddings (M-RoPE), exported as the plain causal LM of their family.

Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense and MoE) and the GLM-4.1V family (GLM-4.1V, GLM-4.6V, GLM-4.5V,
GLM-OCR) give their text model no causal LM of its own: it rotates queries and keys with M-RoPE, three
position rows (time, height, width), each owning some of the rotary frequencies (``mrope_section``: in
consecutive sections for Qwen2-VL and GLM, interleaved for Qwen3-VL). A text token has the same position
in all three rows, so each frequency turns by the same position whichever row owns it: on text alone
M-RoPE is plain RoPE, and the text model is its family's causal LM (Qwen2, Qwen3, Qwen3-MoE, GLM-4,
GLM-4-MoE) with the same weights. The rotary pairs dimensions as the plain family does: GLM-4.1V's and
GLM-OCR's neighbours (dims 2i, 2i+1 turn by frequency i), as GLM-4's; GLM-4.5V's the two halves, as
GLM-4.5's (``Glm4MoeForCausalLM``), so no weight is permuted. ``tests/exporter/test_composite.py`` proves
it per family: the plain causal LM's program gives the composite's own text-only logits at 1e-4.

The table is a fact about these families that their classes do not state. Only the variants tested are
taken: default rotary frequencies, sections covering every rotated frequency, the rotated fractions of a
head listed; anything else (a scaled rope_type, a family not listed) is refused rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from interp.errors import SourceError


@dataclass(frozen=True)
class PlainFamily:
    """The plain causal LM an M-RoPE text model computes on text, and what its config must be told."""

    model_type: str  # the plain family's model_type, e.g. "qwen2"
    fixed: dict = field(default_factory=dict)  # what the text model does unconditionally, as plain config values
    fractions: tuple[float, ...] = (1.0,)  # the rotated fractions of a head tested (``partial_rotary_factor``)
    width_heads: bool = False  # its attention heads are hidden_size // heads wide whatever ``head_dim`` says
    section: tuple[int, ...] | None = None  # the sections its rotary takes when the config names none


_GLM = (8, 12, 12)  # GLM-4.1V's sections, over the 32 frequencies of half a 128-wide head

#: text model_type -> its plain family. Qwen3-VL-MoE's router always renormalises its top-k weights;
#: GLM-4.1V's attention always has q/k/v biases, GLM-OCR's never; GLM-4.5V's has no q/k norm.
MROPE_TEXT_MODELS: dict[str, PlainFamily] = {
    "qwen2_vl_text": PlainFamily("qwen2"),
    "qwen2_5_vl_text": PlainFamily("qwen2"),
    "qwen3_vl_text": PlainFamily("qwen3"),
    "qwen3_vl_moe_text": PlainFamily("qwen3_moe", dict(norm_topk_prob=True)),
    "glm4v_text": PlainFamily("glm4", dict(attention_bias=True), (0.5, 1.0), width_heads=True, section=_GLM),
    "glm_ocr_text": PlainFamily("glm4", dict(attention_bias=False), (0.5, 1.0), section=_GLM),
    "glm4v_moe_text": PlainFamily("glm4_moe", dict(use_qk_norm=False), (0.5, 1.0), section=_GLM),
}

#: M-RoPE keys of ``rope_parameters`` that plain RoPE does not have
_MROPE_KEYS = ("mrope_section", "mrope_interleaved")


def plain_text_config(kind: str, text_config):
    """The plain family config equivalent on text to an M-RoPE ``text_config``, or None when it has no M-RoPE.

    SourceError when the equivalence was not established for this config's rotary variant.
    """
    from transformers import AutoConfig

    family = MROPE_TEXT_MODELS.get(text_config.model_type)
    if family is None:
        return None
    rope = dict(getattr(text_config, "rope_parameters", None) or {})
    width = text_config.hidden_size // text_config.num_attention_heads
    rotary_head = getattr(text_config, "head_dim", None) or width  # what the text model's rotary reads
    head_dim = width if family.width_heads else rotary_head  # what its attention heads are
    fraction = rope.get("partial_rotary_factor", 1.0)
    frequencies = int(rotary_head * fraction) // 2
    section = rope.get("mrope_section") or family.section
    problem = None
    if rope.get("rope_type", "default") != "default":
        problem = f"rope_type {rope.get('rope_type')!r}; paw takes default frequencies only"
    elif fraction not in family.fractions:
        problem = (f"partial_rotary_factor {fraction}; paw takes "
                   f"{' or '.join(str(tested) for tested in family.fractions)} only")
    elif rotary_head != head_dim:
        problem = f"head_dim {rotary_head} for its rotary but {head_dim} for its attention heads"
    elif section is not None and sum(section) != frequencies:
        problem = (f"sections {list(section)} over {frequencies} frequencies; paw takes sections covering them "
                   "all only")
    if problem:
        raise SourceError(f"multimodal checkpoint ({kind}): its text model {text_config.model_type} uses M-RoPE "
                          f"with {problem}")
    params = {key: value for key, value in text_config.to_dict().items()
              if key not in ("model_type", "architectures", "transformers_version", "base_config_key")}
    # stated, not left to the family's defaults (GLM-4's are a rotated half and 128-wide heads)
    params["rope_parameters"] = {**{key: value for key, value in rope.items() if key not in _MROPE_KEYS},
                                 "partial_rotary_factor": fraction}
    params["head_dim"] = head_dim
    config = AutoConfig.for_model(family.model_type, **{**params, **family.fixed})
    # GLM-4's config fills a missing one with GLM-4's ids (GLM-4.1V's text config has no such field)
    config.eos_token_id = getattr(text_config, "eos_token_id", None)
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
