"""``paw serve`` on the real SmolLM2 as a user starts it: greedy answers equal ``paw run``'s.

Concurrent chat and text completions through the official client, and a compiled program
as a model, against the same prompts run one at a time through ``paw_mlx``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import openai
import pytest

import paw_mlx
from tests.apps.test_cli import ROOT

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Write one sentence about the sea.",
           "What is 12 times 13?"]
MAX = 16
SPEC = "Answer with the capital city of the country named in the text, and nothing else."


@pytest.fixture(scope="module")
def served(smollm2_program, tmp_path_factory):
    programs = tmp_path_factory.mktemp("smollm2-programs")
    paw_mlx.compile(SPEC, base=smollm2_program, out_dir=programs / "capital", max_new_tokens=8)
    server = subprocess.Popen([sys.executable, "-m", "apps.cli", "serve", str(smollm2_program), "--programs",
                               str(programs), "--port", "0", "--log-level", "warning"], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = None, time.monotonic() + 300
        while url is None and time.monotonic() < deadline:
            line = server.stderr.readline()
            assert line or server.poll() is None, "paw serve exited"
            found = re.search(r"listening on (http://\S+)/v1", line)
            url = found.group(1) if found else None
        yield url, programs / "capital"
    finally:
        server.terminate()
        server.wait(60)


def test_concurrent_greedy_answers_equal_paw_run(served, smollm2_program):
    url, program = served
    prog = paw_mlx.load(smollm2_program)
    want = []
    for prompt in PROMPTS:
        tokens = list(paw_mlx.stream_tokens(prog, paw_mlx.prompt_ids(prog, prompt), max_tokens=MAX))
        want.append(prog.tokenizer.decode_finished(tokens, skip_special_tokens=True))
    raw = list(paw_mlx.stream_tokens(prog, paw_mlx.prompt_ids(prog, PROMPTS[0], raw=True), max_tokens=MAX))
    want_raw = prog.tokenizer.decode_finished(raw, skip_special_tokens=True)
    want_program = paw_mlx.function(program, base=smollm2_program)("Japan")
    client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=300)
    got: dict = {}

    def chat(i: int) -> None:
        reply = client.chat.completions.create(model=smollm2_program.name, max_tokens=MAX,
                                               messages=[{"role": "user", "content": PROMPTS[i]}])
        got[i] = reply.choices[0].message.content

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    text = client.completions.create(model=smollm2_program.name, prompt=PROMPTS[0], max_tokens=MAX).choices[0].text
    answer = client.chat.completions.create(model="capital", messages=[{"role": "user", "content": "Japan"}])
    for t in threads:
        t.join(300)
    assert [got.get(i) for i in range(len(PROMPTS))] == want
    assert "Paris" in want[0]
    assert text == want_raw
    assert answer.choices[0].message.content == want_program
