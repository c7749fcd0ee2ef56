"""`paw export` refuses a chat template that `paw run` would refuse, before the weights are read;
templates that only mishandle a system message (Gemma's, Mistral's) keep exporting, with a note."""

from __future__ import annotations

import json
import shutil

import pytest

import exporter.export as export_module
from exporter.export import export_source
from interp.errors import SourceError, TemplateError
from interp.tokenizer import Tokenizer

#: Gemma's way: a system message raises
GEMMA_LIKE = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
              "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n"
              "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
#: Mistral's way: the system message goes into the first user turn
MISTRAL_LIKE = ("{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
                "{% for m in messages if m['role'] != 'system' %}{% if m['role'] == 'user' %}[INST] "
                "{{ (system + '\n\n' if system and loop.first else '') + m['content'] }} [/INST]"
                "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}")
#: run time refuses each: (where the template goes, the template, what the error says)
BROKEN = [
    ("chat_template.jinja", "{% for m in messages %}{{ m['content'] }", "does not compile: unexpected '}'"),
    ("tokenizer_config.json", "{% if %}", "does not compile"),
    ("chat_template.jinja", "{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("chat_template.jinja", "{% for m in messages %}<|im_start|>{{ m['role'] }}\n<|im_end|>{% endfor %}",
     "drops the user's message"),
    ("chat_template.jinja", "{{ messages[0]['content'] * 99999999 }}", "beyond the limit"),
]


@pytest.fixture
def model_folder(tiny_hf_folder):
    return tiny_hf_folder


def with_template(model_folder, tmp_path, where: str, template: str):
    """A copy of the model folder whose chat template is ``template``, in ``where``."""
    folder = shutil.copytree(model_folder, tmp_path / "model")
    if where == "tokenizer_config.json":
        (folder / "chat_template.jinja").unlink()
        config = json.loads((folder / where).read_text())
        (folder / where).write_text(json.dumps({**config, "chat_template": template}))
    else:
        (folder / where).write_text(template)
    return folder


@pytest.mark.parametrize("where, template, fragment", BROKEN)
def test_a_template_run_time_would_refuse_is_refused_before_the_weights(model_folder, tmp_path, monkeypatch,
                                                                        where, template, fragment):
    folder = with_template(model_folder, tmp_path, where, template)

    def no_weights(*args, **kwargs):
        raise AssertionError("the model was loaded before the chat template was checked")

    monkeypatch.setattr(export_module, "_load_model", no_weights)
    with pytest.raises(SourceError, match=fragment) as refused:
        export_source(str(folder), tmp_path / "out")
    assert str(refused.value).startswith(f"{folder / where}: ")
    assert "\n" not in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no output, not even a partial one


@pytest.mark.parametrize("template, note", [(GEMMA_LIKE, "fails on a system message: System role not supported"),
                                            (MISTRAL_LIKE, None)])
def test_templates_that_only_mishandle_a_system_message_export(model_folder, tmp_path, template, note):
    folder = with_template(model_folder, tmp_path, "chat_template.jinja", template)
    said: list[str] = []
    out = export_source(str(folder), tmp_path / "out", progress=said.append)
    notes = [line for line in said if line.startswith("note: the chat template")]
    assert notes == ([f"note: the chat template {note}"] if note else [])
    prompt = Tokenizer(out).apply_chat_template([{"role": "user", "content": "Hi there"}])
    assert "Hi there" in prompt and (out / "prog.json").is_file()


def test_run_time_refuses_what_export_refuses(model_folder, tmp_path):
    folder = with_template(model_folder, tmp_path, "chat_template.jinja", BROKEN[3][1])
    with pytest.raises(TemplateError, match="drops the user's message"):
        Tokenizer(folder).apply_chat_template([{"role": "user", "content": "Hi"}])


def test_a_gguf_files_template_is_named_by_the_file(tmp_path, tiny_tokenizer, monkeypatch):
    import copy

    from tests.tiny_gguf import write_tiny_gguf

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = BROKEN[2][1]
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tokenizer)
    monkeypatch.setattr(export_module, "_load_model", lambda *a, **k: pytest.fail("the weights were read"))
    with pytest.raises(SourceError, match=r"tiny.gguf \(tokenizer.chat_template\): .*roles must alternate"):
        export_source(str(path), tmp_path / "out")
    assert not (tmp_path / "out").exists()
