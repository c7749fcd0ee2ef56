"""The language model of a multimodal (composite) checkpoint, loaded alone.

Vision-language checkpoints (Gemma 3 and 4, Llama 4, Mistral 3, ...) have a composite
config: a ``text_config`` beside a ``vision_config`` (and sometimes an ``audio_config``).
A paw program is text-only, so such a source exports as its text config's causal LM.

The checkpoint's names for the text model's weights differ by family and by transformers
version (``language_model.model.layers.N...``, ``model.language_model.layers.N...``,
``language_model.lm_head.weight``, or no head at all when it is tied). Rather than a table
per family, the composite class says where they are: a meta-device instance of it gives
the names its text model's parameters have inside it, and its weight conversions (the
renamings and tensor converters transformers' loader applies, ``get_model_conversion_mapping``)
take every checkpoint layout it loads to those names and shapes. ``TextModel.loading`` hands
transformers those conversions, then renamings from the composite's names to the text
model's, in front of the text class's own conversions; the text class's ``from_pretrained``
(whole or streamed) then reads only what the text model needs. The vision tower and projector are renamed under
``LEFT_OUT``, which the text model ignores: they are never read.

Since the towers are never read, the meta instance is built without them (``towers_left_empty``): a tower that
needs libraries paw does not depend on (Gemma 3n's, FastVLM's and Perception LM's timm models) does not stop the
export of a text model that needs none.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from interp.errors import SourceError

#: where the checkpoint keys of the composite's other sub-models are renamed to, and ignored
LEFT_OUT = "paw_left_out"

# Facts about families that their classes do not state, each held by tests/exporter/test_composite.py.
#: model_type -> why a causal program cannot compute its text model
NOT_CAUSAL = {
    "paligemma": "it is a prefix LM: its processor marks a prompt's tokens as prefix (token_type_ids 0), and "
                 "those attend to each other both ways, which a causal program cannot do",
}
#: model_type -> text config values its own head implies: transformers' Aya Vision and Command A
#: Vision compute logits with their own ``lm_head``, without Cohere 2's ``logit_scale``
HEAD_CONFIG = {"aya_vision": dict(logit_scale=1.0), "cohere2_vision": dict(logit_scale=1.0)}


@dataclass(frozen=True)
class TextModel:
    """The text model of a composite checkpoint: what to build and how the checkpoint's keys reach it."""

    composite_type: str  # the checkpoint's model_type, e.g. "gemma3"
    text_type: str  # its text config's model_type, e.g. "gemma3_text" ("qwen2_vl_text" exports as "qwen2")
    model_class: type  # the text config's *ForCausalLM
    config: Any  # the text config, tied as the composite ties it
    renamings: tuple  # transformers weight conversions: checkpoint key -> text model name
    left_out: tuple[str, ...]  # the other sub-models, e.g. ("vision",)

    def note(self) -> str:
        """One line for the export's progress: what is exported and what is not."""
        towers = " and ".join(self.left_out)
        plural = "towers are" if len(self.left_out) > 1 else "tower is"
        exported = self.text_type
        if self.config.model_type != self.text_type:
            exported += f" as {self.config.model_type}"
        return (f"multimodal checkpoint ({self.composite_type}): exporting its text model {exported}; "
                f"the {towers} {plural} left out")

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Within the block, ``model_class.from_pretrained`` reads the composite checkpoint's text weights only."""
        from transformers import modeling_utils

        original = modeling_utils.get_model_conversion_mapping

        def conversions(model, key_mapping=None, hf_quantizer=None, **kwargs):
            own = original(model, key_mapping, hf_quantizer, **kwargs)
            if type(model) is not self.model_class:
                return own
            # the other sub-models' keys end up unexpected: expected so, not reported
            model._keys_to_ignore_on_load_unexpected = {
                *(model._keys_to_ignore_on_load_unexpected or ()), rf"^{LEFT_OUT}\."}
            return [copy.deepcopy(renaming) for renaming in self.renamings] + own

        modeling_utils.get_model_conversion_mapping = conversions
        try:
            yield
        finally:
            modeling_utils.get_model_conversion_mapping = original

    def check_loaded(self, missing: set[str], location: str) -> None:
        """SourceError when the checkpoint lacked weights of the text model (transformers would invent them)."""
        from exporter.source_checks import require_weights

        require_weights(missing, location, f"the {self.composite_type} text model's")


