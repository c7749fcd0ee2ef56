"""Compile a natural-language spec into a program: the KV prefix of the spec on a base model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx

from interp.atomic import check_not_reading, check_writable
from interp.errors import ArtifactError, PawError
from interp.paths import DEFAULT_MODEL
from interp.tokenizer import Tokenizer
from paw_mlx.programs.artifact import (
    GenerationSettings,
    ProgramArtifact,
    PromptLayout,
    write_artifact,
)
from paw_mlx.programs.examples import read_task_file
from paw_mlx.programs.interpreter import interpreter, resolve_base
from paw_mlx.runtime import LoadedProgram

if TYPE_CHECKING:
    from paw_mlx.programs.select import SelectOptions

#: progress(description, done, total) of a compile with examples
Progress = Callable[[str, int, int], None]

_INPUT_MARK = "\u2063PAW-INPUT\u2063"  # invisible separator: never in a real spec or input
#: a call's default output budget in tokens, raised to fit the examples' longest output
DEFAULT_MAX_NEW_TOKENS = 64
#: tokens of budget beyond the longest example output (a model may write a little more)
OUTPUT_MARGIN = 8
RAW_PREFIX_SEP = "\n\nInput: "
RAW_SUFFIX = "\nOutput:"
#: what ``choose_leads`` puts before inputs and outputs where it saves tokens
LEAD = " "


def choose_leads(tokenizer: Tokenizer, rows: Sequence[dict]) -> tuple[str, str]:
    """The (input, output) leads of a program compiled from ``rows``: a space before every input
    (and every output) where the rows' inputs (outputs) take fewer tokens with it than without.

    A chat turn starts a line, and at a line's start a byte-level BPE tokenizer spells a word
    without the space it has everywhere in running text: for SmolLM2 ``Portugal`` is
    ``Port|ug|al`` and ``Lisbon`` ``L|is|bon``, where `` Portugal`` and `` Lisbon`` are single
    tokens, the ones the model knows the country and its capital by. With the space, a
    program's inputs and outputs are spelled as the model read them in training. Where the
    space changes nothing or would be a token of its own (digits split one per token; a
    tokenizer that already adds one), it is left out. Measured in docs/programs.md ("Leads").
    """
    def saves_tokens(texts: list[str]) -> bool:
        encode = tokenizer.encode
        return (sum(len(encode(LEAD + t, add_special_tokens=False)) for t in texts)
                < sum(len(encode(t, add_special_tokens=False)) for t in texts))

    if not rows:
        return "", ""
    return (LEAD if saves_tokens([r["input"] for r in rows]) else "",
            LEAD if saves_tokens([r["output"] for r in rows]) else "")


def prompt_layout(tokenizer: Tokenizer, spec: str, demos: Sequence[dict] = (),
                  leads: tuple[str, str] = ("", "")) -> PromptLayout:
    """Split the prompt around the input: the spec is the system message and each demo
    ({"input", "output"}) a user turn answered by an assistant turn, before the input's.

    ``leads`` (``choose_leads``) go before each input and output. A chat template that trims
    messages would drop them from the demonstrations, so there a lead it drops is not used."""
    input_lead, output_lead = leads
    if not tokenizer.has_chat_template:  # plain text: "Input: x\nOutput: y", the space before y always there
        shots = "".join(f"{RAW_PREFIX_SEP}{d['input']}{RAW_SUFFIX} {d['output']}" for d in demos)
        return PromptLayout("raw", spec + shots + RAW_PREFIX_SEP[: len(RAW_PREFIX_SEP) - len(input_lead)],
                            RAW_SUFFIX, input_lead, LEAD)
    if input_lead or output_lead:
        input_lead, output_lead = _kept_leads(tokenizer, spec, input_lead, output_lead)
    leads = input_lead, output_lead
    text = tokenizer.apply_chat_template(program_messages(spec, demos, leads)
                                         + [{"role": "user", "content": _INPUT_MARK}])
    if text.count(_INPUT_MARK) != 1:
        raise PawError("the base model's chat template does not place the user message once")
    before, after = text.split(_INPUT_MARK)
    return PromptLayout("chat", before, after, input_lead, output_lead)


def _kept_leads(tokenizer: Tokenizer, spec: str, input_lead: str, output_lead: str) -> tuple[str, str]:
    """The leads the chat template keeps in a demonstration's turns (one that trims drops them)."""
    marks = {"input": _INPUT_MARK + "i", "output": _INPUT_MARK + "o"}
    text = tokenizer.apply_chat_template(program_messages(spec, [marks], (input_lead, output_lead)),
                                         add_generation_prompt=False)
    return (input_lead if input_lead + marks["input"] in text else "",
            output_lead if output_lead + marks["output"] in text else "")


