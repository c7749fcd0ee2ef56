"""``paw chat`` with reasoning models: the reasoning in its own folding widget above the answer,
no markers anywhere, and what later turns (and the KV cache) keep of it.

A tiny random model whose tokenizer has the think and harmony markers as special tokens, under
three small templates written here: Qwen3's structure (the model opens ``<think>`` itself; past
reasoning dropped; ``enable_thinking``), DeepSeek-R1's (the generation prompt opens the block)
and gpt-oss's harmony (which refuses channel markers in a message's content, as gpt-oss's does).
A scripted generation writes the replies: the model is fed the scripted tokens, so the cache
holds exactly what a model that wrote them would hold.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from textual.widgets._collapsible import CollapsibleTitle

import paw_mlx
import paw_mlx.chat
from apps.chat.app import ChatApp
from apps.chat.widgets import AssistantMessage, Notice, PromptInput, ReasoningMessage, UserMessage
from paw_mlx.chat import ChatSession
from tests.apps.test_chat_app import errors, notices, settle, submit

MARKERS = ["<think>", "</think>", "<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>"]
#: Qwen3's structure, shortened: earlier turns lose their reasoning; enable_thinking=False closes an empty block
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and loop.last and m.reasoning_content %}<think>\n{{ m.reasoning_content }}\n"
    "</think>\n\n{% endif %}{{ m.content.split('</think>')[-1] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
#: DeepSeek-R1's distills' structure, shortened: the generation prompt opens the think block
OPENED_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.split('</think>')[-1] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
#: gpt-oss's structure, shortened, with its refusal of channel markers in a message's content
HARMONY_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'assistant' %}"
    "{% if '<|channel|>' in m.content %}{{ raise_exception('pass analysis messages in the thinking field') }}"
    "{% endif %}<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>"
    "{% else %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
TEMPLATES = {"qwen3": QWEN3_TEMPLATE, "opened": OPENED_TEMPLATE, "harmony": HARMONY_TEMPLATE}
HARMONY_REPLY = "<|channel|>analysis<|message|>Two and two.<|end|><|start|>assistant<|channel|>final<|message|>Four."


@pytest.fixture(scope="module")
def reasoning_programs(tmp_path_factory) -> dict[str, Path]:
    """One tiny model, its tokenizer with the markers as special tokens, under each template."""
    from tests.tiny import export_tiny, make_tokenizer, tiny_llama_config

    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": MARKERS})
    root = tmp_path_factory.mktemp("chat-reasoning")
    base = export_tiny(tiny_llama_config(vocab_size=400, max_position_embeddings=1024), root / "base",
                       tokenizer=tokenizer)
    programs = {}
    for name, template in TEMPLATES.items():
        programs[name] = root / name
        programs[name].mkdir()
        for path in base.iterdir():
            if path.name != "chat_template.jinja":
                (programs[name] / path.name).symlink_to(path)
        (programs[name] / "chat_template.jinja").write_text(template, encoding="utf-8")
    return programs


@pytest.fixture(scope="module")
def progs(reasoning_programs, mlx_thread):
    return {name: mlx_thread.load(path) for name, path in reasoning_programs.items()}


@pytest.fixture
def script(monkeypatch):
    """``script(text, ...)``: the next replies are these texts' tokens, one text per turn (None: the
    model's own reply), fed to the model as it would have fed them; ``pause``: seconds per token."""
    real = paw_mlx.chat.stream_tokens
    replies: list[str | None] = []
    delay = [0.0]

    def stream_tokens(prog, ids, *, max_tokens, cache, stop=None, **options):
        text = replies.pop(0) if replies else None
        if text is None:
            yield from real(prog, ids, max_tokens=max_tokens, cache=cache, stop=stop, **options)
            return
        tokens = prog.tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
        for _ in real(prog, ids + tokens, max_tokens=1, cache=cache, **options):
            pass  # the prompt and the reply prefilled: the cache a model that wrote them would hold
        for token in tokens:
            if stop is not None and stop.is_set():
                return
            time.sleep(delay[0])
            yield token

    monkeypatch.setattr(paw_mlx.chat, "stream_tokens", stream_tokens)

    def set_script(*texts: str | None, pause: float = 0.0) -> None:
        replies.extend(texts)
        delay[0] = pause

    return set_script


def chat_app(progs, mlx_thread, name: str, **opts) -> ChatApp:
    opts.setdefault("max_tokens", 64)
    return ChatApp(progs[name], mlx_thread, model_name=name, **opts)


def screen_text(app) -> str:
    """The texts of everything the conversation shows."""
    return "\n".join(w.text for w in app.conversation_view.children if hasattr(w, "text"))


def shown(app) -> list[type]:
    return [type(w) for w in app.conversation_view.children if not isinstance(w, Notice)]


