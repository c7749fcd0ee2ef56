"""Leads: a space before a program's inputs and outputs, where words tokenize as in running text."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

import paw_mlx
from interp.errors import ArtifactError
from interp.tokenizer import Tokenizer
from paw_mlx.engine.text import TextStream
from paw_mlx.programs.artifact import PromptLayout, read_artifact
from paw_mlx.programs.compile import choose_leads, prompt_layout
from paw_mlx.programs.interpreter import interpreter
from paw_mlx.programs.select import SelectOptions

SPEC = "Answer with an animal."
#: words the tiny tokenizer spells in fewer tokens after a space ("Ġcat") than at a line's start ("c", "at")
ROWS = [{"input": i, "output": o} for i, o in [("cat", "dog"), ("dog", "cat"), ("capital", "dog"), ("bird", "cat")]]
FEWSHOT = SelectOptions(candidates=("fewshot",), folds=2)


def test_a_space_leads_inputs_and_outputs_only_where_it_saves_tokens(tiny_program):
    tok = interpreter(tiny_program).tokenizer
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    assert len(encode(" cat")) < len(encode("cat")) and len(encode(" Hello")) > len(encode("Hello"))
    assert choose_leads(tok, ROWS) == (" ", " ")
    assert choose_leads(tok, [{"input": "Hello", "output": "cat"}]) == ("", " ")  # " Hello" is "Ġ", "Hell", "o"
    assert choose_leads(tok, [{"input": "cat", "output": "Hello"}]) == (" ", "")
    assert choose_leads(tok, []) == ("", "")  # a spec-only program: nothing to measure, laid out as before


def test_a_program_with_leads_shows_calls_and_reads_them_as_its_demonstrations(tiny_program, tmp_path):
    tok = interpreter(tiny_program).tokenizer
    art = paw_mlx.compile(SPEC, base=tiny_program, examples=ROWS, options=FEWSHOT, out_dir=tmp_path / "p",
                          returns=["dog", "cat"])
    assert (art.layout.input_lead, art.layout.output_lead) == (" ", " ")
    assert "<|im_start|>user\n cat<|im_end|>\n<|im_start|>assistant\n dog<|im_end|>" in art.layout.prefix_text
    f = paw_mlx.function(tmp_path / "p", base=tiny_program)
    ids = f.token_ids("bird")
    assert ids == tok.encode(" bird" + art.layout.suffix_text, add_special_tokens=False)
    for text in ("cat", "capital", "Hello"):
        written = f.call_ids([f.token_ids(text)])[0]
        assert tok.decode(written[:1]).startswith(" ")  # the model writes the lead, as its demonstrations do
        assert f(text) in ("dog", "cat")  # and the caller reads the answer without it
    meta = json.loads((tmp_path / "p" / "program.json").read_text())
    assert meta["version"] == 3 and (meta["layout"]["input_lead"], meta["layout"]["output_lead"]) == (" ", " ")
    assert read_artifact(tmp_path / "p").layout == art.layout


def test_a_program_without_leads_is_written_as_version_2(tiny_program, tmp_path):
    """So that a paw reading version 2 still runs it: only a program with a lead needs version 3."""
    paw_mlx.compile(SPEC, base=tiny_program, out_dir=tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "program.json").read_text())
    assert meta["version"] == 2 and read_artifact(tmp_path / "p").layout.input_lead == ""


@pytest.mark.parametrize("lead", ["x", 1, "  "])
def test_a_lead_that_is_not_a_space_is_refused(tiny_program, tmp_path, lead):
    paw_mlx.compile(SPEC, base=tiny_program, examples=ROWS, options=FEWSHOT, out_dir=tmp_path / "p")
    path = tmp_path / "p" / "program.json"
    meta = json.loads(path.read_text())
    meta["layout"]["output_lead"] = lead
    path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="output_lead"):
        read_artifact(tmp_path / "p")


def test_a_template_that_trims_messages_gets_no_leads(tiny_program, tmp_path):
    """Its demonstrations would show no space where calls and training put one."""
    folder = tmp_path / "trims"
    shutil.copytree(tiny_program, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    template = config.get("chat_template")
    if template is None:  # the template in its own file
        template_file = folder / "chat_template.jinja"
        template_file.write_text(template_file.read_text().replace("message['content']", "message['content'] | trim"))
    else:
        config["chat_template"] = template.replace("message['content']", "message['content'] | trim")
        config_path.write_text(json.dumps(config))
    trimming = Tokenizer(folder)
    layout = prompt_layout(trimming, SPEC, ROWS, (" ", " "))
    assert (layout.input_lead, layout.output_lead) == ("", "")
    assert "user\ncat<|im_end|>" in layout.prefix_text
    kept = prompt_layout(interpreter(tiny_program).tokenizer, SPEC, ROWS, (" ", " "))
    assert (kept.input_lead, kept.output_lead) == (" ", " ")


def test_a_raw_layout_puts_the_space_before_the_input_with_the_input():
    """Without a chat template the prompt is "Input: x\\nOutput: y": the space after "Input:" is
    tokenized with the call's input, as it is with each demonstration's."""

    class Plain:
        has_chat_template = False

    layout = prompt_layout(Plain(), SPEC, ROWS[:1], (" ", ""))
    assert layout.prefix_text.endswith("Input: cat\nOutput: dog\n\nInput:") and layout.input_lead == " "
    assert layout.output_lead == " "  # the raw form always writes a space before the output
    assert prompt_layout(Plain(), SPEC, ROWS[:1]).prefix_text.endswith("Input: ")


def test_a_stream_drops_the_output_lead_once(tiny_program):
    tok = interpreter(tiny_program).tokenizer
    ids = tok.encode("  cat dog", add_special_tokens=False)
    stream = TextStream(tok, lead=" ")
    text = "".join(stream.add([i]) for i in ids) + stream.finish()
    assert text == " cat dog" == stream.text  # one space is the lead, the second one the output's
    layout = replace(PromptLayout("chat", "", ""), output_lead=" ")
    assert "".join(layout.output_pieces(iter([" ", " cat", " dog"]))) == " cat dog"
    assert "".join(layout.output_pieces(iter(["cat"]))) == "cat"


def test_paw_compile_says_where_it_put_a_lead(tiny_program, tmp_path):
    import subprocess
    import sys

    examples = tmp_path / "ex.jsonl"
    examples.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run = subprocess.run([sys.executable, "-m", "apps.cli", "compile", SPEC, "-o", str(tmp_path / "p"), "--base",
                          str(tiny_program), "--examples", str(examples), "--candidates", "fewshot", "--folds", "2"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "its inputs and outputs follow a space" in run.stderr.replace("\n", " ")
    assert json.loads((tmp_path / "p" / "program.json").read_text())["selection"]["leads"] == ["inputs", "outputs"]


def test_input_lead_option_must_be_true_or_false(tiny_program, tmp_path):
    from interp.errors import PawError

    with pytest.raises(PawError, match="input_lead must be true or false"):
        paw_mlx.compile(SPEC, base=tiny_program, examples=ROWS, options=replace(FEWSHOT, input_lead="no"),
                        out_dir=tmp_path / "p")
    assert not (tmp_path / "p").exists()
    art = paw_mlx.compile(SPEC, base=tiny_program, examples=ROWS, options=replace(FEWSHOT, input_lead=False))
    assert (art.layout.input_lead, art.layout.output_lead) == ("", " ")