def program_messages(spec: str, demos: Sequence[dict], leads: tuple[str, str] = ("", "")) -> list[dict]:
    """The chat messages a chat-layout program's prefix renders: the spec as the system
    message, then each demonstration as a user turn answered by an assistant turn, each
    after its lead (``choose_leads``)."""
    input_lead, output_lead = leads
    messages = [{"role": "system", "content": spec}]
    for demo in demos:
        messages += [{"role": "user", "content": input_lead + demo["input"]},
                     {"role": "assistant", "content": output_lead + demo["output"]}]
    return messages


def demo_spans(tokenizer: Tokenizer, layout: PromptLayout, spec: str, demos: Sequence[dict]) -> list[tuple[int, int]]:
    """Token positions [start, end) of each demo's turns in the prefix ids of ``layout``.

    Training hides a row's own demo from it with these (so it cannot copy its answer).
    Found by tokenizing the prefix text up to each demo's end: chat turns begin with a
    special token, where tokenization of the whole text splits too.
    """
    if not demos:
        return []
    full = layout_prefix_ids(tokenizer, layout)
    leads = layout.input_lead, layout.output_lead
    ends = []
    for i in range(len(demos) + 1):
        if layout.kind == "chat":
            text = tokenizer.apply_chat_template(program_messages(spec, demos[:i], leads), add_generation_prompt=False)
        else:
            text = prompt_layout(tokenizer, spec, demos[:i], leads).prefix_text
            text = text[: text.rindex(RAW_PREFIX_SEP.rstrip(" "))]
        upto = len(tokenizer.encode(text, add_special_tokens=layout.kind == "raw"))
        ends.append(min(upto, len(full)))
    return [(ends[i], ends[i + 1]) for i in range(len(demos))]


def prefixes_without(tokenizer: Tokenizer, layout: PromptLayout, spec: str, demos: Sequence[dict]) -> list[list[int]]:
    """The prefix ids of ``spec`` with ``demos`` but demo i, for each i (the others in order and
    laid out as the kept prefix ``layout`` lays them out): what training on a base with recurrent
    state runs demo i's own row behind, since no key mask can hide it there (``train.py``)."""
    leads = layout.input_lead, layout.output_lead
    return [layout_prefix_ids(tokenizer, prompt_layout(tokenizer, spec, [*demos[:i], *demos[i + 1:]], leads))
            for i in range(len(demos))]


def layout_prefix_ids(tokenizer: Tokenizer, layout: PromptLayout) -> list[int]:
    # The chat template carries its own special tokens; raw prompts get the tokenizer's BOS.
    return tokenizer.encode(layout.prefix_text, add_special_tokens=layout.kind == "raw")


def input_ids(tokenizer: Tokenizer, layout: PromptLayout, text: str) -> list[int]:
    """The ids a call appends after the prefix: the input and the fixed suffix after it.

    A special token's text in the input (``<|im_end|>`` in a document or code) stays text,
    so an input cannot end its user turn and write the assistant's; such an input is
    encoded apart from the suffix, any other together with it, as it always was.
    """
    text = layout.input_lead + text
    if not tokenizer.holds_special_text(text):
        return tokenizer.encode(text + layout.suffix_text, add_special_tokens=False)
    return tokenizer.encode_literal(text) + tokenizer.encode(layout.suffix_text, add_special_tokens=False)


def compute_prefix(prog: LoadedProgram, ids: list[int]) -> list[tuple[mx.array, mx.array]]:
    """Run the base model over ``ids`` once and keep every attention layer's keys and values
    (a recurrent layer's state is not a prefix of positions: ``recurrent_prefix.py`` rebuilds it)."""
    if not ids:
        raise PawError("the program's prefix is empty")
    ids = prog.check_ids(ids, "prefix ids")
    if len(ids) >= prog.context_length:  # checked before the prefill, which grows with the square of the length
        raise PawError(f"the program's prefix (spec and demonstrations: {len(ids)} tokens) fills the base model's "
                       f"context of {prog.context_length}: shorten the spec")
    cache = prog.make_cache()
    with prog.lock:
        prog.model(mx.array([ids], dtype=mx.int32), cache=cache)
        states = [c.state for c in cache[: prog.program.num_layers]]  # the KV caches come first
        mx.eval(states)
    if not all(states):
        raise PawError(f"{prog.path}: a KV-cache layer is never written, so it has no prefix to keep")
    return [(mx.array(k), mx.array(v)) for k, v in states]


