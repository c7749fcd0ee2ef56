"""Multi-turn chat over one program, reusing the KV cache between turns.

Each turn renders the whole conversation through the chat template, keeps the part
of the cache that matches the new token ids (the common prefix) and prefills only the
rest. The rendered assistant message may tokenize differently from the ids that were
generated; the common-prefix rule makes that harmless (the cache is simply cut back a
little further). A hybrid program's conv states go back only as far as they keep inputs
(``interp/conv_cache.py``), its delta states not at all (``interp/delta_state.py``); when a
turn needs more, the cache goes back to the latest *checkpoint* at or before the point needed:
with recurrent state, each turn feeds its prompt but the last token itself and keeps a copy of
the recurrent states there, at the start of the reply (the last ``CHECKPOINTS`` of them). A turn
that cuts into the previous reply (a template that drops a reasoning block, a reply that
tokenizes differently, ``/retry``, ``/undo``) so prefills from that reply's start, not from the
beginning of the conversation; with no checkpoint early enough it prefills everything again.
Either way it costs time, never exactness. Nothing here imports torch.

A reasoning model's reply may be kept as its answer and its reasoning (``split_reply``,
called by the app that read the markers): the template then gets ``reasoning_content``
(and ``thinking``, gpt-oss's name) and decides itself what an earlier turn keeps; most
drop it, so the rendering of that turn changes and the cache is cut back to it.

With a compiled program in use (``use_program``: a ``paw compile`` directory or a
``.paw`` bundle), every message is one call of that program: its own cached prefix
(tuned or not, demonstrations included) and its LoRA adapter, never its spec re-sent as
a system message. Calls are independent, as a program is a function; the messages stay
on screen and in saved conversations.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import mlx.core as mx

from interp.atomic import atomic_write_text
from interp.errors import ArtifactError, InputError, PawError, ProgramError, first_line
from interp.generate import GenerationStats, prefill
from interp.jsonfile import parse_json
from interp.paths import require_file
from paw_mlx.runtime import LoadedProgram, check_generation_options, stream_tokens

CHAT_FORMAT = "paw-chat"
CHAT_VERSION = 1
ROLES = ("system", "user", "assistant")
#: reply-start checkpoints of the recurrent states a chat keeps (each one copy of every state at one point)
CHECKPOINTS = 4
#: the chat template variable that turns a model's thinking on or off (Qwen3, SmolLM3)
THINKING_SWITCH = "enable_thinking"


def check_session_options(max_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0,
                          seed: int | None = None) -> None:
    """InputError for settings no turn of a chat could use; cheap, so callers check before loading."""
    check_generation_options(max_tokens, temperature, top_p, top_k, seed)
    if max_tokens < 1:
        raise InputError(f"max_tokens must be at least 1, not {max_tokens}")


def check_thinking_switch(template: str | None, model: str) -> None:
    """PawError unless the chat ``template`` reads ``enable_thinking`` (cheap: callers check first)."""
    if THINKING_SWITCH not in (template or ""):
        raise PawError(f"the chat template of {model} has no {THINKING_SWITCH} switch: "
                       "its thinking cannot be turned on or off")


class ChatSession:
    """A conversation with one loaded program: its messages, its cache and the ids in it."""

    def __init__(self, prog: LoadedProgram, *, system: str | None = None, max_tokens: int = 512,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 template_variables: dict | None = None):
        """``template_variables``: more chat template variables for every turn (``enable_thinking``)."""
        check_session_options(max_tokens, temperature, top_p, top_k, seed)
        self.prog = prog
        self.system = system
        self.messages: list[dict] = []  # user and assistant turns; the system text lives apart
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.seed = seed
        self.template_variables = dict(template_variables or {})
        self.cache = prog.make_cache()
        self.cached_ids: list[int] = []  # the token ids whose keys and values the cache holds
        #: where a recurrent program's cache can go back to: (offset, copies of its recurrent states), oldest first
        self._checkpoints: list[tuple[int, list]] = []
        self._kv_layers = prog.program.num_layers if prog.program.recurrent else None  # the states follow them
        self.stats: GenerationStats | None = None  # of the last turn
        self.prompt_tokens = 0  # the last turn's whole prompt (the conversation so far)
        self.prompt: list[int] = []  # its ids (a reply reader looks at their end)
        self.prefilled = 0  # how many of those it had to prefill (the rest came from the cache)
        self.generated = 0  # tokens the last turn generated
        self._turn_length: int | None = None  # prompt length of the turn under way
        self._reply: dict | None = None  # the assistant message the last turn recorded
        #: the compiled program each message is sent to (``use_program``), or None for plain chat
        self.program = None
        self.program_name: str | None = None

    # ------------------------------------------------------------------ conversation

    def conversation(self) -> list[dict]:
        """The messages as the chat template sees them, system message first."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [_template_message(m) for m in self.messages]

    def prompt_ids(self) -> list[int]:
        """Token ids of the whole conversation, ending with the assistant's turn to speak."""
        tok = self.prog.tokenizer
        messages = self.conversation()
        if tok.has_chat_template:
            try:
                return tok.encode_chat(messages, variables=self.template_variables)
            except PawError:
                raise
            except Exception as exc:  # a template's own raise_exception or a jinja error
                raise PawError(f"the chat template rejected the conversation: {exc}") from None
        # No template (a base model): a plain transcript, as a reasonable fallback.
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
        return tok.encode(text, add_special_tokens=True)

    @property
    def context_used(self) -> int:
        """Positions of the context in use (during a turn: the prompt and the reply so far)."""
        if self._turn_length is not None:
            return self._turn_length + self.generated
        return len(self.cached_ids)

    @property
    def context_size(self) -> int:
        return self.prog.context_length

    def set_thinking(self, on: bool) -> None:
        """Turn the model's thinking on or off from the next turn, with its template's
        ``enable_thinking`` (off, Qwen3's generation prompt closes the think block); PawError
        for a template without that switch, where the setting would silently do nothing."""
        check_thinking_switch(self.prog.tokenizer.chat_template, self.prog.name)
        self.template_variables[THINKING_SWITCH] = on

    def clear(self) -> None:
        """Forget the turns (the system message stays; its cached prefix is reused)."""
        self.messages.clear()

    # ------------------------------------------------------------------ generation

    def send(self, text: str, stop: threading.Event | None = None) -> Iterator[str]:
        """Add a user message and stream the reply as text pieces.

        The reply is recorded as an assistant message when the stream ends, also when
        it is stopped early (``stop`` set, or the iterator closed): nothing written is lost.
        """
        self._reply = None
        if self.program is not None:
            return self._call_program(text, stop)
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self.prompt_ids()
            if len(ids) >= self.context_size:
                raise PawError(f"the conversation ({len(ids)} tokens) fills the model's context of "
                               f"{self.context_size}; /clear to start again")
            keep = self._reuse_prefix(ids)
        except BaseException:
            self.messages.pop()
            raise
        self.stats = GenerationStats()
        self.prompt_tokens = len(ids)
        self.prompt = ids
        self.prefilled = len(ids) - keep
        self.generated = 0
        self._turn_length = len(ids)
        return self._stream(ids, keep, stop)

    def _stream(self, ids: list[int], keep: int, stop: threading.Event | None) -> Iterator[str]:
        budget = min(self.max_tokens, self.context_size - len(ids))
        stats = self.stats
        produced: list[int] = []
        early = GenerationStats()
        if self._kv_layers is not None and keep < len(ids) - 1:
            keep = self._checkpoint_at(ids, keep, early)
        tokens = stream_tokens(self.prog, ids[keep:], max_tokens=budget, temperature=self.temperature,
                               top_p=self.top_p, top_k=self.top_k, seed=self.seed, cache=self.cache,
                               stats=stats, stop=stop)
        failed = True
        try:
            yield from self._pieces(tokens, produced)
            failed = False
        except GeneratorExit:
            failed = False
            raise
        finally:
            tokens.close()  # releases the program's lock before the cache is touched
            stats.prompt_tokens += early.prompt_tokens  # the part fed before the checkpoint
            stats.prompt_seconds += early.prompt_seconds
            if failed and not produced:
                self.messages.pop()  # the turn never happened
            else:
                # as it was shown: a reply cut inside a character ends before it (``decode_finished``)
                self._reply = {"role": "assistant", "content": self.prog.tokenizer.decode_finished(produced)}
                self.messages.append(self._reply)
            if failed:
                self.reset_cache()
            else:
                self._settle_cache(ids + produced)
            self._turn_length = None

    def split_reply(self, answer: str, reasoning: str) -> None:
        """Keep the last turn's reply as its ``answer`` and its ``reasoning`` (read by the caller,
        who knows the model's markers) rather than as the text generated, markers included.

        The next turns' template gets the reasoning as ``reasoning_content`` and ``thinking``
        and decides what to show of it (most drop it from earlier turns; gpt-oss's refuses
        harmony markers in a message's content). Nothing happens when the turn recorded no reply."""
        if self._reply is None:
            return
        self._reply["content"] = answer
        if reasoning:
            self._reply["reasoning_content"] = reasoning

    def _pieces(self, tokens: Iterable[int], produced: list[int], skip_special_tokens: bool = False) -> Iterator[str]:
        """Text pieces of ``tokens`` as they decode; each token is appended to ``produced`` and counted."""
        detok = self.prog.tokenizer.detokenizer(skip_special_tokens)
        for token in tokens:
            produced.append(token)
            self.generated = len(produced)
            piece = detok.add_token(token)
            if piece:
                yield piece
        tail = detok.finalize()
        if tail:
            yield tail

    # ------------------------------------------------------------------ programs

    def use_program(self, path: str | Path) -> str:
        """Send every message to the compiled program at ``path`` (a directory or a .paw bundle)
        made for this chat's model; returns its name. Loads on the calling (MLX) thread."""
        from paw_mlx.programs.artifact import read_artifact
        from paw_mlx.programs.function import ProgramFunction

        path = Path(path).expanduser()
        if path.suffix == ".paw" and path.is_file():
            from paw_mlx.programs.pawfile import bundle_artifact, read_bundle

            artifact = bundle_artifact(read_bundle(path), self.prog, str(self.prog.path), path.name)
        elif not path.exists():
            raise ArtifactError(f"no such program: {path}")
        else:
            artifact = read_artifact(path)
        self.program = ProgramFunction(artifact, self.prog)
        self.program_name = path.stem if path.suffix == ".paw" else Path(artifact.directory or path).name
        return self.program_name

    def drop_program(self) -> None:
        """Back to plain chat with the model."""
        self.program = self.program_name = None

    def _call_program(self, text: str, stop: threading.Event | None) -> Iterator[str]:
        function = self.program
        ids = function.token_ids(text)
        total = function.artifact.prefix_length + len(ids)
        if total >= self.context_size:
            raise PawError(f"the program's prefix and this message ({total} tokens) fill the model's context "
                           f"of {self.context_size}")
        self.messages.append({"role": "user", "content": text})
        self.stats = GenerationStats()
        self.prompt_tokens, self.prefilled, self.generated = total, len(ids), 0
        self._turn_length = total
        return self._program_stream(function, ids, text, stop)

    def _program_stream(self, function, ids: list[int], text: str, stop: threading.Event | None) -> Iterator[str]:
        budget = min(function.max_new_tokens, self.max_tokens, self.context_size - self._turn_length)
        produced: list[int] = []
        try:
            if function.grammar is not None or function.copy_rule is not None:  # constrained: one whole call
                tokens: Iterator[int] = iter(function.call_ids([ids], texts=[text])[0])
            else:
                tokens = stream_tokens(function.runner, ids, max_tokens=budget,
                                       temperature=function.artifact.generation.temperature,
                                       cache=function.start_cache(), stats=self.stats, stop=stop)
            # a program's reply is its call's output, without special tokens (paw_mlx/programs/function.py)
            yield from function.artifact.layout.output_pieces(self._pieces(tokens, produced, skip_special_tokens=True))
        finally:
            reply = function.artifact.layout.output_text(
                self.prog.tokenizer.decode_finished(produced, skip_special_tokens=True))
            self.messages.append({"role": "assistant",
                                  "content": reply.strip() if function.artifact.generation.strip else reply})
            self._turn_length = None

    def _checkpoint_at(self, ids: list[int], keep: int, stats: GenerationStats) -> int:
        """Feed ``ids[keep:-1]`` into the cache and keep a copy of the recurrent states there, the
        start of the reply (where a later turn most often cuts back to); returns the new offset."""
        end = len(ids) - 1
        start = time.perf_counter()
        with self.prog.lock:
            try:
                tokens = mx.array(self.prog.check_ids(ids[keep:end], "prompt ids"), dtype=mx.int32)[None]
                self.prog.model(prefill(self.prog.model, tokens, self.cache), cache=self.cache)
                mx.eval([c.state for c in self.cache])
            except (RuntimeError, ValueError, MemoryError) as exc:  # MLX's errors while evaluating the graph
                self.reset_cache()
                raise ProgramError(f"running {self.prog.path} failed: {first_line(exc)}") from exc
        stats.prompt_tokens, stats.prompt_seconds = end - keep, time.perf_counter() - start
        self.cached_ids = ids[:end]
        kept = [point for point in self._checkpoints if point[0] < end][-(CHECKPOINTS - 1):]
        self._checkpoints = [*kept, (end, [state.copy() for state in self.cache[self._kv_layers:]])]
        return end

    def _reuse_prefix(self, ids: list[int]) -> int:
        """Cut the cache back to its longest prefix shared with ``ids``, leaving one id to feed."""
        keep = 0
        for cached, new in zip(self.cached_ids, ids, strict=False):
            if cached != new:
                break
            keep += 1
        keep = self._trim_to(min(keep, len(ids) - 1))
        self.cached_ids = self.cached_ids[:keep]
        return keep

    def _settle_cache(self, fed: list[int]) -> None:
        """After a turn, make ``cached_ids`` describe the cache exactly.

        The generation loop may or may not have fed the last token (or the EOS token it
        does not yield) into the cache; whatever lies beyond ``fed`` is cut off.
        """
        keep = self._trim_to(min(self._offset(), len(fed)))
        self.cached_ids = list(fed[:keep])
        # evaluated, the cache can be continued from any thread (MLX ties lazy arrays to a thread's stream)
        mx.eval([c.state for c in self.cache])

    def _offset(self) -> int:
        return int(self.cache[0].offset) if self.cache else 0

    def _trim_to(self, length: int) -> int:
        """Cut the cache back to ``length`` positions; returns the positions it then holds:
        ``length``; or, when a layer cannot go back that far (a conv, delta or SSM state), the
        latest checkpoint's offset at or before ``length``, its states restored; else 0 (empty)."""
        held = length if self._cut(length) else self._restore(length)
        # a checkpoint past the cut holds positions that the next ids may replace
        self._checkpoints = [point for point in self._checkpoints if point[0] <= held]
        return held

    def _restore(self, length: int) -> int:
        """Go back to the latest checkpoint at or before ``length``; returns its offset, or 0 (empty cache)."""
        for offset, states in reversed(self._checkpoints):
            if offset <= length and self._cut(offset, kv_only=True):
                self.cache[self._kv_layers:] = [state.copy() for state in states]  # copies: it may be used again
                return offset
        self.reset_cache()
        return 0

    def _cut(self, length: int, kv_only: bool = False) -> bool:
        """Trim every layer (or only the KV caches) back to ``length``; False if one cannot go that far."""
        layers = self.cache[:self._kv_layers] if kv_only else self.cache
        for layer in layers:
            extra = layer.offset - length
            if extra > 0 and layer.trim(extra) < extra:
                return False
        return True

    def reset_cache(self) -> None:
        self.cache = self.prog.make_cache()
        self.cached_ids = []
        self._checkpoints = []

    # ------------------------------------------------------------------ files

    def to_json(self) -> dict:
        return {"format": CHAT_FORMAT, "version": CHAT_VERSION, "model": self.prog.name,
                "fingerprint": self.prog.fingerprint, "system": self.system, "messages": self.messages}

    def save(self, path: str | Path) -> Path:
        """Write the conversation as JSON (atomically: a temporary file, then a rename)."""
        path = Path(path).expanduser()
        try:
            atomic_write_text(path, json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n")
        except OSError as exc:
            raise PawError(f"cannot write {path}: {exc.strerror or exc}") from exc
        return path

    def load(self, path: str | Path) -> None:
        """Replace the conversation with one saved by :meth:`save` (the cache is reused where it matches)."""
        system, messages = read_conversation(path)
        self.system, self.messages = system, messages


def read_conversation(path: str | Path) -> tuple[str | None, list[dict]]:
    """The system text and messages of a saved conversation, checked; PawError if malformed."""
    path = Path(path).expanduser()
    require_file(path, "file")
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise PawError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        data = parse_json(text, "the text", PawError)
    except PawError as exc:
        raise PawError(f"{path} is not a JSON conversation: {exc}") from None
    if isinstance(data, list):  # a bare message list is accepted too
        data = {"messages": data}
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise PawError(f"{path} holds no 'messages' list")
    version = data.get("version", CHAT_VERSION)
    if (data.get("format", CHAT_FORMAT) != CHAT_FORMAT or not isinstance(version, int) or isinstance(version, bool)
            or not 1 <= version <= CHAT_VERSION):
        raise PawError(f"{path} is not a {CHAT_FORMAT} file of version {CHAT_VERSION}")
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise PawError(f"{path}: 'system' must be text")
    messages = []
    for i, message in enumerate(data["messages"]):
        if (not isinstance(message, dict) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)):
            raise PawError(f"{path}: message {i} needs a role ({', '.join(ROLES)}) and text content")
        if message["role"] == "system":
            if i != 0:
                raise PawError(f"{path}: a system message may only come first")
            system = message["content"]
            continue
        reasoning = message.get("reasoning_content")
        if reasoning is not None and (message["role"] != "assistant" or not isinstance(reasoning, str)):
            raise PawError(f"{path}: message {i}: 'reasoning_content' must be the text of an assistant's reasoning")
        messages.append({"role": message["role"], "content": message["content"]}
                        | ({"reasoning_content": reasoning} if reasoning else {}))
    return system or None, messages


def _template_message(message: dict) -> dict:
    """A stored message as templates read it: a reply's reasoning under both names templates use."""
    item = dict(message)
    if item.get("reasoning_content"):
        item["thinking"] = item["reasoning_content"]  # gpt-oss's name; Qwen3's is reasoning_content
    return item
