"""Multimodal (composite) checkpoints export their text model, and it matches the composite's own text forward.

Each case is a tiny random vision-language model of its family (tests/archs.py ``COMPOSITES``:
text model as ``ARCHS`` builds it, vision tower shrunk), saved with ``save_pretrained`` as
transformers writes such checkpoints (Gemma 3 and Mistral 3 under ``language_model.model.``,
Gemma 4 under ``model.language_model.``, Llama 4's whole ``language_model``), exported with
paw from the folder and compared with the composite model's forward on text alone:
full-sequence logits, logits through the KV cache, and greedy tokens against its ``generate``.
"""

from __future__ import annotations

import filecmp
import json

import pytest
from safetensors import safe_open

from exporter.export import export_source
from exporter.mrope import MROPE_TEXT_MODELS
from interp.errors import SourceError
from tests.archs import COMPOSITES, GLM_MOE, ArchCase, composite_config, glm_rope, timm_stood_in, tiny_composite
from tests.exporter.test_architectures import PREFILL, TOLERANCE

#: what the export's progress line says it left out, where it is more than a vision tower
LEFT_OUT = {"gemma3n": "the vision and audio towers are left out"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_tokenizer):
    """model_type -> (its saved tiny composite folder, the composite model)."""
    root = tmp_path_factory.mktemp("composites")
    made = {}
    for model_type in COMPOSITES:
        model = tiny_composite(model_type)
        model.save_pretrained(root / model_type)
        tiny_tokenizer.save_pretrained(root / model_type)
        made[model_type] = (root / model_type, model)
    return made


@pytest.fixture(scope="module")
def exported(folders, tmp_path_factory):
    """model_type -> (the whole-load export's directory, its progress lines)."""
    root = tmp_path_factory.mktemp("composite-programs")
    made = {}
    for model_type, (folder, _) in folders.items():
        lines: list[str] = []
        made[model_type] = (export_source(str(folder), root / model_type, stream=False, progress=lines.append),
                            lines)
    return made


@pytest.mark.parametrize("model_type", list(COMPOSITES))
def test_text_model_matches_the_composite(folders, exported, model_type):
    case = ArchCase(model_type, exported[model_type][0], model=folders[model_type][1])
    full, cached, greedy = case.errors(PREFILL)
    assert full < TOLERANCE, f"{model_type}: logits differ by {full}"
    assert cached < TOLERANCE, f"{model_type}: cached logits differ by {cached}"
    assert greedy, f"{model_type}: greedy tokens differ"


@pytest.mark.parametrize("model_type", list(COMPOSITES))
def test_export_says_what_it_left_out_and_keeps_the_tokenizer(folders, exported, model_type):
    program, lines = exported[model_type]
    text_type = folders[model_type][1].config.text_config.model_type
    family = MROPE_TEXT_MODELS.get(text_type)
    exported_type = family.model_type if family else text_type
    shown = text_type if exported_type == text_type else f"{text_type} as {exported_type}"
    left_out = LEFT_OUT.get(model_type, "the vision tower is left out")
    assert f"multimodal checkpoint ({model_type}): exporting its text model {shown}; {left_out}" in lines
    spec = json.loads((program / "prog.json").read_text())
    assert spec["model"]["model_type"] == exported_type
    assert spec["model"]["source"]["text_model_of"] == model_type
    tokenizer = json.loads((program / "tokenizer_config.json").read_text())
    assert "im_start" in (tokenizer.get("chat_template") or (program / "chat_template.jinja").read_text())


@pytest.mark.parametrize("model_type", ["gemma3", "gemma4", "qwen2_vl", "smolvlm", "gemma3n", "fast_vlm", "glm4v",
                                        "glm4v_moe"])