def is_composite(config) -> bool:
    """Whether a config nests a text model's config (``text_config``) of another model_type."""
    if "text_config" not in (getattr(config, "sub_configs", None) or {}):
        return False
    text = getattr(config, "text_config", None)
    return text is not None and getattr(text, "model_type", None) != config.model_type


def find_text_model(config) -> TextModel:
    """The text model of a composite config (see ``is_composite``); SourceError when paw cannot export it."""
    import torch

    from exporter.mrope import plain_text_config

    kind = config.model_type
    text_type = config.text_config.model_type
    if kind in NOT_CAUSAL:
        raise SourceError(f"multimodal checkpoint ({kind}): paw cannot export its text model: {NOT_CAUSAL[kind]}")
    if getattr(config.text_config, "is_encoder_decoder", False):  # Florence-2's BART: its decoder reads an encoder
        raise SourceError(f"multimodal checkpoint ({kind}): its text model {text_type} is an encoder-decoder; "
                          "paw exports decoder-only causal LMs")
    text_config = copy.deepcopy(config.text_config)
    text_config._commit_hash = getattr(config, "_commit_hash", None)  # the hub revision, for the manifest
    text_config = plain_text_config(kind, text_config) or text_config
    for key, value in HEAD_CONFIG.get(kind, {}).items():
        setattr(text_config, key, value)
    model_class = _causal_lm_class(config, text_config)
    if model_class is None:
        raise SourceError(f"multimodal checkpoint ({kind}): transformers has no causal LM for its text model "
                          f"{text_type}, so paw cannot export it")
    composite_class = _composite_class(config)
    try:
        with torch.device("meta"), towers_left_empty(config):  # names and shapes only: no memory
            composite = composite_class(config)
            # the composite decides the tie (Gemma 3 ties at the top level whatever its text config says)
            text_config.tie_word_embeddings = _is_tied(composite)
            text = model_class(text_config)
    except Exception as exc:  # model constructors raise many types (a missing backend: ImportError)
        raise SourceError(f"multimodal checkpoint ({kind}): transformers cannot build {composite_class.__name__} "
                          f"to find its text model: {_gist(exc)}") from exc
    pairs = _text_paths(composite, text, kind)
    _check_names(composite, text, pairs, kind)
    left_out = tuple(name.removesuffix("_config") for name in config.sub_configs
                     if name != "text_config" and getattr(config, name, None) is not None)
    return TextModel(kind, text_type, model_class, text_config, _renamings(composite, pairs), left_out or ("other",))


@contextlib.contextmanager
def towers_left_empty(config) -> Iterator[None]:
    """Within the block, a sub-model built from one of ``config``'s sub-configs other than its text config is
    an empty module.

    Composites build their towers with ``AutoModel.from_config(config.vision_config)`` (or ``X._from_config``),
    which both go through ``PreTrainedModel._from_config``. Leaving them empty changes nothing paw takes from the
    composite: the text model's parameter names are its module paths, which its siblings do not shape, and
    ``get_model_conversion_mapping`` scopes a sub-model's conversions to that sub-model's keys (a tower's only
    match keys that are left out anyway) and lets a sub-model's claim hide only the conversions of modules
    inside it. tests/exporter/test_composite.py holds every tested family's conversions to it.
    """
    import torch
    from transformers import PreTrainedModel

    towers = [getattr(config, name) for name in config.sub_configs
              if name != "text_config" and getattr(config, name, None) is not None]
    original = PreTrainedModel.__dict__["_from_config"]

    def from_config(cls, sub_config, **kwargs):
        if any(sub_config is tower for tower in towers):
            return torch.nn.Module()
        return original.__func__(cls, sub_config, **kwargs)

    PreTrainedModel._from_config = classmethod(from_config)
    try:
        yield
    finally:
        PreTrainedModel._from_config = original


