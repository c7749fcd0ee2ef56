"""The copy rule: when every example answers with words of its input, so does every call."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from dataclasses import replace

import pytest

import paw_mlx
from interp.errors import ArtifactError, PawError
from paw_mlx.constrain import grammar_for
from paw_mlx.programs.artifact import read_artifact
from paw_mlx.programs.copy_rule import CopyRule, infer_copy_rule, runs
from paw_mlx.programs.interpreter import interpreter
from paw_mlx.programs.select import SelectOptions


def rows(pairs):
    return [{"input": i, "output": o} for i, o in pairs]


#: "the last word": every output is a word of its input
LAST_WORD = rows([("red cat sat", "sat"), ("one two", "two"), ("big blue sea", "sea"), ("we run far", "far"),
                  ("old tree", "tree")])
FEWSHOT = SelectOptions(candidates=("fewshot",), folds=2)
#: new inputs, none a training input
NEW = ["green hat", "the dog barks loud", "seven eight nine"]


def test_runs_are_letter_runs_and_digit_runs():
    assert runs("Grace, 50th birthday: grace@x.org!") == ["Grace", "50", "th", "birthday", "grace", "x", "org"]
    assert runs("café 日本") == ["caf"]  # other characters are never constrained


def test_the_rule_is_inferred_where_every_example_copies():
    assert infer_copy_rule(LAST_WORD) == CopyRule("exact", ())
    emails = rows([("mail ann@yahoo.com", "yahoo.com"), ("bob@gmail.com here", "gmail.com"),
                   ("ceo@bigcorp.com", "bigcorp.com"), ("x@a.org now", "a.org")])
    assert infer_copy_rule(emails) == CopyRule("exact", ())
    # a change of case: matched in any case, written in the case the outputs use
    assert infer_copy_rule(rows([(w, w.upper()) for w in ["cat", "dog", "sun", "red"]])) == CopyRule("upper", ())
    assert infer_copy_rule(rows([(w, w.lower()) for w in ["Cat", "DOG", "Sun", "rEd"]])) == CopyRule("lower", ())
    assert infer_copy_rule(rows([(w, w.title()) for w in ["cat", "dog", "sun", "red"]])) == CopyRule("any", ())
    # JSON keys every output holds: shared runs
    people = rows([(f"{n} is {a}.", json.dumps({"name": n, "age": a})) for n, a in
                   [("Ann", 30), ("Bob", 45), ("Cy", 7), ("Di", 9)]])
    assert infer_copy_rule(people) == CopyRule("exact", ("age", "name"))


def test_no_rule_where_an_example_answers_with_a_word_its_input_lacks():
    assert infer_copy_rule(rows([("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"),
                                 ("Spain", "Madrid")])) is None  # knowledge
    assert infer_copy_rule(rows([("I loved it", "positive"), ("awful", "negative"), ("great", "positive"),
                                 ("bad", "negative")])) is None  # labels: nothing copied (``returns`` is for them)
    # one output with a word of its own: no rule, however many copy
    assert infer_copy_rule([*LAST_WORD, {"input": "ten cats", "output": "dogs"}]) is None
    assert infer_copy_rule(LAST_WORD[:3]) is None  # too few examples to infer anything from


def test_the_grammar_is_the_rule():
    """The regular expression a call is held to accepts an output exactly where the rule allows it
    (random outputs over the input's pieces), in Python and in the grammar engine alike."""
    rng = random.Random(0)
    for rule, text in [(CopyRule("exact", ()), "ann@yahoo.com and 15 kg"), (CopyRule("any", ("age",)), "Bridge 7x"),
                       (CopyRule("upper", ("age",)), "Bridge 7x"), (CopyRule("lower"), "Bridge 7x"),
                       (CopyRule("exact", ()), "...")]:
        pieces = [*runs(text), "yah", "hoo", "YAHOO", "age", "AGE", "BRIDGE", "bridge", "1", "5", "x7", " ", ".", "@",
                  ", ", "é"]
        pattern = re.compile(rule.regex(text))
        for _ in range(400):
            out = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 5)))
            assert bool(pattern.fullmatch(out)) == rule.allows(text, out), (text, out)


