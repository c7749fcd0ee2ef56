"""Constrained outputs: choices, regular expressions and JSON schemas, enforced token by token."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import paw_mlx
from interp.errors import ConstraintError
from paw_mlx.constrain import compile_returns, grammar_for, normalize_returns, parse_returns_option
from paw_mlx.programs.interpreter import interpreter

SPEC = "Answer with one word."
INPUTS = ["(A) cat (B) dog (C) bird", "(A) 1", "Hello, how are you today?", "2024-01-05", "x"]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["label", "score"],
          "properties": {"label": {"enum": ["positive", "negative"]},
                         "score": {"type": "integer", "minimum": 0, "maximum": 99}}}


@pytest.fixture(scope="module")
def tiny_spec(tiny_program):
    return paw_mlx.compile(SPEC, base=tiny_program)


def test_choices_are_the_only_outputs(tiny_spec):
    choices = ["cat", "dog bird", "2024"]
    f = paw_mlx.function(tiny_spec, returns=choices, max_new_tokens=16)
    outputs = f(INPUTS)
    assert all(o in choices for o in outputs), outputs
    assert outputs == [f(i) for i in INPUTS]  # a batch gives what single calls give


def test_regex_outputs_match(tiny_spec):
    pattern = r"[0-9]{2,3}-[a-z]{2}"
    outputs = paw_mlx.function(tiny_spec, returns={"regex": pattern}, max_new_tokens=16)(INPUTS)
    assert all(re.fullmatch(pattern, o) for o in outputs), outputs


def test_json_schema_outputs_parse_and_validate(tiny_spec):
    outputs = paw_mlx.function(tiny_spec, returns={"json_schema": SCHEMA}, max_new_tokens=40)(INPUTS)
    for text in outputs:
        value = json.loads(text)
        assert set(value) == {"label", "score"}, text
        assert value["label"] in ("positive", "negative") and 0 <= value["score"] <= 99, text


def test_mask_allows_eos_only_when_complete(tiny_program):
    prog = interpreter(tiny_program)
    grammar = grammar_for(prog, ["ab", "abc"])
    eos = sorted(prog.eos_token_ids)
    row = grammar.start()
    assert not row.allowed()[eos].any()
    for token in prog.tokenizer.encode("ab", add_special_tokens=False):
        assert row.allowed()[token]
        row.advance(token)
    assert row.accepting and not row.done  # "abc" could still follow
    assert row.allowed()[eos].all()
    row.advance(eos[0])
    assert row.done
    assert grammar.matches("abc") and not grammar.matches("abcd")


def test_disallowed_token_is_an_error(tiny_program):
    prog = interpreter(tiny_program)
    row = grammar_for(prog, ["cat"]).start()
    bad = int(np.flatnonzero(~row.allowed())[0])
    with pytest.raises(ConstraintError, match="breaks the output constraint"):
        row.advance(bad)


def test_budget_too_small_is_an_error_not_a_truncated_output(tiny_spec):
    f = paw_mlx.function(tiny_spec, returns={"json_schema": SCHEMA}, max_new_tokens=3)
    with pytest.raises(ConstraintError, match="did not complete"):
        f("x")


def test_a_context_too_full_for_the_output_says_so_not_raise_the_budget(tiny_spec):
    """Was "(raise max_new_tokens)" also when the base model's context was what cut the output."""
    f = paw_mlx.function(tiny_spec, returns={"json_schema": SCHEMA}, max_new_tokens=64)
    room = f.base.context_length - f.artifact.prefix_length
    words = ["x"]
    while len(f.token_ids(" ".join(words))) < room - 3:
        words.append("x")
    with pytest.raises(ConstraintError, match=r"did not complete .* context of \d+ tokens .* shorten the input"):
        f(" ".join(words))


@pytest.mark.parametrize("returns, message", [
    ({"regex": "[0-9"}, "invalid output constraint"),
    ({"regex": "(ab"}, r"regex parse error: unclosed group$"),  # the reason, on the one line
    ({"json_schema": {"type": "nonsense"}}, "invalid output constraint"),
    ([], "non-empty list"),
    ({"choices": 5}, "non-empty list"),  # program.json or a request may hold any JSON value here
    ({"choices": "ab"}, "non-empty list"),  # not the choices "a" and "b"
    ({"choices": {"a": 1}}, "non-empty list"),
    ({"regex": "a", "choices": ["b"]}, "exactly one"),
    (42, "list of choices or a dict"),
    ({"json_schema": {"$ref": "#"}}, "admits no output"),  # valid, but recursion with no way out
])
def test_invalid_constraints_are_named(tiny_program, returns, message):
    prog = interpreter(tiny_program)
    with pytest.raises(ConstraintError, match=message):
        compile_returns(returns, prog.tokenizer, 384)


def test_cli_forms():
    assert parse_returns_option('["yes", "no"]') == {"choices": ["yes", "no"]}
    assert parse_returns_option("choices:yes|no") == {"choices": ["yes", "no"]}
    assert parse_returns_option(r"regex:\d+") == {"regex": r"\d+"}
    assert parse_returns_option("json") == {"json_object": True}
    assert parse_returns_option('{"type": "array"}') == {"json_schema": {"type": "array"}}
    assert normalize_returns({"choices": ["a", "a", "b"]}) == {"choices": ["a", "b"]}
    with pytest.raises(ConstraintError, match="cannot read --returns"):
        parse_returns_option("yes or no")


def test_cli_forms_of_hostile_json_are_one_constraint_error(tmp_path):
    nested = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ConstraintError, match="nested too deeply"):
        parse_returns_option(nested)
    (tmp_path / "deep.json").write_text(nested)
    with pytest.raises(ConstraintError, match="nested too deeply"):
        parse_returns_option(f"@{tmp_path / 'deep.json'}")
    with pytest.raises(ConstraintError, match="not usable JSON"):
        parse_returns_option('{"type": "integer", "maximum": ' + "9" * 5000 + "}")
    with pytest.raises(ConstraintError) as error:
        parse_returns_option("[" + "1," * 10_000)
    assert len(str(error.value)) < 200  # the line names the value, cut short


def test_stored_with_the_program_and_used_by_the_cli(tiny_program, tmp_path):
    out = tmp_path / "labels"
    art = paw_mlx.compile(SPEC, base=tiny_program, out_dir=out, returns="choices:left|right")
    assert json.loads((out / "program.json").read_text())["returns"] == {"choices": ["left", "right"]}
    assert art.returns == {"choices": ["left", "right"]}
    assert paw_mlx.function(out)(INPUTS[0]) in ("left", "right")
    run = subprocess.run([sys.executable, "-m", "apps.cli", "call", str(out), "--returns", "regex:[a-z]{4}", "a", "b"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert all(re.fullmatch("[a-z]{4}", line) for line in run.stdout.splitlines()) and len(run.stdout.splitlines()) == 2
    bad = subprocess.run([sys.executable, "-m", "apps.cli", "compile", SPEC, "-o", str(tmp_path / "bad"), "--base",
                          str(tiny_program), "--returns", "regex:(("], capture_output=True, text=True)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("paw: error: invalid output constraint") and not (tmp_path / "bad").exists()
