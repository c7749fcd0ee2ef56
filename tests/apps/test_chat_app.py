"""The chat app, driven by Textual's Pilot on a real (tiny, random) exported Llama."""

from __future__ import annotations

import json
import time

import pytest

import paw_mlx.chat
from apps.chat import commands
from apps.chat.app import ChatApp, run_chat
from apps.chat.widgets import AssistantMessage, Notice, PromptInput, StatusBar, UserMessage
from interp.errors import PawError

MODEL_NAME = "tiny-random-llama"


@pytest.fixture(scope="module")
def prog(mlx_thread, tiny_program):
    return mlx_thread.load(tiny_program)


@pytest.fixture
def make_app(prog, mlx_thread):
    def make(**opts) -> ChatApp:
        opts.setdefault("max_tokens", 8)
        return ChatApp(prog, mlx_thread, model_name=MODEL_NAME, **opts)

    return make


async def submit(app, pilot, text: str) -> None:
    """Put ``text`` in the prompt, press Enter and wait until the app is idle again."""
    app.query_one(PromptInput).text = text
    await pilot.press("enter")
    await settle(app, pilot)


async def settle(app, pilot) -> None:
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()


def notices(app) -> list[str]:
    return [w.text for w in app.query(Notice)]


def errors(app) -> list[str]:
    return [w.text for w in app.query(Notice) if w.has_class("error")]


def status_text(app) -> str:
    return app.query_one(StatusBar).plain


@pytest.mark.anyio
async def test_typing_and_sending_streams_a_reply(make_app, monkeypatch):
    pieces: list[str] = []
    write = AssistantMessage.write

    async def recording_write(self, piece):
        pieces.append(piece)
        await write(self, piece)

    monkeypatch.setattr(AssistantMessage, "write", recording_write)
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        assert "– tok/s" in status_text(app) and "ctx 0/512" in status_text(app)
        await pilot.press(*"Hello", "ctrl+j", *"there")
        assert app.query_one(PromptInput).text == "Hello\nthere"
        await pilot.press("enter")
        await settle(app, pilot)
        assert app.query_one(PromptInput).text == ""
        assert [w.text for w in app.query(UserMessage)] == ["Hello\nthere"]
        reply = app.query_one(AssistantMessage)
        assert len(pieces) > 1 and "".join(pieces) == reply.text  # streamed piece by piece
        assert app.session.messages == [{"role": "user", "content": "Hello\nthere"},
                                        {"role": "assistant", "content": reply.text}]
        assert app.session.generated == 8
        status = status_text(app)
        assert MODEL_NAME in status and "– tok/s" not in status and "TTFT – ms" not in status
        assert f"ctx {app.session.context_used}/512" in status and app.session.context_used > 8

        # The second turn reuses the cache: only the new turn is prefilled.
        await submit(app, pilot, "How are you?")
        assert len(app.query(AssistantMessage)) == 2
        tok = app.session.prog.tokenizer
        first = tok.encode_chat(app.session.conversation()[:1])
        full = tok.encode_chat(app.session.conversation()[:-1])
        assert 0 < app.session.prefilled <= len(full) - len(first)
        assert not errors(app)


@pytest.mark.anyio
async def test_escape_stops_the_reply_and_keeps_what_was_written(make_app, prog, monkeypatch):
    real = paw_mlx.chat.stream_tokens

    def slow_stream_tokens(*args, **kwargs):  # a real model, slowed so Esc lands mid-reply
        for token in real(*args, **kwargs):
            time.sleep(0.02)
            yield token

    monkeypatch.setattr(paw_mlx.chat, "stream_tokens", slow_stream_tokens)
    # The random model may end early: no token ends this reply.
    monkeypatch.setattr(type(prog), "eos_token_ids", property(lambda self: set()))
    app = make_app(max_tokens=200)
    async with app.run_test(size=(80, 24)) as pilot:
        app.query_one(PromptInput).text = "Tell me a long story."
        await pilot.press("enter")
        for _ in range(500):
            await pilot.pause(0.01)
            if app.query(AssistantMessage) and app.query_one(AssistantMessage).text:
                break
        assert app.generating
        await pilot.press("escape")
        await settle(app, pilot)
        assert not app.generating
        assert 0 < app.session.generated < 200
        reply = app.query_one(AssistantMessage).text
        assert reply and app.session.messages[-1] == {"role": "assistant", "content": reply}
        assert f"stopped after {app.session.generated} tokens" in notices(app)


@pytest.mark.anyio
async def test_input_while_generating_is_refused_not_lost(make_app, prog, monkeypatch):
    real = paw_mlx.chat.stream_tokens

    def slow_stream_tokens(*args, **kwargs):
        for token in real(*args, **kwargs):
            time.sleep(0.02)
            yield token

    monkeypatch.setattr(paw_mlx.chat, "stream_tokens", slow_stream_tokens)
    # The random model may end early: no token ends this reply.
    monkeypatch.setattr(type(prog), "eos_token_ids", property(lambda self: set()))
    app = make_app(max_tokens=100)
    async with app.run_test(size=(80, 24)) as pilot:
        app.query_one(PromptInput).text = "first"
        await pilot.press("enter")
        await pilot.pause(0.05)
        app.query_one(PromptInput).text = "second"
        await pilot.press("enter")
        assert app.query_one(PromptInput).text == "second"  # kept for later
        assert any("busy" in e for e in errors(app))
        await pilot.press("escape")
        await settle(app, pilot)
        assert [m["content"] for m in app.session.messages if m["role"] == "user"] == ["first"]