def read_spec(spec: str) -> str:
    """A spec given as text, or as @path to a text file."""
    if spec.startswith("@"):
        spec = read_task_file(spec[1:], "spec")
    spec = spec.strip()
    if not spec:
        raise PawError("the spec is empty")
    return spec


def load_rows(examples: Sequence[dict] | str | Path) -> tuple[list[dict], int]:
    """The examples (a JSON-lines path or rows), checked, with the training rows' repeats of an
    (input, output) pair dropped; and how many were dropped."""
    from paw_mlx.programs.examples import check_examples, distinct, load_examples

    rows = load_examples(examples) if isinstance(examples, str | Path) else check_examples(list(examples))
    train, repeated = distinct([r for r in rows if r.get("split", "train") == "train"])
    return train + [r for r in rows if r.get("split", "train") == "test"], repeated


def conflicting_inputs(rows: Sequence[dict]) -> int:
    """How many distinct inputs the rows give with more than one output (after stripping, as
    scoring compares): no program can match every one of those examples."""
    outputs: dict[str, set[str]] = {}
    for row in rows:
        outputs.setdefault(row["input"].strip(), set()).add(row["output"].strip())
    return sum(len(o) > 1 for o in outputs.values())


def longest_output(prog: LoadedProgram, rows: Sequence[dict]) -> int:
    """Tokens in the longest example output (0 without examples)."""
    return max((len(prog.tokenizer.encode_literal(r["output"])) for r in rows), default=0)


def output_budget(prog: LoadedProgram, rows: Sequence[dict], asked: int | None) -> int:
    """A call's output budget: ``asked``, else ``DEFAULT_MAX_NEW_TOKENS`` raised to fit the
    longest example output with a margin. An example longer than ``asked`` is an error:
    no call could write it."""
    longest = longest_output(prog, rows)
    if asked is None:
        return max(DEFAULT_MAX_NEW_TOKENS, longest + OUTPUT_MARGIN)
    if longest > asked:
        raise PawError(f"an example output is {longest} tokens, more than the output budget of {asked} "
                       "(--max-new-tokens): no call could write it")
    return asked


def _check_examples_fit(prog: LoadedProgram, spec: str, rows: Sequence[dict], leads: tuple[str, str]) -> None:
    """Every example must fit the base model's context after the spec's prefix, input and
    output and end-of-turn token together: else no program on this base could write its
    output (a call stops at the context's end), and as a demonstration it would not fit
    either. Checked before any training, so a compile does not spend minutes first."""
    tokenizer = prog.tokenizer
    layout = prompt_layout(tokenizer, spec, (), leads)
    start = len(layout_prefix_ids(tokenizer, layout))
    room = prog.context_length - start
    needs = [(len(input_ids(tokenizer, layout, row["input"]))
              + len(tokenizer.encode_literal(layout.output_lead + row["output"])) + 1, row["input"]) for row in rows]
    over = [(need, text) for need, text in needs if need > room]
    if over:
        need, text = max(over)
        raise PawError(f"{len(over)} of the {len(rows)} examples do not fit the base model's context of "
                       f"{prog.context_length} tokens after the spec's {start}: the longest (input {text!r:.40}) "
                       f"takes {need} with its output, so no call could write it")


def _check_outputs_fit(grammar, rows: Sequence[dict]) -> None:
    """Every example's output must be one the output constraint lets a call write: one it
    forbids could never be matched, and as a demonstration it teaches a forbidden form."""
    from paw_mlx.constrain import describe_returns

    bad = [r["output"] for r in rows if not grammar.matches(r["output"].strip())]
    if not bad:
        return
    hint = ""
    if "json_schema" in grammar.spec or "json_object" in grammar.spec:
        hint = " (constrained JSON is written as json.dumps writes it: ', ' and ': ' between items, no newlines)"
    raise PawError(f"{len(bad)} of the {len(rows)} example outputs cannot be written under the output constraint "
                   f"({describe_returns(grammar.spec)}), e.g. {bad[0]!r:.80}{hint}")


