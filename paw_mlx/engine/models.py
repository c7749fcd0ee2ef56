"""What the engine serves: base programs and compiled programs, each under a model name.

A ``ServedModel`` turns a request's chat messages or completion prompt into token ids
for its base model, and says where those ids' keys and values may already be: a
compiled program brings its KV prefix (possibly tuned, so it differs from running the
base over the same ids), and each model has its own prompt-cache namespace.

How a compiled program reads a request, so that greedy outputs equal
``paw_mlx.function(program)(input)``:
- completions: the prompt is the program's input;
- chat, with a chat-template layout: the conversation is rendered with the spec as the
  system message; the rendering starts with the program's prefix text, whose KV is the
  program's prefix, and the rest is tokenized after it. One user message gives exactly
  the ids of a function call; more turns continue the same conversation.
- chat, with a raw layout (base models without a template): one user message, the input.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interp.errors import ArtifactError, InputError, PawError, RequestError
from paw_mlx.engine.messages import normalize_messages
from paw_mlx.runtime import LoadedProgram


class AdapterStack:
    """The LoRA adapters of the compiled programs served on one base model, stacked.

    Rows of one batch may belong to programs with different adapters (or none): the base
    runs as one graph with every adapter in it (``paw_mlx.programs.function.stacked``), and
    each row picks its own by index (``adapter_index``; 0 is no adapter). Without any
    adapter the base runs as it is.
    """

    def __init__(self, base: LoadedProgram):
        self.base = base
        self.adapters: list = [None]
        self._model = None

    def add(self, adapter) -> int:
        """Take ``adapter`` (checked against the base's layers now); returns the index its rows pass.

        The stacked graph is built once, when the batch first runs, not once per program added.
        """
        from interp.lora import check_adapter, linear_sites

        try:
            check_adapter(adapter.scaled(), linear_sites(self.base.program))
        except ArtifactError as exc:
            raise ArtifactError(f"the program's adapter does not fit base model {self.base.name}: {exc}") from None
        self.adapters.append(adapter)
        self._model = None
        return len(self.adapters) - 1

    @property
    def model(self):
        """The GraphModel the base's batch runs: the base's own, or with every adapter stacked in."""
        if len(self.adapters) == 1:
            return self.base.model
        if self._model is None:
            from paw_mlx.programs.function import stacked

            self._model = stacked(self.base, self.adapters).model
        return self._model


@dataclass(eq=False)  # compared and hashed by identity: one object per served name
class ServedModel:
    """One model name the engine answers to: a base program, or a compiled program on a base."""

    name: str
    base: LoadedProgram
    artifact: Any | None = None  # paw_mlx.programs.ProgramArtifact for a compiled program
    created: int = field(default_factory=lambda: int(time.time()))
    aliases: tuple[str, ...] = ()
    #: the adapters served on this base (shared by every model on it), and this model's index
    adapters: AdapterStack | None = None
    adapter_index: int = 0
    #: a compiled program on a base with recurrent state: its prefix's whole cache list, which
    #: each request starts from a copy of (``paw_mlx.programs.recurrent_prefix.RecurrentPrefix``)
    prefix_state: Any | None = None

    @property
    def is_program(self) -> bool:
        return self.artifact is not None

    @property
    def namespace(self) -> str:
        """Prompt-cache namespace: the keys and values of equal ids are equal only within it."""
        if self.artifact is None:
            return f"base:{self.base.fingerprint}"
        where = self.artifact.directory or id(self.artifact)
        return f"program:{self.base.fingerprint}:{where}"

    @property
    def prefix_ids(self) -> list[int]:
        return list(self.artifact.prefix_ids) if self.artifact is not None else []

    @property
    def prefix_kv(self) -> list | None:
        return list(self.artifact.prefix) if self.artifact is not None else None

    @property
    def context_length(self) -> int:
        return self.base.context_length

    @property
    def default_max_tokens(self) -> int | None:
        """A compiled program's own output budget; None for a base model (the server's default)."""
        return self.artifact.generation.max_new_tokens if self.artifact is not None else None

    @property
    def default_temperature(self) -> float:
        return float(self.artifact.generation.temperature) if self.artifact is not None else 0.0

    @property
    def returns(self) -> dict | None:
        """A compiled program's stored output constraint (``paw compile --returns``), if any."""
        return self.artifact.returns if self.artifact is not None else None

    @property
    def copy_rule(self):
        """A compiled program's copy rule (``paw_mlx/programs/copy_rule.py``), where its stored
        ``returns`` does not replace it; else None."""
        return self.artifact.copy_rule if self.artifact is not None and self.returns is None else None

    def copy_constraint(self, inputs: Sequence[str]):
        """The copy rule's fresh per-row constraint for a request whose input texts are ``inputs``
        (a completion's prompt, a conversation's user turns: ``user_texts``), or None."""
        from paw_mlx.programs.copy_rule import copy_constraint

        return copy_constraint(self.copy_rule, self.base, "\n".join(inputs), self.output_lead)

    @property
    def output_lead(self) -> str:
        """What a compiled program's outputs start with and callers do not see (``PromptLayout``)."""
        return self.artifact.layout.output_lead if self.artifact is not None else ""

    # ------------------------------------------------------------------ prompts

    def completion_ids(self, prompt: str | Sequence[int], param: str = "prompt") -> list[int]:
        """Token ids of a completion prompt (text, or token ids for a base model); ``param`` names
        the request's field that held it, for an error."""
        tokenizer = self.base.tokenizer
        if self.artifact is None:
            if isinstance(prompt, str):
                self._check_size(prompt, 0, param)
                return tokenizer.encode(prompt, add_special_tokens=True)
            return self._check_ids(prompt)
        if not isinstance(prompt, str):
            raise RequestError(f"model {self.name!r} is a compiled program: its prompt is the input text")
        from paw_mlx.programs.compile import input_ids

        prefix = self.prefix_ids
        self._check_size(prompt, len(prefix), param)
        return prefix + input_ids(tokenizer, self.artifact.layout, prompt)

    def _check_size(self, text: str, before: int, param: str) -> None:
        """A ``context_length_exceeded`` RequestError when ``text``, after ``before`` ids, has more
        tokens than the context leaves room for, proved from its size alone before it is
        tokenized (a tokenizer's longest token: ``interp/token_span.py``); exact: a prompt that
        fits always passes (the whole check after tokenizing is in apps/serve/prepare.py)."""
        least = before + self.base.tokenizer.least_tokens(text)
        if least >= self.context_length:
            raise RequestError(f"this model's context is {self.context_length} tokens and the prompt has at least "
                               f"{least} ({len(text):,} characters)", code="context_length_exceeded", param=param)

    def chat_ids(self, messages: Sequence[dict], tools: list[dict] | None = None,
                 variables: dict[str, Any] | None = None) -> list[int]:
        """Token ids of a conversation, ending with the assistant's turn to speak.

        ``tools`` (OpenAI's ``{"type": "function", "function": {...}}`` entries) go to the chat
        template, which describes them to the model; a base model only, whose template takes them.
        ``variables`` are more template variables (``enable_thinking``, ...), base models only: a
        compiled program's prefix was rendered without them.
        """
        messages = normalize_messages(messages)
        tokenizer = self.base.tokenizer
        if tools and self.artifact is not None:
            raise RequestError(f"model {self.name!r} is a compiled program: tools are served on base models only",
                               param="tools")
        if variables and self.artifact is not None:
            raise RequestError(f"model {self.name!r} is a compiled program: chat template variables are served on "
                               "base models only", param="chat_template_kwargs")
        if self.artifact is None:
            if not tokenizer.has_chat_template:
                raise RequestError(f"model {self.name!r} has no chat template: use /v1/completions")
            if tools and not tokenizer.takes_tools:
                raise RequestError(f"model {self.name!r}: this model's chat template does not take tools",
                                   param="tools")
            text = _render_text(tokenizer, messages, tools, variables)
            self._check_size(text, 0, "messages")
            return tokenizer.encode(text, add_special_tokens=False)
        if any(m["role"] == "system" for m in messages):
            raise RequestError(f"model {self.name!r} is a compiled program: its spec is the system message, "
                               "so send only user and assistant messages")
        layout = self.artifact.layout
        if layout.kind != "chat":
            if len(messages) != 1 or messages[0]["role"] != "user":
                raise RequestError(f"model {self.name!r} takes one user message (its input)")
            return self.completion_ids(messages[0]["content"], param="messages")
        from paw_mlx.programs.compile import program_messages

        # the conversation continues the prefix's: the spec and the demonstrations come first,
        # and its turns are laid out as theirs, each after its lead
        leads = {"user": layout.input_lead, "assistant": layout.output_lead}
        turns = [dict(m, content=leads.get(m["role"], "") + m["content"]) if isinstance(m.get("content"), str) else m
                 for m in messages]
        text = _render_text(tokenizer, [*program_messages(self.artifact.spec, self.artifact.demos,
                                                          (layout.input_lead, layout.output_lead)), *turns])
        if not text.startswith(layout.prefix_text):
            raise RequestError(f"the chat template of model {self.name!r} does not start with the program's "
                               "prefix for these messages")
        prefix, rest = self.prefix_ids, text[len(layout.prefix_text):]
        self._check_size(rest, len(prefix), "messages")
        return prefix + tokenizer.encode(rest, add_special_tokens=False)

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        """Prompt ids checked against the base's vocabulary (``LoadedProgram.check_ids``), as a 400."""
        try:
            return self.base.check_ids(ids, "prompt token ids")
        except InputError as exc:
            raise RequestError(str(exc), param="prompt") from None