def _causal_lm_class(config, text_config) -> type | None:
    """The text config's causal LM: its own, or the one transformers files under the composite's
    model_type when it is built from the text config (Mllama's ``MllamaForCausalLM``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    for key in (type(text_config), type(config)):
        with contextlib.suppress(KeyError):
            found = MODEL_FOR_CAUSAL_LM_MAPPING[key]
            if isinstance(text_config, getattr(found, "config_class", ()) or ()):
                return found
    return None


def _composite_class(config) -> type:
    """The class the checkpoint was saved from (``architectures``), else transformers' multimodal class for it."""
    import transformers
    from transformers.models.auto import modeling_auto

    for name in getattr(config, "architectures", None) or []:
        found = getattr(transformers, name, None)
        if isinstance(found, type) and isinstance(config, getattr(found, "config_class", ()) or ()):
            return found
    for mapping in ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING", "MODEL_FOR_MULTIMODAL_LM_MAPPING",
                    "MODEL_FOR_CAUSAL_LM_MAPPING"):
        with contextlib.suppress(KeyError, AttributeError):
            return getattr(modeling_auto, mapping)[type(config)]
    raise SourceError(f"multimodal checkpoint ({config.model_type}): transformers has no model class for it")


def _module_path(root, module) -> str | None:
    return next((name for name, candidate in root.named_modules() if candidate is module), None)


def _text_paths(composite, text, kind: str) -> list[tuple[str, str]]:
    """(path in the composite, path in the text model) of the text model's parts: its decoder and its head."""
    decoder = composite.get_decoder()
    decoder_path = _module_path(composite, decoder)
    if decoder_path is not None and type(decoder) is type(text):  # the composite holds a whole causal LM (Llama 4)
        return [(decoder_path, "")]
    head = composite.get_output_embeddings()
    # the text model's copy of the composite's decoder, found by class (its get_decoder may return itself),
    # else its own decoder (an M-RoPE text model exports as its family's plain one: another class)
    text_decoder = next((path for path, module in text.named_modules() if type(module) is type(decoder)), None)
    text_decoder = text_decoder or _module_path(text, text.get_decoder())
    pairs = [(decoder_path, text_decoder),
             (_module_path(composite, head) if head is not None else None,
              _module_path(text, text.get_output_embeddings()))]
    if any(not path for pair in pairs for path in pair):
        raise SourceError(f"multimodal checkpoint ({kind}): cannot find its text model's decoder and output layer "
                          f"in {type(composite).__name__}")
    return pairs


def _is_tied(model) -> bool:
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embeddings is not None and head.weight is embeddings.weight


def _composite_name(name: str, pairs: list[tuple[str, str]]) -> str | None:
    """A text model parameter's name inside the composite."""
    for composite_path, text_path in pairs:
        if not text_path:
            return f"{composite_path}.{name}"
        if name.startswith(text_path + "."):
            return composite_path + name[len(text_path):]
    return None


def _check_names(composite, text, pairs: list[tuple[str, str]], kind: str) -> None:
    """Every text model parameter is one of the composite's, of the same shape (else the renamings would be wrong)."""
    inside = dict(composite.named_parameters(remove_duplicate=False))
    for name, param in text.named_parameters():
        found = inside.get(_composite_name(name, pairs) or "")
        if found is None or found.shape != param.shape:
            raise SourceError(f"multimodal checkpoint ({kind}): its text model's {name} is not one of "
                              f"{type(composite).__name__}'s parameters")


def _renamings(composite, pairs: list[tuple[str, str]]) -> tuple:
    """Checkpoint key -> text model name: the composite's own conversions (renamings, and converters such as
    Qwen3-VL-MoE's transpose of its stored experts or MiniMax-M3's merge of them), then its text paths to the
    text model's (converters match by name suffix, so they find the text model's weights under either)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    own = list(get_model_conversion_mapping(composite, add_legacy=False))
    kept = "|".join(re.escape(path) + r"\." for path, _ in pairs)
    moves = [WeightRenaming(rf"^(?!{kept})(.+)$", rf"{LEFT_OUT}.\1")]
    for composite_path, text_path in pairs:
        target = rf"{text_path}.\1" if text_path else r"\1"
        moves.append(WeightRenaming(rf"^{re.escape(composite_path)}\.(.+)$", target))
    return tuple(own + moves)


def _gist(exc: Exception) -> str:
    """The cause in a few words: the libraries transformers asks for (its ImportError runs to paragraphs)."""
    missing = re.findall(r"requires the (\S+) library", str(exc))
    if missing:
        return f"it needs {' and '.join(dict.fromkeys(missing))}, which are not installed"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