def test_streamed_export_reads_no_vision_weight_and_matches_the_whole_one(folders, exported, model_type,
                                                                          tmp_path):
    """gemma3's checkpoint keys are the legacy ``language_model.model.*``, gemma4's ``model.language_model.*``,
    smolvlm's ``model.text_model.*``; qwen2_vl's, glm4v's and glm4v_moe's land in another class
    (Qwen2ForCausalLM, Glm4ForCausalLM, Glm4MoeForCausalLM); gemma3n has an audio tower and embedders beside
    its timm vision tower, fast_vlm a timm tower only."""
    from exporter.sources import load_source_streaming, resolve_source, text_model_of

    folder = folders[model_type][0]
    source = resolve_source(str(folder))
    model, _, weights = load_source_streaming(source, "float32", text_model_of(source))
    read = {entry[1] for group in weights.plan.groups.values() for entry in group.entries}
    with safe_open(folder / "model.safetensors", "pt") as stored:
        towers = {key for key in stored.keys() if any(word in key for word in ("vision", "projector", "visual",
                                                                                "connector", "audio"))}
    assert towers and not read & towers
    assert all(p.is_meta for p in model.parameters())
    streamed = export_source(str(folder), tmp_path / "streamed")
    compared = filecmp.dircmp(exported[model_type][0], streamed)
    _, mismatch, errors = filecmp.cmpfiles(exported[model_type][0], streamed, compared.common_files, shallow=False)
    assert not mismatch and not errors and not compared.left_only and not compared.right_only