def _render_text(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                 variables: dict[str, Any] | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, variables=variables)
    except PawError:
        raise
    except Exception as exc:  # jinja2 raises many types (and templates call raise_exception)
        raise RequestError(f"the chat template rejected these messages: {exc}") from None


# ---------------------------------------------------------------------- catalog


class ModelCatalog:
    """Model names to ``ServedModel``s: base programs and the compiled programs on them."""

    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}
        self._aliases: dict[str, str] = {}
        self._stacks: dict[int, AdapterStack] = {}  # id(base) -> its adapters

    def __iter__(self):
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    @property
    def bases(self) -> list[LoadedProgram]:
        seen: dict[int, LoadedProgram] = {}
        for model in self._models.values():
            seen.setdefault(id(model.base), model.base)
        return list(seen.values())

    def stack(self, base: LoadedProgram) -> AdapterStack:
        """The adapters served on ``base`` (one object per base, shared by its models)."""
        return self._stacks.setdefault(id(base), AdapterStack(base))

    def add(self, model: ServedModel) -> ServedModel:
        if model.name in self._models or model.name in self._aliases:
            raise PawError(f"two models are named {model.name!r}: rename one of the directories")
        model.adapters = self.stack(model.base)
        self._models[model.name] = model
        for alias in model.aliases:
            if alias not in self._models and alias not in self._aliases:
                self._aliases[alias] = model.name
        return model

    def remove(self, name: str) -> None:
        """Stop answering to ``name`` (requests already running finish)."""
        model = self._models.pop(name)
        for alias in model.aliases:
            self._aliases.pop(alias, None)

    def add_base(self, prog: LoadedProgram, name: str | None = None) -> ServedModel:
        """Serve ``prog`` as ``name`` (one with recurrent state prefills each prompt alone:
        ``paw_mlx/engine/engine.py``)."""
        name = name or prog.path.name
        aliases = tuple(a for a in {prog.name} if a != name)
        if prog.has_tokenizer:
            _ = prog.tokenizer.max_token_bytes  # read from the vocabulary now, not on the first request
        return self.add(ServedModel(name=name, base=prog, aliases=aliases))

    def add_program(self, directory: str | Path, name: str | None = None) -> ServedModel:
        """A compiled program whose base is already served (matched by fingerprint)."""
        from paw_mlx.programs.artifact import check_against_base, read_artifact

        artifact = read_artifact(directory)  # its prefix evaluated: any thread (the engine's worker) reads it
        name = name or Path(directory).name
        for base in self.bases:
            if base.fingerprint == artifact.base_fingerprint:
                if getattr(base.model, "ranks", None):
                    raise ArtifactError(f"{directory}: compiled programs are not served on a model split over "
                                        "several processes yet (its prefix would have to be copied to every rank)")
                check_against_base(artifact, base)
                if name in self._models or name in self._aliases:
                    raise PawError(f"two models are named {name!r}: rename one of the directories")
                state = _prefix_state(base, artifact) if base.program.recurrent else None
                index = self.stack(base).add(artifact.adapter) if artifact.adapter is not None else 0
                return self.add(ServedModel(name=name, base=base, artifact=artifact, adapter_index=index,
                                            prefix_state=state))
        raise ArtifactError(f"{directory} was compiled for base model {artifact.base_fingerprint} "
                            f"({artifact.base_hint or 'unknown path'}), which is not served")

    def get(self, name: str) -> ServedModel:
        if not isinstance(name, str) or not name:
            raise RequestError("model must name a served model")
        model = self._models.get(name) or self._models.get(self._aliases.get(name, ""))
        if model is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise RequestError(f"no model named {name!r}; this server has: {known}", code="model_not_found")
        return model


def _prefix_state(base: LoadedProgram, artifact):
    """A program's prefix on a recurrent base, run now (ArtifactError if it cannot be rebuilt)."""
    from paw_mlx.programs.recurrent_prefix import program_prefix

    return program_prefix(base, artifact).build()


def user_texts(messages: Sequence[dict]) -> list[str]:
    """The text of a conversation's user turns: a compiled program's inputs, which its copy rule
    holds a reply to."""
    return [m["content"] for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
