"""``paw chat``: a Textual app for talking to a program, one conversation at a time.

Generation runs on the app's MLX thread (see ``mlx_thread``) and posts text back with
``call_from_thread``, so the screen never freezes; the conversation and its KV cache
live in a ``paw_mlx.chat.ChatSession``, which prefills only what changed since the
last turn. A reasoning model's reasoning is shown apart from its answer (``reply_view``).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Footer

from apps.chat import commands
from apps.chat.mlx_thread import MLXThread
from apps.chat.reply_view import ReplyView, no_answer_text, saved_reply
from apps.chat.widgets import (
    AssistantMessage,
    Notice,
    PromptInput,
    StatusBar,
    StatusInfo,
    UserMessage,
)
from apps.reasoning import ReplySplitter
from interp.errors import PawError
from paw_mlx.chat import THINKING_SWITCH, ChatSession
from paw_mlx.runtime import LoadedProgram

QUIT_WINDOW_SECONDS = 2.0


class ChatApp(App):
    """The chat screen: conversation above, prompt below, status and keys at the bottom."""

    CSS_PATH = "chat.tcss"
    TITLE = "paw chat"
    ENABLE_COMMAND_PALETTE = False  # slash commands are the command palette here
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+c", "quit_twice", "Quit (twice)", priority=True),
    ]

    def __init__(self, prog: LoadedProgram, mlx_thread: MLXThread, *, system: str | None = None,
                 max_tokens: int = 512, temperature: float = 0.0, model_name: str | None = None,
                 template_variables: dict | None = None) -> None:
        """``prog`` must have been loaded on ``mlx_thread`` (``mlx_thread.load(path)``);
        ``template_variables`` go to the chat template every turn (``enable_thinking``)."""
        super().__init__()
        self.mlx = mlx_thread
        self.session = ChatSession(prog, system=system, max_tokens=max_tokens, temperature=temperature,
                                   template_variables=template_variables)
        self.model_name = model_name or prog.name
        self.program_name: str | None = None
        self.state = ""
        self.stop_event = threading.Event()
        self._last_ctrl_c = float("-inf")
        self._measured = False  # the status bar shows dashes until a reply has been timed
        self._status_timer = None

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield VerticalScroll(id="conversation")
        yield PromptInput(id="prompt", show_line_numbers=False, soft_wrap=True)
        yield StatusBar(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#conversation", VerticalScroll).anchor()
        self.query_one(PromptInput).focus()
        self.notice(f"Talking to {self.model_name}. Enter sends, Ctrl+J adds a line, Esc stops a reply, "
                    "/help lists commands, Ctrl+C twice quits.")
        self.refresh_status()

    @property
    def conversation_view(self) -> VerticalScroll:
        return self.query_one("#conversation", VerticalScroll)

    @property
    def generating(self) -> bool:
        return self.state in ("generating", "stopping")

    def notice(self, text: str, error: bool = False) -> Notice:
        widget = Notice(text, error=error)
        self.conversation_view.mount(widget)
        return widget

    def error(self, text: str) -> Notice:
        return self.notice(f"error: {text}", error=True)

    def refresh_status(self) -> None:
        stats = self.session.stats if self._measured else None
        info = StatusInfo(
            model=self.model_name, program=self.program_name, state=self.state,
            context_used=self.session.context_used, context_size=self.session.context_size,
            tokens_per_second=stats.generation_tps if stats and stats.generation_tokens > 1 else None,
            ttft_seconds=stats.ttft if stats and stats.generation_tokens else None,
            peak_memory_gb=stats.peak_memory_gb if stats and stats.generation_tokens else None,
        )
        self.query_one(StatusBar).show(info)

    def set_state(self, state: str) -> None:
        self.state = state
        self.refresh_status()
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "stop":
            return True if self.state == "generating" else None  # shown dimmed when idle
        return True

    # ------------------------------------------------------------------ input

    @on(PromptInput.Submitted)
    def submitted(self, event: PromptInput.Submitted) -> None:
        command = commands.parse(event.text)
        if self.generating or self.state == "loading":
            self.notice("busy: wait for the reply (or press Esc to stop it) before sending more", error=True)
            return
        self.query_one(PromptInput).clear()
        if command is not None:
            self.run_command(command)
        else:
            self.send(commands.message_text(event.text))

    def send(self, text: str) -> None:
        self.conversation_view.mount(UserMessage(text))
        reply = AssistantMessage()
        self.conversation_view.mount(reply)
        self.conversation_view.anchor()
        self.stop_event.clear()
        self.set_state("generating")
        self._status_timer = self.set_interval(0.25, self.refresh_status)
        self.generate(text, ReplyView(self.conversation_view, reply))

    @work(exclusive=True, group="generate")
    async def generate(self, text: str, view: ReplyView) -> None:
        error = await self.mlx.run(self._generate_on_mlx_thread, text, view)
        await self._finished(view, error)

    def _generate_on_mlx_thread(self, text: str, view: ReplyView) -> str | None:
        """Stream a reply (on the MLX thread); every UI change goes through call_from_thread."""
        error = None
        try:
            stream = self.session.send(text, stop=self.stop_event)
            if self.session.program is None and self.session.prog.tokenizer.has_chat_template:
                # the markers are the template's; a program's reply is its output, as generated
                view.splitter = ReplySplitter(self.session.prog.tokenizer, self.session.prompt)
            self.call_from_thread(self._measuring)
            for piece in stream:
                self.call_from_thread(view.write, piece)
        except PawError as exc:
            error = str(exc)
        except Exception as exc:  # never let a model failure take the app down
            error = f"{type(exc).__name__}: {exc}"
        return error

    def _measuring(self) -> None:
        self._measured = True

    async def _finished(self, view: ReplyView, error: str | None) -> None:
        if self._status_timer is not None:
            self._status_timer.stop()
            self._status_timer = None
        await view.finish()
        reply = view.answer
        if view.splitter.splits:
            self.session.split_reply(reply.text, view.reasoning_text)  # the template decides what later turns keep
        stopped = self.stop_event.is_set()
        if not reply.text and (error is not None or view.reasoning is not None):
            await reply.remove()
        if error is not None:
            self.error(error)
        elif stopped:
            self.notice(f"stopped after {self.session.generated} tokens")
        if error is None and view.reasoning is not None and not reply.text:
            limit = self.session.max_tokens if self.session.generated >= self.session.max_tokens else None
            self.notice(no_answer_text(view.thinking, stopped, limit))
        self.set_state("")

    def action_stop(self) -> None:
        if self.state == "generating":
            self.stop_event.set()
            self.set_state("stopping")

    def action_quit_twice(self) -> None:
        now = time.monotonic()
        if now - self._last_ctrl_c < QUIT_WINDOW_SECONDS:
            self.exit()
            return
        self._last_ctrl_c = now
        self.notify("Press Ctrl+C again to quit.", timeout=QUIT_WINDOW_SECONDS)

    # ------------------------------------------------------------------ commands

    def run_command(self, command: commands.Command) -> None:
        handler = getattr(self, f"cmd_{command.name.replace('-', '_')}", None)
        if command.name not in commands.COMMANDS or handler is None:
            self.error(f"unknown command /{command.name}; /help lists the commands")
            return
        try:
            handler(command.arg)
        except PawError as exc:
            self.error(str(exc))
        except Exception as exc:  # a command failing in a way nobody foresaw must not close the app
            self.error(f"/{command.name} failed: {type(exc).__name__}: {exc}")
        self.refresh_status()

    def cmd_help(self, arg: str) -> None:
        self.notice(commands.help_text()).add_class("help")

    def cmd_system(self, arg: str) -> None:
        if not arg:
            current = self.session.system
            self.notice(f"system message: {current}" if current else "no system message")
        elif arg == "-":
            self.session.system = None
            self.notice("system message removed")
        else:
            self.session.system = arg
            self.notice("system message set; it applies from the next reply"
                        + (" (after /program - : a program ignores it)" if self.session.program else ""))

    def cmd_clear(self, arg: str) -> None:
        self.session.clear()
        self.conversation_view.remove_children()
        self.notice("new conversation" + (" (the system message stays)" if self.session.system else ""))

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise PawError("/save needs a file name")
        path = self.session.save(arg)
        self.notice(f"saved {len(self.session.messages)} messages to {path}")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise PawError("/load needs a file name")
        self.session.load(arg)
        self.show_conversation()
        self.notice(f"loaded {len(self.session.messages)} messages from {arg}")

    def cmd_program(self, arg: str) -> None:
        if not arg:
            if self.session.program is None:
                self.notice("no program: messages go to the model. /program DIR (or FILE.paw) sends them to a program")
            else:
                self.notice(f"program {self.program_name}: each message is one call of it; /program - to leave")
            return
        if arg == "-":
            self.session.drop_program()
            self.program_name = None
            self.notice("back to chatting with the model")
            return
        self.set_state("loading")
        self.load_program(arg)

    @work(exclusive=True, group="load")
    async def load_program(self, path: str) -> None:
        try:
            name = await self.mlx.run(self.session.use_program, path)
        except PawError as exc:
            self.error(str(exc))
        except Exception as exc:  # a broken program file must not take the app down
            self.error(f"{type(exc).__name__}: {exc}")
        else:
            self.program_name = name
            artifact = self.session.program.artifact
            kind = (artifact.selection or {}).get("kept") or ("imported .paw" if artifact.adapter else "spec")
            parts = [f"{artifact.prefix_length}-token prefix"] + ([f"LoRA rank {artifact.adapter.rank}"]
                                                                   if artifact.adapter else [])
            self.notice(f"talking to program {name} ({kind}: {', '.join(parts)}): each message is one call of "
                        "the compiled program, from its own prefix and adapter. /program - leaves it.")
        self.set_state("")

    def cmd_temp(self, arg: str) -> None:
        if arg:
            value = _parse_number(arg, float, "/temp")
            if value < 0:
                raise PawError("/temp needs a temperature of 0 or more")
            self.session.temperature = value
        self.notice(f"temperature {self.session.temperature:g}" + (" (greedy)" if not self.session.temperature else ""))

    def cmd_max_tokens(self, arg: str) -> None:
        if arg:
            value = _parse_number(arg, int, "/max-tokens")
            if value < 1:
                raise PawError("/max-tokens needs a positive number")
            self.session.max_tokens = value
        self.notice(f"replies stop after {self.session.max_tokens} tokens")

    def cmd_reasoning(self, arg: str) -> None:
        view = self.conversation_view
        if arg in ("show", "hide"):
            view.set_class(arg == "hide", "hide-reasoning")  # chat.tcss hides every ReasoningMessage under it
        elif arg:
            raise PawError(f"/reasoning takes show or hide, not {arg!r}")
        self.notice("reasoning hidden: only answers are shown (/reasoning show)" if view.has_class("hide-reasoning")
                    else "reasoning shown above each answer, folded once the answer starts (/reasoning hide)")

    def cmd_think(self, arg: str) -> None:
        if arg in ("on", "off"):
            self.session.set_thinking(arg == "on")
        elif arg:
            raise PawError(f"/think takes on or off, not {arg!r}")
        setting = self.session.template_variables.get(THINKING_SWITCH)
        self.notice("thinking: as the model's template decides (/think on|off sets it)" if setting is None
                    else f"thinking {'on' if setting else 'off'} ({THINKING_SWITCH}={setting} for the template)")

    def cmd_model(self, arg: str) -> None:
        if not arg:
            self.notice(f"model: {self.model_name} ({self.session.prog.path})")
            return
        self.set_state("loading")
        self.notice(f"loading {arg} ...")
        self.load_model(arg)

    @work(exclusive=True, group="load")
    async def load_model(self, path: str) -> None:
        try:
            prog = await self.mlx.run(self.mlx.load_here, Path(path).expanduser())
        except PawError as exc:
            self._model_loaded(None, str(exc))
        except Exception as exc:
            self._model_loaded(None, f"{type(exc).__name__}: {exc}")
        else:
            self._model_loaded(prog, None)

    def _model_loaded(self, prog: LoadedProgram | None, error: str | None) -> None:
        if prog is not None:
            old = self.session
            self.session = ChatSession(prog, system=old.system, max_tokens=old.max_tokens,
                                       temperature=old.temperature, top_p=old.top_p, top_k=old.top_k,
                                       template_variables=old.template_variables)
            self.session.messages = list(old.messages)
            self.model_name = prog.name
            self.program_name = None  # a program belongs to the base model it was made for: dropped
            self._measured = False
            self.notice(f"now talking to {prog.name}")
        else:
            self.error(error or "the model did not load")
        self.set_state("")

    def on_unmount(self) -> None:
        self.stop_event.set()  # a reply being written stops at its next token

    def show_conversation(self) -> None:
        """Redraw the message list from the session (after /load)."""
        view = self.conversation_view
        view.remove_children()
        if self.session.system:
            self.notice(f"system message: {self.session.system}")
        for message in self.session.messages:
            if message["role"] == "user":
                view.mount(UserMessage(message["content"]))
            else:
                view.mount(*saved_reply(message))


def _parse_number(text: str, kind: type, command: str):
    try:
        return kind(text)
    except ValueError:
        raise PawError(f"{command} needs a number, not {text!r}") from None


def run_chat(program: Path | None, *, system: str | None = None, max_tokens: int = 512,
             temperature: float = 0.0, think: bool | None = None) -> None:
    """Load ``program`` (or the default model's program) and run the app until the user quits;
    ``think`` set turns the model's thinking on or off (its template's ``enable_thinking``)."""
    from interp.paths import require_default_program
    from interp.program import resolve_program_dir
    from interp.tokenizer import Tokenizer
    from paw_mlx.chat import check_session_options, check_thinking_switch

    check_session_options(max_tokens, temperature)  # a bad option or path is one error line, before the app
    program = resolve_program_dir(program or require_default_program("pass a program directory"))
    if think is not None:
        check_thinking_switch(Tokenizer(program).chat_template, program.name)
    import sys

    print(f"loading {program} ...", file=sys.stderr)
    mlx_thread = MLXThread()
    try:
        prog = mlx_thread.load(program)
        ChatApp(prog, mlx_thread, system=system, max_tokens=max_tokens, temperature=temperature,
                template_variables=None if think is None else {THINKING_SWITCH: think}).run()
    finally:
        mlx_thread.shutdown()