@pytest.mark.anyio
async def test_reasoning_streams_above_the_answer_and_folds_when_it_starts(progs, mlx_thread, script, monkeypatch):
    seen = []  # (collapsed, the answer so far) at each piece of reasoning
    write = ReasoningMessage.write

    def recording_write(self, piece):
        seen.append((self.collapsed, app.query_one(AssistantMessage).text))
        write(self, piece)

    monkeypatch.setattr(ReasoningMessage, "write", recording_write)
    script("<think>\nThe user greets me politely.\n</think>\n\nHello there!")
    app = chat_app(progs, mlx_thread, "qwen3")
    async with app.run_test(size=(80, 24)) as pilot:
        await submit(app, pilot, "Hi")
        reasoning, answer = app.query_one(ReasoningMessage), app.query_one(AssistantMessage)
        assert shown(app) == [UserMessage, ReasoningMessage, AssistantMessage]
        assert len(seen) > 1 and all(state == (False, "") for state in seen)  # open and streaming, no answer yet
        assert reasoning.text == "The user greets me politely." and answer.text == "Hello there!"
        assert reasoning.collapsed and reasoning.title == "Thinking (5 words)"
        assert not any(marker in screen_text(app) for marker in MARKERS)
        assert app.session.messages[-1] == {"role": "assistant", "content": "Hello there!",
                                            "reasoning_content": "The user greets me politely."}
        await pilot.click(CollapsibleTitle)
        assert not reasoning.collapsed  # the user opens it again
        app.query_one(PromptInput).focus()  # the click focused the title

        await submit(app, pilot, "/reasoning hide")
        assert reasoning.styles.display == "none" and answer.styles.display == "block"
        await submit(app, pilot, "/reasoning show")
        assert reasoning.styles.display == "block"
        await submit(app, pilot, "/reasoning maybe")
        assert errors(app)[-1] == "error: /reasoning takes show or hide, not 'maybe'"


@pytest.mark.anyio
async def test_reasoning_opened_while_the_answer_streams_stays_open(progs, mlx_thread, script):
    script("<think>\nShort.\n</think>\n\nA rather long answer that takes its time to arrive.", pause=0.05)
    app = chat_app(progs, mlx_thread, "qwen3")
    async with app.run_test(size=(80, 24)) as pilot:
        app.query_one(PromptInput).text = "Hi"
        await pilot.press("enter")
        for _ in range(500):
            await pilot.pause(0.01)
            if app.query(AssistantMessage) and app.query_one(AssistantMessage).text:
                break
        assert app.generating and app.query_one(ReasoningMessage).collapsed
        await pilot.click(CollapsibleTitle)
        await settle(app, pilot)
        assert not app.query_one(ReasoningMessage).collapsed  # neither the next pieces nor the end fold it
        assert app.query_one(AssistantMessage).text.endswith("to arrive.")


def test_a_later_turn_reuses_the_cache_up_to_the_turn_the_template_rewrote(progs, mlx_thread, script):
    """Qwen3's template drops the first reply's reasoning from the second turn's prompt: the cache
    is cut back to where the two renderings part, and the second reply is a fresh session's."""
    script("<think>\nGreeting.\n</think>\n\nHello!")

    def two_turns(session: ChatSession) -> tuple[list[int], str]:
        "".join(session.send("Hi"))
        first = list(session.cached_ids)
        session.split_reply("Hello!", "Greeting.")  # as the app records it
        session.max_tokens = 8
        return first, "".join(session.send("And you?"))  # the model's own reply

    session = ChatSession(progs["qwen3"], max_tokens=64)
    first, second = mlx_thread.call(two_turns, session)
    decode = session.prog.tokenizer.decode
    assert "Greeting." in decode(first) and "Greeting." not in decode(session.prompt)
    shared = next(i for i, (a, b) in enumerate(zip(first, session.prompt, strict=False)) if a != b)
    assert session.prompt_tokens - session.prefilled == shared > 0  # reused exactly what still matches

    fresh = ChatSession(progs["qwen3"], max_tokens=8)
    fresh.messages = session.messages[:2]
    assert mlx_thread.call(lambda: "".join(fresh.send("And you?"))) == second and second
    assert fresh.prompt == session.prompt and fresh.prefilled == fresh.prompt_tokens


@pytest.mark.anyio
async def test_a_model_without_reasoning_markers_shows_its_reply_as_generated(prog, mlx_thread, script):
    script("<think>not markers here</think> Plain.")
    app = ChatApp(prog, mlx_thread, model_name="plain", max_tokens=64)
    async with app.run_test(size=(80, 24)) as pilot:
        await submit(app, pilot, "Hi")
        assert shown(app) == [UserMessage, AssistantMessage] and not notices(app)[1:]
        assert app.query_one(AssistantMessage).text == "<think>not markers here</think> Plain."
        assert app.session.messages[-1] == {"role": "assistant", "content": "<think>not markers here</think> Plain."}


