"""``paw serve`` and ``paw run``'s sampling options as a user runs them: real processes."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import openai

from tests.apps.test_cli import ROOT, assert_one_line_error, paw


def test_run_takes_every_sampling_control(tiny_program):
    done = paw("run", str(tiny_program), "-p", "Hello", "-n", "4", "--logit-bias", "40=100", "--logprobs", "2",
               "--repetition-penalty", "1.2", "--presence-penalty", "0.5", "--frequency-penalty", "0.5",
               "--min-p", "0.01", "--temperature", "0.7", "--seed", "3")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "FFFF\n"  # token 40 is "F", and +100 outweighs everything
    rows = [line for line in done.stderr.splitlines() if line.strip().startswith("'F'")]
    assert len(rows) == 4 and all("|" in row for row in rows)  # its log-probability and two alternatives
    assert_one_line_error(paw("run", str(tiny_program), "-p", "Hi", "--logit-bias", "forty"), "--logit-bias")
    assert_one_line_error(paw("run", str(tiny_program), "-p", "Hi", "--logit-bias", "99999=1"), "vocabulary")


def test_serve_refuses_what_it_cannot_serve(tmp_path):
    assert_one_line_error(paw("serve", str(tmp_path / "missing")), "missing")
    assert_one_line_error(paw("serve", "--programs", str(tmp_path / "nope"), str(tmp_path)), "prog.json")
    # an empty host (`--host "$UNSET"`) listened on every interface, not on this machine only
    assert_one_line_error(paw("serve", str(tmp_path / "missing"), "--host", " "), "--host is empty")


def test_serve_answers_an_openai_client_and_stops_on_sigterm(tiny_program):
    server = subprocess.Popen([sys.executable, "-m", "apps.cli", "serve", str(tiny_program), "--port", "0",
                               "--api-key", "k", "--log-level", "warning"], cwd=ROOT, stderr=subprocess.PIPE,
                              text=True)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = server.stderr.readline()
            assert line or server.poll() is None, "paw serve exited"
            found = re.search(r"listening on (http://\S+)/v1", line)
            url = found.group(1) if found else None
        assert url is not None
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=3, timeout=60)
        reply = client.chat.completions.create(model=tiny_program.name, max_tokens=4,
                                               messages=[{"role": "user", "content": "Hello"}])
        assert reply.usage.completion_tokens >= 1 and reply.choices[0].finish_reason in ("stop", "length")
    finally:
        server.terminate()
        # uvicorn shuts down, then re-raises the signal so the parent sees it (not an abort, -6)
        assert server.wait(30) in (0, -signal.SIGTERM)


def test_the_server_does_not_import_torch():
    code = ("import sys, apps.serve.app, apps.serve.runner, apps.serve.command, paw_mlx.engine; "
            "sys.exit('torch' in sys.modules or 'transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0
