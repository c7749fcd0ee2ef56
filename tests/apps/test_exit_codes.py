"""Every way a user can fail ends in one ``paw: error:`` line and a non-zero exit code:
bad token ids, conflicting options, Ctrl-C (130, "interrupted"), hostile compiled programs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apps import cli
from tests.apps.test_cli import assert_one_line_error, paw
from tests.child_env import child_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("ids", ["100000", "1 2 384", "1 -5 3"])
def test_prompt_ids_outside_the_vocabulary(tiny_program, tmp_path, ids):
    """100000 segfaulted; 384 (one past the table) printed garbage with exit 0; -5 was accepted."""
    path = tmp_path / "ids.txt"
    path.write_text(ids)
    assert_one_line_error(paw("run", str(tiny_program), "--prompt-ids", str(path), "-n", "2"),
                          "outside the vocabulary")


def test_decode_of_ids_outside_the_vocabulary(tiny_program, tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("1 2 99999")
    assert_one_line_error(paw("decode", str(path), "--program", str(tiny_program)), "99999")


def test_prompt_and_prompt_ids_together_exit_1(tiny_program, tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("1 2")
    assert_one_line_error(paw("run", str(tiny_program), "--prompt", "a", "--prompt-ids", str(path)),
                          "either --prompt or --prompt-ids")


def test_main_returns_typer_exit_codes(monkeypatch, capsys):
    """typer hands back the code of a typer.Exit (and of Ctrl-C) instead of exiting with it."""
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    for result, want, message in [(lambda **_: 1, 1, ""), (lambda **_: 130, 130, "paw: interrupted"),
                                  (stopped, 130, "paw: interrupted")]:
        monkeypatch.setattr(cli, "app", result)
        with pytest.raises(SystemExit) as stop:
            cli.main()
        assert stop.value.code == want
        assert capsys.readouterr().err.strip() == message
    monkeypatch.setattr(cli, "app", lambda **_: 0)
    cli.main()  # success returns normally


def test_an_unexpected_error_is_still_one_line(monkeypatch, capsys):
    """A bug's exception (MLX's nanobind TypeErrors span several lines) keeps the one-line promise."""
    def broken(**_):
        raise TypeError("sum(): incompatible function arguments.\n    1. sum(a: array, /, ...) -> array")

    monkeypatch.setattr(cli, "app", broken)
    monkeypatch.delenv("PAW_DEBUG", raising=False)
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paw: error: TypeError: sum(): incompatible"), lines


def test_an_os_error_names_the_path_and_the_reason(monkeypatch, capsys):
    """An OS refusal outside the paths a command checks itself: the path and the OS's words, no class name."""
    def refused(**_):
        raise PermissionError(13, "Permission denied", "/data/models/x")

    monkeypatch.setattr(cli, "app", refused)
    monkeypatch.delenv("PAW_DEBUG", raising=False)
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip() == "paw: error: /data/models/x: Permission denied"


@pytest.mark.parametrize("argv", [["run"], ["export", "hf"], ["run", "x", "--no-such-option"]])
def test_usage_errors_exit_2_with_clicks_usage_message(monkeypatch, capsys, argv):
    monkeypatch.setattr(sys, "argv", ["paw", *argv])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("Usage: ") and "Error: " in err and "paw: error" not in err


def endless_program(tiny_program: Path, directory: Path) -> Path:
    """A copy of the tiny program that never ends a reply: no EOS token, a huge context."""
    shutil.copytree(tiny_program, directory)
    spec = json.loads((directory / "prog.json").read_text())
    spec["model"].update(context_length=1_000_000, eos_token_ids=[])
    (directory / "prog.json").write_text(json.dumps(spec))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_ctrl_c_during_run_exits_130(tiny_program, tmp_path):
    program = endless_program(tiny_program, tmp_path / "endless")
    # A process started with SIGINT ignored (a background job of a non-interactive shell, as
    # `cmd &` in a script; nohup) passes that on, and Python then leaves Ctrl-C ignored, as a
    # shell expects of a background job. The run under test is a terminal's foreground job, so
    # it gets Python's handler back whatever the suite was started from.
    # PYTHONFAULTHANDLER: if the interrupt is still not obeyed, SIGABRT makes the run print
    # where every thread was, so the failure says why.
    env = child_env(PYTHONFAULTHANDLER="1")
    foreground = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                  "signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT]); "
                  "sys.argv[0] = 'paw'; runpy.run_module('apps.cli', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", foreground, "run", str(program), "--prompt", "Hello",
                             "--raw", "-n", "1000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    try:
        assert proc.stdout.read(1), "no output before the interrupt"
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            status = Path(f"/proc/{proc.pid}/status")
            lines = status.read_text().splitlines() if status.exists() else []
            masks = [line for line in lines if line.startswith("Sig")]
            proc.send_signal(signal.SIGABRT)
            _, err = proc.communicate(timeout=30)
            pytest.fail(f"Ctrl-C was not obeyed within 60 s; signal masks {masks}; the run's threads then:\n"
                        + err.decode(errors="replace")[-4000:])
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.decode().strip().splitlines()[-1] == "paw: interrupted"
    assert b"Traceback" not in err