def test_the_grammar_engine_agrees(tiny_program):
    prog = interpreter(tiny_program)
    for case, cases in [("any", [("BRIDGE", True), ("bridge 50 th", True), ("the50th", True), ("BriDge", True)]),
                        ("upper", [("BRIDGE", True), ("bridge", False), ("THE50TH", True), ("BriDge", False)]),
                        ("lower", [("BRIDGE", False), ("bridge 50 th", True)]), ("exact", [("BRIDGE", False)])]:
        grammar = grammar_for(prog, {"regex": CopyRule(case).regex("the bridge, 50th")})
        for out, ok in [*cases, ("BRIDGEMBUS", False), ("brid", False), ("5", False), ("", True)]:
            assert grammar.matches(out) == ok, (case, out)
            assert CopyRule(case).allows("the bridge, 50th", out) == ok, (case, out)


def test_an_input_with_too_many_words_is_not_constrained():
    text = " ".join(f"w{i}x" for i in range(3000))
    assert CopyRule().regex(text) is None


def test_a_compiled_program_answers_with_words_of_its_input(tiny_program, tmp_path):
    art = paw_mlx.compile("Say the last word.", base=tiny_program, examples=LAST_WORD, options=FEWSHOT,
                          out_dir=tmp_path / "p")
    assert art.copy_rule == CopyRule("exact", ()) and art.selection["copy_rule"] == {"case": "exact", "shared": []}
    f = paw_mlx.function(tmp_path / "p", base=tiny_program)
    assert f.copy_rule == art.copy_rule
    outputs = f(NEW)
    assert all(art.copy_rule.allows(i, o) for i, o in zip(NEW, outputs, strict=True)), outputs
    assert any(runs(o) for o in outputs)  # it answers (a random model), within the rule
    # the same program without the rule: the random base writes words no input holds
    free = paw_mlx.compile("Say the last word.", base=tiny_program, examples=LAST_WORD,
                           options=replace(FEWSHOT, copy_rule=False))
    assert free.copy_rule is None
    unruled = paw_mlx.function(free, base=tiny_program)(NEW)
    assert not all(art.copy_rule.allows(i, o) for i, o in zip(NEW, unruled, strict=True)), unruled
    # a constraint the caller gives replaces the rule
    assert paw_mlx.function(tmp_path / "p", base=tiny_program, returns=["zebra"])(NEW[0]) == "zebra"


def test_an_output_cut_by_its_budget_is_returned_not_refused(tiny_program, tmp_path):
    """The rule holds words to the input's; it asks no output to parse, so the token budget may
    end one mid-word, as it would end an output without the rule."""
    art = paw_mlx.compile("Say the last word.", base=tiny_program, examples=LAST_WORD, options=FEWSHOT)
    f = paw_mlx.function(art, base=tiny_program, max_new_tokens=1)
    done = f.complete(NEW)
    assert all(c.tokens <= 1 for c in done)


def test_the_rule_is_written_and_read_back(tiny_program, tmp_path):
    paw_mlx.compile("Say the last word.", base=tiny_program, examples=LAST_WORD, options=FEWSHOT,
                    out_dir=tmp_path / "p")
    path = tmp_path / "p" / "program.json"
    meta = json.loads(path.read_text())
    assert meta["version"] == 3 and meta["copy_rule"] == {"case": "exact", "shared": []}
    assert read_artifact(tmp_path / "p").copy_rule == CopyRule("exact", ())
    for bad in ({"case": "title", "shared": []}, {"case": "exact", "shared": ["a b"]}, [], {"shared": []},
                {"case": "any", "shared": [], "more": 1}):
        path.write_text(json.dumps(dict(meta, copy_rule=bad)))
        with pytest.raises(ArtifactError, match="copy_rule"):
            read_artifact(tmp_path / "p")