@pytest.mark.anyio
async def test_slash_commands(make_app, tmp_path, prog, tiny_program):
    app = make_app(max_tokens=4)
    async with app.run_test(size=(80, 24)) as pilot:
        await submit(app, pilot, "/help")
        assert all(f"/{name}" in notices(app)[-1] for name in commands.COMMANDS)

        await submit(app, pilot, "/system Be brief.")
        assert app.session.system == "Be brief."
        await submit(app, pilot, "/system")
        assert notices(app)[-1] == "system message: Be brief."

        await submit(app, pilot, "/temp 0.5")
        assert app.session.temperature == 0.5
        await submit(app, pilot, "/temp hot")
        assert errors(app)[-1] == "error: /temp needs a number, not 'hot'"
        await submit(app, pilot, "/temp 0")
        await submit(app, pilot, "/max-tokens 3")
        assert app.session.max_tokens == 3
        await submit(app, pilot, "/max-tokens 0")
        assert errors(app)[-1] == "error: /max-tokens needs a positive number"

        await submit(app, pilot, "Hello")
        assert app.session.generated == 3
        saved = tmp_path / "chat.json"
        await submit(app, pilot, f"/save {saved}")
        assert json.loads(saved.read_text())["messages"] == app.session.messages
        before = list(app.session.messages)

        await submit(app, pilot, "/clear")
        assert app.session.messages == [] and not app.query(UserMessage)
        assert app.session.system == "Be brief."

        await submit(app, pilot, f"/load {saved}")
        assert app.session.messages == before
        assert [w.text for w in app.query(UserMessage)] == ["Hello"]
        assert len(app.query(AssistantMessage)) == 1
        await submit(app, pilot, f"/load {tmp_path / 'missing.json'}")
        assert errors(app)[-1].startswith("error: no such file")
        (tmp_path / "bad.json").write_text("{not json")
        await submit(app, pilot, f"/load {tmp_path / 'bad.json'}")
        assert "is not a JSON conversation" in errors(app)[-1]
        for content in ('{"messages": [], "version": "2"}', "null", "[" * 50_000, "1" * 5000):  # crashed the app
            (tmp_path / "bad.json").write_text(content)
            await submit(app, pilot, f"/load {tmp_path / 'bad.json'}")
            assert errors(app)[-1].startswith("error: ")
        assert app.session.messages == before  # a bad file changes nothing

        paw_mlx.compile("Answer in French.", base=tiny_program, out_dir=tmp_path / "french", max_new_tokens=3)
        await submit(app, pilot, f"/program {tmp_path / 'french'}")
        await settle(app, pilot)
        assert app.program_name == "french" and "french" in status_text(app)
        assert "each message is one call" in notices(app)[-1]
        foreign = tmp_path / "foreign"
        paw_mlx.compile("x", base=tiny_program, out_dir=foreign)
        meta = json.loads((foreign / "program.json").read_text())
        meta["base"]["fingerprint"] = "feedface"
        (foreign / "program.json").write_text(json.dumps(meta))
        await submit(app, pilot, f"/program {foreign}")
        await settle(app, pilot)
        assert "compiled for base model feedface" in errors(app)[-1] and app.program_name == "french"

        await submit(app, pilot, "Bonjour")
        assert app.session.messages[-2] == {"role": "user", "content": "Bonjour"}
        assert app.session.messages[-1]["content"] == paw_mlx.function(tmp_path / "french")("Bonjour")
        await submit(app, pilot, "/program -")
        assert app.session.program is None and app.program_name is None

        await submit(app, pilot, f"/model {tmp_path / 'nowhere'}")
        assert errors(app)[-1].startswith("error: ") and app.session.prog is prog
        await submit(app, pilot, f"/model {tiny_program}")
        assert app.session.prog is not prog and app.model_name == "tiny-random-llama"
        assert app.session.messages[-2]["content"] == "Bonjour"  # the conversation carries over
        await submit(app, pilot, "Encore")
        assert app.session.messages[-1]["role"] == "assistant"

        await submit(app, pilot, "/system -")
        assert app.session.system is None
        await submit(app, pilot, "/frobnicate")
        assert errors(app)[-1] == "error: unknown command /frobnicate; /help lists the commands"
        await submit(app, pilot, "//not a command")
        assert app.session.messages[-2] == {"role": "user", "content": "/not a command"}


@pytest.mark.anyio
async def test_ctrl_c_twice_quits(make_app, monkeypatch):
    app = make_app()
    exits = []
    monkeypatch.setattr(app, "exit", lambda *a, **k: exits.append(1))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+c")
        assert exits == [] and any("Ctrl+C again" in str(n.message) for n in app._notifications)
        await pilot.press("ctrl+c")
        assert exits == [1]


def test_missing_default_model_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PAW_CACHE", str(tmp_path))
    with pytest.raises(PawError, match=r"paw export llama smollm2 -o .*programs/smollm2"):
        run_chat(None)


def test_cli_chat_without_default_model_exits_1(monkeypatch, tmp_path, capsys):
    from apps.cli import main

    monkeypatch.setenv("PAW_CACHE", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["paw", "chat"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("paw: error: the default model's program is missing at ")
    assert f"paw export llama smollm2 -o {tmp_path / 'programs' / 'smollm2'}" in err[0]


async def steady_cursor(pilot) -> None:
    """The prompt's cursor drawn and not blinking: a blink before the picture is taken (a loaded
    machine is slow to take it) would change the picture."""
    pilot.app.query_one(PromptInput).cursor_blink = False


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_main_screen_snapshot(make_app, snap_compare, size):
    assert snap_compare(make_app(), terminal_size=size, run_before=steady_cursor)


def test_help_snapshot(make_app, snap_compare):
    assert snap_compare(make_app(), terminal_size=(80, 24), press=[*"/help", "enter"], run_before=steady_cursor)


@pytest.fixture
def anyio_backend():
    return "asyncio"