def compile(spec: str, base: str | Path = DEFAULT_MODEL, out_dir: str | Path | None = None, *,
            examples: Sequence[dict] | str | Path | None = None, max_new_tokens: int | None = None,
            force: bool = False, returns=None, options: SelectOptions | None = None,
            progress: Progress | None = None) -> ProgramArtifact:
    """Compile ``spec`` into a program for ``base``.

    Without ``examples``: the spec's own prefix. With examples (a JSON-lines path or rows
    of {"input", "output"}), the candidates of ``options`` (few-shot prefix, LoRA, ...) are
    scored by cross-validation inside the examples and the best is kept
    (``paw_mlx/programs/select.py``); its report is ``artifact.selection``. Rows marked
    ``"split": "test"`` are never used to build or choose: the kept program is scored on
    them at the end (``selection["test"]``). ``returns`` (choices, a regex or a JSON
    schema; ``paw_mlx.constrain``) is checked and stored with the program, so every call
    enforces it. ``max_new_tokens`` is a call's default output budget: 64 unless an
    example's output needs more. Writes the program to ``out_dir`` (atomically) when given.
    """
    from paw_mlx.programs.select import Builder, SelectOptions, select

    spec = read_spec(spec)
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise PawError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r:.40}")
    base_path = resolve_base(base)
    if out_dir is not None and Path(out_dir).exists() and not force:
        raise ArtifactError(f"{out_dir} already exists (use --force to replace it)")
    if out_dir is not None:
        check_writable(out_dir, ArtifactError, folder=True)
        check_not_reading(out_dir, [base_path, examples if isinstance(examples, (str, Path)) else None],
                          ArtifactError)
    note = None
    if examples is not None:
        options = options or SelectOptions()
        options.check()  # before the base model loads: a bad option is one line at once
        note = options.check_base(base_path)
    prog = interpreter(base_path)
    if not prog.fingerprint:
        raise PawError(f"the base model {base_path} has no fingerprint (no manifest.json), so a program "
                       "cannot record what it was made for: export the base with `paw export`")
    grammar = None
    if returns is not None:
        from paw_mlx.constrain import grammar_for

        grammar = grammar_for(prog, returns)  # checked against the tokenizer before any work
        returns = grammar.spec
    rows, repeated = load_rows(examples) if examples is not None else ([], 0)
    train = [r for r in rows if r.get("split", "train") == "train"]
    test = [r for r in rows if r.get("split", "train") == "test"]
    if examples is not None and not train:
        raise PawError("no training examples (every row is marked \"split\": \"test\")")
    leads = choose_leads(prog.tokenizer, train)
    if options is not None and not options.input_lead:
        leads = "", leads[1]
    _check_examples_fit(prog, spec, rows, leads)
    if grammar is not None:
        _check_outputs_fit(grammar, rows)
    max_new_tokens = output_budget(prog, rows, max_new_tokens)
    builder = Builder(prog, spec, str(base_path), GenerationSettings(max_new_tokens=max_new_tokens), returns, leads,
                      copy_rule=(options or SelectOptions()).copy_rule)
    if examples is None:
        artifact = builder.prompted([])
    else:
        artifact, info = select(prog, builder, train, options or SelectOptions(), progress)
        if repeated:
            info["repeated_examples_dropped"] = repeated
        if note:
            info["note"] = note
        if conflicting := conflicting_inputs(train):
            info["conflicting_inputs"] = conflicting
        led = [side for side, lead in (("inputs", artifact.layout.input_lead), ("outputs", artifact.layout.output_lead))
               if lead]
        if led:
            info["leads"] = led
        if artifact.copy_rule is not None:
            info["copy_rule"] = artifact.copy_rule.metadata()
        if test:
            outputs = builder.outputs(artifact, [r["input"] for r in test], max_new_tokens)
            correct = sum(o.strip() == r["output"].strip() for o, r in zip(outputs, test, strict=True))
            info["test"] = {"exact_match": round(correct / len(test), 4), "correct": correct, "total": len(test),
                            "outputs": outputs}
            trained_inputs = {r["input"].strip() for r in train}
            seen = sum(r["input"].strip() in trained_inputs for r in test)
            if seen:  # such a row's score is not held-out: its input is a demonstration in the prefix
                info["test"]["inputs_also_in_training"] = seen
    if out_dir is not None:
        write_artifact(artifact, out_dir, force=force)
    return artifact