def test_a_text_model_without_a_causal_lm_is_one_error(folders, tmp_path):
    folder = tmp_path / "clip-text"
    folder.mkdir()
    for item in folders["mistral3"][0].iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["text_config"] = {"model_type": "clip_text_model"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match=r"multimodal checkpoint \(mistral3\): transformers has no causal LM "
                                          "for its text model clip_text_model"):
        export_source(str(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gemma3n_matches_its_causal_lm_holding_the_same_weights(folders, exported):
    """Gemma 3n's text model is transformers' Gemma3nForCausalLM: loaded with the composite's text weights,
    it computes what the exported program computes (KV sharing, sparse MLPs, per-layer inputs, AltUp)."""
    import copy

    from transformers import Gemma3nForCausalLM

    composite = folders["gemma3n"][1]
    config = copy.deepcopy(composite.config.text_config)
    config.tie_word_embeddings = composite.config.tie_word_embeddings  # untied at the top, as COMPOSITES builds it
    reference = Gemma3nForCausalLM(config).eval()
    weights = {f"model.{key}": value for key, value in composite.model.language_model.state_dict().items()}
    reference.load_state_dict({**weights, "lm_head.weight": composite.lm_head.weight})
    full, cached, greedy = ArchCase("gemma3n", exported["gemma3n"][0], model=reference).errors(PREFILL)
    assert full < TOLERANCE and cached < TOLERANCE and greedy


def test_gemma3n_at_its_real_size_needs_no_timm_to_reach_its_weights(tmp_path):
    """Gemma 3n's default config (E2B's shapes) names a timm vision tower; paw depends on neither timm nor
    PIL, and leaves the tower out unbuilt: the export gets as far as the (here missing) weights."""
    from transformers import AutoConfig

    AutoConfig.for_model("gemma3n").save_pretrained(tmp_path / "gemma3n")
    lines: list[str] = []
    with pytest.raises(SourceError, match="could not load .*gemma3n: Error no file named model.safetensors"):
        export_source(str(tmp_path / "gemma3n"), tmp_path / "out", progress=lines.append)
    assert ("multimodal checkpoint (gemma3n): exporting its text model gemma3n_text; the vision and audio towers "
            "are left out") in lines
    assert not (tmp_path / "out").exists()


def _conversions(model) -> list[tuple]:
    from transformers.conversion_mapping import get_model_conversion_mapping

    return [(type(t).__name__, t.source_patterns, t.target_patterns, t.scope_prefix,
             [type(op).__name__ for op in getattr(t, "operations", [])])
            for t in get_model_conversion_mapping(model, add_legacy=False)]


@pytest.mark.parametrize("model_type", list(COMPOSITES))
def test_towers_left_empty_change_no_text_name_or_conversion(model_type):
    """The composite built without its towers (``towers_left_empty``) has the text model's parameters under
    the same names and the same weight conversions, less those scoped inside a tower (Gemma 3's SigLIP
    tower renames its own keys; Llama 4 builds its tower by its class, and keeps it)."""
    import torch

    from exporter.composite import _composite_class, towers_left_empty

    config = composite_config(model_type)
    with torch.device("meta"), timm_stood_in():
        whole = _composite_class(config)(config)
    with torch.device("meta"), towers_left_empty(config):
        empty = _composite_class(config)(config)
    towers = {path for path, module in empty.named_modules() if type(module) is torch.nn.Module and path}
    base = whole.base_model_prefix
    scopes = {path.removeprefix(base).removeprefix(".") for path in towers}

    def in_tower(name: str) -> bool:
        return any(name == path or name.startswith(path + ".") for path in towers | scopes)

    assert [name for name, _ in whole.named_parameters() if not in_tower(name)] == \
        [name for name, _ in empty.named_parameters()]
    kept = [conversion for conversion in _conversions(whole) if conversion[3] is None or not in_tower(conversion[3])]
    assert kept == _conversions(empty)


@pytest.mark.parametrize("stream", [False, True])
def test_a_text_weight_missing_from_the_checkpoint_is_one_error(folders, tmp_path, stream):
    """transformers would fill a missing weight with random values; paw refuses before writing."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    folder.mkdir()
    for item in folders["mistral3"][0].iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    tensors = load_file(folder / "model.safetensors")
    missing = next(key for key in tensors if key.endswith("layers.1.mlp.down_proj.weight"))
    del tensors[missing]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SourceError, match=r"the checkpoint has no weights for the mistral3 text model's "
                                          r"model\.layers\.1\.mlp\.down_proj\.weight"):
        export_source(str(folder), tmp_path / "out", stream=stream)
    assert not (tmp_path / "out").exists()


def test_a_sharded_checkpoint_streams_to_the_same_program(folders, exported, tmp_path, tiny_tokenizer):
    """Shards with an index, as large checkpoints are saved: each tensor is found in its shard by its name."""
    folder = tmp_path / "mistral3"  # the same folder name, so the manifest's source is the same
    folders["mistral3"][1].save_pretrained(folder, max_shard_size="40KB")
    tiny_tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    streamed = export_source(str(folder), tmp_path / "streamed")
    whole = exported["mistral3"][0]
    compared = filecmp.dircmp(whole, streamed)
    _, mismatch, errors = filecmp.cmpfiles(whole, streamed, compared.common_files, shallow=False)
    assert not mismatch and not errors and not compared.left_only and not compared.right_only


def _edited_copy(folder, target, edit) -> None:
    """A copy of a saved checkpoint folder whose config.json ``edit`` changed in place."""
    target.mkdir()
    for item in folder.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("model_type", "text", "problem"), [
    ("qwen2_vl", dict(rope_parameters=dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=64)),
     "rope_type 'yarn'; paw takes default frequencies only"),
    ("qwen2_vl", dict(rope_parameters=dict(mrope_section=[2, 2, 2])),
     r"sections \[2, 2, 2\] over 8 frequencies; paw takes sections covering them all only"),
    ("qwen2_vl", dict(rope_parameters=dict(partial_rotary_factor=0.5, mrope_section=[1, 1, 2])),
     "partial_rotary_factor 0.5; paw takes 1.0 only"),
    ("glm4v", dict(rope_parameters=dict(partial_rotary_factor=0.25, mrope_section=[1, 0, 1])),
     "partial_rotary_factor 0.25; paw takes 0.5 or 1.0 only"),
    ("glm4v_moe", dict(rope_parameters=dict(rope_type="linear", factor=2.0)),
     "rope_type 'linear'; paw takes default frequencies only"),
    # no sections named: GLM's rotary takes 8, 12, 12, which 8 frequencies cannot hold
    ("glm46v", dict(rope_parameters=dict(mrope_section=None)),
     r"sections \[8, 12, 12\] over 8 frequencies; paw takes sections covering them all only"),
    # GLM-4.1V's rotary reads head_dim, its attention hidden_size // heads
    ("glm4v", dict(head_dim=32), "head_dim 32 for its rotary but 16 for its attention heads"),
])
def test_an_untested_m_rope_variant_is_one_error(folders, tmp_path, model_type, text, problem):
    """Plain RoPE equals M-RoPE on text only for what the tests prove: default frequencies, every one in a
    section, a rotated fraction of the head tested, heads as wide for the rotary as for attention."""
    def edit(config):
        config["text_config"]["rope_parameters"].update(text.get("rope_parameters", {}))
        config["text_config"].update({key: value for key, value in text.items() if key != "rope_parameters"})

    _edited_copy(folders[model_type][0], tmp_path / model_type, edit)
    text_type = folders[model_type][1].config.text_config.model_type
    with pytest.raises(SourceError, match=rf"multimodal checkpoint \({model_type}\): its text model {text_type} uses "
                                          f"M-RoPE with {problem}$"):
        export_source(str(tmp_path / model_type), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("model_type", "fraction"), [("glm_ocr", 0.5), ("glm4v_moe", 1.0)])
def test_glm_text_models_match_on_the_other_rotated_fraction(tmp_path, tiny_tokenizer, model_type, fraction):
    """The GLM-4.1V family is taken on half-rotated and whole-rotated heads: COMPOSITES tests glm4v_text on
    both (glm4v, glm46v), glm_ocr_text on whole heads and glm4v_moe_text on halves; these are the others."""
    text = dict(glm_rope(fraction, head_dim=32), **(GLM_MOE if model_type == "glm4v_moe" else {}))
    model = tiny_composite(model_type, text=text)
    model.save_pretrained(tmp_path / model_type)
    tiny_tokenizer.save_pretrained(tmp_path / model_type)
    program = export_source(str(tmp_path / model_type), tmp_path / "out", stream=False)
    full, cached, greedy = ArchCase(model_type, program, model=model).errors(PREFILL)
    assert full < TOLERANCE and cached < TOLERANCE and greedy


@pytest.mark.parametrize(("model_type", "text"), [("glm_ocr", {}), ("glm4v", dict(partial_rotary_factor=0.5))])
def test_a_glm_text_config_without_eos_keeps_none(model_type, text):
    """GLM-4's config fills a missing eos_token_id with GLM-4's ids, past GLM-OCR's vocabulary: the plain
    config keeps the text model's own (none; GLM-4.1V's text config has no such field), and the folder's
    generation config and tokenizer name it."""
    from transformers import AutoConfig

    from exporter.mrope import plain_text_config

    text_config = AutoConfig.for_model(model_type, text_config=text).text_config
    assert getattr(text_config, "eos_token_id", None) is None
    assert plain_text_config(model_type, text_config).eos_token_id is None


@pytest.mark.parametrize(("model_type", "text", "exported"), [
    ("glm4v", dict(partial_rotary_factor=0.5, rope_scaling=dict(type="default", mrope_section=[8, 12, 12])),
     "glm4v_text as glm4"),
    ("glm4v_moe", dict(head_dim=128, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                          partial_rotary_factor=0.5, mrope_section=[8, 12, 12])),
     "glm4v_moe_text as glm4_moe"),
])
def test_glm_checkpoints_at_their_real_size_reach_their_weights(tmp_path, model_type, text, exported):
    """GLM-4.1V-9B's and GLM-4.5V's config shapes (rotary on half of 128-wide heads, in sections 8, 12, 12;
    GLM-4.1V's written in transformers 4's ``rope_scaling``): the export gets as far as the (missing) weights."""
    from transformers import AutoConfig

    AutoConfig.for_model(model_type, text_config=text).save_pretrained(tmp_path / model_type)
    lines: list[str] = []
    with pytest.raises(SourceError, match=f"could not load .*{model_type}: Error no file named model.safetensors"):
        export_source(str(tmp_path / model_type), tmp_path / "out", progress=lines.append)
    assert (f"multimodal checkpoint ({model_type}): exporting its text model {exported}; the vision tower is left "
            "out") in lines
    assert not (tmp_path / "out").exists()


def test_paligemma_is_a_prefix_lm_and_is_one_cli_error(tmp_path, tiny_tokenizer):
    """PaliGemma's processor marks the prompt as prefix (token_type_ids 0): a text-only prompt's first
    logits then see later tokens, which a causal program cannot compute, so paw refuses it."""
    import torch

    from tests.apps.test_cli import assert_one_line_error, paw
    from tests.archs import VOCAB

    model = tiny_composite("paligemma")
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % VOCAB
    with torch.no_grad():
        first = [model(x, token_type_ids=torch.zeros_like(x)).logits[0, 0] for x in (ids, changed)]
    assert not torch.allclose(*first), "a prefix token sees the tokens after it"
    model.save_pretrained(tmp_path / "paligemma")
    tiny_tokenizer.save_pretrained(tmp_path / "paligemma")
    done = paw("export", "hf", str(tmp_path / "paligemma"), "-o", str(tmp_path / "out"))
    assert_one_line_error(done, "multimodal checkpoint (paligemma): paw cannot export its text model: it is a "
                                "prefix LM")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stream", [False, True])
def test_experts_stored_transposed_load_as_the_composite_loads_them(folders, tmp_path, stream):
    """Qwen3-VL-MoE's checkpoints store each layer's experts as [experts, hidden, 2 x intermediate]; the
    composite's own weight conversions transpose them on load, and the text model must too."""
    from safetensors.torch import load_file, save_file

    folder, model = folders["qwen3_vl_moe"]
    hub = tmp_path / "qwen3_vl_moe"
    hub.mkdir()
    for item in folder.iterdir():
        (hub / item.name).write_bytes(item.read_bytes())
    tensors = load_file(hub / "model.safetensors")
    transposed = {key for key in tensors if key.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    assert transposed
    tensors.update({key: tensors[key].transpose(1, 2).contiguous() for key in transposed})
    save_file(tensors, hub / "model.safetensors", metadata={"format": "pt"})
    program = export_source(str(hub), tmp_path / "out", stream=stream)
    full, cached, greedy = ArchCase("qwen3_vl_moe", program, model=model).errors(PREFILL)
    assert full < TOLERANCE and cached < TOLERANCE and greedy


def test_an_encoder_decoder_is_one_cli_error(tmp_path):
    """T5Gemma 2 has no causal LM in transformers: refused by name before any weight is read."""
    from transformers import AutoConfig

    from tests.apps.test_cli import assert_one_line_error, paw

    AutoConfig.for_model("t5gemma2").save_pretrained(tmp_path / "t5gemma2")
    done = paw("export", "hf", str(tmp_path / "t5gemma2"), "-o", str(tmp_path / "out"))
    assert_one_line_error(done, "t5gemma2 is an encoder-decoder model; paw exports decoder-only causal LMs")
    assert not (tmp_path / "out").exists()


def test_an_encoder_decoder_text_model_is_one_error(tmp_path):
    """Florence-2's text model is BART: transformers has a BartForCausalLM, but it is half the model."""
    from transformers import AutoConfig

    AutoConfig.for_model("florence2").save_pretrained(tmp_path / "florence2")
    with pytest.raises(SourceError, match=r"multimodal checkpoint \(florence2\): its text model bart is an "
                                          "encoder-decoder; paw exports decoder-only causal LMs"):
        export_source(str(tmp_path / "florence2"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_qwen2_vl_in_the_hubs_older_layout_streams_to_the_same_program(folders, exported, tmp_path):
    """Qwen2-VL and Qwen2.5-VL on the hub keep the text model under ``model.`` and the tower under ``visual.``
    (transformers 4's layout); the composite's renamings take them where its text model is."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "qwen2_vl"  # the same folder name, so the manifest's source is the same
    folder.mkdir()
    for item in folders["qwen2_vl"][0].iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    tensors = load_file(folder / "model.safetensors")
    older = {key.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1): value
             for key, value in tensors.items()}
    assert "model.layers.0.self_attn.q_proj.weight" in older and not any(k.startswith("model.visual") for k in older)
    save_file(older, folder / "model.safetensors", metadata={"format": "pt"})
    streamed = export_source(str(folder), tmp_path / "streamed")
    whole = exported["qwen2_vl"][0]
    compared = filecmp.dircmp(whole, streamed)
    _, mismatch, errors = filecmp.cmpfiles(whole, streamed, compared.common_files, shallow=False)
    assert not mismatch and not errors and not compared.left_only and not compared.right_only