@pytest.mark.anyio
async def test_a_reply_cut_short_while_thinking_keeps_its_reasoning_in_view(progs, mlx_thread, script):
    thought = "Let me count the words of this very long thought"
    script(thought, "Still thinking about it and more", pause=0.05)
    app = chat_app(progs, mlx_thread, "opened", max_tokens=6)
    async with app.run_test(size=(80, 24)) as pilot:
        await submit(app, pilot, "Hi")  # the prompt opened <think>: all of it is reasoning
        reasoning = app.query_one(ReasoningMessage)
        assert reasoning.text and thought.startswith(reasoning.text) and not reasoning.collapsed
        assert shown(app) == [UserMessage, ReasoningMessage]  # no empty answer
        assert notices(app)[-1] == ("no answer: the reply reached its limit of 6 tokens while the model was "
                                    "thinking (/max-tokens)")
        assert app.session.messages[-1] == {"role": "assistant", "content": "", "reasoning_content": reasoning.text}

        await submit(app, pilot, "/max-tokens 200")
        app.query_one(PromptInput).text = "Go on"
        await pilot.press("enter")
        for _ in range(500):
            await pilot.pause(0.01)
            if len(app.query(ReasoningMessage)) == 2 and app.query(ReasoningMessage)[1].text:
                break
        await pilot.press("escape")
        await settle(app, pilot)
        second = app.query(ReasoningMessage)[1]
        assert second.text and not second.collapsed and not app.query(AssistantMessage)
        assert notices(app)[-2:] == [f"stopped after {app.session.generated} tokens",
                                     "no answer: stopped while the model was thinking"]


@pytest.mark.anyio
async def test_harmony_channels_split_and_the_next_turn_gets_no_markers(progs, mlx_thread, script):
    script(HARMONY_REPLY, "<|channel|>final<|message|>Five.", "<|channel|>analysis<|message|>No idea.<|end|>")
    app = chat_app(progs, mlx_thread, "harmony")
    async with app.run_test(size=(80, 24)) as pilot:
        await submit(app, pilot, "Two and two?")
        assert app.query_one(ReasoningMessage).text == "Two and two." and app.query_one(ReasoningMessage).collapsed
        assert app.query_one(AssistantMessage).text == "Four."
        await submit(app, pilot, "And two more?")  # gpt-oss's template refuses markers in a past reply
        assert not errors(app)
        assert [w.text for w in app.query(AssistantMessage)] == ["Four.", "Five."]
        assert len(app.query(ReasoningMessage)) == 1  # a reply without analysis has no reasoning widget
        assert not any(marker in screen_text(app) for marker in MARKERS)
        await submit(app, pilot, "And then?")  # the analysis ends, and the reply with it
        assert notices(app)[-1] == "no answer: the model ended its reply after the reasoning"
        assert app.session.messages[-1] == {"role": "assistant", "content": "", "reasoning_content": "No idea."}


@pytest.mark.anyio
async def test_think_switch_and_saved_reasoning(progs, prog, mlx_thread, script, tmp_path):
    script("<think>\nHmm.\n</think>\n\nYes.", "Sure.")
    app = chat_app(progs, mlx_thread, "qwen3")
    async with app.run_test(size=(80, 24)) as pilot:
        await submit(app, pilot, "Really?")
        await submit(app, pilot, "/think off")
        assert app.session.template_variables == {"enable_thinking": False}
        await submit(app, pilot, "Quick answer")
        assert app.session.prog.tokenizer.decode(app.session.prompt).endswith("<think>\n\n</think>\n\n")
        assert app.session.messages[-1] == {"role": "assistant", "content": "Sure."}
        assert len(app.query(ReasoningMessage)) == 1
        await submit(app, pilot, "/think maybe")
        assert errors(app)[-1] == "error: /think takes on or off, not 'maybe'"

        saved = tmp_path / "chat.json"
        await submit(app, pilot, f"/save {saved}")
        assert json.loads(saved.read_text())["messages"][1]["reasoning_content"] == "Hmm."
        await submit(app, pilot, "/clear")
        await submit(app, pilot, f"/load {saved}")
        assert shown(app) == [UserMessage, ReasoningMessage, AssistantMessage, UserMessage, AssistantMessage]
        assert app.query_one(ReasoningMessage).text == "Hmm." and app.query_one(ReasoningMessage).collapsed
        data = json.loads(saved.read_text())
        data["messages"][0]["reasoning_content"] = "a user does not reason"
        saved.write_text(json.dumps(data))
        await submit(app, pilot, f"/load {saved}")
        assert "'reasoning_content' must be the text of an assistant's reasoning" in errors(app)[-1]

    plain = ChatApp(prog, mlx_thread, model_name="plain")
    async with plain.run_test(size=(80, 24)) as pilot:
        await submit(plain, pilot, "/think off")
        assert "has no enable_thinking switch" in errors(plain)[-1] and not plain.session.template_variables


@pytest.fixture(scope="module")
def prog(mlx_thread, tiny_program):
    return mlx_thread.load(tiny_program)


@pytest.fixture
def anyio_backend():
    return "asyncio"
