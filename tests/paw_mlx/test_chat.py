"""ChatSession: multi-turn chat that prefills only what the cache does not already hold."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

import paw_mlx
from interp.errors import ArtifactError, PawError
from paw_mlx.chat import ChatSession, read_conversation


@pytest.fixture(scope="module")
def prog(tiny_program):
    return paw_mlx.load(tiny_program)


def fresh_reply(prog, messages, max_tokens):
    """Greedy reply to the whole conversation with a new cache: the reference."""
    ids = prog.tokenizer.encode_chat(messages)
    tokens = list(paw_mlx.stream_tokens(prog, ids, max_tokens=max_tokens))
    return prog.tokenizer.decode_finished(tokens), len(ids)


def test_second_turn_prefills_only_new_tokens_and_matches_a_fresh_run(prog):
    session = ChatSession(prog, system="Be brief.", max_tokens=12)
    first_ids = prog.tokenizer.encode_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you today?"}])
    first = "".join(session.send("Hello, how are you today?"))
    assert session.prefilled == len(first_ids)  # an empty cache: everything is prefilled
    assert session.messages[-1] == {"role": "assistant", "content": first}
    assert 0 < session.context_used <= session.prefilled + session.generated

    second = "".join(session.send("The capital of France is Paris."))
    expected, full_len = fresh_reply(prog, session.conversation()[:-1], 12)
    assert second == expected
    # Only the new user turn (and the template around it) was prefilled.
    assert 0 < session.prefilled < full_len
    assert full_len - session.prefilled >= len(first_ids)


def test_cached_ids_describe_the_cache_after_every_turn(prog):
    session = ChatSession(prog, max_tokens=5)
    for text in ["Hello", "positive negative", "def f(x): return x + 1"]:
        "".join(session.send(text))
        assert session.cache[0].offset == len(session.cached_ids)
        rendered = prog.tokenizer.encode_chat(session.conversation(), add_generation_prompt=False)
        # What the cache holds is what the template renders, up to the last reply's tail.
        assert session.cached_ids[: len(session.cached_ids) - session.generated] == rendered[
            : len(session.cached_ids) - session.generated]


def test_eos_token_fed_into_the_cache_is_cut_off(tiny_program):
    prog = paw_mlx.load(tiny_program)
    session = ChatSession(prog, max_tokens=4)
    first_token = next(iter(paw_mlx.stream_tokens(prog, prog.tokenizer.encode_chat(
        [{"role": "user", "content": "Hello"}]), max_tokens=1)))
    prog.tokenizer.eos_token_ids = {first_token}  # the very first token now ends the reply
    reply = "".join(session.send("Hello"))
    assert reply == "" and session.generated == 0
    assert session.cache[0].offset == len(session.cached_ids)
    assert session.cached_ids == prog.tokenizer.encode_chat([{"role": "user", "content": "Hello"}])
    # The next turn still matches a fresh run.
    prog.tokenizer.eos_token_ids = set()
    second = "".join(session.send("Parse the options."))
    assert second == fresh_reply(prog, session.conversation()[:-1], 4)[0]


def test_stop_keeps_what_was_written(prog):
    stop = threading.Event()
    session = ChatSession(prog, max_tokens=50)
    pieces = []
    for piece in session.send("Hello", stop=stop):
        pieces.append(piece)
        stop.set()
    assert 0 < session.generated < 50
    assert session.messages[-1] == {"role": "assistant", "content": "".join(pieces)}
    assert session.cache[0].offset == len(session.cached_ids)


def test_closing_the_stream_early_records_the_partial_reply(prog):
    session = ChatSession(prog, max_tokens=30)
    stream = session.send("Hello")
    got = next(stream)
    stream.close()
    assert session.messages[-1]["role"] == "assistant"
    assert session.messages[-1]["content"].startswith(got)
    assert session.cache[0].offset == len(session.cached_ids)


def test_a_full_context_is_an_error_and_leaves_the_conversation_as_it_was(prog):
    session = ChatSession(prog)
    with pytest.raises(PawError, match="fills the model's context"):
        session.send("word " * prog.context_length)
    assert session.messages == []


def test_save_and_load_round_trip(prog, tmp_path):
    session = ChatSession(prog, system="You are terse.", max_tokens=3)
    "".join(session.send("Hello"))
    path = session.save(tmp_path / "chat.json")
    other = ChatSession(prog)
    other.load(path)
    assert other.system == "You are terse." and other.messages == session.messages
    assert json.loads(path.read_text())["fingerprint"] == prog.fingerprint


@pytest.mark.parametrize("content, message", [
    ("not json", "not a JSON conversation"),
    ('{"messages": 3}', "no 'messages' list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "needs a role"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}]}', "only come first"),
])
def test_bad_conversation_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PawError, match=message):
        read_conversation(path)
    with pytest.raises(PawError, match="no such file"):
        read_conversation(tmp_path / "missing.json")


def test_messages_go_to_the_compiled_program_itself(prog, tiny_program, tmp_path):
    paw_mlx.compile("Answer in one word.", base=tiny_program, out_dir=tmp_path / "oneword", max_new_tokens=6)
    session = ChatSession(prog, system="Be chatty.", max_tokens=20)
    assert session.use_program(tmp_path / "oneword") == "oneword"
    reply = "".join(session.send("Hello there"))
    want = paw_mlx.function(tmp_path / "oneword", max_new_tokens=6)("Hello there")
    assert reply == want  # the program's prefix and budget, not the spec re-sent as a system message
    assert session.messages == [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": want}]
    assert session.system == "Be chatty." and session.stats.prompt_tokens == session.prefilled  # only the input
    "".join(session.send("Hello there"))
    assert session.messages[-1]["content"] == want  # calls are independent
    session.drop_program()
    assert session.program is None and "".join(session.send("Hi")) is not None


def test_programs_for_another_base_are_refused(prog, tiny_program, tmp_path):
    other = tmp_path / "other"
    paw_mlx.compile("x", base=tiny_program, out_dir=other)
    meta = json.loads((other / "program.json").read_text())
    meta["base"]["fingerprint"] = "0123abcd"
    (other / "program.json").write_text(json.dumps(meta))
    session = ChatSession(prog)
    with pytest.raises(ArtifactError, match="no such program"):
        session.use_program(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match="compiled for base model 0123abcd"):
        session.use_program(other)
    assert session.program is None


def test_cache_dir_follows_paw_cache(monkeypatch, tmp_path):
    from interp.paths import cache_dir, default_program_dir

    monkeypatch.setenv("PAW_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    assert default_program_dir() == tmp_path / "programs" / "smollm2"
    monkeypatch.delenv("PAW_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "paw"
