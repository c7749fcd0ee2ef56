"""The tokenizer wrapper: what it adds to the ``tokenizers`` library."""

from __future__ import annotations

import threading
import time

from tokenizers import Tokenizer as HFTokenizer

from interp.tokenizer import Tokenizer


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
