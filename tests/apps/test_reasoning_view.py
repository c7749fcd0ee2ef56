"""``paw run`` with a reasoning model: reasoning on stderr (dimmed on a terminal), the answer
on stdout; fixed replies through ``ReplyPrinter``, and the CLI on a tiny model whose template
opens a think block."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from apps.reasoning_view import DIM, RESET, ReplyPrinter

ROOT = Path(__file__).parents[2]
THINK_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.split('</think>')[-1] }}<|im_end|>\n"
                  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


class FakeTokenizer:
    def __init__(self, template: str, tail: str = ""):
        self.chat_template, self.tail = template, tail

    def decode(self, ids, skip_special_tokens=False) -> str:
        return self.tail


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def printed(tokenizer, text: str, chat: bool = True, err: io.StringIO | None = None) -> tuple[str, str]:
    out, err = io.StringIO(), err or io.StringIO()
    printer = ReplyPrinter(tokenizer, [1, 2], chat, out=out, err=err)
    for ch in text:
        printer.write(ch)
    printer.finish()
    return out.getvalue(), err.getvalue()


def test_the_reasoning_goes_to_stderr_and_the_answer_to_stdout():
    opened = FakeTokenizer(THINK_TEMPLATE, tail="<|im_start|>assistant\n<think>\n")
    assert printed(opened, "Two and two.\n</think>\n\nFour.") == ("Four.\n", "Two and two.\n")
    harmony = FakeTokenizer("<|start|>assistant<|channel|>final<|message|>")
    text = "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>Four."
    assert printed(harmony, text) == ("Four.\n", "Easy.\n")


def test_without_reasoning_markers_or_the_chat_template_everything_is_the_answer():
    assert printed(FakeTokenizer("<|im_start|>{{ m.content }}"), "<think>x</think>y") == ("<think>x</think>y\n", "")
    opened = FakeTokenizer(THINK_TEMPLATE, tail="<think>\n")
    assert printed(opened, "x</think>y", chat=False) == ("x</think>y\n", "")  # --raw: the text as generated


def test_reasoning_is_dimmed_on_a_terminal():
    _, err = printed(FakeTokenizer(THINK_TEMPLATE), "<think>Hmm</think>Yes", err=Terminal())
    assert err == f"{DIM}Hmm{RESET}\n"


def test_paw_run_prints_a_reply_cut_short_while_thinking_on_stderr(tiny_program, tmp_path):
    program = tmp_path / "think"
    program.mkdir()
    for path in tiny_program.iterdir():
        if path.name != "chat_template.jinja":
            (program / path.name).symlink_to(path)
    (program / "chat_template.jinja").write_text(THINK_TEMPLATE, encoding="utf-8")

    def run(*extra: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "apps.cli", "run", str(program), "-p", "Hello", "-n", "6", *extra],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert done.returncode == 0, done.stderr
        return done

    thinking = run()  # the prompt opened <think>; the random model never closes it: all reasoning
    assert thinking.stdout == "\n" and thinking.stderr.strip()
    raw = run("--raw")
    assert raw.stdout.strip() and not raw.stderr.strip()


BLOCKED = "import sys; sys.modules.update(fastapi=None, uvicorn=None, starlette=None)"
#: the server's modules that need the `serve` extra, directly or through their imports
SERVER_ONLY = ("apps.serve.app", "apps.serve.tools", "apps.serve.reply", "apps.serve.schemas")


def test_paw_run_needs_no_server_packages(tiny_program):
    """README command 1 installs paw without the `serve` extra: `paw run` (its reasoning printer
    included) must not import FastAPI or uvicorn."""
    done = subprocess.run([sys.executable, "-c", f"{BLOCKED}; from apps.cli import main; sys.argv = ['paw', 'run', "
                           f"{str(tiny_program)!r}, '-p', 'Hi', '-n', '2']; main()"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_paw_chat_needs_no_server_packages():
    """`paw chat` splits reasoning with the same readers as `paw run`: none of it may pull in the
    server's modules or FastAPI either."""
    check = (f"{BLOCKED}; import apps.chat.app, apps.chat.reply_view; "
             f"loaded = [m for m in {SERVER_ONLY!r} if m in sys.modules]; assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
