"""Reasoning on fixed texts: detection from a template, think blocks (opened by the prompt or
not, closed or cut short), harmony's channels and calls, and streaming a character at a time
against reading the reply whole."""

from __future__ import annotations

import json

import pytest

from apps.serve.call_format import ToolCall
from apps.serve.harmony import HARMONY, HarmonyReader, parse_harmony
from apps.serve.reasoning import (
    HARMONY_REASONING,
    MISTRAL_THINK,
    THINK,
    ThinkSplitter,
    detect_reasoning,
    opens_in_prompt,
)
from apps.serve.reply import ReplyPlan, reply_message
from apps.serve.tool_calls import HERMES
from apps.serve.tools import ToolPlan

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
NAMES = frozenset({"get_weather"})
CALL = '{"city": "Paris"}'


@pytest.mark.parametrize("template, fmt", [
    ("{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
     "{{ message.content.split('</think>')[-1] }}", THINK),  # DeepSeek-R1's distills
    ("{%- if enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}", THINK),  # Qwen3
    ("[SYSTEM_PROMPT]Think in [THINK]...[/THINK] first[/SYSTEM_PROMPT]", MISTRAL_THINK),  # Magistral
    ("<|start|>assistant<|channel|>final<|message|>{{ content }}<|end|>", HARMONY_REASONING),  # gpt-oss
    ("<|im_start|>assistant\n{{ content }}<|im_end|>", None),  # a model that does not reason
])
def test_the_reasoning_markers_are_read_from_the_template(template, fmt):
    assert detect_reasoning(template) is fmt


def test_a_prompt_that_ends_inside_a_think_block_opens_the_reply():
    assert opens_in_prompt(THINK, "<|im_start|>assistant\n<think>\n")
    assert not opens_in_prompt(THINK, "<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3, thinking off
    assert not opens_in_prompt(THINK, "<|im_start|>assistant\n")


def split(fmt, text: str, opened: bool = False) -> tuple[str, str, list[tuple[str, str]]]:
    """(reasoning, answer, the pieces as they streamed) with the text coming a character at a time."""
    splitter = ThinkSplitter(fmt, opened)
    pieces = [splitter.add(ch) for ch in text] + [splitter.finish()]
    return ("".join(p.reasoning for p in pieces), "".join(p.content for p in pieces),
            [(p.reasoning, p.content) for p in pieces])


@pytest.mark.parametrize("fmt, text, opened, reasoning, answer", [
    (THINK, "<think>\nThe user greets me.\n</think>\n\nHello!", False, "The user greets me.", "Hello!"),
    (THINK, "  <think>a < b </thin> still\n\n</think>4", False, "a < b </thin> still", "4"),
    (THINK, "The prompt opened it.\n</think>\n\nHello!", True, "The prompt opened it.", "Hello!"),
    (THINK, "Cut short while thinking \n", True, "Cut short while thinking", ""),  # unterminated: all reasoning
    (THINK, "<think>\nCut short", False, "Cut short", ""),
    (THINK, "Hello! No <think> here.", False, "", "Hello! No <think> here."),  # a block only at the start
    (THINK, "<thi", False, "", "<thi"),  # a marker's start that never became one is text
    (MISTRAL_THINK, "[THINK]Two and two.[/THINK]4", False, "Two and two.", "4"),
])
def test_a_think_block_is_reasoning_and_the_rest_the_answer(fmt, text, opened, reasoning, answer):
    got_reasoning, got_answer, pieces = split(fmt, text, opened)
    assert (got_reasoning, got_answer) == (reasoning, answer)
    assert all(fmt.open not in r + c and fmt.close not in r + c for r, c in pieces if text.count(fmt.close))


def test_reasoning_streams_before_the_block_closes():
    _, _, pieces = split(THINK, "<think>\nStep one. Step two.\n</think>\nDone.")
    streamed = [r for r, _ in pieces if r]
    assert len(streamed) > 5 and "".join(streamed) == "Step one. Step two."  # as it came, not at the end


HARMONY_TEXT = ("<|channel|>analysis<|message|>The user asks 2+2.<|end|><|start|>assistant"
                "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant"
                "<|channel|>final<|message|>It is 4.<|return|>")
HARMONY_CALL = ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant"
                f"<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{CALL}<|call|>")


