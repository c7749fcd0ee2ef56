"""The tokenizer wrapper: what it adds to the ``tokenizers`` library."""

from __future__ import annotations

import threading
import time

import pytest
from tokenizers import Tokenizer as HFTokenizer

from interp.token_bytes import _byte_level_decoder
from interp.tokenizer import Tokenizer

# No test here reaches a device predicate (interp/device.py), checked by instrumenting them
# (docs/devices.md): the fake-Mac pass would run the same branches again, so it leaves them out.
pytestmark = pytest.mark.not_fake_mac_pass


def test_encoding_a_long_text_lets_other_threads_run(tiny_program):
    """`paw serve` tokenizes in worker threads: an encode that held the GIL froze every stream
    (measured in docs/reliability.md)."""
    tokenizer = Tokenizer(tiny_program)
    text = "hello " * 200_000
    ticks, done = 0, threading.Event()

    def tick() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            time.sleep(0.001)

    ticker = threading.Thread(target=tick)
    ticker.start()
    start = time.monotonic()
    ids = tokenizer.encode(text, add_special_tokens=False)
    elapsed = time.monotonic() - start
    done.set()
    ticker.join()
    assert ids == HFTokenizer.from_file(str(tiny_program / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert elapsed > 0.1 and ticks >= 20, (elapsed, ticks)  # holding the GIL, the ticker gets 1-3 turns


def test_the_character_u_fffd_and_invalid_bytes_stream_as_they_come(tiny_program):
    """`paw run` and `paw chat` print through the streaming detokenizer: a run of U+FFFD (three
    byte tokens each in the tiny tokenizer) or of invalid bytes is no half character, so it
    prints as it comes instead of being held to the next other character; a character split
    over tokens (an emoji is four) still prints once whole."""
    tokenizer = Tokenizer(tiny_program)
    letters = {byte: letter for letter, byte in _byte_level_decoder().items()}
    invalid = [tokenizer.token_to_id(letters[byte]) for byte in (0xFF, 0x80, 0xFE)]
    ids = (tokenizer.encode("ok " + "\ufffd" * 20, add_special_tokens=False) + invalid * 5
           + tokenizer.encode(" 日本 \U0001F600 end", add_special_tokens=False))
    detokenizer = tokenizer.detokenizer()
    pieces = [detokenizer.add_token(token) for token in ids]
    pieces.append(detokenizer.finalize())
    assert "".join(pieces) == tokenizer.decode(ids) == "ok " + "\ufffd" * 35 + " 日本 \U0001F600 end"
    assert max(piece.count("\ufffd") for piece in pieces) == 1  # each as it came, none held for the next
    assert sum(piece == "\ufffd" for piece in pieces) == 35 and "\U0001F600" in pieces


def test_a_detokenizer_skipping_special_tokens_streams_the_text_decode_skipping_them_gives(tiny_program):
    """A chat turn run by a program streams its call's output, which leaves special tokens out
    (paw_mlx/chat.py); by default they stream, as `paw run` prints them."""
    tokenizer = Tokenizer(tiny_program)
    ids = tokenizer.encode("one <|im_start|>two<|im_end|> three", add_special_tokens=False)
    for skip, want in ((True, "one two three"), (False, "one <|im_start|>two<|im_end|> three")):
        detokenizer = tokenizer.detokenizer(skip_special_tokens=skip)
        streamed = "".join(detokenizer.add_token(token) for token in ids) + detokenizer.finalize()
        assert streamed == tokenizer.decode(ids, skip_special_tokens=skip) == want


@pytest.mark.parametrize("name", ["chat_template.jinja", "tokenizer_config.json", "tokenizer.json"])
def test_a_tokenizer_file_that_is_a_folder_is_refused_not_skipped(tiny_program, tmp_path, name):
    """A chat_template.jinja (or tokenizer_config.json) that was a folder was skipped: the prompt went
    to the model without its chat template; a tokenizer.json folder made the program token-ids-only."""
    import shutil

    import paw_mlx
    from interp.errors import ProgramError

    copy = shutil.copytree(tiny_program, tmp_path / "prog")
    (copy / name).unlink()
    (copy / name).mkdir()
    with pytest.raises(ProgramError, match=f"{name} is not a file"):
        paw_mlx.prompt_ids(paw_mlx.load(copy), "hi")