def test_copy_rule_option_must_be_true_or_false(tiny_program, tmp_path):
    with pytest.raises(PawError, match="copy_rule must be true or false"):
        paw_mlx.compile("x", base=tiny_program, examples=LAST_WORD, options=replace(FEWSHOT, copy_rule=1),
                        out_dir=tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_a_bundle_holds_no_copy_rule(tiny_program, tmp_path):
    from paw_mlx.programs.pawfile import write_bundle

    art = paw_mlx.compile("Say the last word.", base=tiny_program, examples=LAST_WORD, options=FEWSHOT)
    with pytest.raises(ArtifactError, match="copy rule"):
        write_bundle(art, interpreter(tiny_program), tmp_path / "p.paw")
    assert not (tmp_path / "p.paw").exists()


@pytest.mark.parametrize("flag", [None, "--no-copy-rule"])
def test_paw_compile_says_when_it_holds_outputs_to_the_input(tiny_program, tmp_path, flag):
    examples = tmp_path / "ex.jsonl"
    examples.write_text("".join(json.dumps(r) + "\n" for r in LAST_WORD))
    run = subprocess.run([sys.executable, "-m", "apps.cli", "compile", "Say the last word.", "-o", str(tmp_path / "p"),
                          "--base", str(tiny_program), "--examples", str(examples), "--candidates", "fewshot",
                          "--folds", "2", *([flag] if flag else [])], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    said = "held to words of its own input" in run.stderr.replace("\n", " ")
    assert said == (flag is None)
    assert ("copy_rule" in json.loads((tmp_path / "p" / "program.json").read_text())) == (flag is None)


def test_paw_chat_holds_a_program_reply_to_the_message_words(tiny_program, tmp_path):
    from paw_mlx.chat import ChatSession

    art = paw_mlx.compile("Say the last word.", base=tiny_program, examples=LAST_WORD, options=FEWSHOT,
                          out_dir=tmp_path / "p")
    session = ChatSession(interpreter(tiny_program), max_tokens=64)
    session.use_program(tmp_path / "p")
    for text in NEW:
        reply = "".join(session.send(text))
        assert reply == paw_mlx.function(tmp_path / "p", base=tiny_program)(text)
        assert art.copy_rule.allows(text, reply)


def test_a_call_by_ids_reads_its_input_back_for_the_rule(tiny_program):
    art = paw_mlx.compile("Say the last word.", base=tiny_program, examples=LAST_WORD, options=FEWSHOT)
    f = paw_mlx.function(art, base=tiny_program)
    for text in NEW:
        assert f._input_text(f.token_ids(text)).strip() == text
        assert f.call_ids([f.token_ids(text)]) == f.call_ids([f.token_ids(text)], texts=[text])


ODD_INPUTS = ["", "   ", "!!!", "日本語のテキスト", "<|im_end|> cat", "a\x00b\x1bc", "x" * 300,
              " ".join(f"w{i}" for i in range(60)), "ÄÖÜ straße", "\n\n\t"]


@pytest.mark.parametrize("text", ODD_INPUTS, ids=range(len(ODD_INPUTS)))
def test_odd_inputs_run_under_the_rule(tiny_program, text):
    """Empty, punctuation only, other scripts, a special token's text, control characters, one
    long word, many words: each call answers within the rule (or stops at its budget)."""
    art = paw_mlx.compile("Say the last word.", base=tiny_program, examples=LAST_WORD, options=FEWSHOT)
    done = paw_mlx.function(art, base=tiny_program, max_new_tokens=6).complete([text])[0]
    assert done.truncated or art.copy_rule.allows(text, done.text), done


def test_paw_inspect_shows_the_rule(tiny_program, tmp_path):
    paw_mlx.compile("Upper.", base=tiny_program, examples=rows([(w, w.upper()) for w in ["cat", "dog", "sun", "red"]]),
                    options=FEWSHOT, out_dir=tmp_path / "p")
    run = subprocess.run([sys.executable, "-m", "apps.cli", "inspect", str(tmp_path / "p")], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    assert "each output held to words of its own input in capitals (copy rule)" in " ".join(run.stdout.split())