def harmony(text: str, tools=NAMES) -> tuple[list, list, list[ToolCall]]:
    """(reasoning pieces, answer pieces, calls) of ``text`` read a character at a time."""
    reader = HarmonyReader(tools)
    pieces = [reader.add(ch) for ch in text]
    rest, calls = reader.finish()
    pieces.append(rest)
    return [p.reasoning for p in pieces], [p.content for p in pieces], calls


def test_harmony_channels_split_into_reasoning_and_answer():
    reasoning, answer, calls = harmony(HARMONY_TEXT)
    assert "".join(reasoning) == "The user asks 2+2.\nEasy." and "".join(answer) == "It is 4." and not calls
    assert sum(1 for r in reasoning if r) > 5  # streamed as it came
    assert not any("<|" in piece for piece in reasoning + answer)


def test_a_harmony_call_is_a_call_and_its_analysis_reasoning():
    reasoning, answer, calls = harmony(HARMONY_CALL)
    assert "".join(reasoning) == "Need the weather." and "".join(answer) == ""
    assert calls == [ToolCall("get_weather", {"city": "Paris"})]
    # the recipient before the channel, as gpt-oss's template writes earlier calls
    _, _, calls = harmony(f"<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{CALL}")
    assert calls == [ToolCall("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize("text, answer", [
    (f"<|channel|>commentary to=functions.rm_rf <|constrain|>json<|message|>{CALL}<|call|>", CALL),  # not offered
    ("<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{city<|call|>", "{city"),
    ('{"answer": 4}', '{"answer": 4}'),  # no header: an output constraint shaped it; all answer
    ("<|channel|>final", ""),  # a header cut short: nothing to show
    ("<|channel|>final<|message|>Hi<|end|> and more", "Hi and more"),  # text after a message is kept
])
def test_what_is_not_a_harmony_call_is_answer(text, answer):
    reasoning, pieces, calls = harmony(text)
    assert "".join(pieces) == answer and not calls and not "".join(reasoning)
    assert parse_harmony(text, NAMES) == (answer, [])


def plan(reasoning, tools: ToolPlan | None = None, opened: bool = False) -> ReplyPlan:
    return ReplyPlan(tools, reasoning, opened)


def stream(reply_plan: ReplyPlan, text: str) -> tuple[str, str, list[dict]]:
    reader = reply_plan.reader()
    pieces = [reader.add(ch) for ch in text]
    rest, calls = reader.finish()
    pieces.append(rest)
    return "".join(p.reasoning for p in pieces), "".join(p.content for p in pieces), calls


@pytest.mark.parametrize("reply_plan, text", [
    (plan(THINK, opened=True), "Hmm.\n</think>\n\nHello!"),
    (plan(THINK, ToolPlan(HERMES, TOOLS, NAMES, True, {})),
     f'<think>\nCall it.\n</think>\n\n<tool_call>\n{{"name": "get_weather", "arguments": {CALL}}}\n</tool_call>'),
    (plan(HARMONY_REASONING, ToolPlan(HARMONY, TOOLS, NAMES, True, {})), HARMONY_CALL),
    (plan(HARMONY_REASONING), HARMONY_TEXT),
])
def test_a_streamed_reply_says_what_the_whole_one_says(reply_plan, text):
    message, called = reply_message(reply_plan, text)
    reasoning, content, calls = stream(reply_plan, text)
    assert reasoning == message["reasoning_content"] and reasoning
    assert (content.strip() or None) == (message["content"] or None)
    assert [json.loads(c["function"]["arguments"]) for c in calls] == \
        [json.loads(c["function"]["arguments"]) for c in message.get("tool_calls", [])]
    assert called == bool(calls)
    if called:
        assert message["content"] is None and calls[0]["function"]["name"] == "get_weather"


def test_a_model_without_reasoning_markers_has_no_reasoning_field():
    message, _ = reply_message(plan(None), "<think>x</think>y")
    assert message == {"role": "assistant", "content": "<think>x</think>y", "refusal": None}
